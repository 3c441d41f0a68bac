"""When a test is about to hit the suite's timeout, print what each of its asyncio tasks awaits.

pytest-timeout prints every thread's stack when a test runs out of time; for an async test that
usually shows only the event loop idle in ``select`` -- every task waits on something that never
comes, and the thread dump cannot say what. :class:`HangReporter` fires a little before the timeout,
finds the event loop that the main thread is running, and has the loop itself print every task's
stack (scheduled with ``call_soon_threadsafe``, so the tasks are read on their own thread and a loop
idle in ``select`` wakes up for it). A loop that is busy rather than idle never runs the report, and
pytest-timeout's thread dump is then the one that tells.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import sys
import threading
from types import FrameType

__all__ = ["HangReporter"]


def _running_loop(thread: threading.Thread) -> asyncio.AbstractEventLoop | None:
    """The event loop whose ``run_forever`` is on ``thread``'s stack, if any."""
    frame: FrameType | None = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, asyncio.AbstractEventLoop) and candidate.is_running():
            return candidate
        frame = frame.f_back
    return None


def _awaiting(task: asyncio.Task[object]) -> list[str]:
    """Where ``task`` is suspended, outermost call first, down the chain of awaits.

    ``Task.print_stack`` shows only the task's own coroutine frame; the await that never returns is
    usually several calls further down, so follow ``cr_await`` (and generators' ``gi_yieldfrom``).
    """
    lines: list[str] = []
    current: object = task.get_coro()
    while current is not None and len(lines) < 60:
        frame = getattr(current, "cr_frame", None) or getattr(current, "gi_frame", None)
        frame = frame or getattr(current, "ag_frame", None)
        if frame is not None:
            code = frame.f_code
            lines.append(f"  {code.co_filename}:{frame.f_lineno} in {code.co_name}")
        nxt = getattr(current, "cr_await", None) or getattr(current, "gi_yieldfrom", None)
        current = nxt or getattr(current, "ag_await", None)
        if current is not None and frame is None:
            lines.append(f"  awaiting {current!r}")
    return lines


def _print_tasks(title: str) -> None:
    out = io.StringIO()
    tasks = asyncio.all_tasks()
    print(f"\n==== {title}: {len(tasks)} asyncio tasks pending ====", file=out)
    for task in tasks:
        print(f"---- {task!r}", file=out)
        for line in _awaiting(task):
            print(line, file=out)
    sys.stderr.write(out.getvalue())
    sys.stderr.flush()


class HangReporter:
    """A timer that reports the main thread's asyncio tasks ``lead`` seconds before a test's timeout."""

    def __init__(self, title: str, timeout: float, *, lead: float = 10.0) -> None:
        self._title = title
        self._timer = threading.Timer(max(timeout - lead, timeout * 0.8), self._fire)
        self._timer.daemon = True
        self._thread = threading.main_thread()

    def start(self) -> None:
        """Arm the timer."""
        self._timer.start()

    def cancel(self) -> None:
        """Disarm it (the test ended in time)."""
        self._timer.cancel()

    def _fire(self) -> None:
        loop = _running_loop(self._thread)
        if loop is None:
            return
        # RuntimeError: the loop closed meanwhile, so the test got past its await after all.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_print_tasks, f"{self._title} is about to time out")
