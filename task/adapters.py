"""The frozen backbone shared per process and its LoRA adapters, for every task.

One frozen backbone per process: :func:`shared_lora_model` loads it once (the task's
``load_backbone``), wraps it with peft LoRA once (the task's ``lora_config``), and every client
and round served by this process reuses it, only swapping the small adapter tensors in and out
with :func:`set_adapter_state`. Adapters are saved in the standard peft format, so
``PeftModel.from_pretrained(backbone, folder)`` loads them.
"""

from __future__ import annotations

import os
import shutil
import threading
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from task import get_task
from task.config import RunConfig
from task.precision import DTYPES, resolve_precision

State = dict[str, torch.Tensor]

_LOCK = threading.RLock()  # re-entered: shared_lora_model -> the task's loader -> its caches
_SHARED: dict[tuple, nn.Module] = {}
_INITIAL: dict[tuple, State] = {}


# --------------------------------------------------------------------------- shared models
def torch_device(cfg: RunConfig) -> torch.device:
    """``device``: cpu, cuda, or auto (cuda when this machine has it, e.g. a Jetson)."""
    if cfg.model.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.model.device)


def compute_precision(cfg: RunConfig) -> str:
    """``fp32`` or ``bf16``: the precision this process trains and evaluates in (task/precision.py)."""
    return resolve_precision(cfg, torch_device(cfg))


def _model_key(cfg: RunConfig) -> tuple:
    return (cfg.task, cfg.model.name, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.seed,
            str(cfg.cache_path), cfg.model.device, compute_precision(cfg),
            cfg.model.gradient_checkpointing) + get_task(cfg).model_key(cfg)


