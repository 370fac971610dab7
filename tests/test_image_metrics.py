"""The image task's scores: cached real features, KID, FID at a fixed N with its floor, the
conditioning-accuracy classifier, and how the evaluator puts them together."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from task.config import ConfigError, RunConfig
from task.image import scores
from task.image.data import ImageDataset, balanced_order


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread, as an image-task process runs (image.torch-threads): on a busy 2-core
    machine a second thread mostly waits (the classifier's 60 steps: 25 s with 2, 2 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class FakeExtractor:
    """Cheap stand-in for InceptionV3: 8x8 average-pooled pixels as 64-d features; counts calls."""

    extractor_id = "fake-pool8"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return F.adaptive_avg_pool2d(images.float() / 255.0, 8).flatten(1)


class Identity(nn.Module):
    """torchmetrics' custom feature extractor that passes features through."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.num_features = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_real_features_are_computed_once_and_keyed_by_images_and_extractor(tmp_path):
    images = torch.randint(0, 256, (12, 1, 32, 32), dtype=torch.uint8)
    extractor = FakeExtractor()
    first = scores.cached_features(images, extractor, tmp_path, "fashion-mnist-test")
    second = scores.cached_features(images, extractor, tmp_path, "fashion-mnist-test")
    assert extractor.calls == 1 and torch.equal(first, second)  # the second call reads the file
    (path,) = tmp_path.glob("*.safetensors")
    assert path.name.startswith("fashion-mnist-test-12-fake-pool8-")
    # another N, other pixels or another extractor never reuse them
    scores.cached_features(images[:8], extractor, tmp_path, "fashion-mnist-test")
    other = images.clone()
    other[0, 0, 0, 0] ^= 1
    scores.cached_features(other, extractor, tmp_path, "fashion-mnist-test")
    assert extractor.calls == 3
    bf16 = FakeExtractor()
    bf16.extractor_id = "fake-pool8-bf16"
    scores.cached_features(images, bf16, tmp_path, "fashion-mnist-test")
    assert bf16.calls == 1 and len(list(tmp_path.glob("*.safetensors"))) == 4
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_kid_equals_torchmetrics_kernel_inception_distance_on_the_same_features():
    from torchmetrics.image.kid import KernelInceptionDistance

    gen = torch.Generator().manual_seed(3)
    real = torch.rand(120, 32, generator=gen, dtype=torch.float64)
    fake = torch.rand(90, 32, generator=gen, dtype=torch.float64) * 1.2
    metric = KernelInceptionDistance(feature=Identity(32), subsets=15, subset_size=40)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    torch.manual_seed(11)  # torchmetrics draws its subsets from the global generator
    expected_mean, expected_std = metric.compute()
    mean, std = scores.kid(real, fake, subsets=15, subset_size=40, seed=11)
    assert mean == pytest.approx(float(expected_mean), rel=1e-9)
    assert std == pytest.approx(float(expected_std), rel=1e-9)
    assert mean > 0 and std > 0


def test_kid_is_about_zero_for_one_distribution_and_grows_monotonically_with_a_shift():
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(600, 16, generator=gen).abs()
    # identical sets: about 0 (a little below: subsets drawn from one set share images, and a
    # shared image's k(x, x) enters the cross term, O(1/m))
    same = scores.kid(real, real.clone(), subsets=20, subset_size=200, seed=1)
    # another sample of the same distribution: unbiased, so about 0, well within its std
    fresh = scores.kid(real, torch.randn(600, 16, generator=gen).abs(), subsets=20, subset_size=200)
    shifted = [scores.kid(real, real + shift, subsets=20, subset_size=200, seed=1)[0]
               for shift in (0.1, 0.2, 0.4, 0.8)]
    assert abs(same[0]) < 0.1 * shifted[0] and abs(fresh[0]) < 0.02 * shifted[0]
    assert abs(fresh[0]) < 0.5 * fresh[1]
    assert all(a < b for a, b in zip(shifted, shifted[1:])), shifted
    with pytest.raises(ValueError, match="subset size"):
        scores.kid(real[:10], real, subsets=2, subset_size=20)
    assert scores.kid_subset_size(5000, 1000, 1000) == 500  # half the smaller set
    assert scores.kid_subset_size(5000, 4000, 1000) == 1000  # at most the cap


