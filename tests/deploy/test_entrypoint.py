"""docker/entrypoint.sh outside a container: the exporter, TensorRT builder, GPU query and server are stubs that
record their calls, so the caching rules are checked in milliseconds: export once, build an engine once per
model + GPU + TensorRT version, reuse on the next start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from _deploy_helpers import DOCKER, SHARED, require_tool

ENTRYPOINT = DOCKER / "entrypoint.sh"

# Stands in for `python`: records each call in $CALLS; -m model_export / model_export.tensorrt write --out (and
# the .json sidecar); -m server prints the environment the real server would read.
FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "$*" >> "$CALLS"
if [[ $1 == -c ]]; then
    case $2 in
        *"import tensorrt"*) echo "$FAKE_TRT" ;;
        *"import torch"*) exit 1 ;;
        *) exit 0 ;;
    esac
    exit 0
fi
out=""
prev=""
for arg in "$@"; do [[ $prev == --out ]] && out=$arg; prev=$arg; done
case $2 in
    model_export)
        [[ -n ${FAKE_EXPORT_FAIL:-} ]] && { echo "export exploded" >&2; exit 3; }
        echo "onnx from $*" > "$out" ;;
    model_export.tensorrt)
        echo "engine" > "$out"; echo '{"gpu_name": "x", "tensorrt_version": "y"}' > "$out.json" ;;
    server)
        echo "SERVE SSD_MODEL=$SSD_MODEL"
        echo "SERVE SSD_WEIGHTS_DIR=$SSD_WEIGHTS_DIR"
        echo "SERVE mirror=${SSD_WEIGHTS_MIRROR-unset}" ;;
esac
"""

FAKE_NVIDIA_SMI = r"""#!/usr/bin/env bash
[[ -n ${FAKE_GPU:-} ]] || exit 9
echo "$FAKE_GPU"
"""


@pytest.fixture
def sandbox(tmp_path: Path) -> dict:
    require_tool("flock")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("python", FAKE_PYTHON), ("nvidia-smi", FAKE_NVIDIA_SMI)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SSD_", "MODEL_", "TRT_"))}
    env.pop("WEIGHTS_MIRROR", None)
    env.update(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        PYTHON=str(bin_dir / "python"),
        MODEL_CACHE_DIR=str(tmp_path / "cache"),
        CALLS=str(tmp_path / "calls.log"),
        FAKE_TRT="10.13.3.9",
        FAKE_GPU="NVIDIA H200",
    )
    env.pop("TORCH_HOME", None)
    return {"env": env, "cache": tmp_path / "cache", "calls": tmp_path / "calls.log"}


def start(sandbox: dict, **overrides: str) -> subprocess.CompletedProcess[str]:
    env = {**sandbox["env"], **overrides}
    return subprocess.run(["bash", str(ENTRYPOINT)], env=env, capture_output=True, text=True, timeout=30)


def served_model(result: subprocess.CompletedProcess[str]) -> Path:
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("SERVE SSD_MODEL="))
    return Path(line.split("=", 1)[1])


def calls(sandbox: dict, module: str) -> list[str]:
    if not sandbox["calls"].exists():
        return []
    return [line for line in sandbox["calls"].read_text().splitlines() if line.startswith(f"-m {module} ")]


def test_onnxruntime_exports_once_into_the_cache(sandbox: dict) -> None:
    first = start(sandbox, SSD_ENGINE="onnxruntime")
    model = served_model(first)
    assert model == sandbox["cache"] / "onnx" / "ssd_mobilenet_v1_coco-coco.onnx"
    assert model.is_file()
    [export] = calls(sandbox, "model_export")
    assert "--model ssd_mobilenet_v1_coco" in export and "--weights coco" in export and "--max-batch 64" in export
    assert "--numerics" not in export  # the model's own: integer (LiteRT's arithmetic) for ONNX Runtime
    assert f"SERVE SSD_WEIGHTS_DIR={sandbox['cache'] / 'weights'}" in first.stdout
    assert not list(model.parent.glob("*partial*")), "temporary export files left behind"

    second = start(sandbox, SSD_ENGINE="onnxruntime")
    assert served_model(second) == model
    assert len(calls(sandbox, "model_export")) == 1, "the second start must reuse the exported file"
    assert not calls(sandbox, "model_export.tensorrt")


