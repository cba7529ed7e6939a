"""``fpn-train`` and ``fpn-eval`` (SPEC §3)."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from models import FAMILIES, SOLVERS, CheckpointError, load_checkpoint
from models.backprop import BACKPROP_MODES

from .data import DATASETS, load_dataset
from .distributed import resolve_device
from .evaluate import evaluate
from .loop import TrainConfig, train

train_app = typer.Typer(add_completion=False, help="Train an implicit-depth classifier.")
eval_app = typer.Typer(add_completion=False, help="Evaluate a checkpoint on a test split.")


def _choice(value: str, choices, what: str) -> str:
    if value not in choices:
        raise typer.BadParameter(f"unknown {what} {value!r}; available: {sorted(choices)}")
    return value


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _parse_options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--option expects KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return options


@train_app.command()
def fpn_train(
    family: Annotated[
        str, typer.Option(help=f"model family: {', '.join(sorted(FAMILIES))}")
    ] = "fpn",
    dataset: Annotated[str, typer.Option(help=f"one of {', '.join(DATASETS)}")] = "mnist",
    data_dir: Annotated[Path | None, typer.Option(help="directory with the dataset files")] = None,
    epochs: int = 1,
    max_steps: Annotated[
        int | None, typer.Option(help="stop after this many optimiser steps")
    ] = None,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    backprop: Annotated[
        str | None, typer.Option(help="jfb, ift, neumann, unrolled (default: the family's)")
    ] = None,
    solver: str = "anderson",
    tol: float = 1e-4,
    max_iter: int = 50,
    arch: Annotated[str, typer.Option(help="operator kind: conv or mlp")] = "conv",
    channels: int = 32,
    width: int = 128,
    gamma: Annotated[float, typer.Option(help="Lipschitz bound of T in z, < 1")] = 0.9,
    depth: Annotated[int, typer.Option(help="layers of the explicit family")] = 0,
    augment_shift: Annotated[int, typer.Option(help="random translation in pixels")] = 0,
    option: Annotated[
        list[str] | None, typer.Option(help="family option KEY=VALUE (repeatable)")
    ] = None,
    eval_limit: Annotated[
        int | None, typer.Option(help="evaluate on the first N test images")
    ] = None,
    out: Annotated[Optional[Path], typer.Option(help="checkpoint directory to write")] = None,  # noqa: UP045
    name: Optional[str] = None,  # noqa: UP045
    seed: int = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    download: Annotated[bool, typer.Option(help="let torchvision download cifar10/svhn")] = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="print one JSON summary at the end")
    ] = False,
) -> None:
    """Train with a progress bar, evaluate each epoch, keep the best checkpoint in --out."""
    _choice(family, FAMILIES, "family")
    _choice(dataset, DATASETS, "dataset")
    _choice(solver, SOLVERS, "solver")
    if backprop is not None:
        _choice(backprop, BACKPROP_MODES, "backprop mode")
    cfg = TrainConfig(
        family=family, dataset=dataset, data_dir=str(data_dir) if data_dir else None,
        out=str(out) if out else None, name=name, epochs=epochs, max_steps=max_steps,
        batch_size=batch_size, lr=lr, weight_decay=weight_decay, backprop=backprop, solver=solver,
        tol=tol, max_iter=max_iter, arch=arch, channels=channels, width=width, gamma=gamma,
        depth=depth, augment_shift=augment_shift, options=_parse_options(option or []),
        eval_limit=eval_limit, seed=seed, device=device, download=download,
        progress=sys.stderr.isatty(), command=shlex.join(["fpn-train", *sys.argv[1:]]),
    )  # fmt: skip
    try:
        result = train(cfg)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        _fail(str(exc))
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 reports
    if json_output:
        summary = result.summary()
        summary.pop("epochs")
        print(json.dumps(summary))
    else:
        typer.echo(f"test accuracy {result.test_accuracy:.4f}; checkpoint {result.checkpoint}")


@eval_app.command()
def fpn_eval(
    checkpoint: Annotated[Path, typer.Option(help="checkpoint directory")],
    dataset: str = "mnist",
    data_dir: Optional[Path] = None,  # noqa: UP045
    tol: Optional[float] = None,  # noqa: UP045
    max_iter: Optional[int] = None,  # noqa: UP045
    solver: Optional[str] = None,  # noqa: UP045
    limit: Annotated[Optional[int], typer.Option(help="first N test images")] = None,  # noqa: UP045
    batch_size: int = 500,
    device: str = "auto",
    json_output: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Accuracy, iterations, residual, fraction converged and images/s on the test split."""
    _choice(dataset, DATASETS, "dataset")
    if solver is not None:
        _choice(solver, SOLVERS, "solver")
    dev = resolve_device(device)
    try:
        ckpt = load_checkpoint(checkpoint, device=dev)
        test_set = load_dataset(dataset, "test", data_dir).subset(limit)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    result = evaluate(
        ckpt.model,
        test_set,
        tol=tol,
        max_iter=max_iter,
        solver=solver,
        batch_size=batch_size,
        device=dev,
    )
    if json_output:
        print(json.dumps(result.to_dict()))
        return
    it = result.iterations
    typer.echo(
        f"{ckpt.name} on {dataset} (n={result.n}): accuracy {result.accuracy:.4f}, iterations mean "
        f"{it.mean:.2f} p50 {it.p50:.0f} p95 {it.p95:.0f} max {it.max}, mean residual "
        f"{result.mean_residual:.2e}, converged {result.converged_fraction:.2%}, "
        f"{result.images_per_second:.0f} images/s"
    )
