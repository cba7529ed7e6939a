"""Dynamic batching per model, with per-sample adaptive depth.

Requests (:class:`WorkItem`, one per request, ``n`` samples each) wait in a bounded queue. One
worker task per model forms a batch and hands it to the model's single solve thread:

- A batch holds whole requests of **one solver** (one solve runs one solver), oldest first, up to
  ``max_batch_size`` samples. Requests for another solver keep their place for the next batch.
- The worker solves as soon as the batch is full, or when the oldest queued request has waited
  ``max_queue_delay``. While a batch is being solved, new requests queue, so under load batches
  fill by themselves and the delay is never waited for.
- Every sample keeps its request's ``tol`` and ``max_iter`` (per-sample tensors): samples stop
  independently and leave the active set (SPEC §5), so a sample gets the same iterations in any
  batch.
- ``deadline_ms`` is a latency budget, never an error: when its batch starts, a sample's
  ``max_iter`` is capped to the iterations that fit in the time left (estimated from the
  measured cost of an iteration), at least 1. A sample whose deadline passed while it was queued
  therefore gets one iteration and, unless that met its ``tol``, ``converged: false``.
- The queue is bounded in samples (``max_queue_size``); a request that does not fit is refused
  at once with :class:`~service.errors.QueueFull` (503 + ``Retry-After``), never queued.
- Stopping (graceful shutdown) refuses new requests, then solves everything already queued.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from .backends import BatchRequest, BatchResult
from .errors import InternalError, NotReady, QueueFull
from .metrics import Metrics

log = logging.getLogger("fpn_serve.batcher")

SolveFn = Callable[[BatchRequest], BatchResult]


@dataclass(eq=False)
class WorkItem:
    """One request's samples. x: (n, *input.shape) float32 in [0, 1]."""

    x: np.ndarray
    tol: float
    max_iter: int
    solver: str
    deadline: float | None = None  # absolute time.perf_counter() seconds
    enqueued: float = 0.0
    future: asyncio.Future[ItemResult] | None = None

    @property
    def n(self) -> int:
        return int(self.x.shape[0])


@dataclass(frozen=True)
class ItemResult:
    """One request's share of a batch result; arrays have the request's ``n`` rows."""

    probabilities: np.ndarray
    iterations: np.ndarray
    residual: np.ndarray
    converged: np.ndarray
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    queue_seconds: float = 0.0
    solve_seconds: float = 0.0
    batch_id: int = 0
    batch_size: int = 0


