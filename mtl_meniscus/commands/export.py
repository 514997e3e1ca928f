"""Export a trained model to ONNX, for runtimes without PyTorch (onnxruntime, TensorRT, browsers).

Two graphs. `--pipeline` (WholePipeline): the whole of predict's pipeline but test-time
augmentation: input `image`, raw canonical-view slices (B, H, W) float32 of any size; in the graph
the resize to the run's size (OpenCV's INTER_AREA, as weight matrices), the edge filter, the
per-image standardisation, the network, the calibration, the sigmoid and the cascade's gating;
outputs `p_<task>` and `pred_<task>` (1/0, -1 where the gate is closed), so onnxruntime alone gives
what predict gives, and `valid`, False for a slice the graph cannot read (below). Without it, the
network graph below.

The graph holds the network, the run's calibration (the logits divided by each task's temperature,
when `evaluate --calibrate` has saved one) and the sigmoid: input `x`, the preprocessed slice
(B, C, H, W) float32 exactly as `preprocess.make_input` makes it from an (H, W) slice of the run's
image size; outputs `p_<task>`, one (B,) probability per task, the probabilities predict gives. Preprocessing (resize, edge filter, per-image
standardization) and test-time augmentation stay outside the graph: they are OpenCV code, and
the file's metadata and the `.json` written next to it say which filter and size to use.

Inputs the graph cannot read. An ONNX graph cannot raise, so it answers instead: predict refuses a
slice with NaN or infinite pixels, and the pipeline graph gives such a row (and one whose
preprocessing overflows float32, or whose probabilities are not finite) `valid` False, NaN
probabilities and pred_<task> UNREADABLE (-2) for every task, a code apart from 1/0 and from -1
("not applicable"): NaN alone would leave pred_fissure 0, a confident "no tear". The network graph
gives a row of x with a non-finite value NaN probabilities.

A segmenting network (model.segmentation) adds to the network graph the output `p_segmentation`,
the per-pixel class probabilities (B, 3, H, W) of background, meniscus and tear; the pipeline graph,
whose input is any size while the decoder's output is at the run's size, leaves it out.

Every export is checked before it is kept: onnxruntime and PyTorch score the same inputs and must
agree within PARITY_TOLERANCE, else the file is not written.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mtl_meniscus import __version__
from mtl_meniscus.engine.runtime import resolve_runtime
from mtl_meniscus.engine.trained import DEFAULT_THRESHOLD, load_trained
from mtl_meniscus.errors import MeniscusError
from mtl_meniscus.io.imageio import MAX_PIXEL_MAGNITUDE
from mtl_meniscus.io.outputs import atomic_write, check_output_file, json_text, write_text_atomic
from mtl_meniscus.networks.models import segments

PARITY_TOLERANCE = 1e-4  # max |p_onnx - p_torch| over the check inputs
OPSET = 18
SEGMENTATION_OUTPUT = "p_segmentation"  # a segmenting network's pixel probabilities (B, 3, H, W)
VALID_OUTPUT = "valid"  # the pipeline graph's (B,) bool: False where the row's input cannot be read
GATE_CLOSED = -1  # pred_<task> of a gated task where no tear is predicted: not applicable
UNREADABLE = -2  # every pred_<task> of a row that is not valid
INPUT_DTYPE = "float32"  # both graphs' input


def _finite_rows(x: torch.Tensor) -> torch.Tensor:
    """(B,) bool: True where every value of the row (all dimensions after the first) is finite."""
    return torch.isfinite(x).flatten(1).all(dim=1)


class TaskProbabilities(nn.Module):
    """(B, C, H, W) -> tuple of (B,) probabilities sigmoid(logit / T) in the order of `model.tasks`
    (ONNX wants tuples); T is the task's calibration temperature, 1 where none is given.

    With `segmentation` (a segmenting network's network graph) one more output follows: the
    per-pixel class probabilities (B, 3, H, W), softmax over background, meniscus, tear, from the
    same pass of the trunk (models.SharedTrunkNet.forward_with_segmentation).

    A row of x with a NaN or infinite value gets NaN outputs: what a network makes of NaN depends
    on the runtime (a Relu may turn it into 0), so the graph says it rather than leaving it to them."""

    def __init__(
        self, model: nn.Module, temperatures: dict[str, float] | None = None, segmentation: bool = False
    ):
        super().__init__()
        self.model = model
        self.tasks = tuple(model.tasks)
        self.temperatures = {task: float((temperatures or {}).get(task, 1.0)) for task in self.tasks}
        self.segmentation = segmentation

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.segmentation:
            outputs = self._task_probabilities(self.model(x))
        else:
            logits, pixels = self.model.forward_with_segmentation(x)  # pixels (B, 3, H, W)
            outputs = (*self._task_probabilities(logits), torch.softmax(pixels, dim=1))
        finite = _finite_rows(x)
        return tuple(_where_rows(finite, output, torch.nan) for output in outputs)

    def _task_probabilities(self, logits: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(torch.sigmoid(logits[task] / self.temperatures[task]) for task in self.tasks)


def _where_rows(keep: torch.Tensor, values: torch.Tensor, other: float) -> torch.Tensor:
    """`values` where the (B,) mask `keep` is True, `other` in the rows where it is False."""
    keep = keep.reshape(-1, *([1] * (values.dim() - 1)))  # broadcast over a row's other dimensions
    return torch.where(keep, values, torch.full_like(values, other))


def resize_weights(
    length: torch.Tensor, positions: torch.Tensor, size: int, area: torch.Tensor
) -> torch.Tensor:
    """(size, n) weights that resize n pixels (positions 0..n-1, length n as a float tensor) to
    `size` as OpenCV's INTER_AREA does: where both sides shrink, the area of each input pixel under
    each output pixel (`area` True); otherwise OpenCV's linear weights for INTER_AREA (the pixel at
    floor(i * scale) and the next, weighted by the fractional overlap). Tensor arithmetic on the
    input's shape, so the ONNX graph takes any size."""
    scale = length / size
    i = torch.arange(size, dtype=torch.float32)[:, None]  # (size, 1) output pixels
    j = positions[None, :]  # (1, n) input pixels
    overlap = torch.clamp(torch.minimum(j + 1, (i + 1) * scale) - torch.maximum(j, i * scale), min=0)
    first = torch.floor(i * scale)
    frac = (i + 1) - (first + 1) / scale
    frac = torch.where(frac <= 0, torch.zeros_like(frac), frac - torch.floor(frac))
    low, high = torch.minimum(first, length - 1), torch.minimum(first + 1, length - 1)
    linear = (j == low).float() * (1 - frac) + (j == high).float() * frac
    return torch.where(area, overlap / scale, linear)


