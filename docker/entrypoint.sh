#!/usr/bin/env bash
# ssd-serve container entrypoint: make sure the model the server needs exists, then exec the server.
#
#   entrypoint.sh [COMMAND...]   fill the cache if needed, then exec COMMAND (default: python -m server)
#   entrypoint.sh export         fill the cache (steps 1 and 2) and exit 0: an init step (compose's
#                                model-init-cpu service, a Kubernetes initContainer) run in the exporter image
#
#   1. ONNX: SSD_MODEL if it names an existing file; otherwise $MODEL_CACHE_DIR/onnx/<model>-<weights>.onnx,
#      exported on first start (python -m model_export; its weight fetch reads SSD_WEIGHTS_MIRROR when set).
#   2. SSD_ENGINE=tensorrt: a TensorRT engine built from that ONNX on first start and kept under
#      $MODEL_CACHE_DIR/tensorrt/<model>-<onnx sha256>/<gpu name>/trt-<version>/, so the next start with the same
#      model, GPU and TensorRT reuses it and a different GPU or TensorRT gets its own engine.
#   3. SSD_MODEL is set to the file the server loads, and the command (default: python -m server) replaces this shell.
#
# Settings (environment):
#   MODEL_NAME       model source for the exporter           (default ssd_mobilenet_v1_coco)
#   MODEL_WEIGHTS    --weights for the exporter              (default coco; "none" exports random weights)
#   MODEL_CACHE_DIR  the cache volume                        (default /cache)
#   TRT_PRECISION    engine precision                        (default fp16)
#   TRT_MAX_BATCH    engine's largest batch                  (default SSD_MAX_BATCH_SIZE, else 64)
#   PYTHON           interpreter to run the exporters with   (default python)
#   WEIGHTS_MIRROR   compose sets it to the host directory it mounts at /weights-mirror; when non-empty (and
#                    SSD_WEIGHTS_MIRROR is not set) the export takes the weights from /weights-mirror
# Empty SSD_* variables are removed, so compose files can pass "${SSD_X:-}" through without overriding defaults.
set -euo pipefail

