"""KID, FID and class-conditioning accuracy of the conditional generator, measured as the field
measures them.

Real reference: InceptionV3 pool3 features (task/image/fid.py) of ``image.real-feature-images``
test-split images (5,000 by default, a class-balanced seeded sample: data.global_test_rows; no
client trains on the test split), computed once and cached under ``<cache-dir>/features/``,
named by dataset, split, count, extractor and a digest of the pixels, so another set, size or
extractor never reuses them (:func:`cached_features`). A client's reference is its own local
test images, cached the same way.

KID (Binkowski et al., "Demystifying MMD GANs", ICLR 2018): the unbiased estimator of MMD^2
with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3 on random subsets of m real and m
generated feature vectors, mean and std over ``image.kid-subsets`` subsets: torchmetrics'
KernelInceptionDistance (a test holds the two equal on the same features and subsets).
Unbiased, so about 0 for two samples of one distribution (it can be slightly negative) and
comparable across sample sizes, unlike FID. m = min(``image.kid-subset-size``, half the smaller
set): below the whole set, so the std over subsets says how much the estimate moves with the
images drawn (torchmetrics and StyleGAN2-ADA take m = min(n, 1000), at which every subset of
the smaller set is that whole set and the std says nothing about it).

FID (Heusel et al., NeurIPS 2017): the Frechet distance between Gaussians fitted to two feature
sets. It is biased upward by a term that shrinks like 1/N (Chong and Forsyth, CVPR 2020; with
N <= 2048 the 2048-d covariance is not even full rank), so it compares only at one N: reported
as ``fid`` at N = ``image.fid-images`` (results name N: ``fid_images``, ``fid_name`` fid_<N>),
N generated vs the first N reference features, beside ``fid_floor``, the FID of the first N vs
the next N reference features, two disjoint real sets: what a perfect generator would score.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from task.image.classifier import accuracy
from task.image.fid import InceptionFeatures
from task.image.train import generate


# --------------------------------------------------------------------------- features, cached
def cached_features(images: torch.Tensor, extractor, folder: Path, name: str) -> torch.Tensor:
    """``extractor(images)`` (uint8 images -> (N, d) features), computed once and then read
    back from ``folder/<name>-<N>-<extractor id>-<pixel digest>.safetensors`` (written
    atomically: a reader sees the whole file or none)."""
    digest = hashlib.sha1(images.contiguous().numpy().tobytes()).hexdigest()[:12]
    path = Path(folder) / f"{name}-{len(images)}-{extractor.extractor_id}-{digest}.safetensors"
    if path.exists():
        return load_file(path)["features"]
    features = extractor(images).float().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file({"features": features}, str(tmp), metadata={"images": str(len(images)),
                                                           "extractor": extractor.extractor_id})
    tmp.replace(path)
    return features


# --------------------------------------------------------------------------- FID
def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance of (N, d) features, in float64."""
    x = features.double()
    mu = x.mean(0)
    centered = x - mu
    return mu, centered.T @ centered / (len(x) - 1)


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor,
                     sigma2: torch.Tensor) -> float:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)) between two Gaussians (Heusel et
    al. 2017). The trace term from the eigenvalues of S1^(1/2) S2 S1^(1/2), symmetric, with the
    eigenvalues of S1 S2 (two symmetric eigendecompositions instead of a general one)."""
    w, v = torch.linalg.eigh(sigma1)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T
    inner = root1 @ sigma2 @ root1
    cross = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + sigma1.trace() + sigma2.trace() - 2 * cross)


def fid(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """FID between two feature sets (compare only values of the same N)."""
    return frechet_distance(*feature_stats(features_a), *feature_stats(features_b))


# --------------------------------------------------------------------------- KID
def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x.y / d + 1)^3, KID's kernel (degree 3, gamma 1/d, coef 1); the power in
    float64."""
    return (((x @ y.T).double() / x.shape[1]) + 1.0) ** 3


def unbiased_mmd2(real: torch.Tensor, fake: torch.Tensor) -> float:
    """The unbiased MMD^2 estimate of two sets of m feature vectors each: the within-set kernel
    means without their diagonals, minus twice the cross mean."""
    m = len(real)
    k_rr, k_ff, k_rf = polynomial_kernel(real, real), polynomial_kernel(fake, fake), polynomial_kernel(real, fake)
    within = k_rr.sum() - k_rr.diagonal().sum() + k_ff.sum() - k_ff.diagonal().sum()
    return float(within / (m * (m - 1)) - 2 * k_rf.sum() / m**2)