EDGE_KERNELS = {  # OpenCV's 3x3 derivative kernels (x direction; y is the transpose)
    "sobel": [[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]],
    "scharr": [[-3.0, 0.0, 3.0], [-10.0, 0.0, 10.0], [-3.0, 0.0, 3.0]],
}
LAPLACE_KERNEL = [[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]  # cv2.Laplacian, ksize=1


class Preprocess(nn.Module):
    """preprocess.make_input after predict's resize, in torch ops: (B, H, W) raw slices ->
    (B, C, size, size), the resized slice and its edge map, each standardised per image. Borders
    reflect without repeating the edge pixel (OpenCV's default, BORDER_REFLECT_101)."""

    def __init__(self, size: int, edge_filter: str, eps: float = 1e-6):
        super().__init__()
        self.size, self.edge_filter, self.eps = size, edge_filter, eps
        if edge_filter in EDGE_KERNELS:
            gx = torch.tensor(EDGE_KERNELS[edge_filter])
            self.register_buffer("kernels", torch.stack([gx, gx.T])[:, None])  # (2, 1, 3, 3)
        elif edge_filter == "laplace":
            self.register_buffer("kernels", torch.tensor(LAPLACE_KERNEL)[None, None])
        elif edge_filter != "none":
            raise MeniscusError(f"unknown edge filter {edge_filter!r}")

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(image.shape[1], dtype=torch.float32)
        cols = torch.arange(image.shape[2], dtype=torch.float32)
        height, width = rows[-1] + 1, cols[-1] + 1
        area = (height >= self.size) & (width >= self.size)
        resized = (
            resize_weights(height, rows, self.size, area)
            @ image
            @ resize_weights(width, cols, self.size, area).T
        )
        x = resized[:, None]  # (B, 1, size, size)
        if self.edge_filter != "none":
            padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
            grads = nn.functional.conv2d(padded, self.kernels)  # (B, 1 or 2, size, size)
            edges = (
                grads.abs() if self.edge_filter == "laplace" else torch.sqrt((grads**2).sum(1, keepdim=True))
            )
            x = torch.cat([x, edges], dim=1)
        return self._standardize(x)

    def _standardize(self, x: torch.Tensor) -> torch.Tensor:
        """Zero mean, unit (population) variance per image and channel; a constant one becomes zeros.

        The deviations are divided by the largest of them before squaring: predict's statistics
        are float64, while here the sum of float32 squares would overflow from deviations of about
        3e17 on (on a 64 x 64 image) to an infinite std, and x / inf is zeros, a blank slice the
        network would score. So the std is finite, or NaN where the channel holds NaN or inf
        (inf / inf: NaN or inf pixels, an edge map that overflowed), which makes the whole
        channel NaN and the row unreadable for WholePipeline."""
        mean = x.mean(dim=(2, 3), keepdim=True)
        centred = x - mean
        largest = centred.abs().amax(dim=(2, 3), keepdim=True).clamp(min=torch.finfo(x.dtype).tiny)
        std = ((centred / largest) ** 2).mean(dim=(2, 3), keepdim=True).sqrt() * largest
        constant = std < self.eps * torch.clamp(mean.abs(), min=1.0)  # False where std is NaN
        return torch.where(constant, torch.zeros_like(x), centred / torch.where(constant, 1.0, std))


class WholePipeline(nn.Module):
    """Raw slices (B, H, W) -> (p_<task>..., pred_<task>..., valid): Preprocess, the network with
    its calibration and sigmoid (TaskProbabilities), then the cascade's gating: the root task
    (fissure) cut at `threshold`, a task it gates at 0.5 where it is predicted and GATE_CLOSED (-1)
    where it is not.

    `valid` is False for a row the graph cannot read: a NaN or infinite pixel (which predict
    refuses), preprocessing that overflows float32, or probabilities that are not finite. Such a
    row gets NaN probabilities and UNREADABLE (-2) for every pred_<task>: gating NaN alone would
    give pred_fissure 0 and -1 for the others, which reads as a confident "no tear"."""

    def __init__(
        self,
        probabilities: TaskProbabilities,
        preprocess: Preprocess,
        threshold: float,
        gated: tuple[bool, ...],
    ):
        super().__init__()
        self.probabilities, self.preprocess = probabilities, preprocess
        self.tasks, self.threshold, self.gated = probabilities.tasks, threshold, gated

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        probs = self.probabilities(self.preprocess(image))
        # The pixels are checked themselves, not only through what they become: a NaN times a zero
        # resize weight is NaN in IEEE arithmetic, but a runtime's matrix product may skip zeros.
        valid = _finite_rows(image)
        for p in probs:  # NaN where preprocessing overflowed (Preprocess._standardize) or x was not finite
            valid = valid & torch.isfinite(p)
        root = (probs[0] >= self.threshold).long()  # the task table's root comes first
        closed = torch.full_like(root, GATE_CLOSED)
        predicted = [root] + [
            torch.where(root == 1, (p >= 0.5).long(), closed) if gated else (p >= 0.5).long()
            for p, gated in zip(probs[1:], self.gated[1:])
        ]
        probs = [_where_rows(valid, p, torch.nan) for p in probs]
        predicted = [_where_rows(valid, pred, UNREADABLE) for pred in predicted]
        return (*probs, *predicted, valid)


@dataclass
class ExportReport:
    """What was written and how closely the exported graph matches PyTorch."""

    path: str
    sidecar: str
    tasks: tuple[str, ...]
    outputs: tuple[str, ...]  # the graph's output names, predict's probability columns (p_horizontal, ...)
    input_name: str  # x (preprocessed) or image (raw slices, --pipeline)
    input_shape: tuple  # ('batch', C, H, W), or ('batch', 'height', 'width') for the pipeline
    input_dtype: str  # float32
    non_finite_inputs: str  # how the graph answers a row it cannot read (NaN or infinite values)
    edge_filter: str
    image_size: int
    fissure_threshold: float
    threshold_source: str
    temperatures: dict[str, float]  # calibration applied in the graph (1 = the network's own probability)
    max_abs_difference: float
    checked_inputs: int
    source: str
    # the SHA-256 of the checkpoint bytes exported (serve reports the same of what it loaded): a
    # best.pt that a training replaced since no longer matches
    checkpoint_sha256: str
    note: str = ""  # set when a training was still writing the run: best.pt was the best epoch so far
    pipeline: bool = False
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
    run_or_checkpoint: str | Path,
    out: str | Path,
    check_inputs: list[np.ndarray] | np.ndarray | None = None,
    seed: int = 0,
    pipeline: bool = False,
) -> ExportReport:
    """Write `out` (.onnx) and `out`.json: the network graph, or with `pipeline` the WholePipeline.
    `check_inputs`: the inputs of the parity check (network: (N, C, H, W); pipeline: a list of
    (B, H, W) slices of any sizes); by default random ones (for the pipeline, of three sizes)."""
    onnx, onnxruntime = _onnx_modules()
    out = Path(out)
    sidecar = out.with_name(out.name + ".json")
    # an earlier export is replaced: a graph with export's metadata (or its .json beside it)
    out = check_output_file(
        out, "--out", written_here=lambda path: _is_sidecar(sidecar) or _is_our_graph(onnx, path)
    )
    check_output_file(sidecar, "--out's .json", written_here=_is_sidecar)
    trained = _slice_model(run_or_checkpoint)
    threshold = trained.saved_threshold or DEFAULT_THRESHOLD  # what predict would apply
    build = _pipeline_export if pipeline else _network_export
    module, inputs, input_name, input_shape = build(trained, threshold.value, check_inputs, seed)
    output_names = _output_names(trained, module)

    with atomic_write(out) as tmp:
        graph = _onnx_graph(module, inputs[0][:2], input_name, output_names, input_shape)
        for key, value in _metadata(trained, module, threshold.value, pipeline).items():
            graph.metadata_props.add(key=key, value=value)
        onnx.save_model(graph, str(tmp))
        difference = _parity(onnxruntime, tmp, module, inputs, input_name, output_names)
        sidecar.unlink(missing_ok=True)  # the old .json must never describe the new graph (a full disk)
    probabilities = _network_of(module)
    report = ExportReport(
        path=str(out),
        sidecar=str(sidecar),
        tasks=probabilities.tasks,
        outputs=tuple(output_names),
        input_name=input_name,
        input_shape=input_shape,
        input_dtype=INPUT_DTYPE,
        non_finite_inputs=_non_finite_answer(pipeline),
        edge_filter=trained.config.preprocess.edge_filter,
        image_size=trained.config.data.image_size,
        fissure_threshold=threshold.value,
        threshold_source=threshold.source,
        temperatures=probabilities.temperatures,
        max_abs_difference=difference,
        checked_inputs=sum(len(x) for x in inputs),
        source=str(trained.checkpoint),
        checkpoint_sha256=trained.checkpoint_sha256,
        note=trained.in_training_note,
        pipeline=pipeline,
    )
    write_text_atomic(report.sidecar, json_text(asdict(report)))
    return report


