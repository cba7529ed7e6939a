"""Evaluation on a split: accuracy, solver statistics and, for families with a certified bound,
certified accuracy (``fpn-eval``'s numbers)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

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
    # With ``certify``: {eps: fraction of samples certified correct} by the best certificate
    # (a sample counts when any of the family's certificates holds), and per certificate.
    certified_accuracy: dict[str, float] | None = None
    certified_accuracy_by_certificate: dict[str, dict[str, float]] | None = field(default=None)

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.certified_accuracy is None:
            data.pop("certified_accuracy")
            data.pop("certified_accuracy_by_certificate")
        return data


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
    certify: Sequence[float] = (),
) -> EvalResult:
    """Solve every sample at ``tol``/``max_iter`` (default: the model's) and summarise.

    ``certify``: ℓ∞ radii (raw [0, 1] pixel units) at which to report certified accuracy, from
    the certificates the model's family offers (``model.certify``); a family without one raises
    ``ValueError``. ``images_per_second`` times the solves only, not the certification.
    """
    model.eval()
    if certify and not model.certificates:
        model.certify(dataset.batch(slice(0, 1)), dataset.labels[:1], float(certify[0]))
    correct, iterations, residuals, converged = 0, [], [], []
    certified = {m: {float(e): 0 for e in certify} for m in model.certificates} if certify else {}
    best = {float(e): 0 for e in certify}
    device = torch.device(device)
    elapsed = 0.0
    for i in range(0, len(dataset), batch_size):
        x = dataset.batch(slice(i, i + batch_size)).to(device, non_blocking=True)
        y = dataset.labels[i : i + batch_size].to(device, non_blocking=True)
        _sync(device)
        start = time.perf_counter()
        out = model.predict(x, tol=tol, max_iter=max_iter, solver=solver)
        _sync(device)
        elapsed += time.perf_counter() - start
        correct += int((out.logits.argmax(1) == y).sum())
        iterations.append(out.stats.iterations.cpu())
        residuals.append(out.stats.residual.cpu())
        converged.append(out.stats.converged.cpu())
        for eps in best:
            verdicts = model.certify(x, y, eps)
            for method, ok in verdicts.items():
                certified[method][eps] += int(ok.sum())
            best[eps] += int(torch.stack(list(verdicts.values())).any(0).sum())
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
        certified_accuracy={_key(e): c / n for e, c in best.items()} if certify else None,
        certified_accuracy_by_certificate=(
            {m: {_key(e): c / n for e, c in per.items()} for m, per in certified.items()}
            if certify
            else None
        ),
    )


def _key(eps: float) -> str:
    """JSON key of a radius: ``0.01``, ``0.1`` (as written, without float noise)."""
    return f"{eps:g}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
