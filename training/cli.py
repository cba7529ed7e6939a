"""``fpn-train`` and ``fpn-eval`` (SPEC §3)."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from models import FAMILIES, SOLVERS, CheckpointError, get_family, load_checkpoint
from models.backprop import BACKPROP_MODES

from .data import DATASETS, Dataset, load_dataset
from .distributed import resolve_device
from .evaluate import evaluate
from .loop import TrainConfig, train

train_app = typer.Typer(add_completion=False, help="Train an implicit-depth classifier.")
eval_app = typer.Typer(add_completion=False, help="Evaluate a checkpoint on its test or val split.")


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


def _override(obj, **values):
    """``obj`` with the given (non-None) values replaced: an option not given keeps the config's."""
    given = {k: v for k, v in values.items() if v is not None}
    return dataclasses.replace(obj, **given) if given else obj


@train_app.command()
def fpn_train(
    family: Annotated[
        str | None, typer.Option(help=f"model family: {', '.join(sorted(FAMILIES))}")
    ] = None,
    dataset: Annotated[str | None, typer.Option(help=f"one of {', '.join(DATASETS)}")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="directory with the dataset files")] = None,
    epochs: int | None = None,
    max_steps: Annotated[
        int | None, typer.Option(help="stop after this many optimiser steps")
    ] = None,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    backprop: Annotated[
        str | None, typer.Option(help="jfb, ift, neumann, unrolled (default: the family's)")
    ] = None,
    solver: str | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
    arch: Annotated[str | None, typer.Option(help="operator kind: conv or mlp")] = None,
    channels: int | None = None,
    width: int | None = None,
    gamma: Annotated[float | None, typer.Option(help="Lipschitz bound of T in z, < 1")] = None,
    depth: Annotated[int | None, typer.Option(help="layers of the explicit family")] = None,
    augment_shift: Annotated[int | None, typer.Option(help="random translation in pixels")] = None,
    option: Annotated[
        list[str] | None, typer.Option(help="family option KEY=VALUE (repeatable)")
    ] = None,
    val_split: Annotated[
        int | None,
        typer.Option(help="training examples held out for model selection (fixed by the seed)"),
    ] = None,
    patience: Annotated[
        int | None, typer.Option(help="stop after N epochs without a better val accuracy")
    ] = None,
    select_certified: Annotated[
        float | None,
        typer.Option(help="select the epoch on certified val accuracy at this l-inf radius"),
    ] = None,
    eval_limit: Annotated[
        int | None, typer.Option(help="evaluate on the first N validation / test examples")
    ] = None,
    out: Annotated[Optional[Path], typer.Option(help="checkpoint directory to write")] = None,  # noqa: UP045
    name: Optional[str] = None,  # noqa: UP045
    seed: int | None = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N")] = None,
    download: Annotated[bool, typer.Option(help="let torchvision download cifar10/svhn")] = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="print one JSON summary at the end")
    ] = False,
) -> None:
    """Train with a progress bar, select the best epoch on a validation split, evaluate the test
    split once at the end, write the checkpoint to --out. Options not given keep their defaults
    (training.loop.TrainConfig, models.config)."""
    if family is not None:
        _choice(family, FAMILIES, "family")
    if dataset is not None:
        _choice(dataset, DATASETS, "dataset")
    if solver is not None:
        _choice(solver, SOLVERS, "solver")
    if backprop is not None:
        _choice(backprop, BACKPROP_MODES, "backprop mode")
    base = TrainConfig()
    model = base.model
    if family is not None:  # a family brings its own default backprop mode
        mode = get_family(family).default_backprop
        model = model.replace(family=family, backprop=_override(model.backprop, mode=mode))
    try:
        model = model.replace(
            arch=_override(
                model.arch, kind=arch, channels=channels, width=width, gamma=gamma, depth=depth
            ),
            solver=_override(model.solver, method=solver, tol=tol, max_iter=max_iter),
            backprop=_override(model.backprop, mode=backprop),
            options={**model.options, **_parse_options(option or [])},
        )
    except ValueError as exc:
        _fail(str(exc))
    cfg = _override(
        base, model=model, dataset=dataset, data_dir=str(data_dir) if data_dir else None,
        out=str(out) if out else None, name=name, epochs=epochs, max_steps=max_steps,
        batch_size=batch_size, lr=lr, weight_decay=weight_decay, augment_shift=augment_shift,
        val_split=val_split, patience=patience, select_certified=select_certified,
        eval_limit=eval_limit, seed=seed, device=device,
        download=download or None, progress=sys.stderr.isatty(),
        command=shlex.join(["fpn-train", *sys.argv[1:]]),
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
        val = "" if result.val_accuracy is None else f"val accuracy {result.val_accuracy:.4f}; "
        typer.echo(
            f"selected epoch {result.best_epoch}: {val}test accuracy {result.test_accuracy:.4f}; "
            f"checkpoint {result.checkpoint}"
        )


SPLITS = ("test", "val")


@eval_app.command(context_settings={"allow_extra_args": True})
def fpn_eval(
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Option(help="checkpoint directory")],
    dataset: str = "mnist",
    data_dir: Optional[Path] = None,  # noqa: UP045
    split: Annotated[
        str,
        typer.Option(
            help="test, or val: the examples the checkpoint's training run held out for "
            "model selection (re-drawn from the seed and val_split in its config.json)"
        ),
    ] = "test",
    tol: Optional[float] = None,  # noqa: UP045
    max_iter: Optional[int] = None,  # noqa: UP045
    solver: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="a solver the checkpoint's family runs (default: its own)"),
    ] = None,
    limit: Annotated[Optional[int], typer.Option(help="first N examples")] = None,  # noqa: UP045
    batch_size: int = 500,
    certify: Annotated[
        Optional[list[float]],  # noqa: UP045
        typer.Option(
            help="certified accuracy at these l-inf radii in [0, 1] pixel units, e.g. "
            "--certify 0.01 0.05 0.1 (families with a certified bound)"
        ),
    ] = None,
    device: str = "auto",
    json_output: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Accuracy, iterations, residual, fraction converged, images/s (and certified accuracy) on
    the test split or the checkpoint's validation split."""
    _choice(dataset, DATASETS, "dataset")
    _choice(split, SPLITS, "split")
    radii = _radii(certify, ctx.args)
    dev = resolve_device(device)
    try:
        ckpt = load_checkpoint(checkpoint, device=dev)
        ckpt.model.stepper(solver)  # the family's own solvers; another is an error naming them
        if radii and not ckpt.model.certificates:
            raise ValueError(
                f"{ckpt.name}: the {ckpt.config.family!r} family has no certified bound, so "
                f"--certify cannot be answered; it needs a family whose models offer "
                f"certificates (e.g. linf)"
            )
        data = _eval_split(ckpt, dataset, data_dir, split).subset(limit)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    result = evaluate(
        ckpt.model,
        data,
        tol=tol,
        max_iter=max_iter,
        solver=solver,
        batch_size=batch_size,
        device=dev,
        certify=radii,
    )
    if json_output:
        print(json.dumps(result.to_dict()))
        return
    it = result.iterations
    typer.echo(
        f"{ckpt.name} on {dataset} {split} (n={result.n}): accuracy {result.accuracy:.4f}, "
        f"iterations mean {it.mean:.2f} p50 {it.p50:.0f} p95 {it.p95:.0f} max {it.max}, mean "
        f"residual {result.mean_residual:.2e}, converged {result.converged_fraction:.2%}, "
        f"{result.images_per_second:.0f} images/s"
    )
    if result.certified_accuracy is not None:
        by = result.certified_accuracy_by_certificate or {}
        for eps, fraction in result.certified_accuracy.items():
            detail = ", ".join(f"{m} {per[eps]:.4f}" for m, per in by.items())
            typer.echo(f"certified accuracy at eps={eps}: {fraction:.4f} ({detail})")


