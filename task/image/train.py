"""Pre-training, local GAN training, sampling and FID evaluation for the image task.

Pre-training (the backbone): no pre-trained CIFAR/Fashion generator can be downloaded here, so
the server trains generator and discriminator from scratch on the public split (a seeded
``pretrain-fraction`` of the training images that no client holds) for ``pretrain-steps`` Adam
steps, and caches both under ``<cache-dir>/backbones/`` with the cost (seconds, steps, images)
and the recipe in a JSON beside them (``pretrain.json``). Every later run with the same
settings loads the cache; the federated run freezes the generator and federates only LoRA
adapters.

The recipe (``RECIPE``; its digest is part of the cache folder's name, so a backbone of another
recipe is never loaded), the one that makes GANs work on small data:
- hinge loss (Lim & Ye 2017, "Geometric GAN"; Miyato et al., ICLR 2018): the discriminator
  minimizes mean(relu(1 - D(x))) + mean(relu(1 + D(G(z)))), the generator -mean(D(G(z)));
- a spectrally normalized projection discriminator without BatchNorm (Miyato et al., ICLR
  2018; Miyato & Koyama, ICLR 2018; task/image/model.py);
- DiffAugment (Zhao et al., NeurIPS 2020), the paper's small-data policy: translation by up to
  1/8 of the side, then cutout of a square of half the side, drawn per image from a seeded
  generator and applied to real and fake images alike before every discriminator call, in the
  discriminator's step and in the generator's (differentiable, so the generator learns the
  unaugmented images while the discriminator cannot memorize the few real ones);
- an exponential moving average of the generator's weights (decay 0.999, warmed up as
  min(0.999, (1 + t) / (10 + t)); Karras et al., ICLR 2018; Yazici et al., ICLR 2019): the
  cached backbone is the EMA generator, the cached discriminator the trained one;
- Adam 2e-4, betas (0.5, 0.999), batch 64, one discriminator step per generator step (the
  SN-GAN paper's setting for n_dis = 1).
Clients' local training uses the same gan_step, DiffAugment included (why: train_gan_local).

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

import copy
import hashlib
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
from task.image.fid import to_uint8
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
ADAM_BETAS = (0.5, 0.999)  # DCGAN's Adam setting (SN-GAN's setting "B" for n_dis = 1)
DIFFAUGMENT_POLICY = ("translation", "cutout")  # DiffAugment's policy for small data
TRANSLATION_RATIO = 1 / 8  # shift of up to 1/8 of the image side (4 pixels at 32x32)
CUTOUT_RATIO = 1 / 2       # a square of half the image side (16x16 at 32x32), zeroed
EMA_DECAY = 0.999
# What the cached backbone is trained with; its digest names the cache folder, so a backbone of
# another recipe (e.g. version 1's BCE loss, BatchNorm discriminator, raw weights) is never loaded.
RECIPE = {
    "version": 2,
    "loss": "hinge",
    "discriminator": "projection, spectral norm on every weight layer, no BatchNorm",
    "sn": True,
    "diffaugment": ",".join(DIFFAUGMENT_POLICY),
    "translation_ratio": TRANSLATION_RATIO,
    "cutout_ratio": CUTOUT_RATIO,
    "diffaugment_clients": True,
    "ema_decay": EMA_DECAY,
    "ema_warmup": "decay_t = min(ema_decay, (1 + t) / (10 + t))",
    "generator_saved": "ema",
    "lr": PRETRAIN_LR,
    "betas": list(ADAM_BETAS),
}


def recipe_digest() -> str:
    """Eight hex digits of the recipe (part of the cache folder name)."""
    return hashlib.sha1(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:8]


def backbone_dir(cfg: RunConfig) -> Path:
    name = (f"cdcgan-r{RECIPE['version']}-{recipe_digest()}-{cfg.data.dataset}"
            f"-g{cfg.image.generator_width}-d{cfg.image.discriminator_width}"
            f"-steps{cfg.image.pretrain_steps}-public{cfg.image.pretrain_fraction:g}-seed{cfg.seed}")
    return cfg.cache_path / "backbones" / name


# --------------------------------------------------------------------------- losses, DiffAugment, EMA
def d_hinge_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss: mean(relu(1 - D(x))) + mean(relu(1 + D(G(z))))."""
    return F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()


def g_hinge_loss(d_fake: torch.Tensor) -> torch.Tensor:
    """The generator's hinge loss: -mean(D(G(z)))."""
    return -d_fake.mean()


