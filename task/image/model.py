"""Conditional DCGAN and LoRA on its generator's convolutions (the image task).

Generator (Radford et al., ICLR 2016, class-conditional): noise z and a one-hot label go
through four transposed convolutions (1 -> 4 -> 8 -> 16 -> 32 pixels) and a 3x3 convolution to
the image, tanh output in [-1, 1]. Discriminator: strided convolutions with a projection head
(Miyato & Koyama, ICLR 2018): score = w . h + embed(y) . h, every weight layer (convolutions,
head, embedding) spectrally normalized (Miyato et al., ICLR 2018: W / sigma_max(W), one power
iteration per training forward, torch.nn.utils.parametrizations.spectral_norm) and no BatchNorm,
as SN-GAN's discriminators: a 1-Lipschitz-bounded critic for the hinge loss, whose score of an
image does not depend on the rest of its batch. At the paper size (``image.generator-width``
128, ``image.discriminator-width`` 64, CIFAR-10) they hold about 12.8M + 1.8M = 14.6M parameters.
How they are trained (hinge loss, DiffAugment, EMA generator): task/image/train.py.

The generator's normalization is BatchNorm without running statistics (it always normalizes
with the batch): the frozen backbone then holds no buffers that training would silently change,
only adapter tensors ever differ between clients, and an exponential moving average of its
parameters is the whole of an averaged generator.

LoRA: every convolution of the generator, transposed ones included, gets a rank-r update
W + (alpha/r) * B A. peft supports Conv2d; for ConvTranspose2d this module adds
:class:`LoraConvTranspose2d`, registered into peft's LoraConfig as a custom module, so the
generator is an ordinary PeftModel: adapters are saved in peft format, named adapters (Ditto)
work, and the same adapter-state helpers as the text task apply.

The discriminator is never federated: it belongs to the pre-training step and, as each
client's private copy, to local training (see task/image/train.py). Its spectral-norm
parametrization keeps the power iteration's vectors u, v as buffers of its state dict, so a
kept discriminator resumes with them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import _ConvNd
from torch import nn

from task.config import RunConfig

NOISE_DIM = 100
GENERATOR_TYPE = "cdcgan"  # model_type of the generator (the model_type peft reads)


@dataclass(frozen=True)
class GeneratorConfig:
    """What peft and transformers-style code expect at ``model.config``."""
    num_classes: int
    channels: int
    width: int
    model_type: str = GENERATOR_TYPE

    def get(self, key, default=None):  # peft reads the config like a dict in places
        return getattr(self, key, default)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(cin, cout, kernel, stride, padding, bias=False)
        self.norm = nn.BatchNorm2d(cout, track_running_stats=False)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class ToImage(nn.Module):
    def __init__(self, cin: int, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, channels, 3, 1, 1)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class ConditionalGenerator(nn.Module):
    """(z, label) -> a 32x32 image in [-1, 1]."""

    def __init__(self, num_classes: int, channels: int, width: int) -> None:
        super().__init__()
        self.config = GeneratorConfig(num_classes, channels, width)
        w = width
        self.layers = nn.ModuleList([
            UpBlock(NOISE_DIM + num_classes, 8 * w, 4, 1, 0),  # 1 -> 4
            UpBlock(8 * w, 4 * w, 4, 2, 1),                    # 4 -> 8
            UpBlock(4 * w, 2 * w, 4, 2, 1),                    # 8 -> 16
            UpBlock(2 * w, w, 4, 2, 1),                        # 16 -> 32
            ToImage(w, channels),
        ])

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        onehot = nn.functional.one_hot(labels, self.config.num_classes).to(z.dtype)
        x = torch.cat([z, onehot], dim=1)[:, :, None, None]
        for layer in self.layers:
            x = layer(x)
        return x


class ConditionalDiscriminator(nn.Module):
    """(image, label) -> a real/fake logit per image (a spectrally normalized projection
    discriminator): every weight layer (the four convolutions, the head and the projection
    embedding) is divided by its largest singular value, estimated by one power iteration per
    training forward (Miyato et al., ICLR 2018); no BatchNorm (SN-GAN's discriminators drop it:
    the Lipschitz bound is on the layers, and the score of an image does not depend on its
    batch); LeakyReLU 0.1 as in SN-GAN's CNN."""

    def __init__(self, num_classes: int, channels: int, width: int) -> None:
        super().__init__()
        w = width
        sn = nn.utils.parametrizations.spectral_norm
        act = nn.LeakyReLU(0.1)
        self.features = nn.Sequential(
            sn(nn.Conv2d(channels, w, 4, 2, 1)), act,    # 32 -> 16
            sn(nn.Conv2d(w, 2 * w, 4, 2, 1)), act,       # -> 8
            sn(nn.Conv2d(2 * w, 4 * w, 4, 2, 1)), act,   # -> 4
            sn(nn.Conv2d(4 * w, 8 * w, 3, 1, 1)), act,
        )
        self.head = sn(nn.Linear(8 * w, 1))
        self.embed = sn(nn.Embedding(num_classes, 8 * w))

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.features(images).sum(dim=(2, 3))
        return self.head(h).squeeze(1) + (self.embed(labels) * h).sum(dim=1)


