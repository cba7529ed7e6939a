"""Evaluation on a test split: accuracy and solver statistics (``fpn-eval``'s numbers)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from models import ImplicitClassifier

from .data import Dataset


@dataclass(frozen=True)
class IterationStats:
    mean: float
    p50: float
    p95: float
    max: int


@dataclass(frozen=True)
class EvalResult:
    n: int
    accuracy: float
    iterations: IterationStats
    mean_residual: float
    converged_fraction: float
    images_per_second: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate(
    model: ImplicitClassifier,
    dataset: Dataset,
    *,
    tol: float | None = None,
    max_iter: int | None = None,
    solver: str | None = None,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
) -> EvalResult:
    """Solve every test sample at ``tol``/``max_iter`` (default: the model's) and summarise."""
    model.eval()
    correct, iterations, residuals, converged = 0, [], [], []
    device = torch.device(device)
    _sync(device)
    start = time.perf_counter()
    for i in range(0, len(dataset), batch_size):
        x = dataset.images[i : i + batch_size].to(device, non_blocking=True)
        y = dataset.labels[i : i + batch_size].to(device, non_blocking=True)
        out = model.predict(x, tol=tol, max_iter=max_iter, solver=solver)
        correct += int((out.logits.argmax(1) == y).sum())
        iterations.append(out.stats.iterations.cpu())
        residuals.append(out.stats.residual.cpu())
        converged.append(out.stats.converged.cpu())
    _sync(device)
    elapsed = time.perf_counter() - start
    its = torch.cat(iterations).double()
    n = len(dataset)
    return EvalResult(
        n=n,
        accuracy=correct / n,
        iterations=IterationStats(
            mean=float(its.mean()),
            p50=float(its.quantile(0.5)),
            p95=float(its.quantile(0.95)),
            max=int(its.max()),
        ),
        mean_residual=float(torch.cat(residuals).double().nan_to_num(posinf=1.0, nan=1.0).mean()),
        converged_fraction=float(torch.cat(converged).double().mean()),
        images_per_second=n / elapsed,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