def kid_subset_size(n_real: int, n_fake: int, cap: int) -> int:
    """KID's subset size m: at most ``cap`` and half the smaller set (so subsets differ); below
    2 (fewer than 4 images in a set) there is no KID."""
    return min(cap, n_real // 2, n_fake // 2)


def kid(real: torch.Tensor, fake: torch.Tensor, subsets: int, subset_size: int,
        seed: int = 0) -> tuple[float, float]:
    """KID: mean and (population) std of the unbiased MMD^2 over ``subsets`` random subsets of
    ``subset_size`` real and as many generated features, drawn as torchmetrics draws them (a
    permutation of the real set, then one of the generated, per subset) from a generator seeded
    with ``seed`` (fixed: the same draws every round)."""
    if not 2 <= subset_size <= min(len(real), len(fake)):
        raise ValueError(f"KID subset size {subset_size} needs 2 <= it <= min({len(real)} real, "
                         f"{len(fake)} generated)")
    gen = torch.Generator().manual_seed(seed)
    scores = []
    for _ in range(subsets):
        r = real[torch.randperm(len(real), generator=gen)[:subset_size]]
        f = fake[torch.randperm(len(fake), generator=gen)[:subset_size]]
        scores.append(unbiased_mmd2(r, f))
    mean = sum(scores) / len(scores)
    return mean, math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))


# --------------------------------------------------------------------------- a generator's scores
def feature_extractor(cfg):
    """The run's feature extractor: InceptionV3 pool3, fp32 or bf16 (``image.inception-bf16``)."""
    return InceptionFeatures(bf16=cfg.image.inception_bf16)


def balanced_labels(num_classes: int, n: int) -> torch.Tensor:
    """n labels taking turns over the classes (every prefix balanced)."""
    return torch.arange(n) % num_classes


def labels_like(labels: torch.Tensor, n: int) -> torch.Tensor:
    """n labels in the proportions of ``labels`` (repeated in order, then cut)."""
    return labels.repeat(math.ceil(n / len(labels)))[:n]


class GeneratorScores:
    """A generator's scores against fixed real features: every call generates ``labels`` from
    the same seeded noise, extracts the features of the first ``kid_images`` (or
    ``fid_images``, if more) and returns KID with its std over subsets, the conditioning
    accuracy of all generated images and, with ``fid_images``, FID at that N with its
    real-vs-real floor (computed once here). With ``cache`` the generated images' features are
    cached too, keyed by their pixels: the same generator at the same noise (every method's round
    0 in a suite: the pre-trained backbone) is extracted once."""

    def __init__(self, real: torch.Tensor, labels: torch.Tensor, *, extractor, classifier,
                 seed: int, kid_images: int, kid_subsets: int, kid_subset_cap: int,
                 fid_images: int = 0, cache: Path | None = None) -> None:
        if len(labels) < max(kid_images, fid_images):
            raise ValueError(f"{len(labels)} labels for {max(kid_images, fid_images)} images")
        if fid_images and len(real) < 2 * fid_images:
            raise ValueError(f"the FID floor needs 2 x {fid_images} real features, not {len(real)}")
        self.real, self.labels, self.seed, self.cache = real, labels, seed, cache
        self.extractor, self.classifier = extractor, classifier
        self.kid_images, self.kid_subsets, self.fid_images = kid_images, kid_subsets, fid_images
        self.subset_size = kid_subset_size(len(real), kid_images, kid_subset_cap)
        self.fid_floor = fid(real[:fid_images], real[fid_images:2 * fid_images]) if fid_images else None

    def __call__(self, model) -> dict:
        images = generate(model, self.labels, self.seed)
        scored = images[:max(self.kid_images, self.fid_images)]
        fake = (cached_features(scored, self.extractor, self.cache, "generated") if self.cache
                else self.extractor(scored))
        out = {"images": self.kid_images, "kid": math.nan, "kid-std": math.nan,
               "accuracy": accuracy(self.classifier, images, self.labels),
               "accuracy-images": len(images)}
        if self.subset_size >= 2:  # else too few real images (a tiny client): no KID
            out["kid"], out["kid-std"] = kid(self.real, fake[:self.kid_images], self.kid_subsets,
                                             self.subset_size, self.seed)
        else:
            out["images"] = 0
        if self.fid_images:
            n = self.fid_images
            out.update({"fid": fid(fake[:n], self.real[:n]), "fid-floor": self.fid_floor,
                        "fid-images": n})
        return out
