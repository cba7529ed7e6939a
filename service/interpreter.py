"""Interpreter settings for a serving process, applied once the models are loaded.

Two CPython defaults cost a busy server much of a core (measured with ``bench/engine_ab.py``):

- **The cyclic garbage collector** runs a young-generation pass every 700 net allocations of
  container objects, and every few hundred passes a full one that walks every object alive: the
  models, the app, every library's tables. With 64 requests in flight (each a parsed JSON body,
  a scope, coroutines, futures) the passes came every request or two, and a py-spy profile put
  15 % of the event loop's time in them. Objects alive after start-up are frozen out of the
  collector's view and the young-generation threshold is raised; refcounting still frees
  everything acyclic at once, so memory does not grow with it.
- **The GIL switch interval** (5 ms): the engine thread releases the GIL inside every torch op
  and must get it back before the next one; while the event loop is busy it waits up to the
  whole interval each time.
"""

from __future__ import annotations

import gc
import logging
import sys

log = logging.getLogger("fpn_serve")


def tune_for_serving(*, gc_threshold: int, switch_interval_ms: float) -> None:
    """Freeze what start-up allocated, then apply the collector threshold and switch interval.
    Process-wide: call it from the process that serves, once its models are loaded."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(gc_threshold, older, oldest)
    sys.setswitchinterval(switch_interval_ms / 1000)
    log.debug("gc: %d objects frozen, threshold %s; switch interval %g ms",
              gc.get_freeze_count(), gc.get_threshold(), switch_interval_ms)  # fmt: skip
