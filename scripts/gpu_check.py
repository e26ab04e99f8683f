"""`make gpu-check`: prove the GPU paths on a GPU host in under 10 minutes and print one summary table.

    python3 scripts/gpu_check.py [--out DIR] [--skip STEP ...] [--e2e-seconds 15] [--budget-s 570]
    python3 scripts/gpu_check.py --cpu-rehearsal   # every step on the CPU: the script and the host's packages
    python3 scripts/gpu_check.py --requirements    # what it installs from ./wheels where the host lacks it

Steps, in this order (each timed; a failed step is marked FAIL and the rest still run; 9.5 minutes in all):
  versions   Python, torch, torchvision, onnxruntime (+ providers), TensorRT, cuda-python, the GPU and its driver
  export     export + validate the default model (ssd_mobilenet_v1_coco, COCO weights from ../shared/models) and
             ssd300_vgg16 (random weights); fp16 TensorRT engines of both where TensorRT is installed
  engines    GPU vs CPU detections on the shared photos, and engine-only throughput at batch 1/8/32/64, per engine
             (scripts/gpu_check_engines.py)
  e2e        the server over HTTP, saturated by ssd-bench clients, one image per request and 8 per /detect/batch
             request: img/s, p50, p99, GPU utilisation, server CPU and its event loop's (scripts/gpu_check_e2e.py)
  tests      the GPU tests (pytest -m gpu), last, in the time left

It uses the host's torch and torchvision (never installs the pinned ones) and says which versions it ran with. On a
machine without a GPU it exits at once (status 2) with one line. Offline hosts: requirements that the host lacks
(pyproject.toml's [export] and [server] extras, pytest, httpx, pyyaml) are installed from the wheels `make
gpu-wheels` put in ./wheels, into .venv-gpu (a venv that also sees the host's packages); test data comes from
../shared.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import importlib.util
import json
import os
import site
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WHEELS = REPO / "wheels"
GPU_VENV = REPO / ".venv-gpu"
DEFAULT_OUT = REPO / "weights" / "gpu-check"  # weights/ is git-ignored
BUDGET_S = 570.0
HOST_ONLY = ("torch", "torchvision", "onnxruntime")  # the host's GPU builds: never installed by this script
TEST_PACKAGES = ("pytest", "httpx", "pyyaml")  # of the [test] extra: what the GPU tests and this check import


def gpu_count() -> int:
    """GPUs the NVIDIA driver shows (driver API via ctypes: works with nothing but the driver installed)."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def requirements() -> list[str]:
    """What the check needs beside the host's torch, torchvision and onnxruntime: pyproject.toml's [export] and
    [server] extras and a few of [test], with their version ranges."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: pip's own copy of tomli
        from pip._vendor import tomli as tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    wanted = [*extras["export"], *extras["server"],
              *(spec for spec in extras["test"] if _name(spec) in TEST_PACKAGES)]
    return list(dict.fromkeys(spec for spec in wanted if _name(spec) not in HOST_ONLY))


def _requirement(spec: str):  # noqa: ANN202 - packaging.requirements.Requirement
    try:
        from packaging.requirements import Requirement
    except ImportError:  # a bare host: pip's own copy
        from pip._vendor.packaging.requirements import Requirement
    return Requirement(spec)


def _name(spec: str) -> str:
    return _requirement(spec).name.lower().replace("_", "-")


def unmet(specs: list[str]) -> list[str]:
    """The requirements this interpreter does not satisfy (missing, or a version outside the range)."""
    missing = []
    for spec in specs:
        requirement = _requirement(spec)
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(spec)
            continue
        if not requirement.specifier.contains(version, prereleases=True):
            missing.append(spec)
    return missing


def bootstrap() -> None:
    """Re-run under .venv-gpu with what is missing installed from ./wheels (offline), or stop with one line.

    .venv-gpu sees the host's packages (`overlay_venv`): `venv --system-site-packages` would see the base
    interpreter's, not those of a venv that the host's torch lives in."""
    host = [name for name in HOST_ONLY if importlib.util.find_spec(name) is None]
    if host:
        sys.exit(f"gpu-check: the host has no {', '.join(host)}: install the host's GPU build of it "
                 "(this check never installs torch, torchvision or onnxruntime)")
    missing = unmet(requirements())
    if not missing:
        return
    if sys.prefix == str(GPU_VENV):
        sys.exit(f"gpu-check: {', '.join(missing)} still unmet in {GPU_VENV} after installing from {WHEELS}")
    if not WHEELS.is_dir():
        sys.exit(f"gpu-check: unmet Python requirements {', '.join(missing)}; run `make gpu-wheels` where there is "
                 f"network and copy {WHEELS.name}/ beside the repository")
    python = overlay_venv(GPU_VENV)
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(WHEELS), *missing],
                   check=True)
    os.execv(python, [python, *sys.argv])


def overlay_venv(venv: Path) -> str:
    """A venv (made once) whose own packages come first and this interpreter's site-packages after them; its
    Python. The .pth file runs `site.addsitedir`, so the host's own .pth files are read too."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        adds = "; ".join(f"site.addsitedir({path!r})" for path in site.getsitepackages())  # one line: a .pth runs it
        Path(purelib, "_gpu_check_host.pth").write_text(f"import site; {adds}\n")
    return str(python)


