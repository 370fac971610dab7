"""The image task's backbone recipe: hinge loss, spectrally normalized discriminator, DiffAugment,
EMA generator, the cached pre-training run, LoRA on the generator (tiny widths, seeded, fast)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import get_peft_model
from torch import nn
from torch.nn.utils import parametrize

from task.config import RunConfig
from task.image import train
from task.image.data import client_image_rows
from task.image.model import ConditionalDiscriminator, ConditionalGenerator, image_lora_config
from task.image.train import (
    DiffAugment,
    cutout,
    d_hinge_loss,
    ema_decay,
    ema_update,
    g_hinge_loss,
    translate,
)


def tiny_cfg(cache_dir, **overrides) -> RunConfig:
    return RunConfig.from_run_config({
        "task": "image", "data.dataset": "fashion-mnist", "data.partitioner": "dirichlet",
        "data.dirichlet-alpha": 0.1, "image.generator-width": 4, "image.discriminator-width": 4,
        "image.pretrain-steps": 3, "lora.rank": 2, "lora.alpha": 4.0, "lora.dropout": 0.0,
        "train.batch-size": 8, "output-dir": str(cache_dir / "out"), "cache-dir": str(cache_dir),
        **overrides})


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    """A tiny backbone pre-trained (3 steps) into a fresh cache of this module."""
    cfg = tiny_cfg(tmp_path_factory.mktemp("backbone-cache"))
    record = train.ensure_pretrained(cfg)
    return cfg, record


# --------------------------------------------------------------------------- hinge loss
def test_hinge_losses_equal_hand_computed_values():
    d_real = torch.tensor([2.0, 0.5, -1.0])
    d_fake = torch.tensor([-2.0, 0.0, 1.5])
    # relu(1 - real) = [0, 0.5, 2] -> 2.5 / 3; relu(1 + fake) = [0, 1, 2.5] -> 3.5 / 3
    assert d_hinge_loss(d_real, d_fake).item() == pytest.approx(2.0)
    assert g_hinge_loss(d_fake).item() == pytest.approx(0.5 / 3)
    # confident, correct critic: no discriminator loss at all
    assert d_hinge_loss(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -5.0])).item() == 0.0


# --------------------------------------------------------------------------- DiffAugment
def test_translate_and_cutout_move_and_zero_pixels_as_specified():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float).reshape(2, 1, 6, 6) + 1
    out = translate(x, torch.tensor([1, -2]), torch.tensor([0, 3]))
    # image 0: out[i, j] = x[i + 1, j]; the last row comes from outside (zero)
    assert torch.equal(out[0, 0, :5], x[0, 0, 1:]) and torch.equal(out[0, 0, 5], torch.zeros(6))
    # image 1: out[i, j] = x[i - 2, j + 3]
    assert torch.equal(out[1, 0, 2:, :3], x[1, 0, :4, 3:])
    assert out[1, 0, :2].abs().sum() == 0 and out[1, 0, :, 3:].abs().sum() == 0

    ones = torch.ones(2, 1, 8, 8)
    cut = cutout(ones, torch.tensor([4, 0]), torch.tensor([4, 7]), (4, 4))
    assert cut[0, 0, 2:6, 2:6].sum() == 0 and cut[0].sum() == 64 - 16  # a full 4x4 square
    assert cut[1, 0, :2, 5:].sum() == 0 and cut[1].sum() == 64 - 6     # clipped at the corner


def test_diffaugment_keeps_shapes_is_seeded_and_follows_the_paper_policy():
    x = torch.rand(64, 1, 32, 32) + 0.5  # no zero pixels: a zero is a filled or cut pixel
    out = DiffAugment(torch.Generator().manual_seed(3))(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, DiffAugment(torch.Generator().manual_seed(3))(x))
    assert not torch.equal(out, DiffAugment(torch.Generator().manual_seed(4))(x))

    # translation alone: every image is itself shifted by at most 1/8 of the side (4 pixels)
    shifted = DiffAugment(torch.Generator().manual_seed(5), policy=("translation",))(x)
    seen = set()
    for i in range(len(x)):
        matches = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)
                   if torch.equal(shifted[i:i + 1], translate(x[i:i + 1], torch.tensor([dy]), torch.tensor([dx])))]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) > 20  # 64 draws of 81 shifts

    # cutout alone: the zeros of each image are one rectangle of at most 16x16 (half the side),
    # exactly 16 wide / tall unless clipped at the border
    cut = DiffAugment(torch.Generator().manual_seed(6), policy=("cutout",))(x)
    full = 0
    for i in range(len(x)):
        zero = cut[i, 0] == 0
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        h, w = len(rows), len(cols)
        assert 0 < h <= 16 and 0 < w <= 16 and zero.sum() == h * w  # a filled rectangle
        assert rows[-1] - rows[0] + 1 == h and cols[-1] - cols[0] + 1 == w
        assert h == 16 or rows[0] == 0 or rows[-1] == 31
        assert w == 16 or cols[0] == 0 or cols[-1] == 31
        assert torch.equal(cut[i][~zero[None]], x[i][~zero[None]])  # the rest untouched
        full += h == w == 16
    assert full >= 5


def test_gradients_flow_through_diffaugment():
    x = torch.ones(16, 1, 32, 32, requires_grad=True)
    out = DiffAugment(torch.Generator().manual_seed(0))(x)
    out.sum().backward()
    # every output pixel that came from the input carries a gradient of one back to it
    assert x.grad is not None and set(x.grad.unique().tolist()) <= {0.0, 1.0}
    assert x.grad.sum() == out.sum() > 0


# --------------------------------------------------------------------------- spectral norm
def test_every_discriminator_weight_layer_is_spectrally_normalized_without_batchnorm():
    torch.manual_seed(0)
    disc = ConditionalDiscriminator(10, 1, 4)
    weighted = [m for m in disc.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))]
    assert len(weighted) == 6  # four convolutions, the head, the projection embedding
    assert all(parametrize.is_parametrized(m, "weight") for m in weighted)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in disc.modules())
    with torch.no_grad():
        for m in weighted:  # a large weight: the normalization, not the init, keeps sigma at 1
            m.parametrizations.weight.original.mul_(7.0)
        images, labels = torch.randn(8, 1, 32, 32), torch.randint(10, (8,))
        disc.train()
        for _ in range(30):  # one power iteration per training forward
            disc(images, labels)
        for m in weighted:
            sigma = torch.linalg.matrix_norm(m.weight.reshape(m.weight.shape[0], -1), ord=2)
            assert sigma.item() == pytest.approx(1.0, abs=0.02)


# --------------------------------------------------------------------------- EMA
def test_ema_update_equals_the_formula_and_the_decay_warms_up():
    torch.manual_seed(0)
    ema, model = ConditionalGenerator(10, 1, 2), ConditionalGenerator(10, 1, 2)
    before = [p.clone() for p in ema.parameters()]
    ema_update(ema, model, 0.9)
    for e, e0, p in zip(ema.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, 0.9 * e0 + 0.1 * p)
    assert ema_decay(0) == pytest.approx(0.1) and ema_decay(1) == pytest.approx(2 / 11)
    assert ema_decay(10_000) == 0.999 and ema_decay(100, decay=0.5) == 0.5
    assert list(model.buffers()) == []  # BatchNorm without running statistics: nothing else to average


# --------------------------------------------------------------------------- the cached backbone
def test_pretraining_writes_the_cache_and_a_second_call_loads_it_without_training(backbone, monkeypatch):
    cfg, record = backbone
    folder = train.backbone_dir(cfg)
    assert f"-{train.recipe_digest()}-" in folder.name
    assert {p.name for p in folder.iterdir()} == {"generator.pt", "generator-raw.pt",
                                                  "discriminator.pt", "pretrain.json"}
    for key in ("pretrain_steps", "pretrain_batch", "pretrain_s", "public_images",
                "generator_params", "discriminator_params"):
        assert key in record
    assert record["pretrain_steps"] == 3 and record["pretrain_batch"] == 64
    recipe = record["recipe"]
    assert recipe["loss"] == "hinge" and recipe["sn"] is True and recipe["ema_decay"] == 0.999
    assert recipe["diffaugment"] == "translation,cutout"
    assert json.loads((folder / "pretrain.json").read_text()) == record
    # the backbone is the EMA of the generator's weights, not the last ones
    ema, raw = (torch.load(folder / f, weights_only=True) for f in ("generator.pt", "generator-raw.pt"))
    assert ema.keys() == raw.keys() and any(not torch.equal(ema[k], raw[k]) for k in ema)

    def no_training(*args, **kwargs):
        raise AssertionError("the cached backbone was trained again")

    monkeypatch.setattr(train, "gan_step", no_training)
    monkeypatch.setattr(train, "_pretrain", no_training)
    generator = train.load_generator_backbone(cfg)
    assert generator.pretrain_record == record and list(generator.buffers()) == []
    assert all(torch.equal(v, ema[k]) for k, v in generator.state_dict().items())
    disc = torch.load(folder / "discriminator.pt", weights_only=True)
    assert all(torch.equal(v, disc[k]) for k, v in generator.discriminator_state.items())
    # another recipe is another folder: a stale backbone is never loaded
    monkeypatch.setitem(train.RECIPE, "loss", "bce")
    assert train.backbone_dir(cfg) != folder


# --------------------------------------------------------------------------- LoRA on the backbone
def test_lora_generator_equals_the_base_at_init_and_trains_only_adapters(backbone):
    cfg, _ = backbone
    generator = train.load_generator_backbone(cfg)
    z, labels = torch.randn(6, 100), torch.arange(6)
    with torch.no_grad():
        base_out = generator(z, labels)
    model = get_peft_model(generator, image_lora_config(cfg))
    with torch.no_grad():
        assert torch.equal(model(z, labels), base_out)  # B = 0: the adapter adds nothing yet
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    rows, _ = client_image_rows(cfg, 0, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}

    def local(seed):
        model.load_state_dict({**before}, strict=True)
        loss = train.train_gan_local(model, rows, epochs=1, batch_size=8, lr=1e-2, max_steps=2, seed=seed)
        return loss, {k: v.clone() for k, v in model.state_dict().items()}

    loss, after = local(1)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert start.keys() >= changed
    # seeded noise, batches and DiffAugment: the same seed gives the same adapter
    loss_again, again = local(1)
    assert loss_again == loss and all(torch.equal(after[k], again[k]) for k in after)
