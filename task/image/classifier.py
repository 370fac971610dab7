"""Class-conditioning accuracy: does the generator draw the class it is asked for?

A small CNN classifier, trained once on the dataset's training split and cached, labels
generated images; the conditioning accuracy is the share it labels as the requested class (the
classifier-accuracy score of conditional GANs, Odena et al., "Conditional Image Synthesis with
Auxiliary Classifier GANs", ICML 2017, there with an Inception classifier). KID and FID say
whether the images look like the data, not whether a "sneaker" prompt draws a sneaker; this
does, and it costs one pass of a 34k-parameter network, so it is the per-round curve beside KID.
Its own test accuracy (on the test split) is the ceiling a perfect generator would reach, and
is recorded beside it (``classifier.json``).

The classifier is an instrument, like InceptionV3: it sees the whole training split (no
federation), with a fixed seed independent of the run's, so every run scores with the same
one. Cached under ``<cache-dir>/classifiers/<dataset>-cnn<version>-steps<n>-seed0/``.

Measured on Fashion-MNIST (1 torch thread, the shared 2-core machine busy with a benchmark
suite): the default 3,000 Adam steps of batch 64 (3.2 epochs) took 94 s (31 ms a step; 25 ms
in the first 300) and reach 0.890 test accuracy (300 steps: 0.819); labelling the 10,000 test
images takes 3 s, so the 1,000 generated images of a round's accuracy about 0.3 s.
"""

from __future__ import annotations

import json
import logging
import os
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from task.image.data import _load_images
from task.image.train import generate
from task.progress import Progress

log = logging.getLogger(__name__)

VERSION = 1  # bump when the architecture or the training changes: a new cache folder
SEED = 0
BATCH = 64
LEARNING_RATE = 1e-3


class ImageClassifier(nn.Module):
    """Three 3x3 conv + ReLU + 2x2 max-pool blocks (16, 32, 64 channels: 32 -> 4 pixels), then
    a linear layer to the class logits. Input: images as float in [-1, 1], (N, C, 32, 32)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        blocks, width = [], channels
        for out in (16, 32, 64):
            blocks += [nn.Conv2d(width, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            width = out
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(64 * 4 * 4, num_classes)
        self.channels, self.num_classes = channels, num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def as_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> the classifier's input, float in [-1, 1]."""
    return images.float() / 127.5 - 1.0


@torch.no_grad()
def predict(classifier: ImageClassifier, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Predicted classes of uint8 images (N, C, 32, 32)."""
    classifier.eval()
    return torch.cat([classifier(as_input(b)).argmax(1) for b in images.split(batch)])


def accuracy(classifier: ImageClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of uint8 images the classifier labels as ``labels``."""
    return float((predict(classifier, images) == labels).float().mean())


def train_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int, steps: int,
                     seed: int = SEED) -> ImageClassifier:
    """Adam steps on seeded random batches of BATCH uint8 images (N, C, 32, 32)."""
    torch.manual_seed(seed)
    images, labels = torch.from_numpy(images), torch.from_numpy(labels).long()
    model = ImageClassifier(images.shape[1], num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    progress = Progress("training the conditioning-accuracy classifier", steps, "steps")
    for _ in range(steps):
        idx = torch.randint(len(images), (BATCH,), generator=gen)
        loss = F.cross_entropy(model(as_input(images[idx])), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress.update(loss=f"{loss.item():.3f}")
    return model.eval()


def cached_classifier(folder: Path, data, steps: int) -> tuple[ImageClassifier, dict]:
    """The classifier of ``data`` (an ImageDataset) trained for ``steps``, trained and saved
    into ``folder`` the first time (with ``classifier.json``: its test accuracy, steps,
    seconds), loaded from there afterwards."""
    record_path, weights = folder / "classifier.json", folder / "classifier.pt"
    if record_path.exists():
        record = json.loads(record_path.read_text())
        model = ImageClassifier(record["channels"], record["num_classes"])
        model.load_state_dict(torch.load(weights, weights_only=True))
        return model.eval(), record
    log.info("training the conditioning-accuracy classifier: %d steps on %d images", steps,
             len(data.train_labels))
    t0 = time.time()
    model = train_classifier(data.train_images, data.train_labels, data.num_classes, steps)
    seconds = time.time() - t0
    test = torch.from_numpy(data.test_images)
    record = {"test_accuracy": accuracy(model, test, torch.from_numpy(data.test_labels).long()),
              "test_images": len(test), "train_images": len(data.train_labels), "steps": steps,
              "batch": BATCH, "learning_rate": LEARNING_RATE, "seed": SEED, "version": VERSION,
              "train_s": round(seconds, 1), "steps_per_s": round(steps / max(seconds, 1e-9), 2),
              "torch_threads": torch.get_num_threads(),
              "params": sum(p.numel() for p in model.parameters()),
              "channels": model.channels, "num_classes": model.num_classes}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_name(f"classifier.pt.{os.getpid()}.tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(weights)
    tmp = record_path.with_name(f"classifier.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(record_path)  # last: a folder with the record holds the weights too
    return model, record


def load_classifier(cfg) -> tuple[ImageClassifier, dict]:
    """The run's classifier (``image.classifier-steps``), from the cache or trained into it."""
    return _load_classifier(cfg.data.dataset, cfg.cache_path, cfg.image.classifier_steps)


@lru_cache(maxsize=2)
def _load_classifier(dataset: str, cache_path: Path, steps: int) -> tuple[ImageClassifier, dict]:
    folder = cache_path / "classifiers" / f"{dataset}-cnn{VERSION}-steps{steps}-seed{SEED}"
    return cached_classifier(folder, _load_images(dataset, cache_path), steps)


def conditioning_accuracy(generator: nn.Module, classifier: ImageClassifier, per_class: int,
                          seed: int) -> float:
    """Generate ``per_class`` images of every class (fixed seeded noise) and return the share
    the classifier labels as the class asked for."""
    labels = torch.arange(classifier.num_classes).repeat(per_class)
    return accuracy(classifier, generate(generator, labels, seed), labels)
