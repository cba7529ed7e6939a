"""Checking an exported model against torch: the parity rule and its summary.

The rule (docs/onnx.md, "Parity"): labels equal except where torch's top-2 probabilities tie,
probabilities within 1e-4, iterations within ±1 of torch except rare float32 near-ties at ``tol``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..implicit import ImplicitClassifier
from .runtime import onnx_session, run_onnx

NEAR_TIE = 0.02
RESIDUAL_NOISE = 1e-7
"""A sample whose solver stopped with a residual within 2% of its ``tol``, or within 1e-7 (the
resolution of a float32 relative residual: a few float32 epsilons), is a near-tie. A rounding
difference (onnxruntime's kernels sum in another order than torch's, as torch's own do between
batch sizes and thread counts) can move such a stop, and an Anderson residual that is not
monotone can then take a few more iterations to come back below ``tol``. Both answers are right
by SPEC §5; torch against itself (batch 1 vs 250) shows the same spread."""


def agreement(c: dict[str, np.ndarray], *, label_gap: float = 0.0) -> dict[str, Any]:
    """Summarise a :func:`compare` result under the parity rule: iterations within ±1 of torch
    except near-ties (:data:`NEAR_TIE`), labels equal except where torch's top-2 probabilities
    are within ``label_gap`` of each other."""
    diff = c["iterations_onnx"].astype(np.int64) - c["iterations_torch"]
    # The residual and convergence of whichever runtime stopped first.
    first = diff > 0
    residual = np.where(first, c["residual_torch"], c["residual_onnx"])
    converged = np.where(first, c["converged_torch"], c["converged_onnx"])
    near_tie = converged & (residual >= (1.0 - NEAR_TIE) * c["tol"] - RESIDUAL_NOISE)
    far = np.abs(diff) > 1
    mismatch = c["labels_torch"] != c["labels_onnx"]
    tied = c["top2_gap_torch"] <= label_gap
    return {
        "max_iteration_diff": int(np.abs(diff[~(far & near_tie)]).max(initial=0)),
        "near_ties": int((far & near_tie).sum()),
        "label_mismatches": int((mismatch & ~tied).sum()),
        "max_probability_diff": float(c["probability_diff"].max(initial=0.0)),
        "converged_mismatches": int((c["converged_torch"] != c["converged_onnx"]).sum()),
    }


@dataclass(frozen=True)
class Verification:
    """How an exported model compares with torch on ``n`` inputs (all solvers together)."""

    n: int
    solvers: tuple[str, ...]
    label_mismatches: int
    max_probability_diff: float
    max_iteration_diff: int
    near_ties: int
    converged_mismatches: int

    @property
    def ok(self) -> bool:
        return (
            self.label_mismatches == 0
            and self.max_probability_diff <= 1e-4
            and self.max_iteration_diff <= 1
            and self.near_ties <= max(1, self.n * len(self.solvers) // 100)
        )

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "solvers": list(self.solvers), "ok": self.ok}


def verification_inputs(shape: tuple[int, ...], n: int, seed: int = 0) -> np.ndarray:
    """``n`` inputs in [0, 1]: a mix of dense noise, sparse strokes on a dark background (like
    digits) and smoothed blobs, so the check covers more than one regime of the model."""
    rng = np.random.default_rng(seed)
    dense = rng.random((n, *shape), dtype=np.float32)
    sparse = dense * (rng.random((n, *shape)) < 0.2)
    blobs = np.clip(rng.normal(0.5, 0.3, (n, *shape)), 0, 1).astype(np.float32)
    kind = np.arange(n) % 3
    x = np.where((kind == 0).reshape(-1, *[1] * len(shape)), dense,
                 np.where((kind == 1).reshape(-1, *[1] * len(shape)), sparse, blobs))  # fmt: skip
    return np.ascontiguousarray(x, dtype=np.float32)


def compare(
    model: ImplicitClassifier, session, x: np.ndarray, *, tol, max_iter, solver: str
) -> dict[str, Any]:
    """torch ``predict`` against the ONNX session on ``x``: per-sample differences."""
    with torch.no_grad():
        ref = model.predict(
            torch.from_numpy(x),
            tol=torch.as_tensor(np.broadcast_to(np.asarray(tol, np.float64), (x.shape[0],)).copy()),
            max_iter=torch.as_tensor(
                np.broadcast_to(np.asarray(max_iter, np.int64), (x.shape[0],)).copy()
            ),
            solver=solver,
        )
    got = run_onnx(session, x, tol=tol, max_iter=max_iter, solver=solver)
    probabilities = ref.logits.float().softmax(1).numpy()
    top2 = np.sort(probabilities, axis=1)[:, -2:]
    result = {
        "tol": np.broadcast_to(np.asarray(tol, np.float64), (x.shape[0],)).copy(),
        "top2_gap_torch": top2[:, 1] - top2[:, 0],
        "labels_torch": probabilities.argmax(1),
        "labels_onnx": got["probabilities"].argmax(1),
        "probability_diff": np.abs(probabilities - got["probabilities"]).max(1),
        "iterations_torch": ref.stats.iterations.numpy(),
        "iterations_onnx": got["iterations"],
        "converged_torch": ref.stats.converged.numpy(),
        "converged_onnx": got["converged"],
        "residual_torch": ref.stats.residual.numpy(),
        "residual_onnx": got["residual"],
    }
    for name, value in ref.extras.items():
        result[f"{name}_torch"] = value.numpy()
        result[f"{name}_onnx"] = got[name]
    return result


def verify(
    model: ImplicitClassifier, onnx_model: str | Path | bytes, *, n: int = 300, seed: int = 0
) -> Verification:
    """Compare the exported model with torch on ``n`` synthetic inputs, with every solver, at the
    checkpoint's default ``tol`` and ``max_iter`` for half of them and per-sample random ones
    (tol log-uniform in [1e-5, 1e-2], max_iter in [1, default]) for the other half."""
    session = onnx_session(onnx_model)
    config = model.config
    x = verification_inputs(tuple(config.input.shape), n, seed)
    rng = np.random.default_rng(seed + 1)
    tol = np.full(n, config.solver.tol)
    max_iter = np.full(n, config.solver.max_iter, np.int64)
    half = n // 2
    tol[half:] = 10.0 ** rng.uniform(-5, -2, n - half)
    max_iter[half:] = rng.integers(1, config.solver.max_iter + 1, n - half)
    solvers = tuple(model.solvers())
    totals = {"label_mismatches": 0, "near_ties": 0, "converged_mismatches": 0}
    # a float and an int, each the max of agreement()'s values
    worst: dict[str, Any] = {"max_probability_diff": 0.0, "max_iteration_diff": 0}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for solver in solvers:
            c = compare(model, session, x, tol=tol, max_iter=max_iter, solver=solver)
            # Random inputs can tie the top two classes: such a label may flip with rounding.
            summary = agreement(c, label_gap=1e-4)
            for key in totals:
                totals[key] += summary[key]
            for key in worst:
                worst[key] = max(worst[key], summary[key])
    finally:
        torch.set_num_threads(threads)
    return Verification(n, tuple(solvers), **totals, **worst)
