"""Self-describing checkpoints, written atomically and loadable with torch.load(weights_only=True)."""

from __future__ import annotations

import errno
import io
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtl_meniscus.config import OWN_TRUNKS, Config, config_from_dict
from mtl_meniscus.errors import ConfigError, MeniscusError
from mtl_meniscus.io.outputs import atomic_write
from mtl_meniscus.networks.models import MODELS, build_model, trains_per_task
from mtl_meniscus.registry import PLUGINS_VARIABLE

FORMAT_VERSION = 1
REQUIRED_KEYS = ("config", "state_dict")  # what model_from_checkpoint needs


def atomic_torch_save(payload: dict[str, Any], path: str | Path) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    with atomic_write(path) as tmp:
        try:
            torch.save(payload, tmp)
        except RuntimeError as err:  # torch's zip writer reports a failed write (a full disk) so
            reason = str(err).strip().splitlines()[0][:120]
            raise OSError(
                errno.EIO,
                f"the write failed ({reason}): a full disk, a file-size limit, a folder made read-only?",
                str(path),
            ) from None


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


def load_checkpoint(path: str | Path, content: bytes | None = None) -> dict[str, Any]:
    """Load a checkpoint file safely (weights_only) with a clear error when it is not one of ours;
    from `content` when given (the file's bytes, read once by a caller that also hashes them)."""
    path = Path(path)
    if content is None and not path.is_file():
        raise MeniscusError(f"checkpoint not found: {path}")
    source = io.BytesIO(content) if content is not None else path
    if not zipfile.is_zipfile(source):  # torch.save has written zip archives since PyTorch 1.6, as here
        raise MeniscusError(
            f"{path}: not a checkpoint (a .pt file that train writes is a zip archive; this is another "
            "kind of file, or a damaged one): give a run folder or its best.pt"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols are not for our users
            if isinstance(source, io.BytesIO):
                source.seek(0)  # is_zipfile read it
            payload = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # The safe loader met Python objects other than tensors and plain data: never load those.
        raise MeniscusError(
            f"{path}: not a checkpoint of this package: it holds Python objects that are not loaded, "
            "for safety (checkpoints written by mtl_meniscus hold tensors and plain data only)"
        ) from None
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else ""
        raise MeniscusError(
            f"{path}: not a readable checkpoint of this package (damaged or another kind of file: "
            f"{type(err).__name__}: {reason[:200]})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise MeniscusError(f"{path}: not an mtl_meniscus checkpoint (format version {FORMAT_VERSION})")
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise MeniscusError(f"{path}: damaged checkpoint: missing {', '.join(missing)}")
    return payload


def model_from_checkpoint(
    payload: dict[str, Any], source: str | Path = "checkpoint"
) -> tuple[nn.Module, Config]:
    """Rebuild the model and its config from a loaded checkpoint; `source` (its file) names it in errors."""
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise MeniscusError(f"{source}: damaged checkpoint: missing {', '.join(missing)}")
    name = payload.get("model_name")
    if isinstance(name, str) and name not in MODELS:  # a plug-in's model: its module registers it
        raise MeniscusError(
            f"{source}: its model {name!r} is not registered here (registered: {', '.join(MODELS.names())}); "
            f"a plug-in module registers it: name that module in ${PLUGINS_VARIABLE} (docs/contributing.md)"
        )
    member = payload.get("member")
    alone = not member or member == "shared"  # a model of its own, not one network of a cascade
    try:
        config = config_from_dict(
            _ignored_settings_cleared(payload["config"]), source=f"{source} (its config)"
        )
    except ConfigError as err:
        if alone:
            raise
        # a cascade's segmentation network (no task) or a classifier that crops around its horns
        raise _cascade_network_alone(source, member, f" ({err})") from None
    if not alone and trains_per_task(config.model.name):
        # the run's config (a last.pt; a plug-in cascade's best.pt): it builds the whole cascade
        raise _cascade_network_alone(source, member, "")
    # The weights come from the checkpoint: do not fetch a timm trunk's pretrained weights again.
    model = build_model(config.model.model_copy(update={"pretrained": "none"}))
    load_weights(model, payload["state_dict"], source)
    model.eval()
    return model, config


def _cascade_network_alone(source: str | Path, member: str, why: str) -> MeniscusError:
    return MeniscusError(
        f"{source} is the {member} network of a cascade run, not a model of its own{why}; "
        "evaluate or predict with the run folder, which assembles its networks"
    )


def _ignored_settings_cleared(config: Any) -> Any:
    """Older checkpoints of the reference trunk may carry a pretrained file or freeze_backbone, which
    that trunk ignored and a config now refuses; they say nothing about the weights, so drop them."""
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict) or model.get("trunk", "reference") not in OWN_TRUNKS:
        return config
    cleared = {**model, "freeze_backbone": False}
    if model.get("pretrained") not in (None, "default", "none"):
        cleared["pretrained"] = "none"
    return {**config, "model": cleared}


def load_weights(model: nn.Module, state_dict: Any, source: str | Path) -> None:
    """model.load_state_dict with a message naming the file when the weights do not fit the model."""
    if not isinstance(state_dict, dict):
        raise MeniscusError(f"{source}: damaged checkpoint: its weights are not a mapping of tensors")
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        details = " ".join(line.strip() for line in str(err).splitlines()[1:4])
        raise MeniscusError(
            f"{source}: damaged checkpoint: its weights do not fit the model it describes ({details[:400]})"
        ) from None
