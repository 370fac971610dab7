"""Pre-training, local GAN training, sampling and FID evaluation for the image task.

Pre-training (the backbone): no pre-trained CIFAR/Fashion generator can be downloaded here, so
the server trains generator and discriminator from scratch on the public split (a seeded
``pretrain-fraction`` of the training images that no client holds) for ``pretrain-steps`` Adam
steps, and caches both under ``<cache-dir>/backbones/`` with the cost (seconds, steps, images)
in a JSON beside them. Every later run with the same settings loads the cache; the federated
run freezes the generator and federates only LoRA adapters.

The discriminator's fate: it is never federated. Each client trains a private discriminator
next to the generator adapter; it starts as a copy of the pre-trained one and, with
``image.keep-discriminator`` (the default), persists between rounds in the client's state folder
beside its personal adapter (``discriminator.pt``). Why private: (1) only the generator is the
model users want, so only its adapter needs to travel (the discriminator would add 1.8M
parameters to every upload at the paper size); (2) a discriminator that saw one client's one or
two classes is useless to the others. Why kept: a critic restarted from the pre-training copy
every round has not seen how the global generator moved, and its few local steps give the
adapter the gradients of a stale critic; measured on the offline run, federated FID stayed flat
with a fresh copy per round and fell with the kept one (docs/image/report.md).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from task.config import RunConfig
from task.image.data import load_images, public_rows, unpack_rows
from task.image.fid import FidEvaluator, to_uint8
from task.image.model import (
    NOISE_DIM,
    ConditionalDiscriminator,
    ConditionalGenerator,
    build_discriminator,
    build_generator,
    save_module,
)
from task.progress import Progress

log = logging.getLogger(__name__)

PRETRAIN_BATCH = 64
PRETRAIN_LR = 2e-4
ADAM_BETAS = (0.5, 0.999)  # DCGAN's Adam setting


def backbone_dir(cfg: RunConfig) -> Path:
    name = (f"cdcgan-{cfg.data.dataset}-g{cfg.image.generator_width}-d{cfg.image.discriminator_width}"
            f"-steps{cfg.image.pretrain_steps}-public{cfg.image.pretrain_fraction:g}-seed{cfg.seed}")
    return cfg.cache_path / "backbones" / name


def gan_step(generator: nn.Module, discriminator: nn.Module, opt_g, opt_d, real: torch.Tensor,
             labels: torch.Tensor, noise: torch.Tensor, g_params: list[nn.Parameter],
             penalty: Callable[[], torch.Tensor] | None = None) -> tuple[float, float]:
    """One DCGAN step: the discriminator on real vs detached fakes, then the generator's
    non-saturating loss against the updated discriminator. Returns (d loss, g loss)."""
    fake = generator(noise, labels)
    d_real, d_fake = discriminator(real, labels), discriminator(fake.detach(), labels)
    d_loss = (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
              + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
    g_out = discriminator(fake, labels)
    g_loss = F.binary_cross_entropy_with_logits(g_out, torch.ones_like(g_out))
    if not torch.isfinite(g_loss) or not torch.isfinite(d_loss):
        raise FloatingPointError(f"GAN loss is not finite (d {d_loss.item()}, g {g_loss.item()})")
    opt_g.zero_grad(set_to_none=True)
    (g_loss + penalty() if penalty is not None else g_loss).backward(inputs=g_params)
    opt_g.step()
    return d_loss.item(), g_loss.item()


def pretrain(cfg: RunConfig) -> dict:
    """Train the backbone on the public split and cache it; returns its cost record."""
    target = backbone_dir(cfg)
    data = load_images(cfg)
    rows = public_rows(cfg)
    torch.manual_seed(cfg.seed)
    generator = build_generator(cfg, data.num_classes, data.channels)
    discriminator = build_discriminator(cfg, data.num_classes, data.channels)
    opt_g = torch.optim.Adam(generator.parameters(), lr=PRETRAIN_LR, betas=ADAM_BETAS)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=PRETRAIN_LR, betas=ADAM_BETAS)
    gen = torch.Generator().manual_seed(cfg.seed)
    log.info("pre-training the generator backbone on %d public images, %d steps", len(rows),
             cfg.image.pretrain_steps)
    t0 = time.time()
    progress = Progress("pre-training the generator backbone", cfg.image.pretrain_steps, "steps")
    for step in range(1, cfg.image.pretrain_steps + 1):
        batch = rows[torch.randint(len(rows), (PRETRAIN_BATCH,), generator=gen)]
        real, labels = unpack_rows(batch, data.channels)
        noise = torch.randn(len(batch), NOISE_DIM, generator=gen)
        d_loss, g_loss = gan_step(generator, discriminator, opt_g, opt_d, real, labels, noise,
                                  list(generator.parameters()))
        progress.update(d_loss=f"{d_loss:.3f}", g_loss=f"{g_loss:.3f}")
    record = {"pretrain_steps": cfg.image.pretrain_steps, "pretrain_batch": PRETRAIN_BATCH,
              "public_images": len(rows), "pretrain_s": round(time.time() - t0, 1),
              "generator_params": sum(p.numel() for p in generator.parameters()),
              "discriminator_params": sum(p.numel() for p in discriminator.parameters())}
    save_module(generator, target / "generator.pt")
    save_module(discriminator, target / "discriminator.pt")
    tmp = target / f"pretrain.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(target / "pretrain.json")
    return record


def ensure_pretrained(cfg: RunConfig) -> dict:
    """The backbone's pre-training record, pre-training it first if it is not cached."""
    path = backbone_dir(cfg) / "pretrain.json"
    return json.loads(path.read_text()) if path.exists() else pretrain(cfg)


