"""A teacher behind an OpenAI-compatible images endpoint (a hosted API, or a local server that speaks it).

`OpenAIImageTeacher` is a `Generator`: wrap it in `CachedGenerator` and it gets the same call cache,
retries, budget and price accounting as the procedural gallery, so a rerun never pays for an image
twice. Within one `generate` call the requests go out concurrently through the async client, at most
`endpoint.max_concurrency` at a time.

A failure of one request does not throw away the others that were paid for: an item that failed with
a transient error (429, 5xx, timeout) comes back as None and the cache retries that item alone; only
when every item failed transiently is the `TransientError` raised (so the cache records why). An item
the server refused alone (a content policy's 400, a reply that is not an image) is None too, and
`outcomes` tells the cache why, so it records that item as failed and does not resend it. An error that
every request would meet (a bad key, an unknown model) is raised as `EndpointError`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from collections.abc import Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image, ImageOps
from pydantic import Field

from ..config import Config
from ..endpoints import EndpointConfig, make_async_client, safe_url
from ..errors import RequestRefused, TransientError
from .remote import endpoint_errors


class OpenAIImageTeacherConfig(Config):
    """An image model behind `client.images.generate`."""

    endpoint: EndpointConfig
    size: str = Field("1024x1024", pattern=r"^(\d+x\d+|auto)$", description="Size asked of the server.")
    resolution: int | None = Field(
        None, ge=8, description="Square side images are center-cropped and resized to; None keeps the server's."
    )
    send_seed: bool = Field(True, description="Send the seed in the body, for servers that honour it (not OpenAI's).")
    send_response_format: bool = Field(
        True, description="Ask for b64_json; off for servers that reject it (gpt-image-1 always returns base64)."
    )
    price_per_call: float = Field(0.0, ge=0, description="Price of one image, for budgets and `ledger stats`.")
    id: str | None = Field(None, description="Cache id; by default it names the model, size and resolution.")


class OpenAIImageTeacher:
    """A `Generator` over an OpenAI-compatible images endpoint (b64 PNGs in, RGB images out).

    The default `id` names the model, the size asked for and the resolution kept, so changing any of
    them changes the cache key. Servers that ignore the seed still give one cached image per (prompt,
    seed): the cache, not the server, makes a rerun reproducible.
    """

    def __init__(self, config: OpenAIImageTeacherConfig):
        self.config = config
        resolution = f":{config.resolution}px" if config.resolution else ""
        self.id = config.id or f"openai-images:{config.endpoint.model}:{config.size}{resolution}"
        self.price_per_call = config.price_per_call

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image | None]:
        """One image per (prompt, seed); None for an item that failed alone (see module doc)."""
        return [None if isinstance(outcome, Exception) else outcome for outcome in self.outcomes(prompts, seeds)]

    def outcomes(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image | Exception]:
        """Each item's image, or why it failed alone: a `TransientError` (worth resending) or a
        `RequestRefused` (not). Raises what every item met: an `EndpointError`, or a `TransientError`."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if not prompts:
            return []
        outcomes = _run(self._generate_all(list(prompts), [int(s) for s in seeds]))
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, (TransientError, RequestRefused)):
                raise outcome
        if all(isinstance(outcome, TransientError) for outcome in outcomes):
            raise outcomes[0]
        return outcomes

    async def _generate_all(self, prompts: list[str], seeds: list[int]) -> list[Any]:
        """Each item's image or exception, with at most `max_concurrency` requests in flight."""
        endpoint = self.config.endpoint
        limit = asyncio.Semaphore(endpoint.max_concurrency)
        async with make_async_client(endpoint) as client:

            async def one(prompt: str, seed: int) -> Image.Image:
                async with limit:
                    with endpoint_errors(endpoint):
                        response = await client.images.generate(
                            model=endpoint.model, prompt=prompt, size=self.config.size, n=1, **self._options(seed)
                        )
                return self._decode(response)

            return await asyncio.gather(*(one(p, s) for p, s in zip(prompts, seeds)), return_exceptions=True)

    def _options(self, seed: int) -> dict:
        options: dict[str, Any] = {}
        if self.config.send_response_format:
            options["response_format"] = "b64_json"
        if self.config.send_seed:
            options["extra_body"] = {"seed": seed}
        return options

    def _decode(self, response: Any) -> Image.Image:
        where = safe_url(self.config.endpoint.base_url)
        data = getattr(response, "data", None)
        b64 = getattr(data[0], "b64_json", None) if isinstance(data, list) and data else None
        if not isinstance(b64, str) or not b64:
            raise RequestRefused(f"{where}: the images reply holds no b64_json image")
        try:
            image = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
            image.load()
        except (binascii.Error, OSError, ValueError, Image.DecompressionBombError) as e:
            raise RequestRefused(f"{where}: the images reply is not an image we can read ({e})") from None
        image = image.convert("RGB")
        side = self.config.resolution
        if side and image.size != (side, side):
            image = ImageOps.fit(image, (side, side), Image.Resampling.LANCZOS)
        return image


def _run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run `coroutine` to completion, also when called from code that already runs an event loop
    (a notebook): then it runs on a loop of its own in a helper thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()
