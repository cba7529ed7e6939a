"""The Open Inference Protocol (V2) over gRPC vs over HTTP: same server, same model, same inputs.

One ``fpn-serve`` process serves both protocols (HTTP on one port, gRPC on ``FPN_GRPC_PORT``).
For each concurrency (default 1 and 64) the same one-image V2 inference is sent in a closed loop:

- HTTP: wrk (``apt-get install wrk``), ``bench/wrk/predict.lua`` posting pre-built V2 JSON bodies
  (``data`` as a flat list), keep-alive connections, one wrk thread;
- gRPC: an asyncio client on ``grpc.aio`` (C core) with tritonclient's generated stubs, the
  image as ``raw_input_contents`` (what ``tritonclient.grpc`` sends), ``c`` calls in flight on
  ``--grpc-processes`` processes (HTTP/2 channels multiplex the calls).

Each run is warmed for a fifth of its duration first. Results: a Markdown table on stdout and
JSON in ``--out`` (requests/s, p50/p95/p99 latency, errors, the server's CPU seconds per 1,000
requests). Run it on a quiet machine::

    python bench/grpc_vs_http.py --model-dir checkpoints --model mnist-fpn --duration 10 \\
        --out bench/results/grpc_vs_http.json

Needs the ``dev`` extra (tritonclient, grpcio) and wrk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import Server, free_port, load_images, wrk


# --- HTTP (wrk) ---------------------------------------------------------------------------------
def write_v2_bodies(path: Path, x: np.ndarray) -> Path:
    """One V2 JSON inference body per line, one image each."""
    with path.open("w") as f:
        for sample in x:
            body = {"inputs": [{"name": "input", "shape": [1, *sample.shape], "datatype": "FP32",
                                "data": sample.ravel().tolist()}]}  # fmt: skip
            f.write(json.dumps(body, separators=(",", ":")) + "\n")
    return path


def http_run(url: str, model: str, bodies: Path, concurrency: int, seconds: int) -> dict:
    path = f"/v2/models/{model}/infer"
    wrk(url, path, bodies, concurrency, max(1, seconds // 5))  # warm the connections
    return wrk(url, path, bodies, concurrency, seconds)


# --- gRPC (grpc.aio) ----------------------------------------------------------------------------
async def _grpc_load(target: str, model: str, x: np.ndarray, concurrency: int, seconds: float):
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    requests = []
    for sample in x:
        request = service_pb2.ModelInferRequest(model_name=model)
        request.inputs.add(name="input", datatype="FP32", shape=[1, *sample.shape])
        request.raw_input_contents.append(np.ascontiguousarray(sample, dtype="<f4").tobytes())
        requests.append(request)
    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        await stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=10)
        end = time.perf_counter() + seconds
        rng = np.random.default_rng()

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < end:
                request = requests[int(rng.integers(len(requests)))]
                start = time.perf_counter()
                try:
                    await stub.ModelInfer(request, timeout=10)
                except grpc.RpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors


def _grpc_process(args: tuple) -> tuple[list[float], int]:
    return asyncio.run(_grpc_load(*args))


def grpc_run(
    target: str, model: str, x: np.ndarray, concurrency: int, seconds: int, processes: int
) -> dict:
    processes = max(1, min(processes, concurrency))
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    context = multiprocessing.get_context("spawn")  # grpc's C core does not survive fork
    with context.Pool(processes) as pool:
        warm = max(1, seconds // 5)
        pool.map(_grpc_process, [(target, model, x, c, warm) for c in shares])
        started = time.perf_counter()
        parts = pool.map(_grpc_process, [(target, model, x, c, seconds) for c in shares])
        elapsed = time.perf_counter() - started
    latencies = sorted(t for part, _ in parts for t in part)
    errors = sum(e for _, e in parts)
    ms = np.array(latencies) * 1e3 if latencies else np.zeros(1)
    return {
        "requests": len(latencies),
        "seconds": round(elapsed, 3),
        "rps": round(len(latencies) / seconds, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p90_ms": round(float(np.percentile(ms, 90)), 3),
        "p95_ms": round(float(np.percentile(ms, 95)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "mean_ms": round(float(statistics.fmean(ms)), 3),
        "max_ms": round(float(ms.max()), 3),
        "errors": errors,
        "client_processes": processes,
    }


# --- driver -------------------------------------------------------------------------------------
def cpu_per_1000(server: Server, before: float, requests: int) -> float:
    return round((server.cpu_seconds() - before) * 1000 / max(requests, 1), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=Path("checkpoints"))
    parser.add_argument("--model", default="mnist-fpn")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--duration", type=int, default=10, help="seconds per run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--threads", type=int, default=None, help="FPN_NUM_THREADS")
    parser.add_argument("--grpc-processes", type=int, default=2, help="gRPC client processes")
    parser.add_argument("--images", type=int, default=256, help="distinct inputs to cycle")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install -y wrk")

    x = load_images(args.data_dir, args.images)
    grpc_port = free_port()
    env = {"FPN_GRPC_PORT": str(grpc_port)}
    if args.threads:
        env["FPN_NUM_THREADS"] = str(args.threads)
    results: dict = {
        "model": args.model,
        "duration_s": args.duration,
        "clients": {
            "http": "wrk -t1, bench/wrk/predict.lua, V2 JSON bodies, keep-alive",
            "grpc": f"grpc.aio closed loop, raw_input_contents, {args.grpc_processes} processes",
        },
        "runs": {"http": {}, "grpc": {}},
    }
    with tempfile.TemporaryDirectory() as tmp:
        bodies = write_v2_bodies(Path(tmp) / "v2.jsonl", x)
        server = Server(args.model_dir, env, Path(tmp) / "server.log")
        try:
            for concurrency in args.concurrency:
                before = server.cpu_seconds()
                run = http_run(server.url, args.model, bodies, concurrency, args.duration)
                run["server_cpu_s_per_1000"] = cpu_per_1000(server, before, run["requests"])
                results["runs"]["http"][f"c{concurrency}"] = run
                before = server.cpu_seconds()
                target = f"127.0.0.1:{grpc_port}"
                run = grpc_run(
                    target, args.model, x, concurrency, args.duration, args.grpc_processes
                )
                run["server_cpu_s_per_1000"] = cpu_per_1000(server, before, run["requests"])
                results["runs"]["grpc"][f"c{concurrency}"] = run
        finally:
            server.stop()

    print(
        "| protocol | concurrency | req/s | p50 ms | p95 ms | p99 ms | errors | server CPU s/1k |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for protocol, runs in results["runs"].items():
        for name, run in runs.items():
            errors = run.get("errors", run.get("non_2xx", 0) + run.get("socket_errors", 0))
            print(f"| {protocol} | {name[1:]} | {run['rps']:.0f} | {run['p50_ms']:.2f} | "
                  f"{run['p95_ms']:.2f} | {run['p99_ms']:.2f} | {errors} | "
                  f"{run['server_cpu_s_per_1000']:.2f} |")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
