"""Local training of a causal LM and token-weighted perplexity: plain PyTorch loops."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from task.precision import autocast, model_precision


@dataclass(frozen=True)
class EvalResult:
    nll_sum: float   # summed next-token negative log-likelihood (nats)
    tokens: int      # number of predicted tokens
    words: int = 0   # words among them (task/lm/words.py); 0 when not counted

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.tokens) if self.tokens else float("nan")

    @property
    def word_perplexity(self) -> float:
        return math.exp(self.nll_sum / self.words) if self.words else float("nan")


def train_local(model: nn.Module, blocks: torch.Tensor, *, epochs: int, batch_size: int,
                lr: float, weight_decay: float = 0.0, max_steps: int = 0, seed: int = 0,
                penalty: Callable[[], torch.Tensor] | None = None,
                after_step: Callable[[int], None] | None = None,
                precision: str | None = None) -> float:
    """AdamW over the trainable parameters only; returns the mean training loss.

    ``max_steps`` caps the optimizer steps of this call (0 = the full ``epochs``), which is how
    CPU runs keep a round short. ``penalty`` is added to each step's loss (proximal terms);
    ``after_step(n)`` runs after optimizer step n (it may evaluate: training mode is restored).
    ``precision="bf16"`` runs forward passes under bf16 autocast (the trained parameters and
    AdamW state stay float32; task/precision.py), on whatever device the model is on; None: the
    model's own (bf16 when it holds bf16 weights).
    """
    precision = precision or model_precision(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # LoRA dropout
    device = next(model.parameters()).device
    model.train()
    losses: list[float] = []
    for _ in range(epochs):
        order = torch.randperm(len(blocks), generator=generator)
        for start in range(0, len(blocks), batch_size):
            batch = blocks[order[start:start + batch_size]].to(device)
            with autocast(precision, device):
                loss = model(input_ids=batch, labels=batch).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss is {loss.item()} at step {len(losses)}")
            (loss + penalty() if penalty is not None else loss).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if after_step is not None:
                after_step(len(losses))
                model.train()
            if max_steps and len(losses) >= max_steps:
                break
        if max_steps and len(losses) >= max_steps:
            break
    model.eval()
    return sum(losses) / len(losses)


@torch.no_grad()
def evaluate_nll(model: nn.Module, blocks: torch.Tensor, *, batch_size: int,
                 words: torch.Tensor | None = None, precision: str | None = None) -> EvalResult:
    """Summed NLL over all ``blocks``, in the precision the model trains in (the loss itself is
    computed from float32 logits). ``words``: the words among each block's predicted tokens
    (task/lm/words.py), summed into the result for word-level perplexity."""
    model.eval()
    device = next(model.parameters()).device
    precision = precision or model_precision(model)
    nll, tokens = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start:start + batch_size].to(device)
        n = batch.numel() - batch.shape[0]  # the first token of each block is not predicted
        with autocast(precision, device):
            nll += model(input_ids=batch, labels=batch).loss.item() * n
        tokens += n
    return EvalResult(nll, tokens, int(words.sum()) if words is not None else 0)