def _slice_model(run_or_checkpoint):
    trained = load_trained(run_or_checkpoint, resolve_runtime("fp32", "cpu"))
    if trained.config.model.exam_pooling is not None:
        raise MeniscusError(
            f"{trained.checkpoint}: a model of whole exams (model.exam_pooling "
            f"{trained.config.model.exam_pooling}); ONNX export takes slice models only"
        )
    if trained.config.model.roi != "none":
        raise MeniscusError(
            f"{trained.checkpoint}: export of ROI models (model.roi {trained.config.model.roi}) is not "
            "supported yet: the horn crops are not part of the graph"
        )
    return trained


def _probabilities(trained, segmentation: bool = False) -> TaskProbabilities:
    """The network with its calibration and sigmoid (and with `segmentation` its pixel
    probabilities); contiguous (NCHW) weights, so the graph does not depend on how this machine
    lays out memory."""
    temperatures = trained.calibration.temperatures if trained.calibration else {}
    model = trained.model.to(memory_format=torch.contiguous_format)
    return TaskProbabilities(model, temperatures, segmentation).eval()


def _network_export(trained, threshold: float, check_inputs, seed: int):
    """(module, parity inputs, input name, input shape) of the network graph: x (B, C, size, size)."""
    channels, size = trained.config.model.in_chans, trained.config.data.image_size
    if check_inputs is None:
        check_inputs = np.random.default_rng(seed).standard_normal((4, channels, size, size), np.float32)
    check_inputs = np.ascontiguousarray(check_inputs, dtype=np.float32)
    if check_inputs.shape[1:] != (channels, size, size):
        raise MeniscusError(
            f"check inputs have shape {check_inputs.shape[1:]}; the model takes ({channels}, {size}, {size})"
        )
    module = _probabilities(trained, segmentation=segments(trained.model))
    return module, [check_inputs], "x", ("batch", channels, size, size)


