"""Which compute precision this process trains and evaluates in: ``model.precision``.

- ``fp32``: everything float32.
- ``bf16``: the frozen backbone is held in bfloat16 (half the memory), forward and backward run
  under bf16 autocast, and what trains stays float32: LoRA adapters and their AdamW state (and
  the whole model of full fine-tuning, which keeps float32 master weights under autocast, so
  LoRA and full fine-tuning compare at the same compute precision). Uploaded tensors stay float32.
- ``auto`` (default): bf16 where this device runs it fast (a CUDA GPU with native bf16; an x86
  CPU with AVX512-BF16 or AMX; an ARM CPU with the BF16 extension), fp32 elsewhere, and fp32 for a
  task that implements fp32 only. Emulated bf16 (AVX-512 without BF16, older ARM cores, Jetson
  Xavier) is slower than fp32, so ``auto`` never picks it.

Why bf16 weights and not fp32 weights under autocast: side by side on SmolLM2-135M they train at
the same loss to 3 digits, bf16 weights are slightly faster (no per-step cast of every weight)
and halve the backbone's memory (README, "Benchmark").
"""

from __future__ import annotations

import functools
import logging
import platform
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from task import get_task
from task.config import RunConfig

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (``flags`` on x86, ``Features`` on ARM)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def fast_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` computes bf16 natively (fast), and what was found."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported(including_emulation=False)
        return ok, f"CUDA device {torch.cuda.get_device_name(device)} " + \
            ("has native bf16" if ok else "has no native bf16")
    if device.type == "cpu":
        flags = _cpu_flags()
        found = sorted(flags & {"avx512_bf16", "amx_bf16", "bf16"})
        machine = platform.machine()
        if found:
            return True, f"CPU ({machine}) has {', '.join(found)}"
        return False, f"CPU ({machine}) has no avx512_bf16 / amx_bf16 / bf16 flag"
    return False, f"device type {device.type!r} is not checked for bf16"


def resolve_precision(cfg: RunConfig, device: torch.device) -> str:
    """``fp32`` or ``bf16``: what ``model.precision`` means on this device for this task."""
    requested = cfg.model.precision
    if requested != "auto":
        return requested
    return _auto(tuple(get_task(cfg).caps.precisions), device)


@functools.cache
def _auto(task_precisions: tuple[str, ...], device: torch.device) -> str:
    ok, why = fast_bf16(device)
    chosen = "bf16" if ok and "bf16" in task_precisions else "fp32"
    if ok and chosen == "fp32":
        why += ", but the task trains in fp32 only"
    log.info("model.precision = auto -> %s on %s (%s)", chosen, device, why)
    return chosen


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """The forward-pass context of a precision (bf16: autocast; fp32: nothing)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def model_precision(model: torch.nn.Module) -> str:
    """``bf16`` for a model that holds bf16 weights (a bf16 backbone), else ``fp32``."""
    return "bf16" if any(p.dtype == torch.bfloat16 for p in model.parameters()) else "fp32"


def precision_record(cfg: RunConfig, device: torch.device) -> dict:
    """What results.json says about precision: what was asked, what this process runs, why."""
    chosen = resolve_precision(cfg, device)
    ok, hardware = fast_bf16(device)
    return {"requested": cfg.model.precision, "server": chosen, "device": str(device),
            "fast_bf16": ok, "hardware": hardware}
