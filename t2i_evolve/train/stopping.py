"""Ctrl-C during training: finish the step, save a checkpoint, then stop, so the rerun goes on from there.

A `KeyboardInterrupt` raised wherever Python happens to be could land inside an optimizer step (some weights
updated, others not): a checkpoint saved then would hold a state no run ever reached. So the first Ctrl-C only
asks; the loop stops at the next step's end, saves, and raises `KeyboardInterrupt` itself. A second Ctrl-C
stops at once, from the last checkpoint, as before.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ..progress import console


@contextmanager
def stop_at_a_step_end(enabled: bool = True) -> Iterator[Callable[[], bool]]:
    """Yields `asked()`: whether Ctrl-C was pressed (once) since it began. Only in the main thread, where Python
    runs signal handlers, and where `enabled`: several processes would each stop at a step of their own (one
    saving while another waits at the next gradient sync), so a launched run stops as a kill does; and only over
    Python's own handler (a process that ignores SIGINT, as a script's background job does, still ignores it)."""
    if not (enabled and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
        yield lambda: False
        return
    pressed = threading.Event()

    def ask(signum, frame) -> None:
        pressed.set()
        signal.signal(signal.SIGINT, previous)  # (a second Ctrl-C: at once)
        console.print("stopping after this step, with a checkpoint (Ctrl-C again: at once, from the last one)",
                      markup=False, highlight=False)

    previous = signal.signal(signal.SIGINT, ask)
    try:
        yield pressed.is_set
    finally:
        if signal.getsignal(signal.SIGINT) is ask:
            signal.signal(signal.SIGINT, previous)