def _backbone_on_device(cfg: RunConfig, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The task's frozen backbone in ``dtype`` with the small-device knobs applied: gradient
    checkpointing (activations recomputed in backward, less memory; non-reentrant, so it works
    with a frozen backbone) and the device."""
    model = get_task(cfg).load_backbone(cfg, dtype)
    model.requires_grad_(False)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(torch_device(cfg))


def _float32_adapter(model: PeftModel, adapter_name: str) -> None:
    """Trained tensors stay float32 on a bf16 backbone (peft first casts a new adapter to its
    base layer's dtype: A is drawn in float32 and rounded once, the same in every process)."""
    tag = f".{adapter_name}."
    for name, param in model.named_parameters():
        if "lora_" in name and tag in name and param.dtype != torch.float32:
            param.data = param.data.float()


def add_lora(cfg: RunConfig, backbone: nn.Module) -> PeftModel:
    torch.manual_seed(cfg.seed)  # the same initial adapter in every process
    with warnings.catch_warnings():
        # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing`: theirs to rename
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(backbone, get_task(cfg).lora_config(cfg, backbone))
    _float32_adapter(model, "default")
    get_task(cfg).prepare_adapter(model, "default")
    return model


def shared_lora_model(cfg: RunConfig) -> PeftModel:
    """The process-wide backbone + LoRA model for this config, built on first use; the frozen
    backbone is held in the compute precision (bf16: half the memory), the adapter in float32."""
    key = _model_key(cfg)
    with _LOCK:
        if key not in _SHARED:
            model = add_lora(cfg, _backbone_on_device(cfg, DTYPES[compute_precision(cfg)]))
            _SHARED[key] = model
            _INITIAL[key] = get_adapter_state(model)
        return _SHARED[key]


def initial_adapter_state(cfg: RunConfig) -> State:
    """The seeded initial adapter (B = 0, so it leaves the backbone's output unchanged)."""
    shared_lora_model(cfg)
    return _INITIAL[_model_key(cfg)]


def shared_full_model(cfg: RunConfig) -> nn.Module:
    """The process-wide model for full fine-tuning (fedavg-full, centralized-full): every weight
    trains and travels, and each call loads the received weights into it in place. Its weights
    are float32 in every precision (bf16 runs it under autocast: float32 master weights)."""
    key = ("full",) + _model_key(cfg)
    with _LOCK:
        if key not in _SHARED:
            _SHARED[key] = _backbone_on_device(cfg).requires_grad_(True)
        return _SHARED[key]


def drop_shared_models() -> int:
    """Forget every process-wide model, so a long-lived process (the device worker) moving on
    to another run holds one run's backbone, not one per config it ever served; the next
    shared_*_model call loads its backbone again. Returns how many models were dropped."""
    with _LOCK:
        dropped = len(_SHARED)
        _SHARED.clear()
        _INITIAL.clear()
    return dropped


def ensure_adapter(model: PeftModel, cfg: RunConfig, adapter_name: str) -> None:
    """Add a second named adapter (e.g. Ditto's "personal") on the same frozen backbone."""
    if adapter_name not in model.peft_config:
        torch.manual_seed(cfg.seed)
        task = get_task(cfg)
        model.add_adapter(adapter_name, task.lora_config(cfg, model.get_base_model()))
        _float32_adapter(model, adapter_name)
        task.prepare_adapter(model, adapter_name)


# --------------------------------------------------------------------------- adapter state
def get_adapter_state(model: PeftModel, adapter_name: str = "default") -> State:
    """The adapter tensors only (peft's own key names, detached copies on the CPU)."""
    return {k: v.detach().to("cpu", copy=True)
            for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()}


def set_adapter_state(model: PeftModel, adapter_state: State, adapter_name: str = "default") -> None:
    """Load adapter tensors in place; every adapter key must be present, nothing else."""
    expected = set(get_peft_model_state_dict(model, adapter_name=adapter_name))
    got = set(adapter_state)
    if got != expected:
        raise KeyError(f"adapter keys differ: missing {sorted(expected - got)[:3]}, "
                       f"unexpected {sorted(got - expected)[:3]}")
    set_peft_model_state_dict(model, adapter_state, adapter_name=adapter_name)


def adapter_parameters(model: PeftModel, adapter_name: str = "default") -> dict[str, nn.Parameter]:
    """The live adapter parameters under their state-dict keys (for proximal terms)."""
    tag = f".{adapter_name}."
    return {name.replace(tag, "."): p for name, p in model.named_parameters()
            if "lora_" in name and tag in name}


def get_full_state(model: nn.Module, copy: bool = True) -> State:
    """Every (untied) weight of a fully fine-tuned model, on the CPU; ``copy=False`` gives views
    of the live (CPU) weights, for a caller that serializes them at once (a clone is a whole
    extra model copy)."""
    return {k: p.detach().to("cpu", copy=copy) for k, p in model.named_parameters()}


def set_full_state(model: nn.Module, state: State) -> None:
    params = dict(model.named_parameters())
    if set(state) != set(params):
        raise KeyError(f"model keys differ: missing {sorted(set(params) - set(state))[:3]}, "
                       f"unexpected {sorted(set(state) - set(params))[:3]}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k])


def lora_parameter_counts(model: PeftModel) -> tuple[int, int]:
    """(adapter parameters, backbone parameters) of a LoRA-wrapped model."""
    adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    backbone = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    return adapter, backbone


def proximal_penalty(params: dict[str, nn.Parameter], reference: State,
                     coef: float) -> Callable[[], torch.Tensor]:
    """coef/2 * ||w - w_ref||^2 over the named parameters (FedProx's mu, Ditto's lambda)."""
    pairs = [(params[k], reference[k].detach().to(params[k].device)) for k in params]

    def penalty() -> torch.Tensor:
        return 0.5 * coef * sum(((p - ref) ** 2).sum() for p, ref in pairs)

    return penalty


# --------------------------------------------------------------------------- files
def save_adapter(model: PeftModel, path: Path, adapter_state: State | None = None) -> None:
    """Write an adapter (default: the model's current one) in the standard peft format,
    atomically: adapter_config.json + adapter_model.safetensors, as PeftModel.save_pretrained
    writes them, so ``PeftModel.from_pretrained(backbone, path)`` loads it."""
    state = get_adapter_state(model) if adapter_state is None else adapter_state
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.peft_config["default"].save_pretrained(tmp)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    # A process killed here (a device losing power) leaves either the new or the old adapter:
    # the old one is moved aside, never deleted before the new one is in place.
    old = path.with_name(f"{path.name}.old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.replace(old)
    tmp.replace(path)
    shutil.rmtree(old, ignore_errors=True)


def load_adapter_file(path: Path) -> State | None:
    """Adapter tensors of a peft checkpoint folder (keys as set_adapter_state wants), or None."""
    for folder in (path, path.with_name(f"{path.name}.old")):  # .old: save_adapter interrupted
        file = folder / "adapter_model.safetensors"
        if file.exists():
            return load_file(str(file))
    return None


# Deployment: the SuperNode's own state folder for the message being handled (set by the
# ClientApp around each call; a context variable, so concurrent calls cannot mix it up).
_NODE_STATE_DIR: ContextVar[Path | None] = ContextVar("node_state_dir", default=None)


@contextmanager
def node_state_dir(path: Path | None):
    """Within the block, personal adapters live in ``path`` (the device), not under output-dir."""
    token = _NODE_STATE_DIR.set(path)
    try:
        yield
    finally:
        _NODE_STATE_DIR.reset(token)


def personal_adapter_dir(cfg: RunConfig, partition_id: int) -> Path:
    """Where a client keeps its personalized adapter (peft format); it survives restarts.

    On a SuperNode with a state folder (deployment), that folder; in simulation, one folder
    per partition under ``output-dir``.
    """
    node_dir = _NODE_STATE_DIR.get()
    if node_dir is not None:
        return node_dir / "personal-adapter"
    return cfg.output_path / "clients" / f"client-{partition_id:04d}" / "personal-adapter"


def personalized_adapter_dir(cfg: RunConfig, partition_id: int) -> Path:
    """Where the personalization protocol leaves the client's result (peft format), beside the
    strategy's own personal adapter (which later rounds of a resumed run go on from)."""
    return client_dir(cfg, partition_id) / "personalized-adapter"


def client_dir(cfg: RunConfig, partition_id: int) -> Path:
    """The client's own folder (its personal adapter and any other private state beside it)."""
    return personal_adapter_dir(cfg, partition_id).parent