log() { printf '[entrypoint] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

for name in $(compgen -e); do
    if [[ $name == SSD_* && -z ${!name} ]]; then
        unset "$name"
    fi
done

if [[ -n ${WEIGHTS_MIRROR:-} && -z ${SSD_WEIGHTS_MIRROR:-} ]]; then
    export SSD_WEIGHTS_MIRROR=/weights-mirror
fi

PYTHON=${PYTHON:-python}
MODEL_NAME=${MODEL_NAME:-ssd_mobilenet_v1_coco}
MODEL_WEIGHTS=${MODEL_WEIGHTS:-coco}
CACHE=${MODEL_CACHE_DIR:-/cache}
ENGINE=${SSD_ENGINE:-onnxruntime}
TRT_PRECISION=${TRT_PRECISION:-fp16}
TRT_MAX_BATCH=${TRT_MAX_BATCH:-${SSD_MAX_BATCH_SIZE:-64}}
# The exporter's --numerics: TensorRT needs the float network (a quantised TFLite model's default, integer, is
# uint8 arithmetic that only ONNX Runtime runs); empty = the model's own.
NUMERICS=${MODEL_NUMERICS:-}
if [[ $ENGINE == tensorrt && -z $NUMERICS ]]; then NUMERICS=float; fi
# Where the exporter's weight fetch (model_export.weights, manifest models) and torch.hub (torchvision / NVIDIA
# checkpoints) keep downloaded weights: inside the cache volume, so a restart downloads nothing.
export SSD_WEIGHTS_DIR=${SSD_WEIGHTS_DIR:-$CACHE/weights}
export TORCH_HOME=${TORCH_HOME:-$CACHE/torch}

EXPORT_ONLY=false
if [[ ${1:-} == export ]]; then
    EXPORT_ONLY=true
    shift
    [[ $# -eq 0 ]] || die "usage: entrypoint.sh export (no further arguments), got: $*"
elif [[ $# -eq 0 ]]; then
    set -- "$PYTHON" -m server
fi

# Lower-case, and anything but [a-z0-9._-] becomes "-": "NVIDIA H200 NVL" -> "nvidia-h200-nvl".
slug() { tr '[:upper:]' '[:lower:]' <<<"$1" | sed -e 's/[^a-z0-9._-]\{1,\}/-/g' -e 's/^-//' -e 's/-$//'; }

mkdir -p "$CACHE" || die "cannot create the cache directory $CACHE"
[[ -w $CACHE ]] || die "the cache directory $CACHE is not writable by uid $(id -u)"
# One container at a time fills the cache: a second replica waits instead of exporting the same file twice.
exec 9>"$CACHE/.lock"
flock 9

export_onnx() {
    local out=$1 tmp
    local -a exporter=(-m model_export --model "$MODEL_NAME" --max-batch "$TRT_MAX_BATCH")
    [[ $MODEL_WEIGHTS == none ]] || exporter+=(--weights "$MODEL_WEIGHTS")
    [[ -z $NUMERICS ]] || exporter+=(--numerics "$NUMERICS")
    "$PYTHON" -c "import onnx, model_export.cli" 2>/dev/null \
        || die "no exported model at $out and this image has no exporter: run the exporter image's init step first (docker/Dockerfile.cpu --target exporter, command 'export', same /cache volume and MODEL_* settings), or mount an exported .onnx and set SSD_MODEL to it"
    mkdir -p "$(dirname "$out")" "$SSD_WEIGHTS_DIR"
    tmp=$(mktemp "$out.XXXXXX.partial.onnx")
    log "exporting $MODEL_NAME ($MODEL_WEIGHTS weights) to $out; weights are fetched into $SSD_WEIGHTS_DIR${SSD_WEIGHTS_MIRROR:+ from the mirror $SSD_WEIGHTS_MIRROR}"
    if ! "$PYTHON" "${exporter[@]}" --out "$tmp"; then
        rm -f "$tmp" "$tmp.json"
        die "export of $MODEL_NAME failed"
    fi
    if [[ -f $tmp.json ]]; then mv -f "$tmp.json" "$out.json"; fi
    mv -f "$tmp" "$out"
}

gpu_name() {
    local name=""
    if command -v nvidia-smi >/dev/null 2>&1; then
        name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1) || name=""
    fi
    if [[ -z $name ]]; then
        name=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0))" 2>/dev/null) || name=""
    fi
    [[ -n $name ]] || die "SSD_ENGINE=tensorrt but no GPU is visible (nvidia-smi and torch.cuda found none); run with --gpus or the compose GPU reservation"
    printf '%s\n' "$name"
}

build_engine() {
    local onnx=$1 out=$2 tmp
    mkdir -p "$(dirname "$out")"
    tmp="${out%.engine}.partial-$$.engine"
    log "building the TensorRT engine ($TRT_PRECISION, max batch $TRT_MAX_BATCH) for $onnx; this takes minutes, once per model, GPU and TensorRT version"
    if ! "$PYTHON" -m model_export.tensorrt --onnx "$onnx" --out "$tmp" \
        --precision "$TRT_PRECISION" --max-batch "$TRT_MAX_BATCH"; then
        rm -f "$tmp" "$tmp.json"
        die "TensorRT engine build failed"
    fi
    if [[ -f $tmp.json ]]; then mv -f "$tmp.json" "$out.json"; fi
    mv -f "$tmp" "$out"
}

# 1. the ONNX file
model=${SSD_MODEL:-}
if [[ -n $model && -f $model ]]; then
    log "using the model file $model"
    onnx=$model
elif [[ $model == *.engine || $model == *.plan ]]; then
    die "SSD_MODEL=$model does not exist; unset SSD_MODEL to have the entrypoint export and build the engine"
else
    if [[ -n $model ]]; then log "SSD_MODEL=$model does not exist yet; exporting $MODEL_NAME there"; fi
    onnx=${model:-$CACHE/onnx/$(slug "$MODEL_NAME")-$(slug "$(basename "$MODEL_WEIGHTS")")${NUMERICS:+-$NUMERICS}.onnx}
    if [[ -f $onnx ]]; then
        log "reusing the exported model $onnx"
    else
        export_onnx "$onnx"
    fi
fi

# 2. the TensorRT engine
if [[ $ENGINE == tensorrt && $onnx != *.engine && $onnx != *.plan ]]; then
    gpu=$(gpu_name)
    trt=$("$PYTHON" -c "import tensorrt; print(tensorrt.__version__)") || die "TensorRT is not importable in this image"
    digest=$(sha256sum "$onnx" | cut -c1-12)
    stem=$(basename "$onnx" .onnx)
    engine=$CACHE/tensorrt/$stem-$digest/$(slug "$gpu")/trt-$(slug "$trt")/$TRT_PRECISION-b$TRT_MAX_BATCH.engine
    if [[ -f $engine ]]; then
        log "reusing the TensorRT engine $engine ($gpu, TensorRT $trt)"
    else
        build_engine "$onnx" "$engine"
    fi
    export SSD_MODEL=$engine
else
    export SSD_MODEL=$onnx
fi

flock -u 9
exec 9>&-
if [[ $EXPORT_ONLY == true ]]; then
    log "the cache holds $SSD_MODEL; done"
    exit 0
fi
log "starting: SSD_MODEL=$SSD_MODEL SSD_ENGINE=$ENGINE: $*"
exec "$@"