# ------------------------------------------------------------------------------------------------ steps


class Check:
    def __init__(self, out: Path, e2e_seconds: float, budget_s: float, device: str) -> None:
        self.out, self.e2e_seconds, self.budget_s, self.device = out, e2e_seconds, budget_s, device
        self.rows: list[tuple[str, str, float, str]] = []
        self.started = time.monotonic()
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "SSD_BENCH_DATA": str(SHARED / "data")}
        if (SHARED / "models").is_dir():
            self.env.setdefault("SSD_WEIGHTS_MIRROR", str(SHARED / "models"))

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def record(self, step: str, status: str, seconds: float, detail: str) -> None:
        self.rows.append((step, status, seconds, detail))
        print(f"[{status}] {step} ({seconds:.0f} s): {detail}", flush=True)

    def run(self, step: str, command: list[str], timeout: float) -> subprocess.CompletedProcess[str] | None:
        """A subprocess with a share of the time left; None (and a FAIL row) when it ran out of time."""
        timeout = max(5.0, min(timeout, self.left()))
        start = time.monotonic()
        try:
            return subprocess.run(command, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.record(step, "FAIL", time.monotonic() - start, f"timed out after {timeout:.0f} s")
            return None


def step_versions(check: Check) -> dict[str, object]:
    start = time.monotonic()
    code = (
        "import json, platform, importlib\n"
        "out = {'python': platform.python_version()}\n"
        "for name in ('torch', 'torchvision', 'onnxruntime', 'tensorrt', 'cuda', 'cv2', 'onnx'):\n"
        "    try:\n"
        "        module = importlib.import_module(name)\n"
        "        out[name] = getattr(module, '__version__', 'present')\n"
        "    except Exception as exc:\n"
        "        out[name] = None\n"
        "import torch\n"
        "out['torch_cuda'] = torch.version.cuda\n"
        "out['torch_sees_gpu'] = torch.cuda.is_available()\n"
        "out['gpu'] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None\n"
        "import onnxruntime\n"
        "out['ort_providers'] = onnxruntime.get_available_providers()\n"
        "print(json.dumps(out))\n"
    )
    done = check.run("versions", [sys.executable, "-c", code], timeout=60)
    if done is None:
        return {}
    if done.returncode != 0:
        check.record("versions", "FAIL", time.monotonic() - start, (done.stderr.strip().splitlines() or ["?"])[-1])
        return {}
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, check=False) if _which("nvidia-smi") else None
    facts["nvidia_smi"] = smi.stdout.strip() if smi is not None and smi.returncode == 0 else None
    detail = (f"{gpu_name(facts)}; python {facts['python']}, torch {facts['torch']} "
              f"(CUDA {facts['torch_cuda']}), torchvision {facts['torchvision']}, onnxruntime {facts['onnxruntime']} "
              f"{facts['ort_providers']}, TensorRT {facts['tensorrt']}, cuda-python {facts['cuda']}")
    if check.device == "cpu":
        detail = f"CPU rehearsal (GPU steps run on the CPU); {detail}"
    ok = facts["torch_sees_gpu"] or check.device == "cpu"
    check.record("versions", "PASS" if ok else "FAIL", time.monotonic() - start, detail)
    return facts


def gpu_test_files() -> list[str]:
    """The test files that hold GPU tests: only they are collected, so the [test] extra's other packages (browser,
    Kubernetes, Triton clients) need not be on the GPU host."""
    return sorted(str(path.relative_to(REPO)) for path in (REPO / "tests").rglob("test_*.py")
                  if "pytest.mark.gpu" in path.read_text())


