"""Inference with the frozen backbone plus one adapter (the global checkpoint or a device's
personal adapter), offline: nothing is downloaded for the built-in backbones.
(scripts/generate.py is its command line.)
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel

from task.config import RunConfig
from task.lm.data import ptb_normalize
from task.lm.model import load_backbone, load_tokenizer


def load_for_inference(cfg: RunConfig, adapter_dir: Path | None):
    """Backbone (+ the adapter in ``adapter_dir``, read with plain peft), in eval mode."""
    model = load_backbone(cfg)
    if adapter_dir is not None:
        if not (Path(adapter_dir) / "adapter_config.json").exists():
            raise FileNotFoundError(f"{adapter_dir} is not a peft adapter folder "
                                    "(no adapter_config.json)")
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.eval()


@torch.no_grad()
def generate_text(cfg: RunConfig, adapter_dir: Path | None, prompt: str, *,
                  max_new_tokens: int = 40, temperature: float = 0.8, top_k: int = 50,
                  seed: int = 0, normalize: bool = True) -> str:
    """Continue ``prompt``; sampled with ``temperature`` / ``top_k`` (temperature 0: greedy).

    The prompt is preprocessed like the training text (PTB-style: lower case, no punctuation)
    unless ``normalize`` is False, so it looks like what the adapter was trained on.
    """
    tokenizer = load_tokenizer(cfg)
    model = load_for_inference(cfg, adapter_dir)
    text = ptb_normalize(prompt) if normalize else prompt
    inputs = tokenizer(text, return_tensors="pt")
    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature, top_k=top_k) if temperature > 0 \
        else dict(do_sample=False)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens,
                            pad_token_id=tokenizer.eos_token_id, **sampling)
    return tokenizer.decode(output[0], skip_special_tokens=True)

