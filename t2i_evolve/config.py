"""Pydantic configs loadable from YAML, with one-line errors that name the bad field."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Sequence, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from .errors import ConfigError, UserError
from .files import write_atomically

C = TypeVar("C", bound="Config")

MAX_PROMPTS = 10_000_000
"""The most prompts (or images) a count of them may ask for: EvolveDirector's uniform baseline at full scale. Past it
a number is a typo, which would otherwise sit for hours building a list in memory before showing any progress."""

FLAG_NAMES = {"output_dir": "--out", "base_url": "--endpoint", "timeout_s": "--timeout", "latency_s": "--latency"}
"""The config fields a command's flag sets under another name (else the flag is the field's name with dashes)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one silently: two
    `lr:` lines, and the run trains at the one the user did not mean)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: keys written after it override those
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:  # (a list as a key: PyYAML's own check below says so in one line)
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _checked_path(value: str) -> str:
    if not value.strip():
        raise ValueError("is empty: name a folder (an empty path is the current folder, where a run would write its "
                         "files among yours)")
    return os.path.expanduser(value)


PathText = Annotated[str, AfterValidator(_checked_path)]
"""A file or folder path in a config: `~` expanded (a YAML value passes no shell), and never empty."""


class Config(BaseModel):
    """Base of every config: unknown fields are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def from_yaml(cls: type[C], path: str | Path) -> C:
        return cls.from_dict(_read_yaml(Path(path)), source=str(path))

    @classmethod
    def load(cls: type[C], path: str | Path | None = None, overrides: Sequence[str] = ()) -> C:
        """The config in YAML file `path` (None: the defaults) with a command line's `key=value` overrides on top
        (`apply_override`); a bad value an override gave is named as it was typed."""
        data = _read_yaml(Path(path)) if path else {}
        for override in overrides:  # (a field the config has not: named as such, not as one the file leaves out)
            if (field := _key(override)[0]) and "=" in override and field not in cls.model_fields:
                close = difflib.get_close_matches(field, list(cls.model_fields), n=1, cutoff=0.75)
                raise ConfigError(f"{override!r} (command line): {cls.__name__} has no field {field!r}"
                                  + (f" (did you mean {close[0]!r}?)" if close else ""))
        try:
            for override in overrides:
                data = apply_override(cls._with_default(data, _key(override)[0]), override)
            return cls.model_validate(data)
        except RecursionError:  # (an anchor that holds itself: `a: &x [*x]`)
            raise ConfigError(f"{path or 'the command line'}: a value nests too deep, or holds itself") from None
        except ValidationError as e:
            at = [str(part) for part in e.errors()[0]["loc"]]
            given = [o for o in overrides if at and _key(o)[:len(at)] == at[:len(_key(o))]]  # (either one deeper)
            source = f"{given[-1]!r} (command line)" if given else str(path or "the command line")
            return cls.from_dict(data, source=source)

    @classmethod
    def _with_default(cls, data: object, field: str) -> object:
        """`data` with a nested config it leaves out written as the field's default (`sampler.guidance=5` keeps
        the default sampler's steps), so that an override changes what it names and nothing else."""
        info = cls.model_fields.get(field)
        if not isinstance(data, dict) or data.get(field) is not None or info is None:
            return data
        default = info.get_default(call_default_factory=True)
        if isinstance(default, BaseModel) or (isinstance(default, list) and default
                                              and all(isinstance(item, BaseModel) for item in default)):
            dumped = default.model_dump(mode="json", exclude_unset=True) if isinstance(default, BaseModel) else [
                item.model_dump(mode="json", exclude_unset=True) for item in default]
            return {**data, field: dumped}
        return data

    @classmethod
    def from_dict(cls: type[C], data: object, source: str = "config") -> C:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of fields, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            field, message = ".".join(str(p) for p in first["loc"]), first["msg"].removeprefix("Value error, ")
            if source.endswith("flags") and first["loc"]:  # a command's flags: named as the user typed them
                name = str(first["loc"][-1])
                raise ConfigError(f"{source}: {FLAG_NAMES.get(name, '--' + name.replace('_', '-'))}: {message}") from None
            raise ConfigError(f"{source}: field '{field}': {message}" if field else f"{source}: {message}") from None

    def updated(self: C, source: str = "flags", **changes) -> C:
        """A copy with `changes` (a command's flags over its config file), checked as the file's fields are."""
        return type(self).from_dict(self.model_dump() | changes, source=source)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def save(self, path: str | Path) -> None:
        """Write as YAML, atomically: a run folder's config is what a rerun is checked against, so a kill
        mid-write must not leave half of one."""
        write_atomically(path, self.to_yaml())


