"""Which ONNX design keeps adaptive depth fastest: measured on this project's checkpoints.

Three ways to run the same solve (same inputs, same per-sample ``tol`` / ``max_iter``):

- ``torch``: ``ImplicitClassifier.predict`` (the torch backend).
- ``ort-loop``: the whole solve in one ONNX graph (``models.onnx.build.build_onnx``: ``Q(x)`` once,
  an ``ONNX Loop`` whose body applies ``T``, tests every sample's residual and drops finished
  rows), one ``InferenceSession.run`` per batch. This is what ``fpn-export`` writes.
- ``ort-host``: the parts as three ONNX graphs (prologue ``x -> (Q(x), z0)``, step ``T``, epilogue
  ``S``) and the solver loop in Python/numpy, as :mod:`models.solvers` does it (active set, per
  sample stopping, Anderson with ``numpy.linalg.solve``), the step run through IO binding.

Times are medians of in-process calls on one thread (``--threads``), at the checkpoint's default
tolerance; the iteration counts of both ONNX designs are checked against torch's.

    .venv/bin/python bench/onnx_design.py --checkpoint checkpoints/mnist-fpn
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models import load_checkpoint  # noqa: E402
from models.onnx.build import build_onnx  # noqa: E402
from models.onnx.parts import export_parts  # noqa: E402
from models.onnx.plan import plan_export  # noqa: E402
from models.onnx.runtime import onnx_session, run_onnx  # noqa: E402
from models.onnx.verify import verification_inputs  # noqa: E402


class HostLoop:
    """The host-side design: three sessions and a numpy solver loop."""

    def __init__(self, parts: dict, threads: int, solvers: dict) -> None:
        self.sessions = {k: onnx_session(v.SerializeToString(), threads=threads)
                         for k, v in parts.items()}  # fmt: skip
        self.damping = solvers["picard"].damping
        a = solvers["anderson"]
        self.anderson = {"memory": a.memory, "mixing": a.mixing, "regularization": a.regularization}

    def step(self, z: np.ndarray, qx: np.ndarray) -> np.ndarray:
        session = self.sessions["step"]
        binding = session.io_binding()
        binding.bind_cpu_input("z", np.ascontiguousarray(z))
        binding.bind_cpu_input("qx", np.ascontiguousarray(qx))
        binding.bind_output("fz")
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def predict(self, x: np.ndarray, tol: np.ndarray, max_iter: np.ndarray, solver: str):
        qx, z0 = self.sessions["prologue"].run(None, {"x": x})
        solve = self.picard if solver == "picard" else self.anderson_solve
        z, iterations = solve(z0, qx, tol, max_iter)
        logits = self.sessions["epilogue"].run(None, {"z": z, "qx": qx})[0]
        return logits, iterations

    def _finish(self, state, k, z, fz, res, done) -> None:
        out, iters, index = state
        rows = index[done]
        ok = np.isfinite(res[done]).reshape(-1, *[1] * (z.ndim - 1))
        out[rows] = np.where(ok, fz[done], z[done])
        iters[rows] = k

    @staticmethod
    def _residual(fz: np.ndarray, z: np.ndarray) -> np.ndarray:
        f, d = fz.reshape(len(fz), -1), (fz - z).reshape(len(fz), -1)
        norm = np.linalg.norm(f, axis=1)
        res = np.linalg.norm(d, axis=1) / np.maximum(norm, 1e-12)
        return np.where(np.isfinite(norm), res, np.nan)

    def picard(self, z, qx, tol, max_iter):
        out, iters, index = z.copy(), np.zeros(len(z), np.int64), np.arange(len(z))
        for k in range(1, int(max_iter.max()) + 1):
            fz = self.step(z, qx)
            res = self._residual(fz, z)
            done = (res <= tol) | ~np.isfinite(res) | (max_iter <= k)
            if done.any():
                self._finish((out, iters, index), k, z, fz, res, done)
            z = fz if self.damping == 1.0 else z + self.damping * (fz - z)
            if done.any():
                keep = ~done
                z, qx, index = z[keep], qx[keep], index[keep]
                tol, max_iter = tol[keep], max_iter[keep]
                if not len(index):
                    break
        return out, iters

    def anderson_solve(self, z, qx, tol, max_iter):
        shape, n, m = z.shape[1:], int(np.prod(z.shape[1:])), self.anderson["memory"]
        lam, beta = self.anderson["regularization"], self.anderson["mixing"]
        out, iters, index = z.copy(), np.zeros(len(z), np.int64), np.arange(len(z))
        X = np.zeros((len(z), m, n), np.float32)
        F = np.zeros_like(X)
        x = z.reshape(len(z), n)
        for k in range(1, int(max_iter.max()) + 1):
            fx = self.step(x.reshape(-1, *shape), qx).reshape(-1, n)
            slot = (k - 1) % m
            X[:, slot], F[:, slot] = x, fx
            res = self._residual(fx, x)
            done = (res <= tol) | ~np.isfinite(res) | (max_iter <= k)
            if done.any():
                self._finish((out.reshape(len(out), n), iters, index), k, x, fx, res, done)
                keep = ~done
                X, F, fx, qx = X[keep], F[keep], fx[keep], qx[keep]
                tol, max_iter, index = tol[keep], max_iter[keep], index[keep]
                if not len(index):
                    break
            used = min(k, m)
            if used == 1:
                x = fx
                continue
            G = F[:, :used] - X[:, :used]
            gram = G @ G.transpose(0, 2, 1)
            diag = np.einsum("aii->ai", gram)
            scale = np.maximum(diag.min(1, keepdims=True), np.finfo(np.float32).tiny)
            gram = gram + lam * scale[:, :, None] * np.eye(used, dtype=np.float32)
            with np.errstate(all="ignore"):
                try:
                    w = np.linalg.solve(gram, np.ones((len(gram), used, 1), np.float32))
                except np.linalg.LinAlgError:
                    w = np.full((len(gram), used, 1), np.nan, np.float32)
                alpha = w / w.sum(1, keepdims=True)
                mixed = (alpha * F[:, :used]).sum(1)
                if beta != 1.0:
                    mixed_x = (alpha * X[:, :used]).sum(1)
                    mixed = mixed_x + beta * (mixed - mixed_x)
            ok = np.isfinite(mixed).all(1, keepdims=True)
            x = np.where(ok, mixed, fx)
        return out, iters


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, action="append")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "onnx_design.json")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    checkpoints = args.checkpoint or [REPO / "checkpoints" / "mnist-fpn"]
    results = {"machine": {"cpus": os.cpu_count(), "threads": args.threads,
                           "load_average": os.getloadavg()}, "models": {}}  # fmt: skip
    lines = [
        "| model | solver | batch | torch ms | ort-loop ms | ort-host ms | iterations "
        "(torch / loop / host) |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for path in checkpoints:
        model = load_checkpoint(path).model
        config = model.config
        loop = onnx_session(build_onnx(model).SerializeToString(), threads=args.threads)
        plan = plan_export(model)
        host = HostLoop(export_parts(plan, tuple(config.input.shape)), args.threads, plan.solvers)
        x_all = verification_inputs(tuple(config.input.shape), max(args.batches), seed=3)
        entry = results["models"].setdefault(path.name, {})
        for solver in plan.solvers:
            for b in args.batches:
                x = x_all[:b]
                tol = np.full(b, config.solver.tol)
                max_iter = np.full(b, config.solver.max_iter, np.int64)
                repeats = 50 if b == 1 else 10
                xt, tt, mt = (torch.from_numpy(v) for v in (x, tol, max_iter))
                torch_call = partial(model.predict, xt, tol=tt, max_iter=mt, solver=solver)
                loop_call = partial(run_onnx, loop, x, tol=tol, max_iter=max_iter, solver=solver)
                host_call = partial(host.predict, x, tol, max_iter, solver)
                with torch.inference_mode():
                    ref = torch_call()
                    t_torch = median_ms(torch_call, repeats)
                got = loop_call()
                t_loop = median_ms(loop_call, repeats)
                _, host_iters = host_call()
                t_host = median_ms(host_call, repeats)
                its = [float(ref.stats.iterations.float().mean()), float(got["iterations"].mean()),
                       float(host_iters.mean())]  # fmt: skip
                entry[f"{solver}-b{b}"] = {
                    "torch_ms": t_torch, "ort_loop_ms": t_loop, "ort_host_ms": t_host,
                    "mean_iterations": its,
                }  # fmt: skip
                lines.append(
                    f"| {path.name} | {solver} | {b} | {t_torch:.2f} | {t_loop:.2f} | "
                    f"{t_host:.2f} | {its[0]:.2f} / {its[1]:.2f} / {its[2]:.2f} |"
                )
                print(lines[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
