"""The model library (``models/``) of another git revision against the working tree's, side by
side.

For solver and model changes: the revision is checked out into a temporary git worktree, and in
interleaved rounds a child process per variant (the same measuring code, ``models`` imported from
that tree or from the working tree) times the bundled checkpoint's ``predict`` at each batch size
and on a batch whose samples ask for tolerances 1e-2 … 1e-6, plus a JFB training step (batch
128). Both see the same inputs; iteration counts are printed so a change that alters the solve,
not just its speed, shows.

    python bench/solver_ab.py --rev HEAD~1 --device cpu --out bench/results/solver_ab_cpu.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MIX_TOLS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


def measure(args: argparse.Namespace) -> dict[str, tuple[float, int | None]]:
    """One round of every cell with the ``models`` package first on ``sys.path`` (a child)."""
    import torch

    from models import cross_entropy, load_checkpoint

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with gzip.open(args.data_dir / "mnist" / "t10k-images-idx3-ubyte.gz") as f:
        raw = f.read()
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 1, 28, 28)[:1024]
    x = torch.from_numpy(images.astype(np.float32) / 255.0).to(device)
    model = load_checkpoint(args.checkpoint, device=device).model
    mix = torch.tensor(MIX_TOLS, dtype=torch.float64).repeat(13)[:64].to(device)

    def predict_ms(batch: int, tol, reps: int) -> tuple[float, int]:
        times, iterations = [], 0
        for i in range(reps + 1):
            xb = x[(i * batch) % 512 : (i * batch) % 512 + batch]
            sync()
            start = time.perf_counter()
            out = model.predict(xb, tol=tol, max_iter=200)
            sync()
            times.append(time.perf_counter() - start)
            iterations += int(out.stats.iterations[:batch].sum()) if i else 0
        return 1e3 * statistics.median(times[1:]), iterations

    def train_step_ms(reps: int) -> float:
        trained = load_checkpoint(args.checkpoint, device=device).model.train()
        optimizer = torch.optim.SGD(trained.parameters(), lr=1e-4)
        y = torch.zeros(128, dtype=torch.int64, device=device)
        times = []
        for i in range(reps + 2):
            sync()
            start = time.perf_counter()
            loss = cross_entropy(trained(x[i * 128 % 512 : i * 128 % 512 + 128]), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sync()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times[2:])

    row: dict[str, tuple[float, int | None]] = {}
    with torch.inference_mode():
        for b in args.batches:
            row[f"batch {b}"] = predict_ms(b, None, max(5, 200 // b))
        row["tol mix, batch 64"] = predict_ms(64, mix, 8)
    row["JFB step, batch 128"] = (train_step_ms(6), None)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rev", default="HEAD~1", help="git revision to compare with")
    parser.add_argument("--checkpoint", type=Path, default=REPO / "checkpoints" / "mnist-fpn")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args)))
        return

    cells = [*(f"batch {b}" for b in args.batches), "tol mix, batch 64", "JFB step, batch 128"]
    with tempfile.TemporaryDirectory() as tmp:
        previous = Path(tmp) / "previous"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q",
                        str(previous), args.rev], check=True)  # fmt: skip
        sources = {args.rev: previous, "working tree": REPO}
        results: dict[str, dict[str, list]] = {v: {c: [] for c in cells} for v in sources}
        try:
            for round_ in range(args.rounds):
                order = list(sources) if round_ % 2 == 0 else list(reversed(sources))
                for name in order:
                    child = [sys.executable, __file__, "--measure",
                             *sys.argv[1:]]  # fmt: skip
                    env = {**os.environ, "PYTHONPATH": str(sources[name])}
                    out = subprocess.run(child, env=env, capture_output=True, text=True,
                                         check=True).stdout  # fmt: skip
                    row = json.loads(out.strip().splitlines()[-1])
                    for cell in cells:
                        results[name][cell].append(row[cell])
                    print(round_, name, {c: round(v[0], 2) for c, v in row.items()}, flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                            str(previous)], check=False)  # fmt: skip

    print(f"\n| cell | {args.rev} ms | working tree ms | ratio | iterations |")
    print("| --- | ---: | ---: | ---: | --- |")
    summary = {}
    for cell in cells:
        old = min(t for t, _ in results[args.rev][cell])
        new = min(t for t, _ in results["working tree"][cell])
        its = {results[v][cell][0][1] for v in sources}
        same = "n/a" if None in its else ("identical" if len(its) == 1 else f"differ: {its}")
        summary[cell] = {
            "rev_ms": round(old, 3),
            "working_tree_ms": round(new, 3),
            "ratio": round(new / old, 3),
            "iterations": same,
        }
        print(f"| {cell} | {old:.2f} | {new:.2f} | {new / old:.2f} | {same} |")
    if args.out:
        machine = {"device": args.device, "threads": args.threads,
                   "load_average_at_start": os.getloadavg()}  # fmt: skip
        args.out.write_text(json.dumps({"machine": machine, "rev": args.rev, "summary": summary,
                                        "rounds": results}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