def test_tensorrt_engine_is_keyed_by_model_gpu_and_tensorrt_version(sandbox: dict) -> None:
    engine = served_model(start(sandbox, SSD_ENGINE="tensorrt", SSD_MAX_BATCH_SIZE="32"))
    assert engine.suffix == ".engine" and engine.is_file()
    assert (engine.parent / (engine.name + ".json")).is_file(), "the builder's .engine.json sidecar must be kept"
    assert engine.name == "fp16-b32.engine"
    assert engine.parent.name == "trt-10.13.3.9"
    assert engine.parent.parent.name == "nvidia-h200"
    assert engine.parent.parent.parent.name.startswith("ssd_mobilenet_v1_coco-coco-float-")
    [export] = calls(sandbox, "model_export")
    assert "--numerics float" in export  # TensorRT cannot run the uint8 graph
    [build] = calls(sandbox, "model_export.tensorrt")
    assert "--precision fp16" in build and "--max-batch 32" in build
    assert "--onnx " + str(sandbox["cache"] / "onnx" / "ssd_mobilenet_v1_coco-coco-float.onnx") in build

    # Second start, same GPU and TensorRT: nothing rebuilt, nothing re-exported.
    assert served_model(start(sandbox, SSD_ENGINE="tensorrt", SSD_MAX_BATCH_SIZE="32")) == engine
    assert len(calls(sandbox, "model_export.tensorrt")) == 1
    assert len(calls(sandbox, "model_export")) == 1

    # Another GPU, then another TensorRT: an engine of their own, the ONNX still reused.
    other_gpu = served_model(start(sandbox, SSD_ENGINE="tensorrt", SSD_MAX_BATCH_SIZE="32", FAKE_GPU="NVIDIA L4"))
    other_trt = served_model(start(sandbox, SSD_ENGINE="tensorrt", SSD_MAX_BATCH_SIZE="32", FAKE_TRT="10.14.1.48"))
    assert len({engine, other_gpu, other_trt}) == 3
    assert other_gpu.parent.parent.name == "nvidia-l4" and other_trt.parent.name == "trt-10.14.1.48"
    assert len(calls(sandbox, "model_export.tensorrt")) == 3
    assert len(calls(sandbox, "model_export")) == 1


def test_tensorrt_without_a_gpu_fails_clearly(sandbox: dict) -> None:
    result = start(sandbox, SSD_ENGINE="tensorrt", FAKE_GPU="")
    assert result.returncode != 0
    assert "no GPU is visible" in result.stderr
    assert "SERVE" not in result.stdout


def test_given_model_file_is_used_as_is(sandbox: dict, tmp_path: Path) -> None:
    mine = tmp_path / "mine.onnx"
    mine.write_text("onnx")
    assert served_model(start(sandbox, SSD_ENGINE="onnxruntime", SSD_MODEL=str(mine))) == mine
    assert not calls(sandbox, "model_export")
    engine = tmp_path / "mine.engine"
    engine.write_text("engine")
    assert served_model(start(sandbox, SSD_ENGINE="tensorrt", SSD_MODEL=str(engine))) == engine
    assert not calls(sandbox, "model_export.tensorrt")
    missing = start(sandbox, SSD_ENGINE="tensorrt", SSD_MODEL=str(tmp_path / "gone.engine"))
    assert missing.returncode != 0 and "does not exist" in missing.stderr


def test_empty_settings_are_removed_and_mirror_is_passed_through(sandbox: dict) -> None:
    unset = start(sandbox, SSD_ENGINE="onnxruntime", SSD_WEIGHTS_MIRROR="", SSD_MAX_BATCH_SIZE="")
    assert "SERVE mirror=unset" in unset.stdout, "an empty SSD_* variable must not reach the server's settings"
    given = start(sandbox, SSD_ENGINE="onnxruntime", SSD_WEIGHTS_MIRROR="/somewhere")
    assert "SERVE mirror=/somewhere" in given.stdout
    # compose: WEIGHTS_MIRROR is the host directory mounted at /weights-mirror
    mounted = start(sandbox, SSD_ENGINE="onnxruntime", WEIGHTS_MIRROR="/home/me/mirror")
    assert "SERVE mirror=/weights-mirror" in mounted.stdout
    assert "SERVE mirror=unset" in start(sandbox, SSD_ENGINE="onnxruntime", WEIGHTS_MIRROR="").stdout


