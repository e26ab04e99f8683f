"""Checkpoint reading and the strict-fit check shared by the PyTorch model sources."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from model_export.checkpoints import check_fit, read_state_dict
from model_export.errors import ExportError


def net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"model": sd, "epoch": 3},
        lambda sd: {"state_dict": sd},
        lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},  # DistributedDataParallel
        lambda sd: {f"module.1.{k}": v for k, v in sd.items()},  # NVIDIA's wrapped checkpoints
    ],
    ids=["bare", "model", "state_dict", "ddp", "module.1"],
)
def test_reads_every_common_layout(tmp_path: Path, wrap) -> None:  # noqa: ANN001
    state = net().state_dict()
    path = tmp_path / "w.pt"
    torch.save(wrap(state), path)
    loaded = read_state_dict(path)
    assert loaded.keys() == state.keys()
    check_fit(net(), loaded, path.name, "tiny")  # fits: no error


def test_misfit_is_one_line_naming_what_differs(tmp_path: Path) -> None:
    state = net().state_dict()
    state["0.weight"] = torch.zeros(5, 3, 3, 3)
    state["extra.bias"] = torch.zeros(1)
    del state["1.running_mean"]
    with pytest.raises(ExportError) as info:
        check_fit(net(), state, "w.pt", "tiny")
    message = str(info.value)
    assert message == (
        "weights w.pt do not fit tiny: 1 missing keys (e.g. 1.running_mean); 1 unexpected keys (e.g. extra.bias); "
        "1 shape mismatches (file vs model) (e.g. 0.weight [5, 3, 3, 3] vs [4, 3, 3, 3])"
    )


def test_unreadable_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not exist"):
        read_state_dict(tmp_path / "absent.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint" * 50)
    with pytest.raises(ExportError, match="not a torch checkpoint"):
        read_state_dict(garbage)
    listing = tmp_path / "list.pt"
    torch.save([1, 2], listing)
    with pytest.raises(ExportError, match="holds no state_dict"):
        read_state_dict(listing)
