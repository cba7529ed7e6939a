"""Load benchmark for fpn-serve: throughput and latency of a real server, measured with wrk.

What it measures (results as a Markdown table on stdout and JSON in --out):

1. requests/s and p50/p95/p99 latency at concurrency 1, 8, 64, batching on (defaults:
   FPN_MAX_BATCH_SIZE=64, FPN_MAX_QUEUE_DELAY_MS=2) vs off (FPN_MAX_BATCH_SIZE=1);
2. the server's added latency at batch 1: p50 at concurrency 1 minus the p50 of an in-process
   ``model.predict`` of the same inputs (same thread count as the server);
3. per-sample early exit vs batch-synchronous stopping (every sample of a batch iterates until
   the batch's slowest sample stops, as torchdeq does) on a request mix with tolerances
   1e-2 ... 1e-6: in-process on the server's backend (the same solve the batcher runs) and
   end to end (the mix through the server).

HTTP load comes from wrk (``apt-get install wrk``) with ``bench/wrk/predict.lua``, which picks
a random pre-built body per request: on a 2-core machine a Python client would saturate first.

    python bench/serve_load.py --model-dir checkpoints --model mnist-fpn --duration 10
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
LUA = REPO / "bench" / "wrk" / "predict.lua"
MIX_TOLS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


# --- inputs -------------------------------------------------------------------------------------
def load_images(data_dir: Path, n: int) -> np.ndarray:
    """The first ``n`` MNIST test images as (n, 1, 28, 28) float32 in [0, 1] (4 decimals)."""
    import gzip

    with gzip.open(data_dir / "mnist" / "t10k-images-idx3-ubyte.gz") as f:
        raw = f.read()
    images = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    return (images.astype(np.float32) / 255.0).round(4)[:, None]


def write_bodies(path: Path, x: np.ndarray, tols: tuple[float, ...] | None = None) -> Path:
    with path.open("w") as f:
        for i, sample in enumerate(x):
            body: dict = {"inputs": [sample.tolist()]}
            if tols:
                body["tol"] = tols[i % len(tols)]
                body["max_iter"] = 200
            f.write(json.dumps(body, separators=(",", ":")) + "\n")
    return path


# --- in-process reference -----------------------------------------------------------------------
class InProcess:
    """The checkpoint in this process, on the server's thread count: the baseline."""

    def __init__(self, checkpoint: Path, x: np.ndarray, threads: int, device: str) -> None:
        import torch

        from models import load_checkpoint

        torch.set_num_threads(threads)
        self.torch = torch
        self.device = torch.device("cuda" if device in ("auto", "cuda") else device)
        self.model = load_checkpoint(checkpoint, device=self.device).model
        self.x = torch.from_numpy(x).to(self.device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def solve_p50_ms(self, repeats: int = 200) -> float:
        """Median wall time of ``model.predict`` on one sample (cycling through the inputs)."""
        latencies = []
        with self.torch.inference_mode():
            for r in range(repeats + 20):
                start = time.perf_counter()
                self.model.predict(self.x[r % len(self.x)][None])
                self._sync()
                latencies.append((time.perf_counter() - start) * 1e3)
        return statistics.median(latencies[20:])

    def batch_ms(self, size: int, repeats: int = 10) -> float:
        with self.torch.inference_mode():
            self.model.predict(self.x[:size])
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                self.model.predict(self.x[:size])
                self._sync()
                times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    def early_exit(self) -> dict:
        """Batches of 64 whose samples ask for tolerances 1e-2 ... 1e-6: per-sample stopping
        (each sample leaves the active set at its own tol) vs batch-synchronous stopping (every
        sample iterates as long as the batch's slowest one, tol=0 and max_iter=that count)."""
        torch = self.torch
        tols = [MIX_TOLS[i % len(MIX_TOLS)] for i in range(64)]
        tol = torch.tensor(tols, dtype=torch.float64, device=self.device)
        per_sample, synchronous, work_ps, work_sync = [], [], 0, 0
        with torch.inference_mode():
            for _ in range(3):
                for i in range(0, len(self.x) - 63, 64):
                    batch = self.x[i : i + 64]
                    start = time.perf_counter()
                    out = self.model.predict(batch, tol=tol, max_iter=200)
                    self._sync()
                    per_sample.append(time.perf_counter() - start)
                    slowest = int(out.stats.iterations.max())
                    work_ps += int(out.stats.iterations.sum())
                    start = time.perf_counter()
                    self.model.predict(batch, tol=0.0, max_iter=slowest)
                    self._sync()
                    synchronous.append(time.perf_counter() - start)
                    work_sync += slowest * len(batch)
        return {
            "per_sample_ms_per_batch": statistics.median(per_sample) * 1e3,
            "synchronous_ms_per_batch": statistics.median(synchronous) * 1e3,
            "per_sample_iterations": work_ps,
            "synchronous_iterations": work_sync,
        }


# --- the server ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``fpn-serve`` on a free port; ``source``: serve another source tree (e.g. a git worktree
    of an earlier revision) instead of the installed package."""

    def __init__(
        self, model_dir: Path, env: dict[str, str], log: Path, source: Path | None = None
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environment = {k: v for k, v in os.environ.items() if not k.startswith("FPN_")}
        environment.update({"FPN_GRPC_PORT": "0", "FPN_DRAIN_SECONDS": "0", **env})
        script = Path(sys.executable).parent / "fpn-serve"
        command = [str(script)] if script.exists() else [sys.executable, "-m", "service"]
        if source is not None:
            command = [sys.executable, "-m", "service"]
            environment["PYTHONPATH"] = str(source)
        self.log = log.open("wb")
        self.process = subprocess.Popen(
            [*command, "--model-dir", str(model_dir), "--port", str(self.port),
             "--log-level", "warning"],
            env=environment, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"fpn-serve exited: see {log}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("fpn-serve did not become ready")

    def metrics(self, model: str) -> dict[str, float]:
        text = urllib.request.urlopen(self.url + "/metrics").read().decode()

        def value(name: str) -> float:
            m = re.search(rf'^{name}{{model="{re.escape(model)}"}} (\S+)$', text, re.M)
            return float(m.group(1)) if m else 0.0

        return {
            "batches": value("fpn_batch_size_count"),
            "samples": value("fpn_batch_size_sum"),
            "iterations": value("fpn_solver_iterations_sum"),
            "solve_seconds": value("fpn_solve_duration_seconds_sum"),
            "cpu_seconds": self.cpu_seconds(),
        }

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process (all threads)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)
        self.log.close()


def wrk(url: str, path: str, bodies: Path, concurrency: int, seconds: int) -> dict:
    command = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "10s",
               "-s", str(LUA), url, "--", str(bodies), path]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(server: Server, model: str, bodies: Path, concurrency: int, seconds: int) -> dict:
    path = f"/v1/models/{model}/predict"
    wrk(server.url, path, bodies, concurrency, max(1, seconds // 5))  # warm the connections
    before = server.metrics(model)
    result = wrk(server.url, path, bodies, concurrency, seconds)
    after = server.metrics(model)
    batches = after["batches"] - before["batches"]
    samples = after["samples"] - before["samples"]
    result["mean_batch_size"] = samples / batches if batches else 0.0
    result["mean_iterations"] = (after["iterations"] - before["iterations"]) / max(samples, 1)
    result["solve_ms_per_batch"] = (
        (after["solve_seconds"] - before["solve_seconds"]) * 1e3 / batches if batches else 0.0
    )
    result["server_cpu_ms_per_request"] = (
        (after["cpu_seconds"] - before["cpu_seconds"]) * 1e3 / max(result["requests"], 1)
    )
    return result


def median_run(runs: list[dict]) -> dict:
    """Per-metric median over repeated runs (robust to a noisy, shared machine)."""
    keys = [k for k in runs[0] if isinstance(runs[0][k], int | float)]
    merged = {k: statistics.median(r[k] for r in runs) for k in keys}
    merged["rounds"] = len(runs)
    merged["rps_each_round"] = [round(r["rps"], 1) for r in runs]
    return merged


# --- main ---------------------------------------------------------------------------------------
CONFIGS = {
    "batching": {},  # the defaults: FPN_MAX_BATCH_SIZE=64, FPN_MAX_QUEUE_DELAY_MS=2
    "no-batching": {"FPN_MAX_BATCH_SIZE": "1"},
    "batching-delay-0": {"FPN_MAX_QUEUE_DELAY_MS": "0"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / "checkpoints")
    parser.add_argument("--model", default="mnist-fpn")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repeats per cell")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) - 1))
    parser.add_argument("--device", default="cpu", help="FPN_DEVICE of the servers")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve_load.json")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install -y wrk")

    work = Path(tempfile.mkdtemp(prefix="fpn-serve-bench-"))
    x = load_images(args.data_dir, 512)
    plain = write_bodies(work / "bodies.txt", x)
    mix = write_bodies(work / "bodies_mix.txt", x, MIX_TOLS)
    checkpoint = args.model_dir / args.model
    reference = InProcess(checkpoint, x, args.threads, args.device)
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": args.threads, "device": args.device},
        "in_process": {
            "batch_1_ms": reference.batch_ms(1, 50),
            "batch_32_ms": reference.batch_ms(32),
            "batch_64_ms": reference.batch_ms(64),
            "early_exit": reference.early_exit(),
        },
        "servers": {},
    }
    print(json.dumps(results["in_process"]), flush=True)
    # Every configuration runs at once (idle servers cost nothing) and the runs interleave, so
    # drifting load from other processes hits every configuration alike.
    env = {"FPN_NUM_THREADS": str(args.threads), "FPN_DEVICE": args.device}
    servers = {name: Server(checkpoint, {**env, **extra}, work / f"{name}.log")
               for name, extra in CONFIGS.items()}  # fmt: skip
    cells: dict[tuple[str, str], list[dict]] = {}
    baseline: list[float] = []
    added: dict[str, list[float]] = {name: [] for name in CONFIGS}
    try:
        for round_ in range(args.rounds):
            order = list(CONFIGS)[round_ % len(CONFIGS) :] + list(CONFIGS)[: round_ % len(CONFIGS)]
            solve = reference.solve_p50_ms()
            baseline.append(solve)
            for c in args.concurrency:
                for name in order:
                    run = measure(servers[name], args.model, plain, c, args.duration)
                    cells.setdefault((name, f"c{c}"), []).append(run)
                    if c == 1:
                        added[name].append(run["p50_ms"] - solve)
                    print(round_, name, c, json.dumps(run), flush=True)
            for name in ("batching", "batching-delay-0"):
                run = measure(servers[name], args.model, mix, 64, args.duration)
                cells.setdefault((name, "mix-c64"), []).append(run)
                print(round_, name, "mix", json.dumps(run), flush=True)
    finally:
        for server in servers.values():
            server.stop()
    for (name, cell), runs in cells.items():
        results["servers"].setdefault(name, {"env": {**env, **CONFIGS[name]}, "runs": {}})
        results["servers"][name]["runs"][cell] = median_run(runs)
    results["in_process"]["solve_p50_ms"] = statistics.median(baseline)
    results["added_latency_p50_ms"] = {name: statistics.median(v) for name, v in added.items() if v}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))


def report(r: dict) -> str:
    lines = ["| server | load | req/s | p50 ms | p95 ms | p99 ms | mean batch | solve ms/batch "
             "| server CPU ms/req |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for name, server in r["servers"].items():
        for run, m in server["runs"].items():
            lines.append(
                f"| {name} | {run} | {m['rps']:.0f} | {m['p50_ms']:.2f} | {m['p95_ms']:.2f} | "
                f"{m['p99_ms']:.2f} | {m['mean_batch_size']:.1f} | {m['solve_ms_per_batch']:.2f} "
                f"| {m['server_cpu_ms_per_request']:.2f} |"
            )
    p = r["in_process"]
    lines.append("")
    lines.append(
        f"in-process solve p50: batch 1 {p['solve_p50_ms']:.2f} ms; batch 32 "
        f"{p['batch_32_ms']:.1f} ms; batch 64 {p['batch_64_ms']:.1f} ms"
    )
    for name, value in r["added_latency_p50_ms"].items():
        lines.append(f"added latency at c=1 ({name}): {value:+.2f} ms p50")
    b, n = r["servers"].get("batching"), r["servers"].get("no-batching")
    if b and n and "c64" in b["runs"] and "c64" in n["runs"]:
        ratio = b["runs"]["c64"]["rps"] / n["runs"]["c64"]["rps"]
        lines.append(f"batching speed-up at c=64: {ratio:.2f}x")
    e = r["in_process"]["early_exit"]
    lines.append(
        f"early exit (batch 64, tol mix): per-sample {e['per_sample_ms_per_batch']:.1f} ms/batch "
        f"({e['per_sample_iterations']} sample-iterations) vs synchronous "
        f"{e['synchronous_ms_per_batch']:.1f} ms/batch ({e['synchronous_iterations']})"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
