"""The iteration-level engine (SPEC §5 scheduling): samples join and leave the running solve at
every iteration, and each gets exactly the answer it gets solved alone.

Real models of every family (float64, so that "exactly" means it), every solver each family
offers, the engine driven by hand one iteration at a time (``Engine.step_once``) for the ordering
tests, and on its own thread for the concurrent ones.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from models import FAMILIES, ArchConfig, InputSpec, ModelConfig, SolverConfig, create_model
from service.backends import SolveProgram
from service.batcher import WorkItem
from service.engine import Engine
from service.metrics import Metrics

INPUT = (12,)


def tiny_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(
        family=family,
        arch=ArchConfig(kind="mlp", width=16, gamma=0.9, depth=4),
        input=InputSpec(shape=INPUT, mean=0.5, std=0.25),
        classes=("a", "b", "c"),
        solver=SolverConfig(tol=1e-6, max_iter=200),
    )
    model = create_model(config).double().eval()
    model.tighten_lipschitz()
    return model


def program_of(model) -> SolveProgram:
    with torch.inference_mode():
        parts = model.solve_parts()
    return SolveProgram(parts, model.solvers(), torch.device("cpu"), torch.float64)


def make_engine(model, *, capacity: int = 64, queue: int = 4096) -> Engine:
    return Engine(
        "tiny", program_of(model), max_batch_size=capacity, max_queue_size=queue, metrics=Metrics()
    )


def solo(model, x: np.ndarray, *, tol: float, max_iter: int, solver: str):
    """Each sample of ``x`` solved alone: (probabilities, iterations, residual, converged)."""
    rows = []
    for row in x:
        out = model.predict(torch.from_numpy(row[None]), tol=tol, max_iter=max_iter, solver=solver)
        rows.append(
            (
                torch.softmax(out.logits.float(), 1)[0].numpy(),
                int(out.stats.iterations[0]),
                float(out.stats.residual[0]),
                bool(out.stats.converged[0]),
            )
        )
    return rows


def assert_solo(result, expected) -> None:
    assert result.iterations.tolist() == [e[1] for e in expected]
    assert result.converged.tolist() == [e[3] for e in expected]
    # A row in a batch may round an ulp differently from the row alone (the CPU's GEMM kernel
    # depends on the row's place in the batch); a converged residual is the difference of two
    # near-equal vectors, so that ulp of ‖z‖ shows up to ~1e-15 absolute.
    np.testing.assert_allclose(result.residual, [e[2] for e in expected], rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(result.probabilities, [e[0] for e in expected], rtol=1e-6, atol=1e-7)


def inputs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *INPUT))


def step(engine: Engine) -> bool:
    with torch.inference_mode():
        return engine.step_once()


CASES = [(f, s) for f in sorted(FAMILIES) for s in tiny_model(f).solvers()]


@pytest.mark.parametrize(("family", "solver"), CASES, ids=[f"{f}-{s}" for f, s in CASES])
def test_a_sample_joining_at_any_iteration_gets_its_solo_answer(family, solver) -> None:
    model = tiny_model(family)

    async def scenario() -> None:
        engine = make_engine(model)
        tols = [1e-8, 1e-3, 1e-6, 1e-10]
        requests = [(inputs(3, seed), tol) for seed, tol in enumerate(tols)]
        futures = []
        for k, (x, tol) in enumerate(requests):  # request k joins at engine iteration k (or so)
            futures.append(engine.submit(WorkItem(x, tol, 150, solver)))
            for _ in range(k):
                step(engine)
        while step(engine):
            pass
        await asyncio.sleep(0)  # deliveries are scheduled on the loop
        for (x, tol), future in zip(requests, futures, strict=True):
            assert_solo(future.result(), solo(model, x, tol=tol, max_iter=150, solver=solver))

    asyncio.run(scenario())


def test_loose_requests_leave_while_strict_ones_keep_running() -> None:
    model = tiny_model("fpn")

    async def scenario() -> None:
        engine = make_engine(model)
        x = inputs(1, 7)
        strict = engine.submit(WorkItem(x, 1e-12, 200, "picard"))
        loose = engine.submit(WorkItem(x, 1e-2, 200, "picard"))
        answered_first = None
        while step(engine):
            await asyncio.sleep(0)
            if answered_first is None and (strict.done() or loose.done()):
                answered_first = "loose" if loose.done() else "strict"
                assert not strict.done()  # still in the solve when the loose one was answered
        await asyncio.sleep(0)
        assert answered_first == "loose"
        assert loose.result().iterations[0] < strict.result().iterations[0]

    asyncio.run(scenario())


def test_newcomers_fill_the_holes_of_rows_that_left_and_no_row_moves() -> None:
    """A row's solver state is large (an Anderson history), so rows stay where they are: a
    newcomer takes the place of a row that left, and only holes nobody filled are closed, by
    moving the last rows in."""
    model = tiny_model("fpn")

    async def scenario() -> None:
        engine = make_engine(model)
        x = inputs(1, 3)
        # Rows 0..3: strict, loose, strict, loose (max_iter 2 stops the loose ones).
        for max_iter in (200, 2, 200, 2):
            engine.submit(WorkItem(x, 1e-12, max_iter, "anderson"))
        step(engine)
        (pool,) = engine._pools.values()
        strict_rows = [pool.owners[0], pool.owners[2]]
        holes_at_compaction = []
        compact = pool.compact

        def counting_compact() -> None:
            holes_at_compaction.append(len(pool.holes))
            compact()

        pool.compact = counting_compact  # type: ignore[method-assign]
        step(engine)  # the loose rows 1 and 3 leave: 3 shrinks the pool, 1 is a hole
        assert pool.size == 3 and pool.holes == [1]
        newcomer = engine.submit(WorkItem(x, 1e-12, 200, "anderson"))
        step(engine)  # the newcomer takes the hole; the strict rows have not moved
        assert holes_at_compaction[-1] == 0 and pool.holes == []
        assert pool.owners[0] is strict_rows[0]
        assert pool.owners[2] is strict_rows[1] and pool.owners[1][0].item.future is newcomer
        for future in [newcomer, *(o[0].item.future for o in strict_rows)]:
            future.cancel()  # rows 0, 1, 2 leave at the next iteration
        engine.submit(WorkItem(inputs(2, 4), 1e-12, 200, "anderson"))
        step(engine)  # two newcomers join at rows 3 and 4, then rows 0, 1, 2 leave
        assert pool.size == 5 and pool.holes == [0, 1, 2]
        survivors = pool.owners[3:]
        step(engine)  # no newcomer: the holes are closed by the last rows before the step
        assert holes_at_compaction[-1] == 3
        assert pool.size == 2 and pool.holes == [] and pool.owners == survivors

    asyncio.run(scenario())


def test_a_cancelled_request_leaves_the_solve_at_the_next_iteration() -> None:
    model = tiny_model("fpn")

    async def scenario() -> None:
        engine = make_engine(model)
        # Picard at tol 0 never converges: without cancellation it would run 500 iterations.
        doomed = engine.submit(WorkItem(inputs(4, 1), 0.0, 500, "picard"))
        kept = engine.submit(WorkItem(inputs(1, 2), 1e-6, 200, "picard"))
        for _ in range(3):
            step(engine)
        assert engine.active == 5
        doomed.cancel()
        step(engine)
        assert engine.active == 1  # its four rows are gone after one more iteration
        while step(engine):
            pass
        await asyncio.sleep(0)
        assert kept.result().converged.all()

    asyncio.run(scenario())


def test_requests_wait_for_free_rows_and_keep_their_order() -> None:
    model = tiny_model("fpn")

    async def scenario() -> None:
        engine = make_engine(model, capacity=4)
        first = engine.submit(WorkItem(inputs(3, 1), 1e-6, 200, "anderson"))
        second = engine.submit(WorkItem(inputs(3, 2), 1e-6, 200, "anderson"))  # does not fit
        step(engine)
        assert (engine.active, engine.queued) == (3, 3)
        while step(engine):
            pass
        await asyncio.sleep(0)
        assert first.result().batch_id < second.result().batch_id

    asyncio.run(scenario())


def test_a_request_cancelled_while_queued_never_joins() -> None:
    model = tiny_model("fpn")

    async def scenario() -> None:
        engine = make_engine(model)
        gone = engine.submit(WorkItem(inputs(2, 1), 1e-6, 200, "anderson"))
        gone.cancel()
        assert not step(engine)  # nothing to run
        assert engine.queued == 0

    asyncio.run(scenario())


@pytest.mark.slow
def test_200_concurrent_requests_on_the_engine_thread_each_get_their_solo_answer() -> None:
    """Random tol, max_iter, deadline_ms and solver, all at once: none lost, none duplicated, each
    the solo answer (a deadline-cut sample: the solo answer at the iterations it got)."""
    model = tiny_model("fpn")
    rng = np.random.default_rng(0)
    specs = [
        (
            inputs(int(rng.integers(1, 4)), seed),
            float(10 ** rng.uniform(-9, -2)),
            int(rng.integers(1, 120)),
            str(rng.choice(["picard", "anderson"])),
            float(rng.uniform(0.5, 30)) if rng.random() < 0.3 else None,
        )
        for seed in range(200)
    ]

    async def scenario():
        engine = make_engine(model, capacity=32)
        engine.start()
        try:
            now = time.perf_counter()
            futures = [
                engine.submit(
                    WorkItem(x, tol, max_iter, solver, None if ms is None else now + ms / 1e3)
                )
                for x, tol, max_iter, solver, ms in specs
            ]
            return await asyncio.gather(*futures)
        finally:
            await engine.stop()

    results = asyncio.run(scenario())
    assert len(results) == len(specs)
    cut = 0
    for (x, tol, max_iter, solver, ms), result in zip(specs, results, strict=True):
        assert result.iterations.shape == (x.shape[0],)
        for i in range(x.shape[0]):
            got = int(result.iterations[i])
            budget = max_iter
            if ms is not None and got < max_iter and not result.converged[i]:
                budget, cut = got, cut + 1  # the deadline stopped it: solo with that budget
            expected = solo(model, x[i : i + 1], tol=tol, max_iter=budget, solver=solver)
            assert_solo(_row(result, i), expected)


def _row(result, i: int):
    from dataclasses import replace

    return replace(
        result,
        probabilities=result.probabilities[i : i + 1],
        iterations=result.iterations[i : i + 1],
        residual=result.residual[i : i + 1],
        converged=result.converged[i : i + 1],
    )


def test_stopping_answers_every_accepted_sample() -> None:
    model = tiny_model("fpn")

    async def scenario() -> None:
        engine = make_engine(model, capacity=8)
        engine.start()
        futures = [engine.submit(WorkItem(inputs(2, s), 1e-8, 200, "anderson")) for s in range(20)]
        await engine.stop()  # graceful: everything accepted is solved first
        await asyncio.sleep(0)
        assert all(f.done() and f.result().converged.all() for f in futures)
        with pytest.raises(Exception, match="shutting down"):
            engine.submit(WorkItem(inputs(1, 0), 1e-6, 10, "anderson"))

    asyncio.run(scenario())