def load_generator_backbone(cfg: RunConfig) -> ConditionalGenerator:
    """The pre-trained generator (pre-trained first if not cached). Its pre-trained
    discriminator rides along as the plain attribute ``discriminator_state`` (not a submodule:
    it is neither trained with the generator's parameters nor part of its state)."""
    if cfg.image.torch_threads:  # small convolutions: extra OpenMP threads mostly wait on a busy CPU
        torch.set_num_threads(cfg.image.torch_threads)
    record = ensure_pretrained(cfg)
    target = backbone_dir(cfg)
    data = load_images(cfg)
    generator = build_generator(cfg, data.num_classes, data.channels)
    generator.load_state_dict(torch.load(target / "generator.pt", weights_only=True))
    generator.discriminator_state = torch.load(target / "discriminator.pt", weights_only=True)
    generator.discriminator_width = cfg.image.discriminator_width
    generator.discriminator_lr = cfg.image.discriminator_learning_rate
    generator.pretrain_record = record
    return generator


def base_generator(model: nn.Module) -> ConditionalGenerator | None:
    """The ConditionalGenerator under a (peft-wrapped) model, or None for other models."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base if isinstance(base, ConditionalGenerator) else None


# The client's kept discriminator file for the call being handled (set by the ClientApp; a
# context variable, so concurrent calls in one process cannot mix them up). None: a fresh copy.
_DISCRIMINATOR_FILE: ContextVar[Path | None] = ContextVar("discriminator_file", default=None)


@contextmanager
def kept_discriminator(path: Path | None):
    """Within the block, local GAN training starts from and saves back to ``path``."""
    token = _DISCRIMINATOR_FILE.set(path)
    try:
        yield
    finally:
        _DISCRIMINATOR_FILE.reset(token)


def private_discriminator(generator: ConditionalGenerator) -> ConditionalDiscriminator:
    """The client's discriminator: its kept one if it has one, else a copy of the pre-trained."""
    c = generator.config
    disc = ConditionalDiscriminator(c.num_classes, c.channels, generator.discriminator_width)
    path = _DISCRIMINATOR_FILE.get()
    kept = path is not None and path.exists()
    disc.load_state_dict(torch.load(path, weights_only=True) if kept else generator.discriminator_state)
    return disc


