"""Device and precision choice: CUDA when present; bf16 autocast where it pays; channels_last always."""

from __future__ import annotations

import contextlib
import ctypes
import sys
from dataclasses import dataclass

import torch
from torch import nn

from mtl_meniscus.config import DEVICE_PATTERN
from mtl_meniscus.errors import ConfigError


def cpu_features() -> dict[str, object]:
    """What the CPU offers the convolutions: ATen's vector ISA, AMX tiles, AVX512-BF16."""

    def probe(name: str) -> bool:
        check = getattr(torch.cpu, name, None)
        try:
            return bool(check and check())
        except RuntimeError:  # pragma: no cover - probe unavailable in this build
            return False

    return {
        "isa": torch.backends.cpu.get_cpu_capability(),
        "amx": probe("_is_amx_tile_supported"),
        "avx512_bf16": probe("_is_avx512_bf16_supported"),
    }


def cpu_bf16_pays_off() -> bool:
    """True on CPUs with AMX tiles, where bf16 autocast trained 4.5x faster than fp32.

    AVX512-BF16 without AMX does not count: there a training step of the shared model took
    0.72 s in bf16 and 0.62 s in fp32 (both channels_last; README, "Speed").
    """
    return bool(cpu_features()["amx"])


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors are computed."""

    device: torch.device
    bf16: bool

    @property
    def channels_last(self) -> bool:
        """Always: oneDNN's and cuDNN's convolutions and max-pooling are faster on NHWC maps, in
        fp32 too (a training step of the shared model on the CPU: 1.34x with AVX-512, 1.41x held
        to AVX2; README, "Speed")."""
        return True

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device, memory_format=self.memory_format)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, memory_format=self.memory_format, non_blocking=True)

    def describe(self) -> str:
        return f"{self.device.type} {self.precision}" + (" channels_last" if self.channels_last else "")


def resolve_device(device: str | None) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N'; None = the first GPU when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not DEVICE_PATTERN.fullmatch(device):
        raise ConfigError(f"device {device!r}: allowed are cpu, cuda, cuda:N")
    chosen = torch.device(device)
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device {device!r}: PyTorch sees no CUDA GPU here (use --device cpu)")
        if (chosen.index or 0) >= count:
            raise ConfigError(
                f"device {device!r}: PyTorch sees {count} CUDA GPU(s), cuda:0..cuda:{count - 1}"
            )
    return chosen


def resolve_runtime(precision: str = "auto", device: str | None = None) -> Runtime:
    """'auto' = bf16 on CUDA and on CPUs with AMX, else fp32; 'fp32'/'bf16' force it."""
    chosen = resolve_device(device)
    if precision == "auto":
        bf16 = chosen.type == "cuda" or (chosen.type == "cpu" and cpu_bf16_pays_off())
    elif precision in ("fp32", "bf16"):
        bf16 = precision == "bf16"
    else:
        raise ConfigError(f"precision {precision!r}: allowed are auto, fp32, bf16")
    if chosen.type == "cuda":
        # fixed input sizes: let cuDNN pick its fastest convolution algorithms once
        torch.backends.cudnn.benchmark = True
    keep_freed_memory()
    return Runtime(chosen, bf16)


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
_kept = False


def keep_freed_memory() -> None:
    """Let glibc's malloc keep the memory the network's activations free, for the next batch.

    By default glibc maps a large block (a batch's activation maps: tens of MB at 256x256) fresh
    from the kernel and unmaps it when freed, and gives freed heap back above 128 KB: every batch
    then touches new pages, and the page faults cost as much as the convolutions. Measured
    (AMD EPYC Zen 5, AVX-512, fp32, 2 threads; predict of 800 256-px slices, shared preset, TTA 5,
    the whole command, medians of 3 interleaved, the same CSV): 20.6 s with glibc's defaults, 13.5 s
    with these on 2026-11-29; 18.2 s and 14.7 s (sys time 11.7 s -> 6.2 s) on 2026-11-30, noisier.
    Heap blocks up to 32 MB (glibc's largest mmap threshold) and 1 GB of free heap are kept;
    larger blocks are mapped as before. Once per process; nothing on another C library."""
    global _kept
    if _kept or not sys.platform.startswith("linux"):
        return
    _kept = True
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...): its own allocator's defaults
        return
    mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
    mallopt(M_TRIM_THRESHOLD, 2**30)
    mallopt(M_TOP_PAD, 256 * 2**20)
