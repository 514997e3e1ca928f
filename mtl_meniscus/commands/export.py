"""Export a trained model to ONNX, for runtimes without PyTorch (onnxruntime, TensorRT, browsers).

The graph holds the network, the run's calibration (the logits divided by each task's temperature,
when `evaluate --calibrate` has saved one) and the sigmoid: input `x`, the preprocessed slice
(B, C, H, W) float32 exactly as `preprocess.make_input` makes it from an (H, W) slice of the run's
image size; outputs `p_<task>`, one (B,) probability per task, the probabilities predict gives. Preprocessing (resize, edge filter, per-image
standardization) and test-time augmentation stay outside the graph: they are OpenCV code, and
the file's metadata and the `.json` written next to it say which filter and size to use.

Every export is checked before it is kept: onnxruntime and PyTorch score the same inputs and must
agree within PARITY_TOLERANCE, else the file is not written.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mtl_meniscus import __version__
from mtl_meniscus.engine.runtime import resolve_runtime
from mtl_meniscus.engine.trained import DEFAULT_THRESHOLD, load_trained
from mtl_meniscus.errors import MeniscusError
from mtl_meniscus.io.outputs import atomic_write, check_output_file, json_text, write_text_atomic

PARITY_TOLERANCE = 1e-4  # max |p_onnx - p_torch| over the check inputs
OPSET = 18


class TaskProbabilities(nn.Module):
    """(B, C, H, W) -> tuple of (B,) probabilities sigmoid(logit / T) in the order of `model.tasks`
    (ONNX wants tuples); T is the task's calibration temperature, 1 where none is given."""

    def __init__(self, model: nn.Module, temperatures: dict[str, float] | None = None):
        super().__init__()
        self.model = model
        self.tasks = tuple(model.tasks)
        self.temperatures = {task: float((temperatures or {}).get(task, 1.0)) for task in self.tasks}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = self.model(x)
        return tuple(torch.sigmoid(logits[task] / self.temperatures[task]) for task in self.tasks)


@dataclass
class ExportReport:
    """What was written and how closely the exported graph matches PyTorch."""

    path: str
    sidecar: str
    tasks: tuple[str, ...]
    outputs: tuple[str, ...]  # the graph's output names, predict's probability columns (p_horizontal, ...)
    input_shape: tuple[str, int, int, int]  # ('batch', C, H, W)
    edge_filter: str
    image_size: int
    fissure_threshold: float
    threshold_source: str
    temperatures: dict[str, float]  # calibration applied in the graph (1 = the network's own probability)
    max_abs_difference: float
    checked_inputs: int
    source: str
    mtl_meniscus_version: str = __version__


def _onnx_modules():
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as err:
        raise MeniscusError(
            f"ONNX export needs onnx, onnxscript and onnxruntime ({err.name} is missing): "
            "pip install -e '.[export]' in a checkout (or pip install onnx onnxscript onnxruntime)"
        ) from None
    return onnx, onnxruntime


def export_onnx(
    run_or_checkpoint: str | Path, out: str | Path, check_inputs: np.ndarray | None = None, seed: int = 0
) -> ExportReport:
    """Write `out` (.onnx) and `out`.json; `check_inputs` (N, C, H, W) default to 4 random inputs."""
    onnx, onnxruntime = _onnx_modules()
    out = check_output_file(out, "--out")
    trained = load_trained(run_or_checkpoint, resolve_runtime("fp32", "cpu"))
    if trained.config.model.exam_pooling is not None:
        raise MeniscusError(
            f"{trained.checkpoint}: a model of whole exams (model.exam_pooling "
            f"{trained.config.model.exam_pooling}); ONNX export takes slice models only"
        )
    # Contiguous (NCHW) weights: the graph must not depend on how this machine lays out memory.
    temperatures = trained.calibration.temperatures if trained.calibration else {}
    model = TaskProbabilities(trained.model.to(memory_format=torch.contiguous_format), temperatures).eval()
    channels, size = trained.config.model.in_chans, trained.config.data.image_size
    if check_inputs is None:
        check_inputs = np.random.default_rng(seed).standard_normal((4, channels, size, size), np.float32)
    check_inputs = np.ascontiguousarray(check_inputs, dtype=np.float32)
    if check_inputs.shape[1:] != (channels, size, size):
        raise MeniscusError(
            f"check inputs have shape {check_inputs.shape[1:]}; the model takes ({channels}, {size}, {size})"
        )
    threshold = trained.saved_threshold or DEFAULT_THRESHOLD  # what predict would apply
    output_names = [trained.tasks[task].p_column for task in model.tasks]  # predict's column names

    with atomic_write(out) as tmp:
        graph = _onnx_graph(model, check_inputs[:2], output_names)
        for key, value in _metadata(trained, model, threshold.value).items():
            graph.metadata_props.add(key=key, value=value)
        onnx.save_model(graph, str(tmp))
        difference = _parity(onnxruntime, tmp, model, check_inputs, output_names)
        if not difference <= PARITY_TOLERANCE:  # also catches NaN
            raise MeniscusError(
                f"the exported graph disagrees with PyTorch by {difference:.2e} (tolerance "
                f"{PARITY_TOLERANCE:.0e}); nothing written. Please report it with torch "
                f"{torch.__version__} and onnxruntime {onnxruntime.__version__}"
            )

    report = ExportReport(
        path=str(out),
        sidecar=str(out.with_name(out.name + ".json")),
        tasks=model.tasks,
        outputs=tuple(output_names),
        input_shape=("batch", channels, size, size),
        edge_filter=trained.config.preprocess.edge_filter,
        image_size=size,
        fissure_threshold=threshold.value,
        threshold_source=threshold.source,
        temperatures=model.temperatures,
        max_abs_difference=difference,
        checked_inputs=len(check_inputs),
        source=str(trained.checkpoint),
    )
    write_text_atomic(report.sidecar, json_text(asdict(report)))
    return report


def _metadata(trained, model: TaskProbabilities, threshold: float) -> dict[str, str]:
    """What the graph carries besides the network: how to prepare its input, and where it came from."""
    return {
        "tasks": ",".join(model.tasks),
        "temperatures": ",".join(f"{task}={t}" for task, t in model.temperatures.items()),
        "edge_filter": trained.config.preprocess.edge_filter,
        "image_size": str(trained.config.data.image_size),
        "fissure_threshold": f"{threshold}",
        "source": str(trained.checkpoint),
        "mtl_meniscus_version": __version__,
    }


def _onnx_graph(model: nn.Module, example: np.ndarray, output_names: list[str]):
    """The model as an ONNX ModelProto with a dynamic batch axis (torch.onnx's dynamo exporter)."""
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates every stage
        program = torch.onnx.export(
            model,
            (torch.from_numpy(example),),
            input_names=["x"],
            output_names=output_names,
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
            opset_version=OPSET,
            dynamo=True,
        )
    return program.model_proto


def _parity(onnxruntime, path: Path, model: nn.Module, inputs: np.ndarray, output_names: list[str]) -> float:
    """Largest |probability difference| between onnxruntime and PyTorch on `inputs`."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    exported = session.run(output_names, {"x": inputs})  # [(N,) per task]
    with torch.no_grad():
        reference = model(torch.from_numpy(inputs))
    return max(float(np.max(np.abs(a - b.numpy()))) for a, b in zip(exported, reference))