class Batcher:
    """Queue + worker for one model. ``solve`` runs on ``executor`` (one thread), never on the loop.

    ``solve`` is looked up through a callable so that a reload can swap the backend between
    batches.
    """

    def __init__(
        self,
        model: str,
        solve: SolveFn,
        executor: Executor,
        *,
        max_batch_size: int,
        max_queue_delay_ms: float,
        max_queue_size: int,
        metrics: Metrics,
    ) -> None:
        self.model = model
        self._solve = solve
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay_ms / 1000.0
        self.max_queue_size = max_queue_size
        self._metrics = metrics
        self._depth = metrics.queue_depth.labels(model)
        self._queues: dict[str, deque[WorkItem]] = {}
        self._queued = 0  # samples waiting, over all solvers
        self._queued_by_solver: dict[str, int] = {}
        self._wakeup = asyncio.Event()
        self._closing = False
        self._worker: asyncio.Task[None] | None = None
        self._batch_id = 0
        self.seconds_per_iteration = 0.0  # running estimates, for deadlines (0: unknown)
        self.seconds_per_batch = 0.0

    # --- submitting ---------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        """Samples waiting."""
        return self._queued

    @property
    def batches(self) -> int:
        """Batches started so far."""
        return self._batch_id

    def submit(self, item: WorkItem) -> asyncio.Future[ItemResult]:
        """Queue ``item``; its future resolves to its :class:`ItemResult`.

        Raises :class:`QueueFull` when its samples do not fit, :class:`NotReady` when stopping.
        """
        check_admission(self.model, item, self._closing, self._queued, self.max_queue_size,
                        self._retry_after)  # fmt: skip
        item.enqueued = time.perf_counter()
        item.future = asyncio.get_running_loop().create_future()
        self._queues.setdefault(item.solver, deque()).append(item)
        self._queued += item.n
        self._queued_by_solver[item.solver] = self._queued_by_solver.get(item.solver, 0) + item.n
        self._depth.set(self._queued)
        self._wakeup.set()
        return item.future

    def _retry_after(self) -> int:
        """Seconds until the queue has likely drained (a rough estimate, at least 1)."""
        batches = math.ceil(self._queued / self.max_batch_size)
        return max(1, math.ceil(batches * self.seconds_per_batch))

    def observe_cost(self, seconds: float, iterations: int) -> None:
        """Update the running cost estimates from one solve of ``iterations`` (its slowest
        sample's) taking ``seconds`` (also fed by warm-up)."""
        per_iteration = seconds / max(1, iterations)
        if self.seconds_per_iteration == 0:
            self.seconds_per_iteration, self.seconds_per_batch = per_iteration, seconds
        else:
            self.seconds_per_iteration = 0.8 * self.seconds_per_iteration + 0.2 * per_iteration
            self.seconds_per_batch = 0.8 * self.seconds_per_batch + 0.2 * seconds

    # --- the worker ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(
                self._run(), name=f"batcher-{self.model}"
            )

    async def stop(self) -> None:
        """Refuse new requests, solve what is queued, then end the worker."""
        self._closing = True
        self._wakeup.set()
        if self._worker is not None:
            await self._worker
            self._worker = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queued:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            solver, head = self._oldest()
            # Wait for the batch to fill, at most until the oldest request has waited the delay.
            while self._queued_by_solver[solver] < self.max_batch_size and not self._closing:
                remaining = head.enqueued + self.max_queue_delay - time.perf_counter()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                timer = loop.call_later(remaining, self._wakeup.set)
                await self._wakeup.wait()
                timer.cancel()
            items = self._take(solver)
            if not items:
                continue
            try:
                await self._solve_batch(items, solver)
            except Exception:  # never let one batch kill the worker
                log.exception("batch bookkeeping failed on %s", self.model)
                _fail(items, self.model)

    def _oldest(self) -> tuple[str, WorkItem]:
        heads = [(q[0].enqueued, s) for s, q in self._queues.items() if q]
        _, solver = min(heads)
        return solver, self._queues[solver][0]

    def _take(self, solver: str) -> list[WorkItem]:
        queue, items, size = self._queues[solver], [], 0
        while queue and size + queue[0].n <= self.max_batch_size:
            item = queue.popleft()
            self._queued -= item.n
            self._queued_by_solver[solver] -= item.n
            if item.future is not None and item.future.done():  # client went away
                continue
            items.append(item)
            size += item.n
        self._depth.set(self._queued)
        return items

    async def _solve_batch(self, items: list[WorkItem], solver: str) -> None:
        start = time.perf_counter()
        self._batch_id += 1
        batch_id = self._batch_id
        counts = [item.n for item in items]
        x = items[0].x if len(items) == 1 else np.concatenate([item.x for item in items])
        tol = np.repeat(np.array([item.tol for item in items], dtype=np.float64), counts)
        max_iter = np.repeat(
            np.array([self._iteration_cap(item, start) for item in items], dtype=np.int64), counts
        )
        request = BatchRequest(x=x, tol=tol, max_iter=max_iter, solver=solver)
        try:
            result, seconds = await asyncio.get_running_loop().run_in_executor(
                self._executor, _timed, self._solve, request
            )
        except Exception:
            log.exception("solve failed for a batch of %d samples on %s", len(x), self.model)
            _fail(items, self.model)
            return
        if result.iterations.size:
            self.observe_cost(seconds, int(result.iterations.max()))
        queue_seconds = [start - item.enqueued for item in items]
        offset = 0
        for item, waited in zip(items, queue_seconds, strict=True):
            rows = slice(offset, offset + item.n)
            offset += item.n
            if item.future is None or item.future.done():
                continue
            item.future.set_result(
                ItemResult(
                    probabilities=result.probabilities[rows],
                    iterations=result.iterations[rows],
                    residual=result.residual[rows],
                    converged=result.converged[rows],
                    extras={k: v[rows] for k, v in result.extras.items()},
                    queue_seconds=waited,
                    solve_seconds=seconds,
                    batch_id=batch_id,
                    batch_size=len(x),
                )
            )
        self._metrics.observe_batch(
            self.model,
            solve_seconds=seconds,
            queue_seconds=queue_seconds,
            iterations=result.iterations,
            residual=result.residual,
            converged=result.converged,
        )

    def _iteration_cap(self, item: WorkItem, now: float) -> int:
        """``max_iter``, capped by what fits before the item's deadline (at least 1)."""
        if item.deadline is None:
            return item.max_iter
        remaining = item.deadline - now
        if remaining <= 0:
            return 1
        if self.seconds_per_iteration <= 0:
            return item.max_iter
        return max(1, min(item.max_iter, int(remaining / self.seconds_per_iteration)))


def check_admission(
    model: str,
    item: WorkItem,
    closing: bool,
    queued: int,
    limit: int,
    retry_after: Callable[[], int],
) -> None:
    """Refuse ``item`` when the scheduler is stopping (:class:`NotReady`) or its samples do not
    fit in the queue (:class:`QueueFull`, with a ``Retry-After`` estimate)."""
    if closing:
        raise NotReady(f"model {model!r} is shutting down; retry on another replica")
    if queued + item.n > limit:
        raise QueueFull(
            f"model {model!r} has {queued} samples queued (limit {limit}); retry later",
            retry_after=retry_after(),
        )


def _fail(items: list[WorkItem], model: str) -> None:
    for item in items:
        if item.future is not None and not item.future.done():
            item.future.set_exception(InternalError(f"model {model!r} failed to solve this batch"))


def _timed(solve: SolveFn, request: BatchRequest) -> tuple[BatchResult, float]:
    start = time.perf_counter()
    result = solve(request)
    return result, time.perf_counter() - start
