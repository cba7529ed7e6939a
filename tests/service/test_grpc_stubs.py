"""The committed gRPC modules are exactly what the pinned grpcio-tools generates from the
committed ``.proto`` (run ``python -m service.protocol`` after changing either)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.protocol import GENERATED, PROTO


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    from service.protocol.__main__ import generate

    generated = generate(tmp_path)
    assert [p.name for p in generated] == list(GENERATED)
    for path in generated:
        committed = PROTO.parent / path.name
        assert committed.read_text() == path.read_text(), (
            f"{committed} is stale: regenerate with `python -m service.protocol`"
        )


def test_the_proto_is_the_open_inference_protocol() -> None:
    text = PROTO.read_text()
    assert "package inference;" in text and "service GRPCInferenceService" in text
    for rpc in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
                "ModelInfer"):  # fmt: skip
        assert f"rpc {rpc}(" in text