def test_frechet_distance_has_the_closed_form_of_diagonal_gaussians():
    # N(mu1, diag(a)) vs N(mu2, diag(b)): |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0, -1.0]).double(), torch.tensor([0.5, 1.0, 0.0, -1.0]).double()
    a, b = torch.tensor([1.0, 4.0, 0.25, 2.0]).double(), torch.tensor([2.0, 1.0, 0.25, 0.5]).double()
    closed = float(((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    exact = scores.frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b))
    assert exact == pytest.approx(closed, rel=1e-10)
    # from samples: FID of 20k Gaussian features approaches the closed form
    gen = torch.Generator().manual_seed(0)
    x = mu1 + a.sqrt() * torch.randn(20000, 4, generator=gen)
    y = mu2 + b.sqrt() * torch.randn(20000, 4, generator=gen)
    assert scores.fid(x, y) == pytest.approx(closed, rel=0.02)
    assert scores.fid(x, x) == pytest.approx(0.0, abs=1e-6)


def test_fid_equals_torchmetrics_frechet_inception_distance_on_correlated_features():
    from torchmetrics.image.fid import FrechetInceptionDistance

    gen = torch.Generator().manual_seed(1)
    mix = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    x = torch.randn(300, 8, generator=gen, dtype=torch.float64) @ mix
    y = torch.randn(200, 8, generator=gen, dtype=torch.float64) @ mix.T + 0.3
    metric = FrechetInceptionDistance(feature=Identity(8))
    metric.update(x, real=True)
    metric.update(y, real=False)
    assert scores.fid(x, y) == pytest.approx(float(metric.compute()), rel=1e-6)


def test_balanced_order_makes_every_prefix_class_balanced():
    labels = np.repeat(np.arange(10), [50, 60, 70, 80, 90, 100, 110, 120, 130, 140])
    order = balanced_order(labels, seed=0)
    assert sorted(order.tolist()) == list(range(len(labels)))
    for n in (10, 37, 200, 500):
        counts = np.bincount(labels[order[:n]], minlength=10)
        assert counts.max() - counts.min() <= 1
    assert not np.array_equal(order, balanced_order(labels, seed=1))


# --------------------------------------------------------------------------- classifier
def pattern_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Class c: a bright 8x8 square in cell (c // 4, c % 4) of a 4x4 grid, on noise."""
    images = rng.integers(0, 60, (len(labels), 1, 32, 32)).astype(np.uint8)
    for i, c in enumerate(labels):
        r, k = 8 * (c // 4), 8 * (c % 4)
        images[i, 0, r:r + 8, k:k + 8] = 230
    return images


def pattern_dataset(n_train: int = 300, n_test: int = 200) -> ImageDataset:
    rng = np.random.default_rng(0)
    train_labels, test_labels = rng.integers(0, 10, n_train), rng.integers(0, 10, n_test)
    return ImageDataset(pattern_images(train_labels, rng), train_labels.astype(np.int64),
                        pattern_images(test_labels, rng), test_labels.astype(np.int64),
                        tuple(str(c) for c in range(10)))


class PatternGenerator(nn.Module):
    """A 'generator' that draws the pattern of the asked class (or of class 0 whatever it is asked)."""

    def __init__(self, faithful: bool) -> None:
        super().__init__()
        self.faithful = faithful

    def forward(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels if self.faithful else torch.zeros_like(labels)
        rng = np.random.default_rng(int(noise.abs().sum() * 1000) % 2**32)
        return torch.from_numpy(pattern_images(labels.numpy(), rng)).float() / 127.5 - 1.0


def test_classifier_learns_separable_patterns_and_is_trained_once(tmp_path, monkeypatch):
    from task.image import classifier

    data = pattern_dataset()
    model, record = classifier.cached_classifier(tmp_path / "c", data, steps=60)
    assert record["test_accuracy"] >= 0.95 and record["steps"] == 60 and record["test_images"] == 200
    assert record["train_s"] > 0 and (tmp_path / "c" / "classifier.json").exists()

    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier is retrained")

    monkeypatch.setattr(classifier, "train_classifier", no_training)
    again, record_again = classifier.cached_classifier(tmp_path / "c", data, steps=60)
    assert record_again == record
    x = torch.from_numpy(data.test_images[:16])
    assert torch.equal(classifier.predict(again, x), classifier.predict(model, x))

    faithful = classifier.conditioning_accuracy(PatternGenerator(True), model, per_class=10, seed=0)
    blind = classifier.conditioning_accuracy(PatternGenerator(False), model, per_class=10, seed=0)
    assert faithful >= 0.95 and blind == pytest.approx(0.1, abs=0.05)


# --------------------------------------------------------------------------- the evaluator
TINY_SCORES = {"image.real-feature-images": 40, "image.fid-images": 16, "image.kid-images": 20,
               "image.round-kid-images": 10, "image.client-kid-images": 12,
               "image.accuracy-per-class": 3, "image.classifier-steps": 30, "image.kid-subsets": 5}


def tiny_cfg(tmp_path, **overrides) -> RunConfig:
    return RunConfig.from_run_config({
        "task": "image", "data.dataset": "fashion-mnist", "data.partitioner": "dirichlet",
        "image.generator-width": 4, "image.discriminator-width": 4, "image.pretrain-steps": 2,
        "lora.rank": 2, "lora.alpha": 4.0, "lora.dropout": 0.0, "output-dir": str(tmp_path / "out"),
        "cache-dir": os.environ["FEDGEN_EDGE_HOME"] + "/cache", **TINY_SCORES, **overrides})


def test_evaluator_scopes_report_kid_fid_with_its_floor_and_accuracy(tmp_path, monkeypatch):
    from task import score
    from task.adapters import shared_lora_model
    from task.image import TASK
    from task.image.data import client_image_rows

    cfg = tiny_cfg(tmp_path, **{"cache-dir": str(tmp_path / "cache")})
    extractor = FakeExtractor()
    monkeypatch.setattr(scores, "feature_extractor", lambda cfg: extractor)
    model = shared_lora_model(cfg)
    test_rows = TASK.global_test_data(cfg)
    assert len(test_rows) == 40 and np.bincount(test_rows[:, 0].numpy()).tolist() == [4] * 10

    whole = TASK.evaluator(cfg, test_rows, seed=cfg.seed, scope="whole")
    TASK.evaluator(cfg, test_rows, seed=cfg.seed, scope="round")
    assert extractor.calls == 1, "the real reference features are computed once, then read back"
    assert len(list((tmp_path / "cache" / "features").glob("fashion-mnist-test-40-fake-pool8-*"))) == 1
    result = whole(model)
    assert result["images"] == 20 and result["fid-images"] == 16 and result["accuracy-images"] == 30
    assert result["kid"] > 0 and result["kid-std"] > 0 and 0 <= result["accuracy"] <= 1
    assert result["fid"] > result["fid-floor"] > 0  # an untrained GAN is far from the data
    calls = extractor.calls
    assert whole(model) == result  # fixed noise and subsets: the same model, the same scores
    # ... and the "whole" scope's generated features were read back by their pixels (every
    # method's round 0 in a suite is the same backbone), while another generator is extracted anew
    assert extractor.calls == calls and len(list((tmp_path / "cache" / "features").glob("generated-20-*"))) == 1
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(0.5)
    assert whole(model)["kid"] != result["kid"] and extractor.calls == calls + 1
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).sub_(0.5)
    figures = TASK.figures([{f"global-{k}": v for k, v in result.items()}], "global")
    assert figures["fid_images"] == 16 and figures["kid"] == result["kid"] == score(TASK, result)

    train_rows, local_test = client_image_rows(cfg, 0, 10)
    client = TASK.evaluator(cfg, local_test, seed=cfg.seed, scope="client")
    assert client.labels.unique().tolist() == local_test[:12, 0].unique().sort().values.tolist()
    row = client(model)
    assert row["images"] == 12 and math.isfinite(row["kid"]) and "fid" not in row
    rows = [{f"global-{k}": v for k, v in r.items()} for r in (row, {**row, "kid": 2 * row["kid"]})]
    assert TASK.figures(rows, "global")["kid"] == pytest.approx(1.5 * row["kid"])
    assert math.isnan(TASK.figures(rows, "global")["fid"])
    # a client with too few real images for KID: no KID (nan), weight 0 in the means
    tiny = TASK.evaluator(cfg, local_test[:3], seed=cfg.seed, scope="client")(model)
    assert tiny["images"] == 0 and math.isnan(tiny["kid"])
    assert TASK.figures([{f"global-{k}": v for k, v in r.items()} for r in (row, tiny)],
                        "global")["kid"] == row["kid"]

    header = TASK.header(cfg, test_rows)
    assert header["fid_images"] == 16 and header["fid_name"] == "fid_16"
    assert "fake-pool8" in header["feature_extractor"] and header["real_reference"]["images"] == 40
    assert "20 generated" in header["scores"]["whole"]["kid"] and "subsets of 10" in header["scores"]["whole"]["kid"]
    assert "10 generated" in header["scores"]["round"]["kid"]
    assert "16 generated" in header["scores"]["whole"]["fid"]
    assert header["classifier"]["steps"] == 30 and 0 < header["classifier"]["test_accuracy"] <= 1


@pytest.mark.parametrize("key,value,needle", [
    ("image.real-feature-images", 30, "'image.real-feature-images'.*two disjoint"),
    ("image.kid-images", 3, "'image.kid-images'"),
    ("image.client-kid-images", 2, "'image.client-kid-images'"),
    ("image.kid-subsets", 0, "'image.kid-subsets'"),
    ("image.classifier-steps", 0, "'image.classifier-steps'"),
    ("image.inception-bf16", 1, "'image.inception-bf16'"),
])
def test_bad_score_settings_stop_the_run_naming_the_key(tmp_path, key, value, needle):
    with pytest.raises(ConfigError, match=needle):
        tiny_cfg(tmp_path, **{key: value})


def test_the_old_client_fid_key_is_refused_with_its_new_name():
    with pytest.raises(ConfigError, match="'image.client-fid-images' is now 'image.client-kid-images'"):
        RunConfig.from_run_config({"image.client-fid-images": 64})


def test_real_reference_larger_than_the_test_split_names_the_key(tmp_path):
    from task.image.data import global_test_rows

    with pytest.raises(ConfigError, match="'image.real-feature-images'"):
        global_test_rows(tiny_cfg(tmp_path, **{"image.real-feature-images": 20000}))


def test_personalization_protocol_chooses_by_validation_kid_lower_is_better(tmp_path, monkeypatch):
    from task.adapters import get_adapter_state, set_adapter_state, shared_lora_model
    from task.image import TASK
    from task.image.data import client_image_rows
    from task.personalization import personalize

    cfg = tiny_cfg(tmp_path, **{"cache-dir": str(tmp_path / "cache"), "server.personalize-max-steps": 4,
                                "server.personalize-checks": 2, "server.personalize-learning-rate": 0.01})
    monkeypatch.setattr(scores, "feature_extractor", lambda cfg: FakeExtractor())
    model = shared_lora_model(cfg)
    start = get_adapter_state(model)
    train_rows, _ = client_image_rows(cfg, 2, 10)
    chosen = personalize(TASK, cfg, model, global_state=start, start_state=None,
                         load=set_adapter_state, snapshot=get_adapter_state, train_data=train_rows, seed=3)
    assert chosen.total_steps == 4 and math.isfinite(chosen.validation_global)
    assert chosen.validation_chosen <= chosen.validation_global  # KID: lower is better
    assert chosen.validation_count == cfg.server.personalize_validation_cap  # 256 of its images
