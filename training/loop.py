"""The training loop: one function a reader can follow top to bottom.

``train(TrainConfig)`` builds the model from the family registry, trains it with the configured
backprop mode, evaluates after every epoch on the test split, keeps the best checkpoint, and
returns the summary that ``fpn-train --json`` prints.
"""

from __future__ import annotations

import math
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from models import (
    ArchConfig,
    BackpropConfig,
    ImplicitClassifier,
    ModelConfig,
    SolverConfig,
    create_model,
    cross_entropy,
    get_family,
    save_checkpoint,
)

from . import distributed
from .data import load_dataset, random_shift
from .evaluate import evaluate


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run; saved under ``training`` in the checkpoint's config.json."""

    family: str = "fpn"
    dataset: str = "mnist"
    data_dir: str | None = None
    out: str | None = None
    name: str | None = None
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    backprop: str | None = None  # default: the family's
    solver: str = "anderson"
    tol: float = 1e-4
    max_iter: int = 50
    arch: str = "conv"
    channels: int = 32
    width: int = 128
    gamma: float = 0.9
    depth: int = 0
    augment_shift: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    eval_limit: int | None = None
    seed: int = 0
    device: str = "auto"
    download: bool = False
    progress: bool = True
    command: str | None = None


@dataclass
class TrainResult:
    test_accuracy: float
    seconds_per_step: float
    peak_memory_bytes: int
    mean_train_iterations: float
    checkpoint: str | None
    steps: int
    epochs: list[dict[str, float]]

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def build_model_config(cfg: TrainConfig, input_spec, classes) -> ModelConfig:
    backprop = cfg.backprop or get_family(cfg.family).default_backprop
    return ModelConfig(
        family=cfg.family,
        arch=ArchConfig(
            kind=cfg.arch, channels=cfg.channels, width=cfg.width, gamma=cfg.gamma, depth=cfg.depth
        ),
        input=input_spec,
        classes=tuple(classes),
        solver=SolverConfig(method=cfg.solver, tol=cfg.tol, max_iter=cfg.max_iter),
        backprop=BackpropConfig(mode=backprop),
        options=dict(cfg.options),
    )


def train(cfg: TrainConfig) -> TrainResult:
    ctx, device = distributed.init_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    train_set = load_dataset(cfg.dataset, "train", cfg.data_dir, download=cfg.download)
    test_set = load_dataset(cfg.dataset, "test", cfg.data_dir, download=cfg.download).subset(
        cfg.eval_limit
    )

    model = create_model(build_model_config(cfg, train_set.input, train_set.classes)).to(device)
    net = DistributedDataParallel(model) if ctx.enabled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=max(total_steps, 1), pct_start=0.15
    )
    images, labels = train_set.images.to(device), train_set.labels.to(device)
    order = torch.Generator().manual_seed(cfg.seed)  # same on every rank: same global batches
    augment = torch.Generator().manual_seed(cfg.seed + 1 + ctx.rank)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    step, step_times, train_iterations, history = 0, [], [], []
    best_accuracy, checkpoint = -1.0, None
    for epoch in range(1, cfg.epochs + 1):
        if step >= total_steps:
            break
        model.train()
        permutation = torch.randperm(len(train_set), generator=order)
        batches = range(min(steps_per_epoch, total_steps - step))
        bar = tqdm(
            batches, desc=f"epoch {epoch}/{cfg.epochs}", disable=not (cfg.progress and ctx.is_main),
            dynamic_ncols=True, leave=False,
        )  # fmt: skip
        seen, correct, loss_sum = 0, 0, 0.0
        for b in bar:
            rows = distributed.shard(
                permutation[b * cfg.batch_size : (b + 1) * cfg.batch_size], ctx
            )
            rows = rows.to(device)
            x = random_shift(images[rows], cfg.augment_shift, augment)
            y = labels[rows]
            start = time.perf_counter()
            out = net(x)
            loss = cross_entropy(out, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_times.append(time.perf_counter() - start)
            step += 1
            iterations = float(out.stats.iterations.float().mean())
            train_iterations.append(iterations)
            seen += y.numel()
            correct += int((out.logits.argmax(1) == y).sum())
            loss_sum += loss.item() * y.numel()
            bar.set_postfix(
                loss=f"{loss_sum / seen:.4f}",
                acc=f"{correct / seen:.4f}",
                iters=f"{iterations:.1f}",
            )
        bar.close()

        if ctx.is_main:
            model.finalize()
            result = evaluate(model, test_set, device=device, batch_size=1000)
            record = {
                "epoch": epoch,
                "train_loss": loss_sum / max(seen, 1),
                "train_accuracy": correct / max(seen, 1),
                "test_accuracy": result.accuracy,
                "test_mean_iterations": result.iterations.mean,
                "train_mean_iterations": statistics.fmean(train_iterations[-len(batches) :]),
            }
            history.append(record)
            tqdm.write(
                f"epoch {epoch}: loss {record['train_loss']:.4f} "
                f"train acc {record['train_accuracy']:.4f} "
                f"test acc {result.accuracy:.4f} iters {result.iterations.mean:.1f} "
                f"(train {record['train_mean_iterations']:.1f})"
            )
            if result.accuracy > best_accuracy and cfg.out:
                best_accuracy = result.accuracy
                checkpoint = _save(model, cfg, result, epoch, step)
            best_accuracy = max(best_accuracy, result.accuracy)
        distributed.barrier(ctx)

    distributed.shutdown(ctx)
    return TrainResult(
        test_accuracy=best_accuracy,
        seconds_per_step=statistics.median(step_times) if step_times else float("nan"),
        peak_memory_bytes=_peak_memory(device),
        mean_train_iterations=statistics.fmean(train_iterations) if train_iterations else 0.0,
        checkpoint=str(checkpoint) if checkpoint else None,
        steps=step,
        epochs=history,
    )


def _save(model: ImplicitClassifier, cfg: TrainConfig, result, epoch: int, step: int) -> Path:
    training = {k: v for k, v in asdict(cfg).items() if k not in {"progress", "out", "data_dir"}}
    training.update(backprop=model.config.backprop.mode, best_epoch=epoch, steps=step)
    metrics = {
        "test_accuracy": result.accuracy,
        "test_n": result.n,
        "mean_iterations": result.iterations.mean,
        "p95_iterations": result.iterations.p95,
        "converged_fraction": result.converged_fraction,
        "parameters": sum(p.numel() for p in model.parameters()),
        "eval_tol": model.config.solver.tol,
        "eval_solver": model.config.solver.method,
    }
    return save_checkpoint(model, cfg.out, name=cfg.name, training=training, metrics=metrics)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
