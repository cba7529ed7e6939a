"""The Open Inference Protocol's gRPC API: the official ``.proto`` and the Python modules that
``grpcio-tools`` generates from it (committed; ``python -m service.protocol`` regenerates them and
``tests/service/test_grpc_stubs.py`` checks that the committed ones are what it generates).

The generated modules register the ``inference`` protobuf package in protobuf's default pool, as
``tritonclient.grpc`` does with its own copy: import them only where gRPC is served, never in a
process that also imports ``tritonclient.grpc`` (the test process, the benchmark client).
"""

from __future__ import annotations

from pathlib import Path

PROTO = Path(__file__).resolve().parent / "open_inference_grpc.proto"
GENERATED = ("open_inference_grpc_pb2.py", "open_inference_grpc_pb2_grpc.py")