def _pipeline_export(trained, threshold: float, check_inputs, seed: int):
    """(module, parity inputs, input name, input shape) of the WholePipeline: image (B, H, W), any H, W."""
    size = trained.config.data.image_size
    tasks = trained.tasks
    probabilities = _probabilities(trained)
    gated = tuple(tasks[task].gated_by == tasks.root.name for task in probabilities.tasks)
    if probabilities.tasks[0] != tasks.root.name:
        raise MeniscusError(
            f"{trained.checkpoint}: the pipeline export needs the model to predict {tasks.root.name}"
        )
    deeper = [t for t in probabilities.tasks if tasks[t].gated_by not in (None, tasks.root.name)]
    if deeper:  # WholePipeline gates on the root task only
        raise MeniscusError(
            f"--pipeline: {', '.join(deeper)} is gated by a task other than {tasks.root.name}, which the "
            "graph's gating does not follow; export the network without --pipeline and gate as predict does"
        )
    module = WholePipeline(
        probabilities, Preprocess(size, trained.config.preprocess.edge_filter), threshold, gated
    )
    if check_inputs is None:  # smaller, equal and larger than the model's size, not square
        rng = np.random.default_rng(seed)
        shapes = [(2, size, size), (2, size // 2 + 3, size - 5), (2, 2 * size + 7, size + 11)]
        check_inputs = [rng.random(shape, np.float32) * 1000 for shape in shapes]
        check_inputs.append(_unreadable_rows(check_inputs[0][0]))
    check_inputs = [np.ascontiguousarray(x, dtype=np.float32) for x in check_inputs]
    return module.eval(), check_inputs, "image", ("batch", "height", "width")


def _is_our_graph(onnx, path: Path) -> bool:
    """Whether `path` is an ONNX graph that export wrote (its metadata names this package)."""
    try:
        graph = onnx.load(str(path), load_external_data=False)
    except Exception:  # not ONNX at all: protobuf's errors come in several types
        return False
    return any(prop.key == "mtl_meniscus_version" for prop in graph.metadata_props)


def _is_sidecar(path: Path) -> bool:
    """Whether `path` is the .json that export writes beside its graph, by the ExportReport fields
    every version wrote (those of 2026-11-27 had no input_name or outputs)."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    fields = {"fissure_threshold", "max_abs_difference", "mtl_meniscus_version"}
    return isinstance(report, dict) and fields <= set(report)


def _unreadable_rows(image: np.ndarray) -> np.ndarray:
    """(4, H, W): `image`, and it with a NaN pixel, with an infinite one and times 1e30 (float32
    overflow in the preprocessing), so the parity check covers the graph's unreadable answer and
    that one row's answer does not leak into the others of its batch."""
    nan, inf = image.copy(), image.copy()
    nan[0, 0], inf[-1, -1] = np.nan, np.inf
    return np.stack([image, nan, inf, image * np.float32(1e30)])


def _non_finite_answer(pipeline: bool) -> str:
    """The sidecar's account of how the graph answers a row it cannot read."""
    if pipeline:
        return (
            f"a row with a NaN or infinite pixel, whose preprocessing overflows float32 or whose "
            f"probabilities are not finite: {VALID_OUTPUT} false, p_* NaN and every pred_* "
            f"{UNREADABLE} (unreadable; {GATE_CLOSED} is a closed gate)"
        )
    return "a row of x with a NaN or infinite value: p_* NaN"


def _network_of(module: nn.Module) -> TaskProbabilities:
    """The network (with calibration and sigmoid) of either graph's module."""
    return module.probabilities if isinstance(module, WholePipeline) else module


def _output_names(trained, module) -> list[str]:
    """predict's column names: p_fissure, p_horizontal, p_anterior (and pred_<task> for the pipeline)."""
    probabilities = _network_of(module)
    names = [trained.tasks[task].p_column for task in probabilities.tasks]
    if isinstance(module, WholePipeline):
        names += [f"pred_{task}" for task in probabilities.tasks] + [VALID_OUTPUT]
    if probabilities.segmentation:
        names.append(SEGMENTATION_OUTPUT)
    return names


def _metadata(trained, module, threshold: float, pipeline: bool) -> dict[str, str]:
    """What the graph carries besides the network: how to prepare its input, and where it came from."""
    probabilities = _network_of(module)
    return {
        "tasks": ",".join(probabilities.tasks),
        "temperatures": ",".join(f"{task}={t}" for task, t in probabilities.temperatures.items()),
        "input": "raw slices (batch, height, width), canonical view" if pipeline else "make_input output",
        "input_dtype": INPUT_DTYPE,
        "non_finite_inputs": _non_finite_answer(pipeline),
        **(
            {"segmentation": f"{SEGMENTATION_OUTPUT}: (batch, 3, H, W) softmax of background, meniscus, tear"}
            if probabilities.segmentation
            else {}
        ),
        "edge_filter": trained.config.preprocess.edge_filter,
        "image_size": str(trained.config.data.image_size),
        "fissure_threshold": f"{threshold}",
        "source": str(trained.checkpoint),
        "checkpoint_sha256": trained.checkpoint_sha256,
        "mtl_meniscus_version": __version__,
    }


def _onnx_graph(module: nn.Module, example: np.ndarray, input_name: str, output_names: list[str], shape):
    """The module as an ONNX ModelProto with the dynamic axes `shape` names ('batch', 'height', ...)."""
    dynamic = {
        axis: torch.export.Dim(name, min=2) for axis, name in enumerate(shape) if isinstance(name, str)
    }
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates every stage
        program = torch.onnx.export(
            module,
            (torch.from_numpy(example),),
            input_names=[input_name],
            output_names=output_names,
            dynamic_shapes={input_name: dynamic},  # the input is named as forward's argument
            opset_version=OPSET,
            dynamo=True,
        )
    return program.model_proto


def _refuse_unanswered_rows(module: nn.Module, batch: torch.Tensor, reference) -> None:
    """A readable check row (finite, within the pixel magnitude that reading allows) must get
    finite probabilities: a network with NaN weights answers NaN everywhere, and its graph would
    match PyTorch NaN for NaN (predict refuses such a model's every answer)."""
    readable = _finite_rows(batch) & (batch.abs().flatten(1).amax(dim=1) <= MAX_PIXEL_MAGNITUDE)
    for probs in reference[: len(_network_of(module).tasks)]:  # (B,) each
        if not torch.isfinite(probs[readable]).all():
            raise MeniscusError(
                "the model's output is not finite on a readable check input (NaN or infinite "
                "weights in the checkpoint?); nothing written"
            )


def _parity(
    onnxruntime, path: Path, module: nn.Module, inputs, input_name: str, output_names: list[str]
) -> float:
    """Largest |difference| between onnxruntime and PyTorch over every output on every input batch;
    NaN on both sides (an unreadable row's probabilities) agrees, NaN on one side only is inf. Above
    PARITY_TOLERANCE a MeniscusError: the graph is not kept."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    largest = 0.0
    for batch in inputs:
        exported = session.run(output_names, {input_name: batch})
        with torch.no_grad():
            reference = module(torch.from_numpy(batch))
        _refuse_unanswered_rows(module, torch.from_numpy(batch), reference)
        for a, b in zip(exported, reference):
            a, b = a.astype(np.float64), b.numpy().astype(np.float64)  # `valid` is bool: no subtraction
            both_nan = np.isnan(a) & np.isnan(b)
            difference = np.where(both_nan, 0.0, np.abs(a - b))
            largest = max(largest, float(np.max(np.nan_to_num(difference, nan=np.inf))))
    if not largest <= PARITY_TOLERANCE:  # also catches NaN
        raise MeniscusError(
            f"the exported graph disagrees with PyTorch by {largest:.2e} (tolerance "
            f"{PARITY_TOLERANCE:.0e}); nothing written. Please report it with torch "
            f"{torch.__version__} and onnxruntime {onnxruntime.__version__}"
        )
    return largest
