"""Compute precision: one dtype name for MIS generation, training and sampling (docs/training.md "Precision").

A run names one dtype (`resources.compute.config.dtype`; a library call passes it as an argument):

- float32: full precision everywhere; `autocast_context` is the identity (a nullcontext).
- bfloat16 / float16: autocast (`torch.autocast`) around the network calls. Training goes through accelerate's
  `mixed_precision` ("bf16" / "fp16"; accelerate adds the GradScaler fp16 needs); fp32 master weights, optimizer
  and EMA. Sampling keeps its latents fp32 for the scheduler. The MIS generator loads Stable Diffusion's weights
  in the dtype itself (`torch_dtype`: inference only, so half the memory and no per-op casts).
- auto: each stage's own default (MISConfig.dtype "auto": fp16 on CUDA; TrainConfig.mixed_precision "auto":
  bf16 on CUDA; sampling fp32), fp32 on CPU.

On CPU float16 is refused (PyTorch's CPU kernels for half are slow and incomplete; CPU autocast is meant for
bfloat16): `check_supported` says so naming the setting, before any weights are loaded.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# accelerate's `mixed_precision` names of the same dtypes
ACCELERATE_NAMES: dict[str, str] = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}


def dtype_name(dtype: str | torch.dtype) -> str:
    """'float32' / 'bfloat16' / 'float16' of a name or a torch dtype ('auto' stays 'auto')."""
    if isinstance(dtype, torch.dtype):
        for name, value in DTYPES.items():
            if value == dtype:
                return name
        raise ValueError(f"dtype {dtype} is not one of {sorted(DTYPES)}")
    if dtype == "auto" or dtype in DTYPES:
        return dtype
    raise ValueError(f"dtype {dtype!r} is not auto or one of {sorted(DTYPES)}")


def device_type(device: str | torch.device | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def check_supported(device: str | torch.device | None, dtype: str | torch.dtype, setting: str = "dtype") -> str:
    """The dtype's name; a ValueError naming `setting` for float16 on CPU."""
    name = dtype_name(dtype)
    if name == "float16" and device_type(device) == "cpu":
        raise ValueError(f"{setting}: float16 is not supported on CPU (slow, incomplete half kernels); use bfloat16 "
                         f"(CPU autocast) or float32")
    return name


def autocast_context(device: str | torch.device | None, dtype: str | torch.dtype) -> AbstractContextManager[Any]:
    """torch.autocast to `dtype` on `device`'s type; float32 (and auto) is the identity."""
    name = check_supported(device, dtype)
    if name in ("float32", "auto"):
        return nullcontext()
    return torch.autocast(device_type=device_type(device), dtype=DTYPES[name])


def accelerate_precision(dtype: str | torch.dtype) -> str:
    """accelerate's mixed_precision name ("no", "bf16", "fp16") of a dtype name; "auto" stays "auto"."""
    name = dtype_name(dtype)
    return "auto" if name == "auto" else ACCELERATE_NAMES[name]


def from_accelerate(name: str) -> str:
    """The dtype name of an accelerate mixed_precision name ("no", "bf16", "fp16")."""
    for dtype, value in ACCELERATE_NAMES.items():
        if value == name:
            return dtype
    raise ValueError(f"mixed_precision {name!r} is not one of {sorted(ACCELERATE_NAMES.values())}")

