"""The committed gRPC modules are what `python -m server.v2.protogen` makes of grpc_predict_v2.proto, and the
service and methods are the names tritonclient calls."""

from __future__ import annotations

from pathlib import Path

from server.testing import REPO_ROOT
from server.v2 import protogen


def test_the_generated_modules_are_current(tmp_path: Path) -> None:
    for fresh in protogen.generate(REPO_ROOT, tmp_path):
        committed = REPO_ROOT / fresh.relative_to(tmp_path)
        assert fresh.read_text() == committed.read_text(), f"{committed} is stale: run python -m server.v2.protogen"


def test_the_service_is_the_one_tritonclient_calls() -> None:
    import tritonclient.grpc.service_pb2_grpc as triton

    from server.v2 import grpc_predict_v2_pb2_grpc as ours

    methods = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer")
    ours_text = Path(ours.__file__).read_text()
    triton_text = Path(triton.__file__).read_text()
    for method in methods:
        path = f"'/inference.GRPCInferenceService/{method}'"
        assert path in ours_text and path in triton_text, method