def translate(x: torch.Tensor, shift_y: torch.Tensor, shift_x: torch.Tensor) -> torch.Tensor:
    """Each image moved by its own integer shift, zeros filling in: out[b, :, i, j] =
    x[b, :, i + shift_y[b], j + shift_x[b]] (0 outside). Differentiable in x (a gather)."""
    b, _, h, w = x.shape
    dev = x.device
    grid_b, grid_y, grid_x = torch.meshgrid(torch.arange(b, device=dev), torch.arange(h, device=dev),
                                            torch.arange(w, device=dev), indexing="ij")
    # indices into x padded by one zero pixel per side; clamping sends everything outside to it
    grid_y = (grid_y + shift_y.to(dev).view(b, 1, 1) + 1).clamp(0, h + 1)
    grid_x = (grid_x + shift_x.to(dev).view(b, 1, 1) + 1).clamp(0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)
    return padded[grid_b, grid_y, grid_x].permute(0, 3, 1, 2).contiguous()


def cutout(x: torch.Tensor, center_y: torch.Tensor, center_x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Each image with a size[0] x size[1] rectangle (rows center - size // 2 on, clipped to the
    image) set to 0. Differentiable in x (a mask product)."""
    b, _, h, w = x.shape
    dev = x.device
    grid_b, grid_y, grid_x = torch.meshgrid(torch.arange(b, device=dev), torch.arange(size[0], device=dev),
                                            torch.arange(size[1], device=dev), indexing="ij")
    grid_y = (grid_y + center_y.to(dev).view(b, 1, 1) - size[0] // 2).clamp(0, h - 1)
    grid_x = (grid_x + center_x.to(dev).view(b, 1, 1) - size[1] // 2).clamp(0, w - 1)
    mask = torch.ones(b, h, w, dtype=x.dtype, device=dev)
    mask[grid_b, grid_y, grid_x] = 0
    return x * mask.unsqueeze(1)


class DiffAugment:
    """Differentiable augmentation (Zhao et al., NeurIPS 2020), applied to real and fake images
    alike before every discriminator call, so the discriminator never sees an unaugmented image
    and cannot memorize the few it has, while the generator, whose fakes are augmented by the same
    differentiable transforms, still learns the unaugmented distribution.

    The paper's policy for small data, per image and independently drawn: ``translation`` by up
    to 1/8 of the side in each direction (zero padding), then ``cutout`` of a square of half the
    side at a uniform centre (clipped to the image), as in the authors' DiffAugment_pytorch.py.
    Zero is the fill value of both, in the [-1, 1] pixel range (mid grey). Random offsets come
    from the given torch.Generator (seeded: the same call sequence gives the same images).
    """

    def __init__(self, generator: torch.Generator, policy: tuple[str, ...] = DIFFAUGMENT_POLICY,
                 translation_ratio: float = TRANSLATION_RATIO, cutout_ratio: float = CUTOUT_RATIO) -> None:
        unknown = set(policy) - {"translation", "cutout"}
        if unknown:
            raise ValueError(f"unknown DiffAugment transform(s) {sorted(unknown)}")
        self.generator, self.policy = generator, tuple(policy)
        self.translation_ratio, self.cutout_ratio = translation_ratio, cutout_ratio

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        for name in self.policy:
            if name == "translation":
                sy, sx = int(h * self.translation_ratio + 0.5), int(w * self.translation_ratio + 0.5)
                x = translate(x, torch.randint(-sy, sy + 1, (b,), generator=self.generator),
                              torch.randint(-sx, sx + 1, (b,), generator=self.generator))
            else:
                size = (int(h * self.cutout_ratio + 0.5), int(w * self.cutout_ratio + 0.5))
                x = cutout(x, torch.randint(0, h + 1 - size[0] % 2, (b,), generator=self.generator),
                           torch.randint(0, w + 1 - size[1] % 2, (b,), generator=self.generator), size)
        return x


def ema_decay(step: int, decay: float = EMA_DECAY) -> float:
    """The EMA's decay after ``step`` updates: min(decay, (1 + t) / (10 + t)), the warm-up of
    TensorFlow's ExponentialMovingAverage, so a short run does not average in the random
    initialization (0.999 from the first step would still weigh it 0.999^1500 = 22% after 1,500)."""
    return min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (buffers copied; the
    generator has none: its BatchNorm keeps no running statistics)."""
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


def gan_step(generator: nn.Module, discriminator: nn.Module, opt_g, opt_d, real: torch.Tensor,
             labels: torch.Tensor, noise: torch.Tensor, g_params: list[nn.Parameter],
             penalty: Callable[[], torch.Tensor] | None = None,
             augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[float, float]:
    """One hinge-loss GAN step (pre-training and clients' local training alike): the
    discriminator on (augmented) real vs detached fakes, in one batch (it has no BatchNorm, so a
    score does not depend on the batch), then the generator's hinge loss -D(G(z)) against the
    updated discriminator, on freshly augmented fakes. ``augment``: DiffAugment (None: none).
    Returns (d loss, g loss)."""
    aug = augment if augment is not None else (lambda x: x)
    fake = generator(noise, labels)
    n = len(real)
    d_out = discriminator(aug(torch.cat([real, fake.detach()])), torch.cat([labels, labels]))
    d_loss = d_hinge_loss(d_out[:n], d_out[n:])
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
    g_loss = g_hinge_loss(discriminator(aug(fake), labels))
    if not torch.isfinite(g_loss) or not torch.isfinite(d_loss):
        raise FloatingPointError(f"GAN loss is not finite (d {d_loss.item()}, g {g_loss.item()})")
    opt_g.zero_grad(set_to_none=True)
    (g_loss + penalty() if penalty is not None else g_loss).backward(inputs=g_params)
    opt_g.step()
    return d_loss.item(), g_loss.item()


def pretrain(cfg: RunConfig) -> dict:
    """Train the backbone on the public split and cache it; returns its cost record.

    The recipe (RECIPE): hinge loss, the spectrally normalized projection discriminator,
    DiffAugment translation + cutout on every discriminator input, Adam 2e-4 (0.5, 0.999), batch
    64, one discriminator step per generator step, an EMA of the generator's weights. Cached:
    the EMA generator (``generator.pt``, the backbone), the trained discriminator
    (``discriminator.pt``, the clients' starting critic), the raw generator
    (``generator-raw.pt``, for comparison only; nothing loads it) and ``pretrain.json``.
    Runs on ``image.torch-threads`` threads (as local training does), whichever caller."""
    threads = torch.get_num_threads()
    if cfg.image.torch_threads:
        torch.set_num_threads(cfg.image.torch_threads)
    try:
        return _pretrain(cfg)
    finally:
        torch.set_num_threads(threads)


def _pretrain(cfg: RunConfig) -> dict:
    target = backbone_dir(cfg)
    data = load_images(cfg)
    rows = public_rows(cfg)
    torch.manual_seed(cfg.seed)
    generator = build_generator(cfg, data.num_classes, data.channels)
    discriminator = build_discriminator(cfg, data.num_classes, data.channels)
    ema = copy.deepcopy(generator).requires_grad_(False)
    opt_g = torch.optim.Adam(generator.parameters(), lr=PRETRAIN_LR, betas=ADAM_BETAS)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=PRETRAIN_LR, betas=ADAM_BETAS)
    gen = torch.Generator().manual_seed(cfg.seed)
    augment = DiffAugment(gen)
    log.info("pre-training the generator backbone on %d public images, %d steps", len(rows),
             cfg.image.pretrain_steps)
    t0 = time.time()
    progress = Progress("pre-training the generator backbone", cfg.image.pretrain_steps, "steps")
    for step in range(1, cfg.image.pretrain_steps + 1):
        batch = rows[torch.randint(len(rows), (PRETRAIN_BATCH,), generator=gen)]
        real, labels = unpack_rows(batch, data.channels)
        noise = torch.randn(len(batch), NOISE_DIM, generator=gen)
        d_loss, g_loss = gan_step(generator, discriminator, opt_g, opt_d, real, labels, noise,
                                  list(generator.parameters()), augment=augment)
        ema_update(ema, generator, ema_decay(step))
        progress.update(d_loss=f"{d_loss:.3f}", g_loss=f"{g_loss:.3f}")
    seconds = time.time() - t0
    record = {"pretrain_steps": cfg.image.pretrain_steps, "pretrain_batch": PRETRAIN_BATCH,
              "public_images": len(rows), "pretrain_s": round(seconds, 1),
              "steps_per_s": round(cfg.image.pretrain_steps / max(seconds, 1e-9), 3),
              "torch_threads": torch.get_num_threads(),
              "generator_params": sum(p.numel() for p in generator.parameters()),
              "discriminator_params": sum(p.numel() for p in discriminator.parameters()),
              "final_d_loss": round(d_loss, 4), "final_g_loss": round(g_loss, 4),
              "recipe": RECIPE, "recipe_digest": recipe_digest()}
    save_module(ema, target / "generator.pt")
    save_module(generator, target / "generator-raw.pt")
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
    generator.discriminator_warmup_steps = cfg.image.discriminator_warmup_steps
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


def private_discriminator(generator: ConditionalGenerator) -> tuple[ConditionalDiscriminator, bool]:
    """The client's discriminator: its kept one if it has one, else a copy of the pre-trained;
    and whether it is such a fresh copy."""
    c = generator.config
    disc = ConditionalDiscriminator(c.num_classes, c.channels, generator.discriminator_width)
    path = _DISCRIMINATOR_FILE.get()
    kept = path is not None and path.exists()
    disc.load_state_dict(torch.load(path, weights_only=True) if kept else generator.discriminator_state)
    return disc, not kept


def warm_up_discriminator(model: nn.Module, discriminator: nn.Module, opt_d, rows: torch.Tensor,
                          steps: int, batch_size: int, gen: torch.Generator,
                          augment: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """``steps`` discriminator-only hinge steps against the current, unchanged generator on
    random batches of ``rows``; returns the last loss (nan: too few images for a batch). The
    idea: the pre-trained discriminator was trained against the raw generator, the backbone is
    its EMA, so a fresh copy's first gradients are those of a critic of another generator.
    Measured worse (docs/image/backbone-gap.md: KID 35.0 vs 29.9 after 8 rounds; the stronger
    critic moves the adapter away from the backbone faster), so ``image.discriminator-warmup-steps``
    is 0 by default; kept as the ablation's knob."""
    if len(rows) < 2:  # BatchNorm needs two images
        return math.nan
    channels, loss = base_generator(model).config.channels, math.nan
    for _ in range(steps):
        batch = rows[torch.randint(len(rows), (min(batch_size, len(rows)),), generator=gen)]
        real, labels = unpack_rows(batch, channels)
        with torch.no_grad():
            fake = model(torch.randn(len(real), NOISE_DIM, generator=gen), labels)
        out = discriminator(augment(torch.cat([real, fake])), torch.cat([labels, labels]))
        d_loss = d_hinge_loss(out[:len(real)], out[len(real):])
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        loss = d_loss.item()
    return loss


def train_gan_local(model: nn.Module, rows: torch.Tensor, *, epochs: int, batch_size: int,
                    lr: float, weight_decay: float = 0.0, max_steps: int = 0, seed: int = 0,
                    penalty: Callable[[], torch.Tensor] | None = None,
                    after_step: Callable[[int], None] | None = None) -> float:
    """GAN training of the generator's trainable parameters (its adapter, or every weight for
    full fine-tuning) against a private discriminator copy: task.lm.train.train_local's contract
    (same arguments, returns the mean generator loss, here the hinge loss -D(G(z)), which may be
    negative).

    The pre-training recipe's gan_step, DiffAugment included. Why clients augment too: (1) the
    discriminator they start from was pre-trained on augmented images only, and unaugmented
    ones would be a shift of its input distribution at the first local step; (2) a client's
    discriminator sees only its own one or two classes, a few dozen to a few thousand images
    (Dirichlet 0.1 partitions, and the smaller validation-split shares of personalization), and,
    kept between rounds, it sees them again every round: the small-data regime where a
    discriminator memorizes its real images and its gradients stop helping the generator,
    which DiffAugment was made for; (3) it costs two gathers and a mask per step. The
    generator, whose fakes go through the same transforms, still learns unaugmented images."""
    generator = base_generator(model)
    params = [p for p in model.parameters() if p.requires_grad]
    discriminator, fresh = private_discriminator(generator)
    opt_g = torch.optim.AdamW(params, lr=lr, betas=ADAM_BETAS, weight_decay=weight_decay)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=generator.discriminator_lr,
                             betas=ADAM_BETAS)
    gen = torch.Generator().manual_seed(seed)
    augment = DiffAugment(gen)
    torch.manual_seed(seed)  # LoRA dropout
    model.train()
    if fresh and getattr(generator, "discriminator_warmup_steps", 0):
        warm_up_discriminator(model, discriminator, opt_d, rows, generator.discriminator_warmup_steps,
                              batch_size, gen, augment)
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
                                 penalty, augment)
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


# --------------------------------------------------------------------------- sampling (scores: scores.py)
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


def save_grid(model: nn.Module, classes, path: Path, per_class: int = 10,
              seed: int = 0) -> None:
    """A PNG with one row per class of ``classes`` (a count: all of them; or a list of labels),
    from fixed noise, so grids of different rounds and models compare."""
    from torchvision.utils import save_image

    classes = list(range(classes)) if isinstance(classes, int) else list(classes)
    labels = torch.tensor(classes).repeat_interleave(per_class)
    images = generate(model, labels, seed).float() / 255.0
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, str(path), nrow=per_class, padding=2)
