"""torch vs onnxruntime backends, in one run: in-process latency and served throughput.

1. In process, through the backends themselves (``service.backends``: the code the service's
   solve thread runs, ``BatchRequest`` in, ``BatchResult`` out): median latency of a batch of 1
   and of 64 MNIST test images at the checkpoint's default ``tol``, ``max_iter`` and solver.
2. Served: one ``fpn-serve`` per backend (same settings otherwise, default batching), loaded by
   wrk (``bench/wrk/predict.lua``, 1 wrk thread, 64 connections, one image per request) in
   interleaved rounds; requests/s, latency percentiles, mean batch size and server CPU time per
   request, from wrk and the servers' ``/metrics``.

The checkpoint is copied to a temporary directory and exported there (``model.onnx``), so the
repository's checkpoints are not touched. ``--in-process-only`` skips part 2 (no wrk needed);
``bench/gpu_onnx.sh`` uses it on CUDA machines.

    .venv/bin/python bench/onnx_backends.py --checkpoint checkpoints/mnist-fpn --duration 10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

BACKENDS = ("torch", "onnxruntime")


def in_process(
    directory: Path, x: np.ndarray, *, device: str, threads: int, batches: list[int]
) -> dict:
    """Median latency per batch size for each backend, and what each ran on."""
    from service.backends import BatchRequest, get_backend

    results = {}
    for name in BACKENDS:
        backend = get_backend(name)()
        entry: dict = {}
        try:
            info = backend.load(directory, device=device, num_threads=threads)
        except Exception as exc:  # e.g. FPN_DEVICE=cuda without onnxruntime-gpu: measure on CPU
            if device == "cpu":
                raise
            entry["fallback"] = f"cannot load on {device} ({exc}); measured on cpu instead"
            print(f"{name}: {entry['fallback']}", flush=True)
            info = backend.load(directory, device="cpu", num_threads=threads)
        solver = info.config.solver
        entry["device"] = info.device
        if name == "onnxruntime":
            entry["providers"] = backend.providers
        for size in batches:
            repeats = 200 if size == 1 else 20
            times, iterations = [], []
            for r in range(repeats + 5):
                start_row = (r * size) % (len(x) - size + 1)
                request = BatchRequest(
                    x=x[start_row : start_row + size],
                    tol=np.full(size, solver.tol),
                    max_iter=np.full(size, solver.max_iter, np.int64),
                    solver=solver.method,
                )
                start = time.perf_counter()
                result = backend.predict(request)
                times.append((time.perf_counter() - start) * 1e3)
                iterations.append(float(result.iterations.mean()))
            entry[f"batch_{size}_ms"] = statistics.median(times[5:])
            entry[f"batch_{size}_p90_ms"] = float(np.percentile(times[5:], 90))
            entry[f"batch_{size}_mean_iterations"] = statistics.fmean(iterations)
        backend.unload()
        results[name] = entry
        print(name, json.dumps(entry), flush=True)
    return results


def served(
    model_dir: Path, model: str, x: np.ndarray, work: Path, *, threads: int, device: str,
    concurrency: int, duration: int, rounds: int,
) -> dict:  # fmt: skip
    from serve_load import Server, measure, median_run, write_bodies

    bodies = write_bodies(work / "bodies.txt", x)
    env = {"FPN_NUM_THREADS": str(threads), "FPN_DEVICE": device}
    servers = {name: Server(model_dir, {**env, "FPN_BACKEND": name}, work / f"{name}.log")
               for name in BACKENDS}  # fmt: skip
    runs: dict[str, list[dict]] = {name: [] for name in BACKENDS}
    try:
        for round_ in range(rounds):
            order = BACKENDS if round_ % 2 == 0 else BACKENDS[::-1]
            for name in order:
                run = measure(servers[name], model, bodies, concurrency, duration)
                runs[name].append(run)
                print(round_, name, f"c{concurrency}", json.dumps(run), flush=True)
    finally:
        for server in servers.values():
            server.stop()
    return {name: median_run(r) for name, r in runs.items()}


def report(results: dict) -> str:
    p = results["in_process"]
    sizes = results["batches"]
    lines = [
        "| backend | device | "
        + " | ".join(f"batch {b} ms (p50)" for b in sizes)
        + f" | ms per image at {sizes[-1]} | mean iterations ({sizes[-1]}) |",
        "| --- | --- |" + " ---: |" * (len(sizes) + 2),
    ]
    for name, e in p.items():
        device = e["device"] + (f" ({e['providers'][0]})" if "providers" in e else "")
        device += " (fallback)" if "fallback" in e else ""
        cells = " | ".join(f"{e[f'batch_{b}_ms']:.2f}" for b in sizes)
        last = sizes[-1]
        lines.append(
            f"| {name} | {device} | {cells} | {e[f'batch_{last}_ms'] / last:.3f} | "
            f"{e[f'batch_{last}_mean_iterations']:.2f} |"
        )
    if results.get("served"):
        c = results["concurrency"]
        lines += [
            "",
            f"| backend | req/s at c={c} | p50 ms | p99 ms | mean batch | solve ms/batch "
            "| server CPU ms/req |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, m in results["served"].items():
            lines.append(
                f"| {name} | {m['rps']:.0f} | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} | "
                f"{m['mean_batch_size']:.1f} | {m['solve_ms_per_batch']:.1f} | "
                f"{m['server_cpu_ms_per_request']:.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=REPO / "checkpoints" / "mnist-fpn")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--device", default="cpu", help="FPN_DEVICE: cpu, auto, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) - 1))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--in-process-only", action="store_true")
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / "onnx_backends.json"
    )
    args = parser.parse_args()
    if not args.in_process_only and shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install -y wrk (or pass --in-process-only)")

    from serve_load import load_images

    from models.onnx.export import export_checkpoint

    work = Path(tempfile.mkdtemp(prefix="fpn-onnx-bench-"))
    model_dir = work / "models"
    directory = shutil.copytree(args.checkpoint, model_dir / args.checkpoint.name)
    start = time.perf_counter()
    export_checkpoint(directory, samples=50)
    export_seconds = time.perf_counter() - start
    if (args.data_dir / "mnist" / "t10k-images-idx3-ubyte.gz").is_file():
        x = load_images(args.data_dir, 512)
    else:  # e.g. a GPU machine without the datasets: same shapes, other iteration counts
        from models.onnx.verify import verification_inputs

        print(f"MNIST not under {args.data_dir}: timing synthetic inputs instead", flush=True)
        x = verification_inputs((1, 28, 28), 512)
    import onnxruntime
    import torch

    results: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "device": args.device,
            "load_average_before": os.getloadavg(),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "onnxruntime_available_providers": onnxruntime.get_available_providers(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "checkpoint": args.checkpoint.name,
        "export_seconds": export_seconds,
        "in_process": in_process(
            directory, x, device=args.device, threads=args.threads, batches=args.batches
        ),
        "batches": args.batches,
        "concurrency": args.concurrency,
        "load_client": "wrk -t1 -c{c} with bench/wrk/predict.lua (one MNIST image per request)",
    }
    if not args.in_process_only:
        results["served"] = served(
            model_dir, args.checkpoint.name, x, work, threads=args.threads, device=args.device,
            concurrency=args.concurrency, duration=args.duration, rounds=args.rounds,
        )  # fmt: skip
    results["machine"]["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
