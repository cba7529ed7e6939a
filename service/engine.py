"""Iteration-level scheduling: samples join and leave the running solve at every iteration.

One :class:`Engine` per model owns a pool of sample rows and a thread that loops:

1. **admit**: queued requests move into free rows (up to ``max_batch_size`` rows in the solve);
   their prologue (injection ``Q(x)``, ``z0``) runs once, here, for all newcomers together;
2. **step**: one solver step (the family's :class:`~models.solvers.Stepper`) on every occupied
   row; each row keeps its own solver state (Anderson's history starts fresh in a new row);
3. **retire**: every row that stops (``tol``, ``max_iter``, deadline, non-finite, or its request
   was cancelled) leaves the pool; its readout runs and its request is answered as soon as all of
   its samples have left. The freed rows are refilled at the next iteration.

A sample's result is therefore the one it gets solved alone (rows never interact: SPEC §5),
whatever joins or leaves around it, and a loose-tolerance request no longer waits for a strict
one that happened to share its batch. Requests of different solvers run in separate pools that
take turns, one step each, in the same loop.

Rows are kept contiguous in buffers allocated once per pool: the step runs on ``buffer[:rows]``
views (no gather). A leaving row leaves a hole that the next newcomers fill; only holes nobody
filled are closed, by moving the last rows in (a copy of the rows that moved, not of the pool).
The thread releases the GIL inside every torch op, so the event loop keeps parsing requests
while the pool computes.

Policy (which rows join, which leave) stays in plain Python over per-row tensors; execution is
the family's parts and stepper. The engine knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from models.solvers import Step, stop_rule

from .backends import SolveProgram
from .batcher import ItemResult, WorkItem, check_admission
from .errors import InternalError
from .metrics import Metrics

log = logging.getLogger("fpn_serve.engine")


@dataclass(eq=False)
class _Request:
    """An admitted request's progress: rows still running and the answers so far."""

    item: WorkItem
    joined: float
    iteration: int
    pool_size: int
    remaining: int
    outputs: dict[str, np.ndarray] = field(default_factory=dict)

    def cancelled(self) -> bool:
        """The client went away (its future was cancelled): its rows leave the solve."""
        return self.item.future is None or self.item.future.done()


Owner = tuple[_Request, int]
"""A row's request and the sample's index in it."""


class _Pool:
    """The rows of one solver (and one model generation), in ``buffers[:size]``.

    Per-row tensors: ``context`` (the prologue's), the stepper's state entries (``state.*``),
    ``tol``, ``max_iter``, ``iterations``, ``deadline`` (perf-counter seconds, inf if none).
    ``owners[i]`` is the request and sample of row ``i``, None for a hole: a row that left. A
    newcomer takes a hole first (its values are written anyway, so filling costs nothing), and
    :meth:`compact` moves rows only into holes no newcomer filled. Moving a row copies its
    whole solver state (an Anderson history is ``2·memory`` iterates), which cost a sixth of
    the engine thread at c64 when every departure moved one.
    """

    def __init__(self, program: SolveProgram, solver: str, capacity: int) -> None:
        self.program = program
        self.stepper = program.steppers[solver]
        self.capacity = capacity
        self.buffers: dict[str, Tensor] = {}
        self.owners: list[Owner | None] = []
        self.holes: list[int] = []

    @property
    def size(self) -> int:
        """Rows stepped: the occupied ones once :meth:`compact` has run."""
        return len(self.owners)

    @property
    def occupied(self) -> int:
        return len(self.owners) - len(self.holes)

    def rows(self, name: str) -> Tensor:
        return self.buffers[name][: self.size]

    def place(self, values: dict[str, Tensor], owners: list[Owner]) -> list[int]:
        """Write newcomers' rows, into holes first, then after the last row; their indices."""
        filled, self.holes = self.holes[: len(owners)], self.holes[len(owners) :]
        start = self.size
        positions = filled + list(range(start, start + len(owners) - len(filled)))
        index = _index(positions, values["tol"].device)
        for name, value in values.items():
            buffer = self.buffers.get(name)
            if buffer is None:
                buffer = value.new_empty((self.capacity, *value.shape[1:]))
                self.buffers[name] = buffer
            buffer[index] = value
        for position, owner in zip(filled, owners, strict=False):
            self.owners[position] = owner
        self.owners.extend(owners[len(filled) :])
        return positions

    def store_state(self, state: dict[str, Tensor]) -> None:
        """Write a step's new state into the buffers (entries updated in place are skipped)."""
        for name, value in state.items():
            rows = self.rows(f"state.{name}")
            if value.data_ptr() != rows.data_ptr():
                rows.copy_(value)

    def state(self) -> dict[str, Tensor]:
        return {name[6:]: self.rows(name) for name in self.buffers if name.startswith("state.")}

    def remove(self, leaving: list[int]) -> None:
        """Rows ``leaving`` become holes; holes at the end shrink the pool at once."""
        for position in leaving:
            self.owners[position] = None
        while self.owners and self.owners[-1] is None:
            self.owners.pop()
        self.holes = sorted(h for h in {*self.holes, *leaving} if h < self.size)

    def compact(self) -> None:
        """Move the last rows into the holes left, so that ``buffers[:size]`` is all occupied."""
        if not self.holes:
            return
        keep = self.occupied
        destinations = [h for h in self.holes if h < keep]
        sources = [i for i in range(keep, self.size) if self.owners[i] is not None]
        device = next(iter(self.buffers.values())).device
        # Index tensors, not slices: a gathered source is a copy, so the ranges may overlap.
        dst, src = (
            torch.tensor(p, dtype=torch.int64, device=device) for p in (destinations, sources)
        )
        for buffer in self.buffers.values():
            buffer[dst] = buffer[src]
        for destination, source in zip(destinations, sources, strict=True):
            self.owners[destination] = self.owners[source]
        del self.owners[keep:]
        self.holes = []