def _radii(certify: list[float] | None, extra: list[str]) -> list[float]:
    """``--certify 0.01 0.05 0.1``: click gives the first value to the option, the rest arrive
    as extra arguments."""
    values = list(certify or [])
    if extra and not values:
        raise typer.BadParameter(f"unexpected arguments {extra}")
    for raw in extra:
        try:
            values.append(float(raw))
        except ValueError:
            raise typer.BadParameter(f"--certify expects radii, got {raw!r}") from None
    if any(not 0.0 <= v <= 1.0 for v in values):
        raise typer.BadParameter(f"--certify radii must be in [0, 1] (pixel units), got {values}")
    return values


def _eval_split(ckpt, dataset: str, data_dir: Path | None, split: str) -> Dataset:
    if split == "test":
        return load_dataset(dataset, "test", data_dir)
    training = ckpt.training
    if not training.get("val_split"):
        raise ValueError(
            f"{ckpt.path / 'config.json'}: records no validation split (training.val_split); "
            f"it was trained before --val-split, so only --split test is defined"
        )
    if training.get("dataset", dataset) != dataset:
        raise ValueError(
            f"{ckpt.name} was trained on {training['dataset']!r}; its validation split is part of "
            f"that dataset, not of {dataset!r}"
        )
    train_set = load_dataset(dataset, "train", data_dir)
    return train_set.split(int(training["val_split"]), int(training.get("seed", 0)))[1]
