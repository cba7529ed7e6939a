"""The training loop: one function a reader can follow top to bottom.

``train(TrainConfig)`` builds the model from ``TrainConfig.model`` (input shape and classes come
from the dataset), trains it with the configured backprop mode, evaluates after every epoch on a
validation split held out of the training data (``val_split`` examples, fixed by the seed), keeps
the best epoch by validation accuracy (and stops early after ``patience`` epochs without
improvement), then evaluates the selected model once on the test split and returns the summary
that ``fpn-train --json`` prints. The test split is not read before that final evaluation.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from models import ImplicitClassifier, ModelConfig, create_model, save_checkpoint

from . import distributed
from .data import as_float, load_dataset, random_shift
from .evaluate import EvalResult, evaluate

# Evaluation batch during training: the training batch, so that evaluating a conv model
# (activations, Anderson's history) needs no more memory than a training step does.
EVAL_BATCH = 128


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run. ``model`` is the model's own config (family, arch, solver,
    backprop, options; ``input`` and ``classes`` are taken from the dataset) and lands at the top
    of config.json; the rest is saved under ``training``, each value once."""

    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: str = "mnist"
    data_dir: str | None = None
    out: str | None = None
    name: str | None = None
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    augment_shift: int = 0
    val_split: int = 5000  # examples held out of train for model selection; 0: none
    patience: int | None = None  # stop after this many epochs without a better val accuracy
    # Select on certified val accuracy at this l-inf radius (families with a certificate) rather
    # than on clean val accuracy: a robustly trained model's best epoch is its most robust one.
    select_certified: float | None = None
    eval_limit: int | None = None  # evaluate on the first N validation / test examples
    seed: int = 0
    device: str = "auto"
    download: bool = False
    progress: bool = True
    command: str | None = None

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def training_record(self) -> dict[str, Any]:
        """What config.json keeps under ``training`` (the model config is stored beside it)."""
        skip = {"model", "progress", "out", "data_dir"}
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip
        }


