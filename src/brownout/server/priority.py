"""The service yields the CPU to the models it started: ``models.local.api_nice``.

On a small machine the local model servers and the service share the same cores. Under load the
service always has something to do -- every refusal, rule-based or cached answer is answered at once,
and a client answered at once comes straight back -- so at equal priority it takes a core's worth of
time the models needed, and a model whose threads are pre-empted mid-token slows down for everyone
(llama.cpp's threads wait for each other at every step). The model answers are the scarce part; the
cheap answers can be made from what the models leave.

So ``brownout serve`` lowers the priority (the Unix *nice* value) of its own threads by
``models.local.api_nice`` steps once it has started -- by default 10 when a local model server runs
more than one thread, the case where pre-emption stalls a model, and no CPU budget holds the
service's own work (``dimmer.cpu_budget``, which does the same job with less delay for the quick
answers; see :meth:`~brownout.config.LocalModelsSection.effective_api_nice`), else none -- and its
model servers keep the priority it began with: they are started from a thread that is left alone
(:func:`brownout.llm.local.spawner_thread_id`), also when one is restarted later. Threads the
service starts afterwards inherit the lower priority. Nothing here needs privileges: any process may
lower its own priority (raising it back would need them, which is why the models' thread is kept
apart rather than restored).

Linux only (per-thread priorities through ``/proc/self/task``); elsewhere nothing changes. With
``api_nice: 0``, or when every role uses external endpoints (no local model to yield to), nothing
changes either.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Collection
from dataclasses import dataclass

from brownout.llm.local import spawner_thread_id

__all__ = ["Yielded", "lower_own_priority", "yield_to_models"]

_log = logging.getLogger("brownout.server")
_MAX_NICE = 19


@dataclass(frozen=True, slots=True)
class Yielded:
    """What :func:`lower_own_priority` did: the threads lowered, to which nice value."""

    threads: int
    nice: int


def lower_own_priority(steps: int, *, keep: Collection[int] = ()) -> Yielded | None:
    """Lower the priority of every thread of this process by ``steps`` nice steps (at most to 19),
    except the threads whose native ids are in ``keep``; None when nothing could be changed here
    (not Linux, ``steps`` 0, or no thread could be lowered)."""
    if steps <= 0 or not sys.platform.startswith("linux"):
        return None
    try:
        tids = [int(name) for name in os.listdir("/proc/self/task")]
    except OSError:
        return None
    lowered = 0
    nice = 0
    for tid in tids:
        if tid in keep:
            continue
        try:
            current = os.getpriority(os.PRIO_PROCESS, tid)
            nice = min(current + steps, _MAX_NICE)
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except (ProcessLookupError, PermissionError):  # the thread ended meanwhile, or a sandbox
            continue
        lowered += 1
    if not lowered:
        return None
    return Yielded(threads=lowered, nice=nice)


def yield_to_models(steps: int, has_local_models: bool) -> Yielded | None:
    """``brownout serve``'s use of :func:`lower_own_priority`: only when it runs local model
    servers, keeping the thread that starts them; says what it did in one log line."""
    if not has_local_models or steps <= 0:
        return None
    done = lower_own_priority(steps, keep=(spawner_thread_id(),))
    if done is not None:
        _log.info(
            "the service's %d threads run at nice %d, below its local model servers "
            "(models.local.api_nice: %d)",
            done.threads,
            done.nice,
            steps,
        )
    return done
