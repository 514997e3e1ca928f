"""Self-describing checkpoints, written atomically and loadable with torch.load(weights_only=True)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import Config, config_from_dict
from .errors import MeniscusError
from .models import build_model

FORMAT_VERSION = 1


def atomic_torch_save(payload: dict[str, Any], path: str | Path) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def model_payload(model: nn.Module, config: Config, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything `predict` needs: model name and kwargs, preprocessing, tasks, full config, weights."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return {
        "format_version": FORMAT_VERSION,
        "model_name": config.model.name,
        "model_config": config.to_dict()["model"],
        "tasks": list(config.model.tasks),
        "preprocess": {"edge_filter": config.preprocess.edge_filter, "image_size": config.data.image_size},
        "config": config.to_dict(),
        "state_dict": state,
        **(extra or {}),
    }


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file safely (weights_only) with a clear error when it is not one of ours."""
    path = Path(path)
    if not path.is_file():
        raise MeniscusError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise MeniscusError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise MeniscusError(f"{path}: not an mtl_meniscus checkpoint (format version {FORMAT_VERSION})")
    return payload


def model_from_checkpoint(payload: dict[str, Any]) -> tuple[nn.Module, Config]:
    """Rebuild the model and its config from a loaded checkpoint."""
    config = config_from_dict(payload["config"], source="checkpoint config")
    # The weights come from the checkpoint: do not fetch a timm trunk's pretrained weights again.
    model = build_model(replace(config.model, pretrained="none"))
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, config