def _read_yaml(path: Path) -> object:
    """A config file's contents: every unreadable case one line naming the file."""
    if not path.is_file():
        raise ConfigError(f"{path} is a folder, not a config file" if path.is_dir() else
                          f"{path} is not a regular file (a YAML config is)" if path.exists() else
                          f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}): save it as UTF-8 YAML") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"bad YAML in {path}{where}: {getattr(e, 'problem', e)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: a value nests too deep") from None
    _check_size(data, str(path))
    return {} if data is None else data  # (an empty file: every field's default)


MAX_CONFIG_VALUES = 100_000
"""Values a config may hold once its YAML aliases are expanded: thousands of times any real config's. Ten anchors of
ten aliases each are a few lines that expand to 10^10 values, which validating (or copying) would take hours over."""


def _check_size(data: object, where: str) -> None:
    """A one-line ConfigError for YAML whose aliases expand past `MAX_CONFIG_VALUES` (counted once per shared value)."""
    sizes: dict[int, int] = {}

    def size(value: object) -> int:
        if not isinstance(value, (dict, list)):
            return 1
        if id(value) not in sizes:
            sizes[id(value)] = 0  # (a value that holds itself counts as one more: YAML can say `a: &x [*x]`)
            sizes[id(value)] = 1 + sum(size(item) for item in (value.values() if isinstance(value, dict) else value))
        return sizes[id(value)]
    if size(data) > MAX_CONFIG_VALUES:
        raise ConfigError(f"{where}: its aliases (*name) expand to over {MAX_CONFIG_VALUES:,} values: write the config "
                          "out plainly")


def _key(override: str) -> list[str]:
    return [part.strip() for part in override.partition("=")[0].split(".")]


def _copied(value):
    """A deep copy that shares nothing: YAML anchors (`*s`) would otherwise carry one override to every alias."""
    if isinstance(value, dict):
        return {key: _copied(item) for key, item in value.items()}
    return [_copied(item) for item in value] if isinstance(value, list) else value


def apply_override(data: object, override: str) -> dict:
    """A copy of `data` (a config file's fields) with one command line's `key=value` set: `lr=1e-5`,
    `judge.kind=openai` (into a nested config, made where the file has none), `teachers.0.p=0.7` (an item of a list
    the file gives). The value is read as YAML (`null`, `[a, b]`, `{rank: 16}`), as it would be in the file."""
    path, (_, sep, text) = _key(override), override.partition("=")
    if not sep or not all(path):
        raise ConfigError(f"{override!r}: an override is key=value (lr=1e-5, judge.kind=openai, teachers.0.p=0.7)")
    if not isinstance(data, dict):
        raise ConfigError(f"{override!r}: the config file holds no mapping of fields to set it in")
    try:
        value = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{override!r}: its value is not YAML ({getattr(e, 'problem', e)})") from None
    _check_size(value, repr(override))
    data = _copied(data)
    node = data
    for depth, part in enumerate(path):
        last, where = depth == len(path) - 1, ".".join(path[:depth + 1])
        if isinstance(node, list):
            if not (part.isascii() and part.isdigit() and int(part) < len(node)):
                raise ConfigError(f"{override!r}: {where}: no such item (the list has {len(node)})")
            part = int(part)
        elif last or node.get(part) is None:  # (a nested config the file leaves out: made)
            if not last and path[depth + 1].isascii() and path[depth + 1].isdigit():
                raise ConfigError(f"{override!r}: {where} is not in the config file: give the whole list "
                                  f"({where}='[...]')")
            node[part] = value if last else {}
        if not last:
            node = node[part]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"{override!r}: {where} is {node!r}, which has no fields")
    if isinstance(node, list):
        node[int(path[-1])] = value
    return data


def check_resumed_config(path: Path, config: Config, may_change: dict | set) -> None:
    """A run folder resumed under another config would mix two runs in one folder (a ledger, a checkpoint):
    refuse in one line, naming what differs. `path`: the config the folder was started with; `may_change` (a
    pydantic `exclude`): what a rerun may set anew, such as more rounds or steps, a larger budget, another
    device or endpoint. A config this version does not validate (another version's: a field since renamed, or one
    a user edited) is compared on the fields both know; one that is not YAML at all stops the rerun."""
    if not path.is_file():
        return
    now = config.model_dump(exclude=may_change)
    try:
        before = type(config).from_yaml(path).model_dump(exclude=may_change)
    except UserError:
        try:
            before = _read_yaml(path)
        except ConfigError as e:
            raise ConfigError(f"{e} (the config {path.parent} was started with: fix it, or delete it to resume under "
                              "this one)") from None
        before, now = _common(before, config.model_dump(mode="json", exclude=may_change))
    changed = list(_differences(before, now))
    if changed:
        raise UserError(f"{path.parent} was started with another config ({'; '.join(changed[:3])}): rerun it with "
                        f"the config in {path}, or start a new run folder")


def _common(old, new) -> tuple:
    """`old` and `new` cut to what both hold: the keys of both mappings, the items of lists of one length."""
    if isinstance(old, dict) and isinstance(new, dict):
        pairs = {key: _common(old[key], new[key]) for key in old if key in new}
        return {key: a for key, (a, _) in pairs.items()}, {key: b for key, (_, b) in pairs.items()}
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        pairs = [_common(a, b) for a, b in zip(old, new)]
        return [a for a, _ in pairs], [b for _, b in pairs]
    return old, new


def _differences(old, new, where: str = ""):
    """'field.sub[0].leaf: old -> new' for each value that differs, down to the leaves (an endpoint's model, not
    the whole judge spec cut at 40 characters)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*new, *(key for key in old if key not in new)]:
            yield from _differences(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            yield from _differences(a, b, f"{where}[{i}]")
    elif old != new:
        yield f"{where}: {old!r:.40} -> {new!r:.40}"