@dataclass
class TrainResult:
    test_accuracy: float
    val_accuracy: float | None
    best_epoch: int
    seconds_per_step: float
    peak_memory_bytes: int
    mean_train_iterations: float
    checkpoint: str | None
    steps: int
    epochs: list[dict[str, float]]

    def summary(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def train(cfg: TrainConfig) -> TrainResult:
    ctx, device = distributed.init_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    full_train = load_dataset(cfg.dataset, "train", cfg.data_dir, download=cfg.download)
    if cfg.val_split:
        train_set, val_set = full_train.split(cfg.val_split, cfg.seed)
        val_set = val_set.subset(cfg.eval_limit)
    else:
        train_set, val_set = full_train, None
    del full_train

    config = cfg.model.replace(input=train_set.input, classes=tuple(train_set.classes))
    model = create_model(config).to(device)
    net = DistributedDataParallel(model) if ctx.enabled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=max(total_steps, 1), pct_start=0.15
    )
    images, labels = train_set.images.to(device), train_set.labels.to(device)  # uint8 stays uint8
    order = torch.Generator().manual_seed(cfg.seed)  # same on every rank: same global batches
    augment = torch.Generator().manual_seed(cfg.seed + 1 + ctx.rank)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    step, step_times, train_iterations, history = 0, [], [], []
    best_score, best_epoch, best_state, stale = -1.0, 0, None, 0
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
            x = random_shift(as_float(images[rows]), cfg.augment_shift, augment)
            y = labels[rows]
            model.set_training_progress(step / max(total_steps, 1))
            start = time.perf_counter()
            out = net(x)
            loss = model.training_loss(out, y)
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

        improved = True
        if ctx.is_main:
            model.finalize()
            record = {
                "epoch": epoch,
                "train_loss": loss_sum / max(seen, 1),
                "train_accuracy": correct / max(seen, 1),
                "train_mean_iterations": statistics.fmean(train_iterations[-len(batches) :]),
            }
            line = f"epoch {epoch}: loss {record['train_loss']:.4f} "
            line += f"train acc {record['train_accuracy']:.4f} "
            if val_set is not None:
                radii = () if cfg.select_certified is None else (cfg.select_certified,)
                result = evaluate(
                    model, val_set, device=device, batch_size=EVAL_BATCH, certify=radii
                )
                record.update(
                    val_accuracy=result.accuracy,
                    val_n=result.n,
                    val_mean_iterations=result.iterations.mean,
                )
                line += f"val acc {result.accuracy:.4f} iters {result.iterations.mean:.1f} "
                score = result.accuracy
                if result.certified_accuracy:
                    certified = next(iter(result.certified_accuracy.values()))
                    record["val_certified_accuracy"] = certified
                    line += f"certified@{cfg.select_certified:g} {certified:.4f} "
                    score = certified + 1e-6 * result.accuracy  # ties: the cleaner one
                record["selection_score"] = score
                improved = score > best_score
            history.append(record)
            tqdm.write(line + f"(train iters {record['train_mean_iterations']:.1f})")
            if improved:  # without a validation split, the last epoch is the one kept
                best_score = record.get("selection_score", -1.0)
                best_epoch, stale = epoch, 0
                best_state = copy.deepcopy(model.state_dict())
                if cfg.out:
                    _save(model, cfg, best_epoch, step, val=record, test=None)
            else:
                stale += 1
        distributed.barrier(ctx)
        stop = cfg.patience is not None and stale >= cfg.patience
        if distributed.agree(stop, ctx):  # rank 0 decides (it alone evaluates)
            if ctx.is_main:
                tqdm.write(f"no better validation accuracy for {stale} epochs: stopping")
            break

    test_accuracy, checkpoint = float("nan"), None
    if ctx.is_main and best_state is not None:
        model.load_state_dict(best_state)
        model.finalize()
        # The one and only read of the test split.
        test_set = load_dataset(cfg.dataset, "test", cfg.data_dir, download=cfg.download)
        radii = () if cfg.select_certified is None else (cfg.select_certified,)
        test = evaluate(
            model,
            test_set.subset(cfg.eval_limit),
            device=device,
            batch_size=EVAL_BATCH,
            certify=radii,
        )
        test_accuracy = test.accuracy
        tqdm.write(f"selected epoch {best_epoch}: test acc {test.accuracy:.4f}")
        if cfg.out:
            val_record = next(r for r in history if r["epoch"] == best_epoch)
            checkpoint = _save(model, cfg, best_epoch, step, val=val_record, test=test)
    distributed.shutdown(ctx)
    return TrainResult(
        test_accuracy=test_accuracy,
        val_accuracy=(
            next(r["val_accuracy"] for r in history if r["epoch"] == best_epoch)
            if val_set is not None and best_epoch
            else None
        ),
        best_epoch=best_epoch,
        seconds_per_step=statistics.median(step_times) if step_times else float("nan"),
        peak_memory_bytes=_peak_memory(device),
        mean_train_iterations=statistics.fmean(train_iterations) if train_iterations else 0.0,
        checkpoint=str(checkpoint) if checkpoint else None,
        steps=step,
        epochs=history,
    )


def _save(
    model: ImplicitClassifier,
    cfg: TrainConfig,
    epoch: int,
    step: int,
    *,
    val: dict[str, Any],
    test: EvalResult | None,
) -> Path:
    """The checkpoint of the selected epoch; ``test`` is None until the final evaluation.
    Metrics are measured at the model's solver defaults (config.json's ``solver``)."""
    if cfg.out is None:
        raise ValueError("TrainConfig.out is not set: there is nowhere to save the checkpoint")
    training = {**cfg.training_record(), "best_epoch": epoch, "steps": step}
    metrics: dict[str, Any] = {}
    if "val_accuracy" in val:
        metrics.update(
            val_accuracy=val["val_accuracy"],
            val_n=val["val_n"],
        )
        if "val_certified_accuracy" in val:
            radius = f"{cfg.select_certified:g}"
            metrics["val_certified_accuracy"] = {radius: val["val_certified_accuracy"]}
    if test is not None:
        metrics.update(
            test_accuracy=test.accuracy,
            test_n=test.n,
            mean_iterations=test.iterations.mean,
            p95_iterations=test.iterations.p95,
            converged_fraction=test.converged_fraction,
        )
        if test.certified_accuracy is not None:
            metrics["test_certified_accuracy"] = test.certified_accuracy
    metrics["parameters"] = sum(p.numel() for p in model.parameters())
    return save_checkpoint(model, cfg.out, name=cfg.name, training=training, metrics=metrics)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
