"""benchmarks.ort_profile on a real (small) export: ONNX Runtime's own profile, summed per operator type."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks.inputs import source_photos
from benchmarks.ort_profile import main, profile, table
from model_export.onnx_export import export_onnx
from model_export.spec import PostprocessOptions, SSDModel

ANCHORS = 300


class _Heads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, stride=8, padding=1)
        self.box = nn.Linear(4 * 100, ANCHORS * 4)
        self.cls = nn.Linear(4 * 100, ANCHORS * 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.conv(x).flatten(1)
        return self.box(f).reshape(-1, ANCHORS, 4), self.cls(f).reshape(-1, ANCHORS, 3)


@pytest.fixture(scope="module")
def small_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not source_photos():
        pytest.skip("shared photos missing")
    g = torch.Generator().manual_seed(1)
    model = SSDModel(
        name="small", network=_Heads(), input_size=(80, 80),
        anchors=torch.cat((torch.rand(ANCHORS, 2, generator=g), 0.1 + 0.2 * torch.rand(ANCHORS, 2, generator=g)), 1),
        box_weights=(10.0, 10.0, 5.0, 5.0), score_activation="softmax", score_columns=(1, 2), class_ids=(0, 1),
        labels=("a", "b"), mean=(127.5,) * 3, std=(127.5,) * 3,
    )
    out = tmp_path_factory.mktemp("profile") / "small.onnx"
    export_onnx(model, PostprocessOptions(), out)
    return out


def test_profile_sums_node_time_per_operator(small_export: Path) -> None:
    per_op, total = profile(small_export, batch_size=2, runs=3, threads=1)
    assert {"Conv", "TopK", "NonMaxSuppression"} <= set(per_op)
    assert total == pytest.approx(sum(per_op.values())) and total > 0
    text = table([small_export, small_export], [(per_op, total)] * 2, top=3)
    assert len(text.splitlines()) == 2 + 3 + 1 and text.splitlines()[-1].startswith("| all nodes |")


def test_cli(small_export: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main([str(small_export), "--runs", "2", "--top", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("batch 1, 2 runs, 1 intra-op thread(s)") and "| NonMaxSuppression |" in out
    assert main([str(tmp_path / "missing.onnx")]) == 2