def step_tests(check: Check) -> None:
    start = time.monotonic()
    done = check.run("tests", [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                               *gpu_test_files()], timeout=check.left() - 5)
    if done is None:
        return
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    summary = lines[-1] if lines else done.stderr.strip()[-200:]
    (check.out / "gpu-tests.log").write_text(done.stdout + done.stderr)
    check.record("tests -m gpu", "PASS" if done.returncode == 0 else "FAIL", time.monotonic() - start,
                 f"{summary.strip('= ')} (log: {check.out.name}/gpu-tests.log)")


EXPORTS = {  # name -> export arguments
    # float numerics: the GPU engines' form of it (TensorRT and ORT CUDA refuse the integer QDQ export)
    "ssd_mobilenet_v1_coco": ["--weights", "coco", "--numerics", "float"],
    "ssd300_vgg16": [],  # random weights
}


def step_export(check: Check, facts: dict[str, object]) -> dict[str, Path]:
    models: dict[str, Path] = {}
    for name, extra in EXPORTS.items():
        start = time.monotonic()
        path = check.out / f"{name}.onnx"
        done = check.run(f"export {name}", [sys.executable, "-m", "model_export", "--model", name, "--out",
                                            str(path), "--validate", *extra], timeout=150)
        if done is None:
            continue
        report = [line.strip() for line in done.stdout.splitlines() if "agree with the reference" in line]
        ok = done.returncode == 0 and path.is_file()
        detail = report[0][:160] if ok and report else (done.stderr.strip().splitlines() or ["no output"])[-1]
        check.record(f"export+validate {name}", "PASS" if ok else "FAIL", time.monotonic() - start, detail)
        if ok:
            models[name] = path
    if facts.get("tensorrt") is None:
        check.record("tensorrt build", "SKIP", 0.0, "TensorRT is not installed on this host")
        return models
    # fp16, the Docker default (the GPU tests compare fp16 with fp32 builds).
    builds = [("ssd_mobilenet_v1_coco", "fp16"), ("ssd300_vgg16", "fp16")]
    for name, precision in builds:
        if name not in models:
            continue
        start = time.monotonic()
        engine = check.out / f"{name}.{precision}.engine"
        done = check.run(f"tensorrt {name} {precision}", [
            sys.executable, "-m", "model_export.tensorrt", "--onnx", str(models[name]), "--out", str(engine),
            "--precision", precision, "--max-batch", "64"], timeout=240)
        if done is None:
            continue
        ok = done.returncode == 0 and engine.is_file()
        detail = (done.stdout if ok else done.stderr).strip().splitlines()[-1:] or ["no output"]
        check.record(f"tensorrt build {name} {precision}", "PASS" if ok else "FAIL", time.monotonic() - start,
                     detail[0][:160])
        if ok:
            models[f"{name}.{precision}.engine"] = engine
    return models


def step_engines(check: Check, models: dict[str, Path]) -> list[dict[str, object]]:
    start = time.monotonic()
    result_path = check.out / "engines.json"
    if check.device == "cpu":  # the rehearsal: the default model alone (ssd300_vgg16 at batch 64 takes minutes)
        models = {key: path for key, path in models.items() if key.startswith("ssd_mobilenet_v1_coco")}
    command = [sys.executable, str(REPO / "scripts" / "gpu_check_engines.py"), "--out", str(result_path),
               "--photos", str(SHARED / "data"), "--device", check.device,
               *[f"{key}={path}" for key, path in models.items()]]
    done = check.run("engines", command, timeout=min(240.0, check.left() - 90))
    if done is None:
        return []
    (check.out / "engines.log").write_text(done.stdout + done.stderr)
    if done.returncode not in (0, 1) or not result_path.is_file():
        check.record("engines", "FAIL", time.monotonic() - start, (done.stderr.strip().splitlines() or ["?"])[-1])
        return []
    rows = json.loads(result_path.read_text())
    for row in rows:
        check.record(f"engine {row['label']}", row["status"], row["seconds"], row["detail"])
    return rows


