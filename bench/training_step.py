"""Training-step cost of each backprop mode, side by side, on the bundled MNIST FPN.

Measures, in one run and on one machine:

1. seconds per optimiser step (median) and peak memory for ``jfb``, ``ift``, ``neumann``,
   ``unrolled``, and the same operator trained through the PyPI ``torchdeq`` library (its IFT and
   its phantom gradient with one step, the JFB-like setting), all at the same forward tolerance;
2. peak memory of ``jfb`` (and ``unrolled`` for contrast) against the number of forward
   iterations, forced by ``tol=0`` and ``max_iter=k``.

Every configuration runs in its own subprocess so that peak memory (CUDA: max allocated; CPU:
max resident set) belongs to that configuration alone.

    python bench/training_step.py --data-dir ../shared/data/mnist --device cpu \
        --out bench/results/training_step_cpu.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import cross_entropy, load_checkpoint  # noqa: E402
from training.data import load_idx  # noqa: E402

MODES = ("jfb", "ift", "neumann", "unrolled", "torchdeq-ift", "torchdeq-phantom")


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _torchdeq_forward(model, x, mode: str, tol: float, max_iter: int):
    from torchdeq import get_deq

    common = dict(f_solver="anderson", f_max_iter=max_iter, f_tol=tol, f_stop_mode="rel")
    if mode == "torchdeq-ift":
        deq = get_deq(core="indexing", ift=True, b_solver="fixed_point_iter", b_max_iter=100,
                      b_tol=1e-6,
                      b_stop_mode="rel", **common)  # fmt: skip
    else:  # phantom gradient, one step, tau = 1: the JFB-like configuration
        deq = get_deq(core="indexing", grad=1, tau=1.0, **common)
    qx = model.inject(x)
    T = model.prepare_operator()
    z_out, info = deq(lambda z: T(z, qx), torch.zeros_like(qx))
    return model.readout(z_out[-1]), float(info["nstep"].float().mean())


def worker(args: argparse.Namespace) -> dict:
    """One configuration: warm up, time ``--steps`` optimiser steps, report."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = load_checkpoint(args.checkpoint, device=device).model.train()
    n = args.batch_size * (args.steps + args.warmup)
    images = load_idx(Path(args.data_dir) / "train-images-idx3-ubyte.gz")[:n]
    labels = load_idx(Path(args.data_dir) / "train-labels-idx1-ubyte.gz")[:n]
    images = torch.from_numpy(images.copy()).float().div_(255).unsqueeze(1).to(device)
    labels = torch.from_numpy(labels.astype("int64")).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    baseline = (
        _peak_bytes(device) if device.type == "cpu" else int(torch.cuda.memory_allocated(device))
    )
    times, iterations = [], []
    for step in range(args.steps + args.warmup):
        rows = slice(step * args.batch_size, (step + 1) * args.batch_size)
        x, y = images[rows], labels[rows]
        start = time.perf_counter()
        if args.mode.startswith("torchdeq"):
            logits, its = _torchdeq_forward(model, x, args.mode, args.tol, args.max_iter)
            loss = torch.nn.functional.cross_entropy(logits, y)
        else:
            out = model(
                x, tol=args.tol, max_iter=args.max_iter, solver=args.solver, backprop=args.mode
            )
            loss, its = cross_entropy(out, y), float(out.stats.iterations.float().mean())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            iterations.append(its)
    return {
        "mode": args.mode,
        "seconds_per_step": statistics.median(times),
        "peak_memory_bytes": _peak_bytes(device) - baseline,
        "mean_forward_iterations": statistics.fmean(iterations),
        "tol": args.tol,
        "max_iter": args.max_iter,
    }


def run_config(args: argparse.Namespace, **overrides) -> dict:
    cmd = [sys.executable, __file__, "--worker"]
    for key, value in {**vars(args), **overrides}.items():
        if key in ("worker", "out", "modes", "depths") or value is None:
            continue
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {**overrides, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "mnist-fpn"))
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--max-iter", type=int, default=50)
    parser.add_argument("--solver", default="anderson")
    parser.add_argument("--mode", default="jfb")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--depths", default="5,10,20,40,80")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    machine = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    by_mode = []
    for mode in modes:
        result = run_config(args, mode=mode)
        by_mode.append(result)
        print(json.dumps(result), flush=True)
    by_depth = []
    for depth in [int(d) for d in args.depths.split(",") if d]:
        for mode in ("jfb", "unrolled"):
            result = run_config(args, mode=mode, tol=0.0, max_iter=depth, solver="picard", steps=5)
            by_depth.append({"forward_iterations": depth, **result})
            print(json.dumps(by_depth[-1]), flush=True)
    report = {
        "machine": machine,
        "batch_size": args.batch_size,
        "by_mode": by_mode,
        "by_depth": by_depth,
    }
    jfb = next((r for r in by_mode if r.get("mode") == "jfb" and "error" not in r), None)
    if jfb:
        report["step_time_ratio_to_jfb"] = {
            r["mode"]: r["seconds_per_step"] / jfb["seconds_per_step"]
            for r in by_mode
            if "error" not in r
        }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report.get("step_time_ratio_to_jfb", {}), indent=2))


if __name__ == "__main__":
    main()