def _index(positions: list[int], device: torch.device) -> slice | Tensor:
    """Row positions as a slice when they are consecutive (a view), else an index tensor."""
    if positions and positions[-1] - positions[0] == len(positions) - 1:
        return slice(positions[0], positions[-1] + 1)
    return torch.tensor(positions, dtype=torch.int64, device=device)


class Engine:
    """Per-iteration solve scheduling for one model (module docstring).

    ``submit`` is called on the event loop; everything else of the solve runs on the engine's own
    thread. ``program`` is a callable returning the current :class:`SolveProgram`, so that a
    reload can swap the model: rows already running finish on the program they started with.
    """

    def __init__(
        self,
        model: str,
        program: SolveProgram,
        *,
        max_batch_size: int,
        max_queue_size: int,
        metrics: Metrics,
    ) -> None:
        self.model = model
        self.capacity = max_batch_size
        self.max_queue_size = max_queue_size
        self._program = program
        self._generation = 0
        self._metrics = metrics
        self._inbox: deque[WorkItem] = deque()
        self._lock = threading.Lock()
        self._queued = 0
        self._wakeup = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pools: dict[tuple[int, str], _Pool] = {}
        self.iterations = 0  # engine iterations (steps of the whole pool), for tests and metrics
        self.seconds_per_iteration = 0.0  # running estimate, for deadlines
        m = metrics
        self._depth = m.queue_depth.labels(model)
        self._active = m.engine_active_samples.labels(model)
        self._iteration_counter = m.engine_iterations.labels(model)
        self._batch_size = m.batch_size.labels(model)
        self._queue_seconds = m.queue_duration.labels(model)
        self._solve_seconds = m.solve_duration.labels(model)

    # --- on the event loop --------------------------------------------------------------------
    @property
    def queued(self) -> int:
        """Samples waiting to join the solve."""
        return self._queued

    @property
    def active(self) -> int:
        """Samples in the running solve."""
        return sum(pool.occupied for pool in self._pools.values())

    def submit(self, item: WorkItem) -> asyncio.Future[ItemResult]:
        """Queue ``item``; its future resolves to its :class:`ItemResult`. Cancelling the future
        takes the item's samples out of the queue or the running solve at the next iteration.

        Raises :class:`QueueFull` when its samples do not fit, :class:`NotReady` when stopping.
        """
        loop = self._loop = asyncio.get_running_loop()
        with self._lock:
            check_admission(self.model, item, self._closing, self._queued, self.max_queue_size,
                            self._retry_after)  # fmt: skip
            item.enqueued = time.perf_counter()
            item.future = loop.create_future()
            self._inbox.append(item)
            self._queued += item.n
            self._depth.set(self._queued)
        self._wakeup.set()
        return item.future

    def _retry_after(self) -> int:
        """Seconds until the queue has likely drained (a rough estimate, at least 1)."""
        rounds = math.ceil(self._queued / self.capacity)
        return max(1, math.ceil(rounds * 10 * self.seconds_per_iteration))

    def observe_cost(self, seconds: float, iterations: int) -> None:
        """Seed the per-iteration cost estimate (warm-up solves feed it)."""
        self._observe_iteration(seconds / max(1, iterations))

    def _observe_iteration(self, seconds: float) -> None:
        if self.seconds_per_iteration == 0:
            self.seconds_per_iteration = seconds
        else:
            self.seconds_per_iteration = 0.9 * self.seconds_per_iteration + 0.1 * seconds

    def swap(self, program: SolveProgram) -> None:
        """Serve ``program`` from now on; rows already running finish on the previous one."""
        with self._lock:
            self._program = program
            self._generation += 1

    def start(self) -> None:
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(
                target=self._run, name=f"engine-{self.model}", daemon=True
            )
            self._thread.start()

    async def stop(self) -> None:
        """Refuse new requests, finish every accepted sample, then end the thread."""
        self._closing = True
        self._wakeup.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None

    # --- on the engine thread -----------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                if not self.step_once():
                    if self._closing and not self._inbox:
                        return
                    self._wakeup.wait()
                    self._wakeup.clear()

    def step_once(self) -> bool:
        """Admit what is queued, then run one iteration over every occupied row; False when there
        was nothing to run. The engine thread's loop body (tests drive it by hand)."""
        self._admit()
        for pool in self._pools.values():
            pool.compact()
        pools = [p for p in self._pools.values() if p.size]
        if not pools:
            return False
        stepped = sum(pool.size for pool in pools)
        self._batch_size.observe(stepped)  # the samples this iteration steps
        start = time.perf_counter()
        for pool in pools:
            try:
                self._iterate(pool)
            except Exception:  # one failing step must not stop the engine
                log.exception("solve step failed on %s", self.model)
                self._fail(pool)
        self.iterations += 1
        self._observe_iteration(time.perf_counter() - start)
        self._iteration_counter.inc()
        self._active.set(self.active)
        for key in [k for k, p in self._pools.items() if not p.size and k[0] < self._generation]:
            del self._pools[key]  # a reloaded model's drained pools
        return True

    def _admit(self) -> None:
        """Move queued requests into free rows, oldest first, whole requests only."""
        free = self.capacity - self.active
        taken: list[WorkItem] = []
        with self._lock:
            while self._inbox and self._inbox[0].n <= free:
                item = self._inbox.popleft()
                self._queued -= item.n
                if item.future is not None and item.future.done():  # cancelled while queued
                    continue
                taken.append(item)
                free -= item.n
            self._depth.set(self._queued)
            program, generation = self._program, self._generation
        if not taken:
            self._active.set(self.active)
            return
        now = time.perf_counter()
        by_solver: dict[str, list[WorkItem]] = {}
        for item in taken:
            by_solver.setdefault(item.solver, []).append(item)
            self._queue_seconds.observe(now - item.enqueued)
        for solver, items in by_solver.items():
            try:
                self._join(program, generation, solver, items, now)
            except Exception:
                log.exception("admitting %d requests failed on %s", len(items), self.model)
                for item in items:
                    _fail_item(self._loop, item, self.model)

    def _join(
        self,
        program: SolveProgram,
        generation: int,
        solver: str,
        items: list[WorkItem],
        now: float,
    ) -> None:
        pool = self._pools.get((generation, solver))
        if pool is None:
            pool = self._pools[(generation, solver)] = _Pool(program, solver, self.capacity)
        x = np.concatenate([item.x for item in items]) if len(items) > 1 else items[0].x
        x_rows = torch.from_numpy(x).to(program.device, program.dtype)
        context, z0 = program.parts.prologue(x_rows)
        counts = [item.n for item in items]
        device = program.device

        def per_row(values: list[float], dtype: torch.dtype) -> Tensor:
            return torch.tensor(np.repeat(values, counts), dtype=dtype, device=device)

        tol = per_row([item.tol for item in items], torch.float64)
        started = pool.stepper.start(program.parts.step, z0, (context,), tol)
        step = started if isinstance(started, Step) else None
        state = started.state if isinstance(started, Step) else started
        owners: list[Owner] = []
        for item in items:
            request = _Request(item, now, self.iterations, self.active + len(owners), item.n)
            owners.extend((request, i) for i in range(item.n))
        deadlines = [math.inf if item.deadline is None else item.deadline for item in items]
        positions = pool.place(
            {
                "context": context,
                "tol": tol,
                "max_iter": per_row([item.max_iter for item in items], torch.int64),
                "iterations": torch.full_like(tol, step.cost if step else 0, dtype=torch.int64),
                "deadline": per_row(deadlines, torch.float64),
                **{f"state.{name}": value for name, value in state.items()},
            },
            owners,
        )
        if step is not None:  # the stepper's start evaluated f (an ODE's first stage)
            self._retire(pool, positions, step)

    def _iterate(self, pool: _Pool) -> None:
        parts = pool.program.parts
        context = (pool.rows("context"),)
        step = pool.stepper.step(parts.step, pool.state(), context, pool.rows("tol"))
        pool.store_state(step.state)
        pool.rows("iterations").add_(step.cost)
        self._retire(pool, range(pool.size), step)

    def _retire(self, pool: _Pool, positions: Sequence[int], step: Step) -> None:
        """Rows ``positions`` were just evaluated by ``step`` (its outputs in that order): answer
        the ones that stop, drop the ones whose request was cancelled; admission refills."""
        index = _index(list(positions), step.residual.device)
        iterations = pool.rows("iterations")[index]
        residual = step.residual
        done, converged = stop_rule(
            residual, pool.rows("tol")[index], iterations, pool.rows("max_iter")[index],
            pool.stepper,
        )  # fmt: skip
        # A row whose deadline would pass before another step could finish stops now.
        horizon = time.perf_counter() + self.seconds_per_iteration
        done |= pool.rows("deadline")[index] <= horizon
        owners = [pool.owners[p] for p in positions]
        cancelled = [i for i, owner in enumerate(owners) if owner and owner[0].cancelled()]
        if cancelled:
            done[cancelled] = False
        finished = done.nonzero().squeeze(1)
        if finished.numel() == 0 and not cancelled:
            return
        if finished.numel():
            self._answer(pool, index, step, finished, converged, iterations, owners)
        pool.remove([positions[i] for i in [*finished.tolist(), *cancelled]])

    def _answer(
        self,
        pool: _Pool,
        index: slice | Tensor,
        step: Step,
        finished: Tensor,
        converged: Tensor,
        iterations: Tensor,
        owners: list[Owner | None],
    ) -> None:
        """Read out the finished rows (indices into ``step``'s rows) and deliver complete
        requests."""
        parts = pool.program.parts
        res = step.residual[finished]
        shape = (-1,) + (1,) * (step.z.ndim - 1)
        z = torch.where(torch.isfinite(res).view(shape), step.fz[finished], step.z[finished])
        logits = parts.readout(z, pool.rows("context")[index][finished])
        outputs = {
            "probabilities": torch.softmax(logits.float(), dim=1),
            "iterations": iterations[finished],
            "residual": res,
            "converged": converged[finished],
            **parts.extras(logits),
        }
        arrays = {name: value.cpu().numpy() for name, value in outputs.items()}
        self._metrics.observe_samples(
            self.model,
            iterations=arrays["iterations"],
            residual=arrays["residual"],
            converged=arrays["converged"],
        )
        now = time.perf_counter()
        complete: list[tuple[asyncio.Future[ItemResult], ItemResult]] = []
        for k, row in enumerate(finished.tolist()):
            owner = owners[row]
            assert owner is not None  # rows stepped are occupied (compact) or newly placed
            request, sample = owner
            for name, value in arrays.items():
                out = request.outputs.get(name)
                if out is None:
                    out = np.empty((request.item.n, *value.shape[1:]), value.dtype)
                    request.outputs[name] = out
                out[sample] = value[k]
            request.remaining -= 1
            self._solve_seconds.observe(now - request.joined)
            if request.remaining == 0:
                complete.append((request.item.future, _result(request)))
        if complete and self._loop is not None:
            self._loop.call_soon_threadsafe(_deliver, complete)

    def _fail(self, pool: _Pool) -> None:
        for request in {id(o[0]): o[0] for o in pool.owners if o}.values():
            _fail_item(self._loop, request.item, self.model)
        pool.owners.clear()
        pool.holes.clear()


def _result(request: _Request) -> ItemResult:
    out = request.outputs
    core = ("probabilities", "iterations", "residual", "converged")
    return ItemResult(
        probabilities=out["probabilities"],
        iterations=out["iterations"].astype(np.int64, copy=False),
        residual=out["residual"],
        converged=out["converged"].astype(bool, copy=False),
        extras={k: v for k, v in out.items() if k not in core},
        queue_seconds=request.joined - request.item.enqueued,
        solve_seconds=time.perf_counter() - request.joined,
        batch_id=request.iteration,
        batch_size=request.pool_size,
    )


def _deliver(complete: list[tuple[asyncio.Future[Any], ItemResult]]) -> None:
    for future, result in complete:
        if not future.done():
            future.set_result(result)


def _fail_item(loop: asyncio.AbstractEventLoop | None, item: WorkItem, model: str) -> None:
    def fail() -> None:
        if item.future is not None and not item.future.done():
            item.future.set_exception(InternalError(f"model {model!r} failed to solve a request"))

    if loop is not None:
        loop.call_soon_threadsafe(fail)
