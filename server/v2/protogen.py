"""Regenerate the gRPC modules from grpc_predict_v2.proto (needs grpcio-tools, a test dependency):

    python -m server.v2.protogen          # from the repository root; rewrites server/v2/grpc_predict_v2_pb2*.py

The messages are built into a private descriptor pool instead of protobuf's default one: tritonclient's own
generated modules define the same `inference.*` messages in the default pool, and one process (a test, a
benchmark, an application with a client and an embedded server) must be able to import both.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO = Path("server") / "v2" / "grpc_predict_v2.proto"
MODULES = ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2_grpc.py")
_DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
_PRIVATE_POOL = "_descriptor_pool.DescriptorPool().AddSerializedFile("  # see the module docstring


def generate(repo_root: Path, out_dir: Path) -> list[Path]:
    """Run protoc on the proto under `repo_root`; the modules land in out_dir/server/v2/. Returns their paths."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{repo_root}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}"]
    args.append(str(repo_root / PROTO))
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    messages = out_dir / PROTO.parent / MODULES[0]
    text = messages.read_text()
    if text.count(_DEFAULT_POOL) != 1:
        raise RuntimeError(f"unexpected protoc output in {messages}: no single default-pool registration")
    messages.write_text(text.replace(_DEFAULT_POOL, _PRIVATE_POOL))
    return [out_dir / PROTO.parent / name for name in MODULES]


if __name__ == "__main__":
    root = Path.cwd()
    for path in generate(root, root):
        print(f"wrote {path.relative_to(root)}", file=sys.stderr)
