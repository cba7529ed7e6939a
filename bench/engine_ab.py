"""Per-iteration engine vs the previous revision's batch scheduler, side by side in one run.

Both servers serve the same checkpoint on the same machine with the same thread count; rounds
alternate between them so that drift of a shared VM hits both. HTTP load from wrk
(``bench/wrk/predict.lua``). What it measures, for each scheduler (the issue's goals):

1. **two-client mix**: two wrk clients at once (``-t1 -c32`` each), one sending ``tol=1e-2``,
   the other ``tol=1e-6``: each client's p50 latency and the total requests/s. Per-iteration
   scheduling should answer a loose request without waiting for the strict ones around it.
2. **c64**: single-digit requests from 64 connections: requests/s, against the in-process
   ``model.predict`` throughput at batch 64 (samples/s) on the same thread count.
3. **c1**: p50 latency minus the p50 of an in-process batch-1 ``model.predict``.

    python bench/engine_ab.py --rev f66bd7f 912d4e1 --data-dir ../shared/data \
        --duration 10 --rounds 3

``--rev`` is checked out into a temporary git worktree and served from there (``python -m
service`` with that tree first on ``PYTHONPATH``), so the comparison needs no second install.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import REPO, InProcess, Server, load_images, write_bodies, wrk

MODEL = "mnist-fpn"
PATH = f"/v1/models/{MODEL}/predict"


def two_clients(server: Server, loose: Path, strict: Path, seconds: int) -> dict:
    """Two wrk clients at once; each one's summary, and the total throughput."""
    results: dict[str, dict] = {}

    def run(name: str, bodies: Path) -> None:
        results[name] = wrk(server.url, PATH, bodies, 32, seconds)

    threads = [threading.Thread(target=run, args=a) for a in (("loose", loose), ("strict", strict))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    loose_r, strict_r = results["loose"], results["strict"]
    return {
        "loose_p50_ms": loose_r["p50_ms"],
        "strict_p50_ms": strict_r["p50_ms"],
        "loose_over_strict_p50": loose_r["p50_ms"] / strict_r["p50_ms"],
        "total_rps": loose_r["rps"] + strict_r["rps"],
        "errors": loose_r["non_2xx"] + loose_r["socket_errors"]
        + strict_r["non_2xx"] + strict_r["socket_errors"],
    }  # fmt: skip


def one_round(server: Server, bodies: dict[str, Path], seconds: int) -> dict:
    wrk(server.url, PATH, bodies["digits"], 64, max(1, seconds // 5))  # warm the connections
    return {
        "mix": two_clients(server, bodies["loose"], bodies["strict"], seconds),
        "c64": wrk(server.url, PATH, bodies["digits"], 64, seconds),
        "c1": wrk(server.url, PATH, bodies["digits"], 1, seconds),
    }


def median(rounds: list[dict], *keys: str) -> float:
    values = []
    for r in rounds:
        for key in keys:
            r = r[key]
        values.append(r)
    return statistics.median(values)


def summarise(rounds: list[dict], in_process: dict) -> dict:
    c1_p50 = median(rounds, "c1", "p50_ms")
    c64 = median(rounds, "c64", "rps")
    return {
        "mix_loose_p50_ms": median(rounds, "mix", "loose_p50_ms"),
        "mix_strict_p50_ms": median(rounds, "mix", "strict_p50_ms"),
        "mix_loose_over_strict_p50": median(rounds, "mix", "loose_over_strict_p50"),
        "mix_total_rps": median(rounds, "mix", "total_rps"),
        "c64_rps": c64,
        "c64_over_in_process_batch64": c64 / in_process["batch64_samples_per_s"],
        "c1_p50_ms": c1_p50,
        "c1_added_ms": c1_p50 - in_process["batch1_p50_ms"],
        "errors": sum(
            r["mix"]["errors"] + r["c64"]["non_2xx"] + r["c1"]["non_2xx"] for r in rounds
        ),
        "rounds": rounds,
    }


def step_ms_by_rows(checkpoint: Path, x, rows: tuple[int, ...], repeats: int = 30) -> dict:
    """One engine iteration's compute (an Anderson step on ``rows`` occupied rows), median ms:
    what masking (always stepping the whole pool) would cost against compaction (stepping the
    occupied rows only)."""
    import torch

    from models import load_checkpoint
    from models.solvers import Step

    model = load_checkpoint(checkpoint).model
    stepper = model.stepper("anderson")
    out = {}
    with torch.inference_mode():
        parts = model.solve_parts()
        for n in rows:
            context, z0 = parts.prologue(torch.from_numpy(x[:n]))
            started = stepper.start(parts.step, z0, (context,), torch.zeros(n))
            state = started.state if isinstance(started, Step) else started
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                state = stepper.step(parts.step, state, (context,), torch.zeros(n)).state
                times.append((time.perf_counter() - start) * 1e3)
            out[n] = statistics.median(times[5:])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rev", nargs="+", default=["f66bd7f"],
        help="previous revisions to compare with (the first is the goals' baseline)",
    )  # fmt: skip
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--checkpoint", type=Path, default=REPO / "checkpoints" / MODEL)
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) - 1))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "engine_ab.json")
    parser.add_argument(
        "--onnxruntime",
        action="store_true",
        help="also serve this revision with FPN_BACKEND=onnxruntime (whole-solve graph, batcher)",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install -y wrk")

    load_at_start = os.getloadavg()
    x = load_images(args.data_dir, 512)
    reference = InProcess(args.checkpoint, x, args.threads, "cpu")
    step_ms = step_ms_by_rows(args.checkpoint, x, (1, 8, 16, 32, 64))
    reference_rounds: list[dict] = []
    env = {"FPN_NUM_THREADS": str(args.threads), "FPN_DEVICE": "cpu", "FPN_GRPC_PORT": "0"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        models = tmp_path / "models"
        models.mkdir()
        shutil.copytree(args.checkpoint, models / MODEL)
        bodies = {
            "digits": write_bodies(tmp_path / "digits.jsonl", x),
            "loose": write_bodies(tmp_path / "loose.jsonl", x, (1e-2,)),
            "strict": write_bodies(tmp_path / "strict.jsonl", x, (1e-6,)),
        }
        trees = {rev: tmp_path / f"rev-{rev}" for rev in args.rev}
        for rev, tree in trees.items():
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q",
                            str(tree), rev], check=True)  # fmt: skip
        try:
            names = [*trees, "engine"] + (["onnxruntime"] if args.onnxruntime else [])
            rounds: dict[str, list[dict]] = {name: [] for name in names}
            for r in range(args.rounds):
                # The baseline in every round too (no server running), so drift hits it alike.
                reference_rounds.append({
                    "batch1_p50_ms": reference.solve_p50_ms(),
                    "batch64_samples_per_s": 64e3 / reference.batch_ms(64, repeats=20),
                })  # fmt: skip
                for name in names if r % 2 == 0 else names[::-1]:
                    source = trees.get(name)
                    backend = {"FPN_BACKEND": "onnxruntime"} if name == "onnxruntime" else {}
                    log = tmp_path / f"{name}.log"
                    server = Server(models, {**env, **backend}, log, source=source)
                    try:
                        rounds[name].append(one_round(server, bodies, args.duration))
                    finally:
                        server.stop()
                    print(f"round {r + 1} {name}: {json.dumps(rounds[name][-1])}", flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                                str(tree)], check=False)  # fmt: skip
    in_process = {
        "batch1_p50_ms": median(reference_rounds, "batch1_p50_ms"),
        "batch64_samples_per_s": median(reference_rounds, "batch64_samples_per_s"),
        "step_ms_by_rows": step_ms,
        "rounds": reference_rounds,
    }
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": args.threads,
            "load_average_at_start": load_at_start,
        },
        "command": " ".join(sys.argv),
        "client": "wrk -t1 (two at once for the mix), bench/wrk/predict.lua",
        "previous_revisions": args.rev,
        "in_process": in_process,
        **{name: summarise(runs, in_process) for name, runs in rounds.items()},
    }
    e, p = result["engine"], result[args.rev[0]]
    result["engine_over_previous"] = {
        "mix_total_rps": e["mix_total_rps"] / p["mix_total_rps"],
        "c64_rps": e["c64_rps"] / p["c64_rps"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    keys = (
        "mix_loose_p50_ms", "mix_strict_p50_ms", "mix_loose_over_strict_p50", "mix_total_rps",
        "c64_rps", "c64_over_in_process_batch64", "c1_p50_ms", "c1_added_ms", "errors",
    )  # fmt: skip
    print(f"in process: {json.dumps(in_process)}")
    print("| metric | " + " | ".join(rounds) + " |\n| --- |" + " ---: |" * len(rounds))
    for key in keys:
        print(f"| {key} | " + " | ".join(f"{result[name][key]:.3f}" for name in rounds) + " |")


if __name__ == "__main__":
    main()
