"""The model families side by side (BENCHMARKS.md, "Model families"), measured in one run.

For each bundled checkpoint (trained by ``bench/train_families.sh`` with one shared budget), on
one machine and in one process:

- test accuracy, mean / p95 iterations, mean residual and fraction converged on the whole test
  split at ``tol=1e-4`` with the checkpoint's own solver, through ``training.evaluate.evaluate``
  (what ``fpn-eval`` runs), batches of 500;
- parameters;
- speed, in ``--rounds`` interleaved rounds (every model once per round; on a shared machine a
  burst of other work slows whatever runs during it, so the figure is the best round, the least
  disturbed, and every round is kept in the JSON): images/s of
  ``predict`` on the first 2,000 test images in batches of 500 at ``tol=1e-4``, and seconds per
  training step, the median of ``--steps`` optimiser steps (after 2 warm-up steps) on batches of
  128 training images with the checkpoint's backprop mode, from a copy of its trained weights
  (so the solver depths are the trained model's);
- for ``linf``: the recorded Lipschitz bound, the mean certified ℓ∞ radius and the certified
  accuracy (correct and radius ≥ ε) at a few ε, plus its iterations with the paper's average
  iteration (``picard`` with step α*, ``max_iter`` 2000);
- the Skip DEQ claim: mean iterations of ``mnist-skip-deq`` against ``mnist-fpn-5ep`` (the same
  operator, the same budget) at equal tolerance, with their accuracies.

    python bench/families.py --data-root ../shared/data --checkpoint-root /tmp/families \
        --out bench/results/families.json

prints the markdown tables and writes every number to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import load_checkpoint  # noqa: E402
from training.data import load_dataset  # noqa: E402
from training.evaluate import evaluate  # noqa: E402

MNIST = ("fpn-5ep", "skip-deq", "skip-reg", "cdeq", "opteq", "linf")
FASHION = ("fpn", "skip-deq", "linf")
EPSILONS = (0.01, 0.03, 0.1)


def time_training_steps(model, dataset, *, steps: int, batch: int = 128, seed: int = 0) -> float:
    """Median seconds per optimiser step (forward, backward, AdamW step) over ``steps`` steps, on a
    copy of ``model`` (the model itself is not trained)."""
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(seed)
    times = []
    for i in range(steps + 2):
        rows = torch.randint(len(dataset), (batch,), generator=g)
        x, y = dataset.batch(rows), dataset.labels[rows]
        start = time.perf_counter()
        loss = model.training_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def images_per_second(model, dataset, *, n: int = 2000, batch: int = 500) -> float:
    model.eval()
    start = time.perf_counter()
    for i in range(0, n, batch):
        model.predict(dataset.batch(slice(i, min(i + batch, n))), tol=1e-4)
    return n / (time.perf_counter() - start)


@torch.no_grad()
def certified(model, dataset, batch: int = 500) -> dict:
    """Mean certified radius and certified accuracy at EPSILONS (linf only)."""
    radii, correct = [], []
    for i in range(0, len(dataset), batch):
        out = model.predict(dataset.batch(slice(i, i + batch)), tol=1e-4)
        radii.append(out.extras["certified_radius_linf"])
        correct.append(out.logits.argmax(1) == dataset.labels[i : i + batch])
    radius, correct = torch.cat(radii), torch.cat(correct)
    return {
        "lipschitz_bound_linf": float(model.lipschitz_bound()),
        "recorded_lipschitz_bound_linf": model.config.options["lipschitz_bound_linf"],
        "mean_certified_radius_linf": float(radius.mean()),
        "median_certified_radius_linf": float(radius.median()),
        "certified_accuracy": {
            str(eps): float((correct & (radius >= eps)).double().mean()) for eps in EPSILONS
        },
    }


def measure(name: str, dataset_name: str, data_root: Path, cache: dict, root: Path) -> dict:
    """Everything but speed (see :func:`main`) for ``<root>/<name>``."""
    path = root / name
    checkpoint = load_checkpoint(path)
    model = checkpoint.model
    if dataset_name not in cache:
        data_dir = data_root / dataset_name
        cache[dataset_name] = (
            load_dataset(dataset_name, "train", data_dir),
            load_dataset(dataset_name, "test", data_dir),
        )
    test_set = cache[dataset_name][1]
    config = model.config
    result = evaluate(model, test_set, tol=1e-4, batch_size=500)
    row = {
        "checkpoint": f"checkpoints/{name}",
        "family": config.family,
        "options": {k: v for k, v in config.options.items() if not k.endswith("_linf")},
        "arch": f"{config.arch.kind} "
        + (f"{config.arch.channels}ch" if config.arch.kind == "conv" else f"w{config.arch.width}"),
        "solver": config.solver.method if config.family != "cdeq" else config.options["ode_method"],
        "backprop": config.backprop.mode,
        "training_command": checkpoint.training.get("command"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "size_bytes": sum(f.stat().st_size for f in path.iterdir()),
        **result.to_dict(),
    }
    if config.family == "linf":
        row.update(certified(model, test_set))
        picard = evaluate(model, test_set, tol=1e-4, max_iter=2000, batch_size=500, solver="picard")
        row["picard"] = {
            "step_size": model.config.options["step_size_linf"],
            "accuracy": picard.accuracy,
            "iterations": picard.to_dict()["iterations"],
            "converged_fraction": picard.converged_fraction,
            "images_per_second": picard.images_per_second,
        }
    row["evaluate_images_per_second"] = row.pop("images_per_second")  # not interleaved
    return row


def markdown(rows: list[dict]) -> str:
    lines = [
        "| checkpoint | family | backprop | solver | test acc. | params | mean it. | p95 it. "
        "| converged | s / train step | images/s |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        it = r["iterations"]
        lines.append(
            f"| `{r['checkpoint'].split('/')[-1]}` | `{r['family']}` | {r['backprop']} "
            f"| {r['solver']} | {100 * r['accuracy']:.2f}% | {r['parameters']:,} "
            f"| {it['mean']:.2f} | {it['p95']:.0f} | {100 * r['converged_fraction']:.1f}% "
            f"| {r['seconds_per_step']:.3f} | {r['images_per_second']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    # Only mnist-fpn and one model per family are bundled: point this at the directory
    # bench/train_families.sh trained into for the full set.
    parser.add_argument("--checkpoint-root", type=Path, default=ROOT / "checkpoints")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved speed rounds")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "families.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    torch.manual_seed(0)
    cache: dict = {}
    tables: dict[str, list[dict]] = {}
    for dataset_name, names in (("mnist", MNIST), ("fashion-mnist", FASHION)):
        tables[dataset_name] = []
        for short in names:
            name = f"{dataset_name}-{short}"
            print(f"measuring {name} ...", file=sys.stderr, flush=True)
            tables[dataset_name].append(
                measure(name, dataset_name, args.data_root, cache, args.checkpoint_root)
            )
    rows = [(d, r) for d, table in tables.items() for r in table]
    root = args.checkpoint_root
    models = {
        r["checkpoint"]: load_checkpoint(root / Path(r["checkpoint"]).name).model for _, r in rows
    }
    speed: dict[str, dict[str, list[float]]] = {k: {"ips": [], "step": []} for k in models}
    round_loads = []
    for round_ in range(args.rounds):
        print(f"speed round {round_ + 1}/{args.rounds} ...", file=sys.stderr, flush=True)
        round_loads.append(os.getloadavg())
        for dataset_name, r in rows:
            train_set, test_set = cache[dataset_name]
            model = models[r["checkpoint"]]
            speed[r["checkpoint"]]["ips"].append(images_per_second(model, test_set))
            speed[r["checkpoint"]]["step"].append(
                time_training_steps(model, train_set, steps=args.steps, seed=round_)
            )
    for _, r in rows:
        s = speed[r["checkpoint"]]
        r["images_per_second"] = max(s["ips"])
        r["seconds_per_step"] = min(s["step"])
        r["speed_rounds"] = {"images_per_second": s["ips"], "seconds_per_step": s["step"]}
    for dataset_name, table in tables.items():
        print(f"\n{dataset_name}\n\n{markdown(table)}\n")

    by_name = {r["checkpoint"].split("/")[-1]: r for r in tables["mnist"]}
    fpn, skip = by_name["mnist-fpn-5ep"], by_name["mnist-skip-deq"]
    claim = {
        "fpn_mean_iterations": fpn["iterations"]["mean"],
        "skip_deq_mean_iterations": skip["iterations"]["mean"],
        "reduction": 1 - skip["iterations"]["mean"] / fpn["iterations"]["mean"],
        "fpn_accuracy": fpn["accuracy"],
        "skip_deq_accuracy": skip["accuracy"],
        "accuracy_difference": skip["accuracy"] - fpn["accuracy"],
    }
    claim["holds"] = claim["reduction"] >= 0.3 and abs(claim["accuracy_difference"]) <= 0.002
    print("skip-deq vs fpn (MNIST test set, tol 1e-4):", json.dumps(claim, indent=1))
    for table in tables.values():
        for r in table:
            if r["family"] == "linf":
                print(
                    f"{r['checkpoint']}: bound {r['lipschitz_bound_linf']:.1f}, mean radius "
                    f"{r['mean_certified_radius_linf']:.4f}, certified accuracy "
                    f"{r['certified_accuracy']}, picard (α*) iterations "
                    f"{r['picard']['iterations']['mean']:.1f}"
                )
    document = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "load_average_at_each_speed_round": round_loads,
        },
        "tol": 1e-4,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "tables": tables,
        "skip_deq_claim": claim,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