def build_generator(cfg: RunConfig, num_classes: int, channels: int) -> ConditionalGenerator:
    return ConditionalGenerator(num_classes, channels, cfg.image.generator_width)


def build_discriminator(cfg: RunConfig, num_classes: int, channels: int) -> ConditionalDiscriminator:
    return ConditionalDiscriminator(num_classes, channels, cfg.image.discriminator_width)


# --------------------------------------------------------------------------- LoRA
class LoraConvTranspose2d(_ConvNd):
    """peft LoRA for nn.ConvTranspose2d (peft itself covers Conv1d/2d/3d only).

    The base weight W has shape (C_in, C_out, k, k). lora_A is a transposed convolution C_in ->
    r with W's kernel, stride and padding (weight (C_in, r, k, k)); lora_B a 1x1 transposed
    convolution r -> C_out (weight (r, C_out, 1, 1)). Transposed convolution is linear in its
    weight, so the two in sequence equal one transposed convolution with
    delta[i, o] = sum_j A[i, j] B[j, o], i.e. delta = (B^T A^T)^T reshaped, and
    forward(x) = convT(x, W + scaling * delta). peft's _ConvNd supplies the rest (adapter dict,
    dropout, scaling, forward, merge/unmerge through get_delta_weight).
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs) -> None:
        if not isinstance(base_layer, nn.ConvTranspose2d):
            raise TypeError(f"LoraConvTranspose2d wraps nn.ConvTranspose2d, not {type(base_layer)}")
        if base_layer.groups != 1 or base_layer.dilation != (1, 1) or base_layer.output_padding != (0, 0):
            raise ValueError("LoraConvTranspose2d supports groups=1, dilation=1, output_padding=0")
        super().__init__(base_layer, adapter_name, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_channels, module.out_channels

    @property
    def lora_variants(self):
        return {(): None}  # plain LoRA (no DoRA for transposed convolutions)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        weight_a = self.lora_A[adapter].weight           # (C_in, r, k, k)
        weight_b = self.lora_B[adapter].weight[:, :, 0, 0]  # (r, C_out)
        return torch.einsum("irhw,ro->iohw", weight_a, weight_b) * self.scaling[adapter]


def image_lora_config(cfg: RunConfig) -> LoraConfig:
    """LoRA on the generator convolutions of ``image.lora-layers`` (layers.<i>.conv; all five by
    default, transposed ones included); with ``image.lora-norms`` the covered blocks' BatchNorm
    affine parameters train too, as peft ``modules_to_save`` (in the adapter state, so they
    travel and are averaged like the LoRA factors). The generator has no class embedding: the
    one-hot label enters layer 0's input, so layer 0's LoRA is the class pathway."""
    layers = cfg.image.lora_layer_indices()
    norms = [f"layers.{i}.norm" for i in layers if i < 4] if cfg.image.lora_norms else None
    config = LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                        target_modules=rf".*layers\.({'|'.join(map(str, layers))})\.conv",
                        modules_to_save=norms, bias="none")
    config._register_custom_module({nn.ConvTranspose2d: LoraConvTranspose2d})
    return config


# --------------------------------------------------------------------------- checkpoint files
def save_module(module: nn.Module, path: Path) -> None:
    """Atomic torch.save of a state dict (the pre-trained backbone cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save(module.state_dict(), tmp)
    tmp.replace(path)
