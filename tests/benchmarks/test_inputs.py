"""benchmarks.inputs: where the photos come from (--data, the default folders) and the one-line error without them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.__main__ import main
from benchmarks.inputs import DEFAULT_DATA_DIRS, NoPhotos, default_data_dir, load_input_set, source_photos
from benchmarks.report import REPO_ROOT, repo_relative

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED_DATA / "images").is_dir(), reason=f"no shared photos at {SHARED_DATA}")


def test_defaults_are_a_repository_folder_then_the_shared_data() -> None:
    assert DEFAULT_DATA_DIRS == (REPO_ROOT / "data", REPO_ROOT.parent / "shared" / "data")


def test_default_is_the_first_existing_folder(tmp_path: Path) -> None:
    second = tmp_path / "b"
    second.mkdir()
    assert default_data_dir((tmp_path / "a", second)) == second
    with pytest.raises(NoPhotos, match=r"pass --data DIR \(looked in .*a, .*c\)"):
        default_data_dir((tmp_path / "a", tmp_path / "c"))


@needs_shared
def test_data_dir_holding_photos_is_used(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    first = sorted((SHARED_DATA / "images").glob("*.jpg"))[0]
    shutil.copyfile(first, tmp_path / "images" / "one.jpg")
    assert source_photos(tmp_path) == [tmp_path / "images" / "one.jpg"]
    inputs = load_input_set("photos", tmp_path)
    assert inputs.sources == ("one.jpg",) and inputs.images[0][:2] == b"\xff\xd8"


def test_a_folder_without_photos_names_the_flag(tmp_path: Path) -> None:
    with pytest.raises(NoPhotos, match="pass --data DIR"):
        source_photos(tmp_path)


def test_cli_without_photos_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--url", "http://127.0.0.1:9", "--data", str(tmp_path / "nothing"), "--duration", "0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ssd-bench: no photos under") and "--data DIR" in err[0]


def test_cli_help_lists_the_data_flag() -> None:
    result = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "--data DIR" in result.stdout


def test_results_record_repository_relative_paths(tmp_path: Path) -> None:
    assert repo_relative(REPO_ROOT / "weights" / "m.onnx") == "weights/m.onnx"
    outside = tmp_path / "m.onnx"
    assert repo_relative(outside) == str(outside)