def train_gan_local(model: nn.Module, rows: torch.Tensor, *, epochs: int, batch_size: int,
                    lr: float, weight_decay: float = 0.0, max_steps: int = 0, seed: int = 0,
                    penalty: Callable[[], torch.Tensor] | None = None,
                    after_step: Callable[[int], None] | None = None) -> float:
    """GAN training of the generator's trainable parameters (its adapter, or every weight for
    full fine-tuning) against a private discriminator copy: task.lm.train.train_local's contract
    (same arguments, returns the mean generator loss)."""
    generator = base_generator(model)
    params = [p for p in model.parameters() if p.requires_grad]
    discriminator = private_discriminator(generator)
    opt_g = torch.optim.AdamW(params, lr=lr, betas=ADAM_BETAS, weight_decay=weight_decay)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=generator.discriminator_lr,
                             betas=ADAM_BETAS)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # LoRA dropout
    model.train()
    losses: list[float] = []
    steps_per_epoch = math.ceil(len(rows) / batch_size)
    total = epochs * steps_per_epoch if not max_steps else min(max_steps, epochs * steps_per_epoch)
    while len(losses) < total:
        order = torch.randperm(len(rows), generator=gen)
        for start in range(0, len(rows), batch_size):
            real, labels = unpack_rows(rows[order[start:start + batch_size]], generator.config.channels)
            if len(real) < 2:  # BatchNorm needs two images
                continue
            noise = torch.randn(len(real), NOISE_DIM, generator=gen)
            _, g_loss = gan_step(model, discriminator, opt_g, opt_d, real, labels, noise, params,
                                 penalty)
            losses.append(g_loss)
            if after_step is not None:
                after_step(len(losses))
                model.train()
            if len(losses) >= total:
                break
        if not losses:
            raise ValueError(f"{len(rows)} images are too few for one training step")
    model.eval()
    if _DISCRIMINATOR_FILE.get() is not None:
        save_module(discriminator, _DISCRIMINATOR_FILE.get())
    return sum(losses) / len(losses)


# --------------------------------------------------------------------------- sampling / FID
@torch.no_grad()
def generate(model: nn.Module, labels: torch.Tensor, seed: int, batch_size: int = 128) -> torch.Tensor:
    """uint8 images for the given labels from fixed, seeded noise (the same every round)."""
    noise = torch.randn(len(labels), NOISE_DIM, generator=torch.Generator().manual_seed(seed))
    model.eval()
    out = [to_uint8(model(noise[i:i + batch_size], labels[i:i + batch_size]))
           for i in range(0, len(labels), batch_size)]
    return torch.cat(out)


def real_uint8(rows: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows -> (uint8 images (N, C, 32, 32), labels)."""
    return rows[:, 1:].reshape(len(rows), channels, 32, 32).contiguous(), rows[:, 0].long()


class RowsFid:
    """FID of a model's samples against a fixed set of real rows, with the rows' own labels
    (so a client's FID is on its own classes, in its own class proportions)."""

    def __init__(self, rows: torch.Tensor, channels: int, seed: int) -> None:
        real, self.labels = real_uint8(rows, channels)
        self.evaluator = FidEvaluator(real)
        self.seed = seed

    def __call__(self, model: nn.Module) -> float:
        return self.evaluator.score(generate(model, self.labels, self.seed))


def save_grid(model: nn.Module, num_classes: int, path: Path, per_class: int = 10,
              seed: int = 0) -> None:
    """A PNG with one row per class (fixed noise, so grids of different rounds compare)."""
    from torchvision.utils import save_image

    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = generate(model, labels, seed).float() / 255.0
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, str(path), nrow=per_class, padding=2)


def summarize_client_fids(rows: list[dict]) -> dict:
    """Image-weighted mean client FIDs (the image task's counterpart of client perplexities).

    ``local_global_fid``: the global generator on every evaluated client's own test images;
    ``personalized_fid`` / ``personalized_global_fid``: personal vs global generator on the
    clients that hold a personal adapter (same clients, same images).
    """
    def mean(rs: list[dict], which: str) -> float:
        n = sum(r["image.fid-images"] for r in rs)
        return sum(r[f"{which}-fid"] * r["image.fid-images"] for r in rs) / n if n else math.nan

    personal = [r for r in rows if r.get("has-personal", 0) > 0]
    return {"local_global_fid": mean(rows, "global"), "personalized_fid": mean(personal, "personal"),
            "personalized_global_fid": mean(personal, "global"), "eval_clients": len(rows),
            "personalized_clients": len(personal)}
