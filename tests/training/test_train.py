"""Training end to end: the loop learns, writes a loadable checkpoint, and the CLIs keep SPEC §3."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import (
    ArchConfig,
    BackpropConfig,
    ModelConfig,
    SolverConfig,
    create_model,
    load_checkpoint,
)
from training.data import load_dataset
from training.loop import TrainConfig, train

BIN = Path(sys.executable).parent


def synthetic_config(out: Path, *, backprop: str = "jfb", **overrides) -> TrainConfig:
    """An MLP FPN on the synthetic set (2,000 training examples, 400 of them held out)."""
    model = ModelConfig(
        family="fpn",
        arch=ArchConfig(kind="mlp", width=64),
        solver=SolverConfig(tol=1e-4, max_iter=50),
        backprop=BackpropConfig(mode=backprop),
    )
    base = dict(
        model=model, dataset="synthetic", epochs=2, batch_size=64, lr=3e-3, val_split=400,
        out=str(out), progress=False, device="cpu",
    )  # fmt: skip
    return TrainConfig(**{**base, **overrides})


def test_training_on_synthetic_learns_in_seconds_and_saves_a_loadable_checkpoint(tmp_path):
    result = train(synthetic_config(tmp_path / "ckpt"))
    assert result.test_accuracy > 0.95 and result.val_accuracy > 0.95
    assert result.mean_train_iterations > 1
    ckpt = load_checkpoint(result.checkpoint)
    test = load_dataset("synthetic", "test")
    out = ckpt.model.predict(test.images)
    accuracy = float((out.logits.argmax(1) == test.labels).float().mean())
    assert accuracy == pytest.approx(result.test_accuracy)
    assert ckpt.metrics["test_accuracy"] == pytest.approx(result.test_accuracy)
    assert ckpt.metrics["val_accuracy"] == pytest.approx(result.val_accuracy)
    assert ckpt.metrics["val_n"] == 400 and ckpt.metrics["test_n"] == len(test)
    assert ckpt.config.backprop.mode == "jfb"
    assert ckpt.training["best_epoch"] == result.best_epoch


@pytest.mark.parametrize("backprop", ["ift", "neumann", "unrolled"])
def test_every_backprop_mode_trains(tmp_path, backprop):
    result = train(synthetic_config(tmp_path / backprop, backprop=backprop, epochs=1))
    assert result.test_accuracy > 0.9


def test_conv_model_trains_on_a_few_mnist_steps(tmp_path, mnist_dir):
    cfg = TrainConfig(
        model=ModelConfig(arch=ArchConfig(channels=8)), dataset="mnist", data_dir=str(mnist_dir),
        max_steps=30, batch_size=64, eval_limit=500, out=str(tmp_path / "m"), progress=False,
        device="cpu",
    )  # fmt: skip
    result = train(cfg)
    assert result.steps == 30
    assert result.test_accuracy > 0.4  # chance is 0.1


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=False, cwd=cwd, timeout=300)


def test_fpn_train_cli_prints_the_spec_json_summary(tmp_path):
    out = tmp_path / "cli"
    done = _run(
        str(BIN / "fpn-train"), "--family", "deq", "--dataset", "synthetic", "--arch", "mlp",
        "--width", "32", "--max-steps", "15", "--batch-size", "32", "--val-split", "400",
        "--tol", "1e-3", "--out", str(out), "--device", "cpu", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    keys = {
        "test_accuracy",
        "val_accuracy",
        "seconds_per_step",
        "peak_memory_bytes",
        "mean_train_iterations",
        "checkpoint",
    }
    assert keys <= set(summary)
    config = json.loads((out / "config.json").read_text())
    assert config["family"] == "deq" and config["backprop"]["mode"] == "ift"  # deq's default
    assert config["training"]["command"].startswith("fpn-train --family deq")
    # Each value once: tol lives in the solver section only; options not given keep the defaults.
    assert config["solver"]["tol"] == 1e-3
    assert config["solver"]["max_iter"] == SolverConfig().max_iter
    assert config["arch"]["gamma"] == ArchConfig().gamma
    assert "tol" not in config["training"] and "family" not in config["training"]
    assert "eval_tol" not in config["metrics"]
    assert config["training"]["val_split"] == 400 and config["training"]["lr"] == 2e-3


def test_fpn_train_rejects_an_unknown_family_with_the_list():
    done = _run(str(BIN / "fpn-train"), "--family", "nope", "--dataset", "synthetic")
    assert done.returncode != 0
    assert "unknown family 'nope'" in done.stderr and "fpn" in done.stderr


def test_fpn_eval_cli_reports_the_spec_keys_on_the_bundled_model(repo_root, mnist_dir):
    done = _run(
        str(BIN / "fpn-eval"), "--checkpoint", str(repo_root / "checkpoints" / "mnist-fpn"),
        "--dataset", "mnist", "--data-dir", str(mnist_dir), "--limit", "300",
        "--device", "cpu", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report) == {
        "n", "accuracy", "iterations", "mean_residual", "converged_fraction", "images_per_second",
    }  # fmt: skip
    assert report["n"] == 300 and report["accuracy"] > 0.98
    assert set(report["iterations"]) == {"mean", "p50", "p95", "max"}


def test_fpn_eval_on_a_corrupt_checkpoint_names_the_file(tmp_path, repo_root):
    ckpt = tmp_path / "broken"
    ckpt.mkdir()
    src = repo_root / "checkpoints" / "mnist-fpn"
    (ckpt / "config.json").write_text((src / "config.json").read_text())
    (ckpt / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:1000])
    done = _run(str(BIN / "fpn-eval"), "--checkpoint", str(ckpt), "--dataset", "synthetic")
    assert done.returncode != 0
    assert "model.safetensors" in done.stderr


@pytest.mark.slow
def test_ddp_on_two_gloo_processes_matches_one_process(tmp_path):
    """torchrun with 2 CPU processes follows the 1-process run (same global batches, mean grads)."""
    common = [
        "--dataset", "synthetic", "--arch", "mlp", "--width", "32", "--max-steps", "8",
        "--batch-size", "64", "--device", "cpu", "--lr", "1e-2", "--seed", "3",
        "--val-split", "400",
    ]  # fmt: skip
    single = _run(sys.executable, "-m", "training", *common, "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    ddp = _run(
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "training", *common, "--out", str(tmp_path / "two"),
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr
    one = load_checkpoint(tmp_path / "one").model.state_dict()
    two = load_checkpoint(tmp_path / "two").model.state_dict()
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    # and training moved the weights: the comparison is not between two untouched models
    torch.manual_seed(3)
    untrained = create_model(load_checkpoint(tmp_path / "one").config).state_dict()
    assert not torch.allclose(one["head.weight"], untrained["head.weight"], atol=1e-3)
