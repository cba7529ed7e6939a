"""The checkpoint format (SPEC §4): exact round trips, errors that name the file, no pickle."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

import models.checkpoint as checkpoint_module
from models import FAMILIES, CheckpointError, load_checkpoint, save_checkpoint
from models.checkpoint import CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE, read_config

KINDS = ("conv", "mlp")


@pytest.fixture
def saved(make_model, tmp_path) -> Path:
    """A float32 MLP FPN checkpoint directory."""
    model = make_model("fpn", "mlp", dtype=torch.float32, width=8)
    return save_checkpoint(
        model, tmp_path / "tiny", training={"epochs": 1}, metrics={"test_accuracy": 0.5}
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_round_trip_is_exact(make_model, make_inputs, tmp_path, family, kind):
    model = make_model(family, kind, dtype=torch.float32)
    directory = save_checkpoint(model, tmp_path / "ckpt", metrics={"test_accuracy": 0.25})
    loaded = load_checkpoint(directory)
    assert loaded.name == "ckpt" and loaded.metrics == {"test_accuracy": 0.25}
    assert loaded.config == model.config
    assert not loaded.model.training
    before, after = model.state_dict(), loaded.model.state_dict()
    assert list(before) == list(after)
    for key in before:
        assert before[key].dtype == after[key].dtype, key
        assert torch.equal(before[key], after[key]), key
    x = make_inputs(model, 4)
    expected, actual = model.predict(x), loaded.model.predict(x)
    assert torch.equal(expected.logits, actual.logits)
    assert torch.equal(expected.stats.iterations, actual.stats.iterations)


def test_config_json_holds_what_the_spec_lists(saved):
    document = json.loads((saved / CONFIG_FILE).read_text())
    assert document["format_version"] == FORMAT_VERSION
    assert document["name"] == "tiny" and document["family"] == "fpn"
    assert {"kind", "gamma"} <= set(document["arch"])
    assert {"shape", "dtype", "scale", "mean", "std"} <= set(document["input"])
    assert document["classes"] == ["class-0", "class-1", "class-2"]
    assert {"method", "tol", "max_iter"} <= set(document["solver"])
    assert document["training"] == {"epochs": 1}
    assert document["metrics"] == {"test_accuracy": 0.5}
    assert read_config(saved) == document


def test_saving_leaves_only_the_checkpoint_files(saved):
    assert sorted(p.name for p in saved.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])


def test_a_failed_save_keeps_the_previous_checkpoint_intact(saved, make_model, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}

    def broken_save_file(tensors, path):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(make_model("fpn", "mlp", dtype=torch.float32, width=8), saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before


def test_loading_never_unpickles(saved, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a checkpoint load must not unpickle")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch.serialization, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    assert load_checkpoint(saved).model is not None


# --- every broken checkpoint fails with CheckpointError naming the file -------------------------


def _edit_config(directory: Path, change) -> None:
    path = directory / CONFIG_FILE
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def _truncate_weights(directory: Path) -> None:
    path = directory / WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _wider(document: dict) -> None:
    document["arch"]["width"] = 16  # the weights hold width 8


def _drop_a_tensor(directory: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(directory / WEIGHTS_FILE))
    tensors.pop("head.bias")
    save_file(tensors, str(directory / WEIGHTS_FILE))


BROKEN = {
    "missing config.json": (lambda d: (d / CONFIG_FILE).unlink(), CONFIG_FILE, "missing"),
    "missing weights": (lambda d: (d / WEIGHTS_FILE).unlink(), WEIGHTS_FILE, "missing"),
    "truncated weights": (_truncate_weights, WEIGHTS_FILE, "truncated"),
    "empty weights": (lambda d: (d / WEIGHTS_FILE).write_bytes(b""), WEIGHTS_FILE, "truncated"),
    "weights are not safetensors": (
        lambda d: (d / WEIGHTS_FILE).write_bytes(pickle.dumps({"head.bias": [0.0]})),
        WEIGHTS_FILE,
        "unreadable",
    ),
    "config-weights shape mismatch": (lambda d: _edit_config(d, _wider), WEIGHTS_FILE, "shape"),
    "a tensor missing from the weights": (_drop_a_tensor, WEIGHTS_FILE, "head.bias"),
    "invalid JSON": (
        lambda d: (d / CONFIG_FILE).write_text('{"format_version": 1,'),
        CONFIG_FILE,
        "JSON",
    ),
    "config is a JSON list": (lambda d: (d / CONFIG_FILE).write_text("[]"), CONFIG_FILE, "object"),
    "newer format_version": (
        lambda d: _edit_config(d, lambda doc: doc.update(format_version=FORMAT_VERSION + 1)),
        CONFIG_FILE,
        "format_version",
    ),
    "no format_version": (
        lambda d: _edit_config(d, lambda doc: doc.pop("format_version")),
        CONFIG_FILE,
        "format_version",
    ),
    "unknown family": (
        lambda d: _edit_config(d, lambda doc: doc.update(family="resnet")),
        CONFIG_FILE,
        "resnet",
    ),
    "unknown config key": (
        lambda d: _edit_config(d, lambda doc: doc["arch"].update(widht=8)),
        CONFIG_FILE,
        "widht",
    ),
    "arch is not an object": (
        lambda d: _edit_config(d, lambda doc: doc.update(arch=None)),
        CONFIG_FILE,
        "",
    ),
    "negative input shape": (
        lambda d: _edit_config(d, lambda doc: doc["input"].update(shape=[-1])),
        CONFIG_FILE,
        "invalid model config",
    ),
    "metrics is not an object": (
        lambda d: _edit_config(d, lambda doc: doc.update(metrics=[0.5])),
        CONFIG_FILE,
        "metrics",
    ),
    "not a contraction": (
        lambda d: _edit_config(d, lambda doc: doc["arch"].update(gamma=1.5)),
        CONFIG_FILE,
        "gamma",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_checkpoint_raises_an_error_that_names_the_file(saved, case):
    break_it, file_name, problem = BROKEN[case]
    break_it(saved)
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(saved)
    message = str(excinfo.value)
    assert str(saved / file_name) in message
    assert problem in message


def test_a_missing_directory_names_its_config_file(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path / "nowhere" / CONFIG_FILE)):
        load_checkpoint(tmp_path / "nowhere")


def test_a_loaded_checkpoint_holds_the_one_metadata_record(saved):
    from models.checkpoint import read_metadata

    ckpt = load_checkpoint(saved)
    assert ckpt.meta == read_metadata(saved)
    assert (ckpt.name, ckpt.path, ckpt.training, ckpt.metrics) == (
        "tiny",
        saved,
        {"epochs": 1},
        {"test_accuracy": 0.5},
    )
    assert ckpt.config == ckpt.model.config


def test_checkpoints_that_repeat_tol_in_training_and_metrics_still_load(saved):
    """Before each value was stored once, config.json repeated the solver's tol (and more) under
    ``training`` and ``metrics``; those sections are records, so such files load unchanged."""
    _edit_config(
        saved,
        lambda doc: (
            doc["training"].update(tol=1e-4, solver="anderson", family="fpn", arch="mlp"),
            doc["metrics"].update(eval_tol=1e-4, eval_solver="anderson"),
        ),
    )
    ckpt = load_checkpoint(saved)
    assert ckpt.training["tol"] == 1e-4 and ckpt.metrics["eval_tol"] == 1e-4
    assert ckpt.config.solver.tol == 1e-4