def step_e2e(check: Check, models: dict[str, Path]) -> None:
    from gpu_check_e2e import Load, run_e2e  # scripts/ is on sys.path; needs the server's deps: after bootstrap

    if check.device == "cuda":
        targets = [("torch cuda fp16, GPU decode", "ssd300_vgg16", {"engine": "torch", "device": "cuda", "fp16": True})]
        loads = [Load("", 4, 64), Load(", /detect/batch x8", 4, 16, images_per_request=8)]
    else:  # the rehearsal: the same path on the CPU, with the default model
        targets = [("torch cpu fp32", "ssd_mobilenet_v1_coco", {"engine": "torch", "device": "cpu"})]
        loads = [Load("", 2, 8), Load(", /detect/batch x8", 2, 2, images_per_request=8)]
    if "ssd300_vgg16.fp16.engine" in models:
        targets.append(("tensorrt fp16", "ssd300_vgg16.fp16.engine", {"engine": "tensorrt", "device": "cuda"}))
    for label, key, settings in targets:
        if key not in models:
            check.record(f"e2e {label}", "SKIP", 0.0, f"no {key} (its export step failed)")
            continue
        if check.left() < e2e_minimum(check, len(loads)):
            check.record(f"e2e {label}", "SKIP", 0.0, f"{check.left():.0f} s left of the budget")
            continue
        start = time.monotonic()
        try:
            results = run_e2e(models[key], settings, loads, check.e2e_seconds, check.env, check.out)
        except Exception as exc:  # noqa: BLE001 - one row per failure, the rest still runs
            check.record(f"e2e {label} ({key})", "FAIL", time.monotonic() - start,
                         f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            continue
        seconds = (time.monotonic() - start) / len(results)
        for load, detail, ok in results:
            check.record(f"e2e {label}{load.label} ({key})", "PASS" if ok else "FAIL", seconds, detail)


def e2e_minimum(check: Check, loads: int) -> float:
    return 30.0 + loads * (check.e2e_seconds + 15.0)  # server start; each load's warm-up, run and reports


def summary_table(rows: list[tuple[str, str, float, str]]) -> str:
    width = max(len(step) for step, *_ in rows)
    lines = [f"{'step':<{width}}  result  secs  detail", "-" * (width + 80)]
    lines += [f"{step:<{width}}  {status:<6}  {seconds:4.0f}  {detail}" for step, status, seconds, detail in rows]
    return "\n".join(lines)


def gpu_name(facts: dict[str, object]) -> object:
    return facts.get("nvidia_smi") or facts.get("gpu") or "no GPU"


def _which(name: str) -> bool:
    return any((Path(folder) / name).is_file() for folder in os.environ.get("PATH", "").split(os.pathsep) if folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="exports, engines, logs and the JSON summary")
    parser.add_argument("--skip", nargs="*", default=[], choices=("tests", "export", "engines", "e2e"))
    parser.add_argument("--e2e-seconds", type=float, default=15.0, help="measured seconds per end-to-end run")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="seconds for all the steps together")
    parser.add_argument("--cpu-rehearsal", action="store_true",
                        help="run every step on the CPU (no GPU needed): proves the script, its dependencies and the "
                             "host's torch before a GPU's minutes are spent")
    parser.add_argument("--requirements", action="store_true",
                        help="print what the check installs from ./wheels when the host lacks it, one per line")
    args = parser.parse_args(argv)
    if args.requirements:
        print("\n".join(requirements()))
        return 0
    if gpu_count() == 0 and not args.cpu_rehearsal:
        print("gpu-check: no NVIDIA GPU visible (no driver, no device, or CUDA_VISIBLE_DEVICES hides them); "
              "nothing to check on this machine", file=sys.stderr)
        return 2
    bootstrap()
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.out, args.e2e_seconds, args.budget_s, "cpu" if args.cpu_rehearsal else "cuda")
    facts = step_versions(check)
    models = step_export(check, facts) if "export" not in args.skip else {}
    if "engines" not in args.skip and models:
        step_engines(check, models)
    if "e2e" not in args.skip:
        step_e2e(check, models)
    if "tests" not in args.skip:  # last: it gets what is left of the budget, the figures above come first
        step_tests(check)
    elapsed = time.monotonic() - check.started
    print(f"\ngpu-check summary ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{gpu_name(facts)}, torch {facts.get('torch')}, {elapsed:.0f} s)\n")
    print(summary_table(check.rows))
    (args.out / "summary.json").write_text(json.dumps({"facts": facts, "rows": check.rows}, indent=2) + "\n")
    return 1 if any(status == "FAIL" for _, status, _, _ in check.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
