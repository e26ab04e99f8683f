"""Reading PyTorch checkpoints safely, and checking that one fits a network, with a one-line account of any misfit."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from model_export.errors import ExportError

# Wrappers a state_dict may sit under, and prefixes that (Distributed)DataParallel adds to its keys.
_WRAPPER_KEYS = ("model", "state_dict")
_DISTRIBUTED_PREFIXES = ("module.1.", "module.")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """`torch.load(weights_only=True)` of a bare state_dict or one under 'model' / 'state_dict'."""
    if not path.is_file():
        raise ExportError(f"weights file {path} does not exist")
    try:
        loaded = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - a damaged file makes the unpickler raise almost anything
        detail = " ".join(str(exc).split())[:160]
        raise ExportError(
            f"cannot read weights file {path}: not a torch checkpoint that loads with weights_only=True "
            f"({type(exc).__name__}{': ' + detail if detail else ''})"
        ) from exc
    if isinstance(loaded, Mapping):
        wrapped = [loaded[key] for key in _WRAPPER_KEYS if isinstance(loaded.get(key), Mapping)]
        loaded = wrapped[0] if wrapped else loaded
    if (
        not isinstance(loaded, Mapping)
        or not loaded
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items())
    ):
        raise ExportError(
            f"weights file {path} holds no state_dict of tensors (expected one bare or under 'model' / 'state_dict')"
        )
    for prefix in _DISTRIBUTED_PREFIXES:  # only a prefix every key has: "module.1.x" may be DDP around child "1"
        if all(key.startswith(prefix) for key in loaded):
            return {key[len(prefix) :]: value for key, value in loaded.items()}
    return dict(loaded)


def _examples(names: list[str]) -> str:
    shown = ", ".join(names[:3])
    return f" (e.g. {shown}{', ...' if len(names) > 3 else ''})"


def check_fit(network: nn.Module, state: Mapping[str, torch.Tensor], source: str, model_name: str) -> None:
    """Raise one ExportError line unless `state` has exactly the network's keys and shapes (a strict load)."""
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {list(state[k].shape)} vs {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{len(names)} {what}{_examples(names)}"
        for what, names in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches (file vs model)", mismatched),
        )
        if names
    ]
    if problems:
        raise ExportError(f"weights {source} do not fit {model_name}: " + "; ".join(problems))