def test_failed_export_leaves_nothing_behind(sandbox: dict) -> None:
    result = start(sandbox, SSD_ENGINE="onnxruntime", FAKE_EXPORT_FAIL="1")
    assert result.returncode != 0
    assert "export of ssd_mobilenet_v1_coco failed" in result.stderr
    assert not list((sandbox["cache"] / "onnx").glob("*")), "a failed export must not leave a file to be reused"


def test_shellcheck() -> None:
    shellcheck = require_tool("shellcheck")
    result = subprocess.run([shellcheck, str(ENTRYPOINT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


MIRROR = SHARED / "models"


@pytest.mark.slow
def test_real_export_from_the_weights_mirror_then_reuse(tmp_path: Path) -> None:
    """The container's first start with the project's real exporter and an offline weights mirror, then a restart."""
    if not (MIRROR / "coco_ssd_mobilenet_v1" / "detect.tflite").is_file():
        pytest.skip(f"no weights mirror at {MIRROR}")
    pytest.importorskip("torch")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SSD_", "MODEL_", "TRT_"))}
    env.pop("TORCH_HOME", None)
    env.update(
        PYTHON=sys.executable,
        MODEL_CACHE_DIR=str(tmp_path / "cache"),
        SSD_WEIGHTS_MIRROR=str(MIRROR),
        SSD_ENGINE="onnxruntime",
    )
    check = (
        "import os, onnxruntime; path = os.environ['SSD_MODEL']; "
        "session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider']); "
        "print('LOADED', path, [i.name for i in session.get_inputs()])"
    )
    command = ["bash", str(ENTRYPOINT), sys.executable, "-c", check]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    onnx = tmp_path / "cache" / "onnx" / "ssd_mobilenet_v1_coco-coco.onnx"
    assert f"LOADED {onnx} ['images']" in first.stdout
    assert (tmp_path / "cache" / "weights" / "ssd_mobilenet_v1_coco" / "detect.tflite").is_file()
    assert not list(onnx.parent.glob("*partial*"))

    stamp = onnx.stat().st_mtime_ns
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "reusing the exported model" in second.stderr
    assert onnx.stat().st_mtime_ns == stamp


def test_export_mode_fills_the_cache_and_exits(sandbox: dict) -> None:
    """`entrypoint.sh export`: the init step (compose's model-init-cpu, a Kubernetes initContainer)."""
    env = {**sandbox["env"], "SSD_ENGINE": "onnxruntime"}
    first = subprocess.run(["bash", str(ENTRYPOINT), "export"], env=env, capture_output=True, text=True, timeout=30)
    assert first.returncode == 0, first.stderr
    assert "SERVE" not in first.stdout, "export mode must not start the server"
    onnx = sandbox["cache"] / "onnx" / "ssd_mobilenet_v1_coco-coco.onnx"
    assert onnx.is_file() and f"the cache holds {onnx}" in first.stderr
    again = subprocess.run(["bash", str(ENTRYPOINT), "export"], env=env, capture_output=True, text=True, timeout=30)
    assert again.returncode == 0 and "reusing the exported model" in again.stderr
    assert len(calls(sandbox, "model_export")) == 1
    # The server's start afterwards (the runtime image) finds that very file.
    assert served_model(start(sandbox, SSD_ENGINE="onnxruntime")) == onnx
    bad = subprocess.run(["bash", str(ENTRYPOINT), "export", "extra"], env=env, capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode != 0 and "usage: entrypoint.sh export" in bad.stderr


def test_server_only_image_without_a_cached_model_names_the_init_step(sandbox: dict) -> None:
    fake = Path(sandbox["env"]["PYTHON"])
    no_exporter = fake.with_name("python-no-exporter")
    no_exporter.write_text(fake.read_text().replace('*) exit 0 ;;', '*"model_export.cli"*) exit 1 ;;\n        *) exit 0 ;;', 1))
    no_exporter.chmod(0o755)
    result = start(sandbox, SSD_ENGINE="onnxruntime", PYTHON=str(no_exporter))
    assert result.returncode != 0 and "SERVE" not in result.stdout
    assert "run the exporter image's init step first" in result.stderr
