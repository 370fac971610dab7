"""The image task: LoRA on (transposed) convolutions, only adapters train, data splits, Inception FID."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import get_peft_model
from torch import nn

from task.config import RunConfig
from task.image.data import client_image_rows, public_and_pool, image_partitions, load_images, unpack_rows
from task.image.model import ConditionalGenerator, LoraConvTranspose2d, image_lora_config

ROOT = Path(__file__).resolve().parents[1]


def image_cfg(tmp_path, **overrides) -> RunConfig:
    """A tiny image-task config; ``overrides`` by run-config key (``**{"lora.rank": 4}``)."""
    return RunConfig.from_run_config({
        "task": "image", "data.dataset": "fashion-mnist", "data.partitioner": "dirichlet",
        "data.dirichlet-alpha": 0.1, "image.generator-width": 4, "image.discriminator-width": 4,
        "image.pretrain-steps": 2, "lora.rank": 2, "lora.alpha": 4.0, "lora.dropout": 0.0,
        "train.batch-size": 8, "output-dir": str(tmp_path / "out"),
        "cache-dir": os.environ["FEDGEN_EDGE_HOME"] + "/cache", **overrides})


def lora_generator(cfg: RunConfig):
    torch.manual_seed(0)
    return get_peft_model(ConditionalGenerator(10, 1, cfg.image.generator_width), image_lora_config(cfg))


def test_lora_covers_every_generator_conv_transposed_ones_with_our_module(tmp_path):
    model = lora_generator(image_cfg(tmp_path))
    wrapped = {n: type(m).__name__ for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert len(wrapped) == 5  # four transposed convolutions + the final 3x3 convolution
    assert sum(isinstance(m, LoraConvTranspose2d) for m in model.modules()) == 4
    assert list(wrapped.values()).count("Conv2d") == 1  # peft's own Conv2d LoRA


def test_lora_at_init_equals_the_frozen_layer_and_merges_to_w_plus_scaled_ba(tmp_path):
    cfg = image_cfg(tmp_path)
    model = lora_generator(cfg)
    layer = model.base_model.model.layers[1].conv
    assert isinstance(layer, LoraConvTranspose2d)
    x = torch.randn(3, layer.in_features, 4, 4)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base_layer(x))  # B = 0 at init
        layer.lora_B["default"].weight.normal_()
        w = layer.base_layer.weight.clone()                 # (C_in, C_out, k, k)
        a = layer.lora_A["default"].weight                  # (C_in, r, k, k)
        b = layer.lora_B["default"].weight[:, :, 0, 0]      # (r, C_out)
        c_in, c_out, k, _ = w.shape
        r = cfg.lora.rank
        # W + scale * (B A) reshaped: B^T (C_out x r) times A as an (r x C_in*k*k) matrix.
        ba = (b.t() @ a.permute(1, 0, 2, 3).reshape(r, -1)).reshape(c_out, c_in, k, k).permute(1, 0, 2, 3)
        expected = w + cfg.lora.alpha / r * ba
        adapted = layer(x)
        conv = layer.base_layer
        reference = nn.functional.conv_transpose2d(x, expected, None, conv.stride, conv.padding)
        torch.testing.assert_close(adapted, reference, rtol=1e-5, atol=1e-5)
        layer.merge()
        torch.testing.assert_close(layer.base_layer.weight, expected)
        torch.testing.assert_close(layer(x), adapted, rtol=1e-5, atol=1e-5)


def test_training_changes_only_the_generator_adapter(tmp_path):
    from task.adapters import get_adapter_state, initial_adapter_state, set_adapter_state, shared_lora_model
    from task.image import TASK

    cfg = image_cfg(tmp_path)
    model = shared_lora_model(cfg)  # pre-trains the tiny backbone into the test cache once

    set_adapter_state(model, initial_adapter_state(cfg))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    disc_before = {k: v.clone() for k, v in model.get_base_model().discriminator_state.items()}
    train_rows, _ = client_image_rows(cfg, 0, 10)
    loss = TASK.train(model, train_rows, epochs=1, batch_size=8, lr=1e-2, max_steps=3, seed=1)
    assert np.isfinite(loss)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert len(changed) == len(get_adapter_state(model))  # every adapter tensor moved (B included)
    # the pre-trained discriminator the clients copy from is untouched
    assert all(torch.equal(v, model.get_base_model().discriminator_state[k]) for k, v in disc_before.items())


def test_a_client_keeps_its_discriminator_between_training_calls(tmp_path):
    from task.image.train import kept_discriminator, private_discriminator
    from task.adapters import initial_adapter_state, set_adapter_state, shared_lora_model
    from task.image import TASK

    cfg = image_cfg(tmp_path)
    model = shared_lora_model(cfg)
    generator = model.get_base_model()
    train_rows, _ = client_image_rows(cfg, 0, 10)
    path = tmp_path / "client-0000" / "discriminator.pt"

    def train_call(seed: int) -> None:
        set_adapter_state(model, initial_adapter_state(cfg))
        TASK.train(model, train_rows, epochs=1, batch_size=8, lr=1e-2, max_steps=2, seed=seed)

    with kept_discriminator(path):
        assert not path.exists()
        train_call(1)  # starts from the pre-trained copy, saves the trained one
        first = torch.load(path, weights_only=True)
        assert any(not torch.equal(first[k], v) for k, v in generator.discriminator_state.items())
        assert all(torch.equal(first[k], v) for k, v in private_discriminator(generator)[0].state_dict().items())
        train_call(2)  # starts from the kept one
        second = torch.load(path, weights_only=True)
        assert any(not torch.equal(first[k], second[k]) for k in first)
    # without a kept file (image.keep-discriminator = false) every call starts from the pre-trained copy
    fresh = private_discriminator(generator)[0].state_dict()
    assert all(torch.equal(fresh[k], v) for k, v in generator.discriminator_state.items())


def test_discriminator_warm_up_trains_only_the_critic_and_only_a_fresh_copy(tmp_path, monkeypatch):
    import task.image.train as image_train
    from task.adapters import initial_adapter_state, set_adapter_state, shared_lora_model
    from task.image import TASK

    cfg = image_cfg(tmp_path)
    model = shared_lora_model(cfg)
    set_adapter_state(model, initial_adapter_state(cfg))
    generator = model.get_base_model()
    rows, _ = client_image_rows(cfg, 0, 10)
    disc, fresh = image_train.private_discriminator(generator)
    assert fresh
    generator_before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(disc.parameters(), lr=1e-3, betas=image_train.ADAM_BETAS)
    gen = torch.Generator().manual_seed(0)
    first = image_train.warm_up_discriminator(model, disc, opt, rows, 1, 16, gen, lambda x: x)
    last = image_train.warm_up_discriminator(model, disc, opt, rows, 40, 16, gen, lambda x: x)
    assert last < first  # the critic learned to tell the generator's images from the real ones
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in generator_before.items())

    # local training warms up a fresh copy only, not the client's kept critic
    calls = []
    monkeypatch.setattr(image_train, "warm_up_discriminator", lambda *a: calls.append(a[4]))
    monkeypatch.setattr(generator, "discriminator_warmup_steps", 7)
    with image_train.kept_discriminator(tmp_path / "client-0000" / "discriminator.pt"):
        for seed in (1, 2):
            TASK.train(model, rows, epochs=1, batch_size=8, lr=1e-3, max_steps=1, seed=seed)
    assert calls == [7]


def test_a_process_running_two_configs_gives_each_its_own_discriminator_settings(tmp_path):
    from task.adapters import shared_lora_model

    default = shared_lora_model(image_cfg(tmp_path)).get_base_model()
    other = shared_lora_model(image_cfg(tmp_path, **{"image.discriminator-learning-rate": 1e-5,
                                                     "image.discriminator-warmup-steps": 3})).get_base_model()
    assert (default.discriminator_lr, default.discriminator_warmup_steps) == (2e-4, 0)
    assert (other.discriminator_lr, other.discriminator_warmup_steps) == (1e-5, 3)


def test_public_split_is_disjoint_and_dirichlet_skews_labels(tmp_path):
    cfg = image_cfg(tmp_path)
    public, pool = public_and_pool(cfg)
    assert len(public) == 6000 and not set(public) & set(pool)
    parts = image_partitions(cfg, 20)
    assert not set(public) & set(np.concatenate(parts))
    labels = load_images(cfg).train_labels
    # alpha 0.1: a client's two largest classes hold most of its images
    top2 = [np.sort(np.bincount(labels[p], minlength=10))[-2:].sum() / len(p) for p in parts]
    assert np.median(top2) > 0.8
    train, test = client_image_rows(cfg, 3, 20)
    images, y = unpack_rows(train, 1)
    assert images.shape[1:] == (1, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert images[:, :, :2].max() == -1  # zero padding to 32x32 (black border)
    assert set(y.tolist()) <= set(labels[parts[3]].tolist()) and len(test) >= 1


def test_inception_fid_is_zero_for_identical_sets_grows_with_a_shift_and_matches_direct_frechet():
    from task.image.fid import InceptionFeatures
    from task.image.scores import fid

    data = load_images(image_cfg(Path("/tmp")))
    torch.set_num_threads(1)  # the caller's setting (a generator's image.torch-threads)
    real = torch.from_numpy(data.test_images[:8])
    shifted = (real.int() // 2 + 100).to(torch.uint8)  # lower contrast, lighter
    feats = InceptionFeatures(threads=2)  # its own threads for the large convolutions
    f1, f2 = feats(real), feats(shifted)
    assert torch.get_num_threads() == 1, "the caller's thread count is restored"
    np.testing.assert_allclose(InceptionFeatures(threads=1)(real[:2]), f1[:2], rtol=1e-4, atol=1e-4)
    assert f1.shape == (8, 2048) and feats.extractor_id == "inceptionv3-pool3-fp32"
    same, moved = fid(f1, f1), fid(f1, f2)
    assert abs(same) < 1e-2 * moved and moved > 1.0

    # Direct Frechet distance on the same InceptionV3 features (numpy, float64, eigvals of S1 S2).
    a, b = f1.double().numpy(), f2.double().numpy()
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.linalg.eigvals(s1 @ s2)
    direct = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eig.real.clip(0)).sum()
    assert moved == pytest.approx(direct, rel=1e-3)

    # bf16 autocast: other features, within a few percent (task/image/fid.py's measurement)
    bf16 = InceptionFeatures(bf16=True)
    f1_bf16 = bf16(real)
    assert bf16.extractor_id == "inceptionv3-pool3-bf16" and f1_bf16.dtype == torch.float32
    assert 0 < float((f1_bf16 - f1).norm() / f1.norm()) < 0.08


@pytest.mark.parametrize("strategy", ["fedavg-lora", "fedper", "ditto", "local-only", "fedprox",
                                      "fedadam", "fedavg-full"])
def test_every_strategy_trains_the_image_generator_unchanged(tmp_path, strategy):
    from strategies.registry import strategy_entry

    cfg = image_cfg(tmp_path, **{"strategy.name": strategy, "strategy.fedper-personal-layers": 1})
    module = strategy_entry(cfg).module
    initial = module.server_initial_state(cfg)
    train_rows, _ = client_image_rows(cfg, 1, 10)
    upload, loss = module.client_train(cfg, initial, 1, train_rows, 7, {"proximal-mu": 0.01})
    assert np.isfinite(loss)
    if strategy == "local-only":
        assert upload is None
    else:
        assert set(upload) == set(initial) and any(not torch.equal(upload[k], initial[k]) for k in upload)
    if strategy == "fedper":  # the last generator layer's adapter stays on the client
        assert initial and not any(".layers.4." in k for k in upload)
    global_state, personal = module.client_eval_states(cfg, initial, 1)
    assert (personal is None) == (strategy in ("fedavg-full",))


def test_a_personal_generator_renders_its_own_classes_from_its_run_folder(tmp_path):
    """scripts/generate.py on a client's personal adapter inside a run folder: the run's config
    comes from its results.json, and --classes own draws one grid row per class of that client."""
    import importlib.util
    import json

    from PIL import Image

    from task.adapters import shared_lora_model
    from task.image.generate import own_classes

    cfg = image_cfg(tmp_path)
    run = tmp_path / "run"
    (run / "results.json").parent.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"config": cfg.flat(), "num_clients": 10}))
    adapter = run / "clients" / "client-0002" / "personalized-adapter"
    model = shared_lora_model(cfg)
    with torch.no_grad():  # a personal adapter that differs from the backbone
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(str(adapter))

    classes = own_classes(cfg, 2, 10)
    train_labels = client_image_rows(cfg, 2, 10)[0][:, 0].numpy()
    assert sorted(classes) == sorted(set(train_labels.tolist())) and len(classes) < 10  # alpha 0.1
    assert np.bincount(train_labels)[classes[0]] == np.bincount(train_labels).max()

    spec = importlib.util.spec_from_file_location("generate_cli", ROOT / "scripts" / "generate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    own, every, backbone = tmp_path / "own.png", tmp_path / "all.png", tmp_path / "backbone.png"
    assert cli.main(["--adapter", str(adapter), "--classes", "own", "--per-class", "3", "--out", str(own)]) == 0
    assert cli.main(["--adapter", str(adapter), "--per-class", "3", "--out", str(every)]) == 0
    assert cli.main(["--adapter", "none", "--per-class", "3", "--out", str(backbone),
                     "--run-config", f"task='image' image.generator-width=4 image.discriminator-width=4 "
                     f"image.pretrain-steps=2 data.dataset='fashion-mnist' data.partitioner='dirichlet' "
                     f"cache-dir='{cfg.cache_dir}'"]) == 0
    # save_image: rows of 32-pixel images with 2-pixel padding around each
    assert Image.open(own).size == (3 * 34 + 2, len(classes) * 34 + 2)
    assert Image.open(every).size == (3 * 34 + 2, 10 * 34 + 2)
    assert np.asarray(Image.open(every)).tolist() != np.asarray(Image.open(backbone)).tolist()
    with pytest.raises(ValueError, match="outside"):
        cli.main(["--adapter", str(adapter), "--classes", "3,12", "--out", str(tmp_path / "x.png")])


def test_lora_placement_covers_the_chosen_layers_and_norms_travel_in_the_adapter(tmp_path):
    from peft import PeftModel

    from task.adapters import get_adapter_state, set_adapter_state
    from task.config import ConfigError

    cfg = image_cfg(tmp_path, **{"image.lora-layers": "1,3", "image.lora-norms": True})
    model = lora_generator(cfg)
    wrapped = sorted(n for n, m in model.named_modules() if hasattr(m, "lora_A"))
    assert [w.split("base_model.model.")[1] for w in wrapped] == ["layers.1.conv", "layers.3.conv"]
    state = get_adapter_state(model)
    norm_keys = sorted(k for k in state if ".norm." in k)
    assert norm_keys == ["base_model.model.layers.1.norm.bias", "base_model.model.layers.1.norm.weight",
                         "base_model.model.layers.3.norm.bias", "base_model.model.layers.3.norm.weight"]
    w = cfg.image.generator_width
    assert sum(state[k].numel() for k in norm_keys) == 2 * (4 * w) + 2 * w  # weight + bias per channel
    # the norms train with the LoRA factors, and the adapter file carries them
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".norm." in n for n in trainable) and all("lora_" in n or ".norm." in n for n in trainable)
    changed = {k: v + 0.25 for k, v in state.items()}
    set_adapter_state(model, changed)
    model.save_pretrained(str(tmp_path / "adapter"))
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(ConditionalGenerator(10, 1, w), str(tmp_path / "adapter"),
                                       config=image_lora_config(cfg))
    for k, v in get_adapter_state(loaded).items():
        torch.testing.assert_close(v, changed[k])
    # all five convolutions by default; bad placements stop the run naming the key
    assert len([m for m in lora_generator(image_cfg(tmp_path)).modules() if hasattr(m, "lora_A")]) == 5
    for value, key in (("1,9", "image.lora-layers"), ("2,2", "image.lora-layers"), ("conv", "image.lora-layers")):
        with pytest.raises(ConfigError, match=key):
            image_cfg(tmp_path, **{"image.lora-layers": value})
    with pytest.raises(ConfigError, match="image.lora-norms"):
        image_cfg(tmp_path, **{"image.lora-layers": "4", "image.lora-norms": True})
