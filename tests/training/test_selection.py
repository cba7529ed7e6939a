"""Honest model selection (SPEC §3): the best epoch is chosen on a validation split held out of
the training data, fixed by the seed; the test split is read once, at the end; ``fpn-eval --split
val`` re-creates the validation split from a checkpoint's config.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import synthetic_config

import training.loop as loop
from models import load_checkpoint
from training.data import load_dataset

BIN = Path(sys.executable).parent


def test_the_test_split_is_read_once_after_every_validation(tmp_path, monkeypatch):
    """Instrument the loader and the evaluator: epochs are scored on validation examples only,
    and the test split is loaded and evaluated once, after the last epoch."""
    events: list[tuple[str, ...]] = []
    real_load, real_evaluate = loop.load_dataset, loop.evaluate

    def load(name, split, *args, **kwargs):
        events.append(("load", split))
        return real_load(name, split, *args, **kwargs)

    def evaluate(model, dataset, **kwargs):
        events.append(("evaluate", str(len(dataset))))
        return real_evaluate(model, dataset, **kwargs)

    monkeypatch.setattr(loop, "load_dataset", load)
    monkeypatch.setattr(loop, "evaluate", evaluate)
    result = loop.train(synthetic_config(tmp_path / "c", epochs=3))

    test_size = len(real_load("synthetic", "test"))
    assert events[0] == ("load", "train")
    assert events[1:4] == [("evaluate", "400")] * 3  # the 400 held-out examples
    assert events[4:] == [("load", "test"), ("evaluate", str(test_size))]
    assert [r["epoch"] for r in result.epochs] == [1, 2, 3]
    assert all("test_accuracy" not in r for r in result.epochs)


def test_the_validation_split_is_fixed_by_the_seed_and_disjoint_from_training(mnist_dir):
    full = load_dataset("mnist", "train", mnist_dir)
    rest, val = full.split(5000, seed=0)
    again_rest, again_val = full.split(5000, seed=0)
    assert len(val) == 5000 and len(rest) == 55000
    assert torch.equal(val.images, again_val.images) and torch.equal(rest.labels, again_rest.labels)
    other = full.split(5000, seed=1)[1]
    assert not torch.equal(other.images, val.images)
    # disjoint and complete: every training image is in exactly one of the two
    keys = lambda d: {bytes(row) for row in d.images.flatten(1).numpy()}  # noqa: E731
    assert not keys(rest) & keys(val)
    assert len(keys(rest) | keys(val)) == len(keys(full))
    # every class is represented in the held-out examples
    assert torch.bincount(val.labels, minlength=10).min() > 300
    with pytest.raises(ValueError, match="validation split of 60000"):
        full.split(60000, seed=0)


def test_best_epoch_and_early_stopping_follow_the_validation_split(tmp_path):
    """With a zero learning rate nothing improves after epoch 1: patience 1 stops after epoch 2
    and keeps epoch 1."""
    result = loop.train(synthetic_config(tmp_path / "p", epochs=5, lr=0.0, patience=1))
    assert [r["epoch"] for r in result.epochs] == [1, 2]
    assert result.best_epoch == 1
    assert load_checkpoint(tmp_path / "p").training["best_epoch"] == 1


def test_fpn_eval_split_val_reproduces_the_training_runs_validation_accuracy(tmp_path):
    result = loop.train(synthetic_config(tmp_path / "v", epochs=1, seed=5))
    done = subprocess.run(
        [str(BIN / "fpn-eval"), "--checkpoint", str(tmp_path / "v"), "--dataset", "synthetic",
         "--split", "val", "--device", "cpu", "--json"],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["n"] == 400
    assert report["accuracy"] == pytest.approx(result.val_accuracy)
    assert report["accuracy"] == pytest.approx(
        load_checkpoint(tmp_path / "v").metrics["val_accuracy"]
    )


def test_fpn_eval_split_val_on_a_checkpoint_without_one_says_so(repo_root, tmp_path):
    ckpt = tmp_path / "old"
    ckpt.mkdir()
    src = repo_root / "checkpoints" / "mnist-fpn"
    document = json.loads((src / "config.json").read_text())
    document["training"].pop("val_split", None)
    (ckpt / "config.json").write_text(json.dumps(document))
    (ckpt / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    done = subprocess.run(
        [str(BIN / "fpn-eval"), "--checkpoint", str(ckpt), "--dataset", "synthetic",
         "--split", "val"],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2
    assert "records no validation split" in done.stderr
