"""A SuperNode's own data, state and keys: node config, a device's text folder, the personal
adapter's folder (crash-safe), certificates and node keys, and the inference command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from task.config import ConfigError, RunConfig
from task.lm.data import local_text_docs
from task.adapters import load_adapter_file, node_state_dir, personal_adapter_dir, save_adapter, shared_lora_model
from task.node import NodeConfig, node_data

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

LINE = "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him {}."


def _text_folder(folder: Path, files: int = 3, lines: int = 200) -> Path:
    for f in range(files):
        sub = folder / ("notes" if f else "")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"file{f}.txt").write_text("\n".join(LINE.format(f * 1000 + i) for i in range(lines)))
    (folder / "ignored.md").write_text("not text data")
    return folder


def test_node_config_partition_or_own_files(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDGEN_EDGE_HOME", str(tmp_path / "home"))
    node = NodeConfig.from_node_config({"partition-id": 2, "num-partitions": 3})
    assert (node.partition_id, node.state_path) == (2, None)  # simulation layout
    own = NodeConfig.from_node_config({"data-path": str(tmp_path)})
    assert own.partition_id == -1 and own.state_path == tmp_path / "home" / "node"
    assert own.run_state_path(7) == tmp_path / "home" / "node" / "run-7"
    with_dir = NodeConfig.from_node_config({"data-path": str(tmp_path), "state-dir": "/x/s",
                                            "cache-dir": "/x/c"})
    assert with_dir.state_path == Path("/x/s")
    assert with_dir.run_config(RunConfig.from_run_config({"cache-dir": "/srv/c"})).cache_dir == "/x/c"


@pytest.mark.parametrize("config,needle", [
    ({"partition-id": 0, "num-partitions": 2, "partion-id": 1}, "partion-id"),
    ({"data-path": "/does/not/exist"}, "'data-path'"),
    ({"partition-id": 3, "num-partitions": 3}, "partition-id"),
    ({}, "data-path"),
    ({"partition-id": "0", "num-partitions": 2}, "'partition-id'"),
])
def test_bad_node_config_names_the_key(config, needle):
    with pytest.raises(ConfigError, match=needle):
        NodeConfig.from_node_config(config)


def test_own_text_files_split_deterministically_and_stably(tiny_cfg, tmp_path):
    folder = _text_folder(tmp_path / "data")
    train, test = local_text_docs(tiny_cfg, str(folder))
    assert train and test and local_text_docs(tiny_cfg, str(folder)) == (train, test)
    assert "friends romans countrymen" in train[0] and "," not in train[0]  # PTB-style
    n = len(train) + len(test)
    assert 0.05 < len(test) / n < 0.5  # about data.test-fraction = 0.2
    # A new file adds documents but moves none of the existing ones.
    (folder / "new.txt").write_text("\n".join(LINE.format(9000 + i) for i in range(200)))
    train2, test2 = local_text_docs(tiny_cfg, str(folder))
    assert set(train) <= set(train2) and set(test) <= set(test2)


def test_node_blocks_are_cached_in_the_state_folder(tiny_cfg, tmp_path):
    folder = _text_folder(tmp_path / "data")
    node = NodeConfig.from_node_config({"data-path": str(folder),
                                        "state-dir": str(tmp_path / "state")})
    train, test = node_data(tiny_cfg, node)
    assert train.shape[1] == tiny_cfg.train.seq_len and len(test) >= 1
    assert len(list((tmp_path / "state" / "blocks").glob("*.pt"))) == 1
    again = node_data(tiny_cfg, node)
    assert torch.equal(again[0], train) and torch.equal(again[1], test)


def _image_folder(folder: Path, per_class: int = 12) -> Path:
    """An ImageFolder of Fashion-MNIST-like PNGs: class folders by name and by index."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("sneaker", "3"):  # class 7 by name, class 3 (dress) by index
        (folder / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (40, 30), dtype=np.uint8)).save(folder / cls / f"{i}.png")
    (folder / "sneaker" / "notes.txt").write_text("not an image")
    return folder


def test_own_images_are_class_folders_split_by_hash_and_cached(tmp_path, monkeypatch):
    from task.image import data as image_data

    cfg = RunConfig.from_run_config({"task": "image", "data.dataset": "fashion-mnist", "seed": 3,
                                     "cache-dir": str(tmp_path / "cache")})
    folder = _image_folder(tmp_path / "images")
    node = NodeConfig.from_node_config({"data-path": str(folder), "state-dir": str(tmp_path / "state")})
    train, test = node_data(cfg, node)
    assert train.shape[1] == test.shape[1] == 1 + 32 * 32 and len(train) + len(test) == 24
    assert 1 <= len(test) < 12  # about data.test-fraction = 0.2 of 24
    images, labels = image_data.unpack_rows(torch.cat([train, test]), channels=1)
    assert sorted(set(labels.tolist())) == [3, 7]
    assert images[:, :, :2].eq(-1).all() and images[:, :, :, -2:].eq(-1).all()  # the 2-pixel black border
    # decoded once: the second call reads the state folder's cache
    monkeypatch.setattr(image_data, "local_image_rows", lambda *a: pytest.fail("decoded again"))
    again = node_data(cfg, node)
    assert torch.equal(again[0], train) and torch.equal(again[1], test)
    monkeypatch.undo()
    # a new image moves none of the others between train and test
    from PIL import Image

    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(folder / "3" / "new.png")
    train2, test2 = image_data.local_image_rows(cfg, str(folder))
    assert len(train2) + len(test2) == 25 and {tuple(r) for r in test.tolist()} <= {tuple(r) for r in test2.tolist()}
    (folder / "socks").mkdir()
    (folder / "socks" / "a.png").write_bytes((folder / "3" / "new.png").read_bytes())
    with pytest.raises(ValueError, match="class folder 'socks'"):
        image_data.local_image_rows(cfg, str(folder))


def test_personal_adapter_lives_in_the_node_state_and_survives_an_interrupted_save(tiny_cfg, tmp_path):
    assert personal_adapter_dir(tiny_cfg, 4).is_relative_to(tiny_cfg.output_path)
    with node_state_dir(tmp_path / "run-1"):
        path = personal_adapter_dir(tiny_cfg, 4)
    assert path == tmp_path / "run-1" / "personal-adapter"
    model = shared_lora_model(tiny_cfg)
    save_adapter(model, path)
    first = load_adapter_file(path)
    # A process killed between moving the old adapter aside and putting the new one in place.
    path.replace(path.with_name("personal-adapter.old"))
    restored = load_adapter_file(path)
    assert restored is not None and all(torch.equal(first[k], restored[k]) for k in first)
    save_adapter(model, path)  # the next save cleans up
    assert not path.with_name("personal-adapter.old").exists() and load_adapter_file(path)


def test_certificates_and_node_keys(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    from certs import make_certificates

    make_certificates(tmp_path, ["edge.example.org", "10.0.0.5"], nodes=2)
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "edge.example.org"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.0.0.5"}
    for i in range(2):
        key = load_ssh_private_key((tmp_path / f"node-{i}").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        public = load_ssh_public_key((tmp_path / f"node-{i}.pub").read_bytes())
        assert public.public_numbers() == key.public_key().public_numbers()
    before = (tmp_path / "node-0").read_bytes()
    make_certificates(tmp_path, ["edge.example.org", "10.0.0.5"], nodes=3)  # keeps what exists
    assert (tmp_path / "node-0").read_bytes() == before and (tmp_path / "node-2.pub").exists()


def test_generate_command_with_a_saved_adapter(tiny_cfg, tmp_path):
    model = shared_lora_model(tiny_cfg)
    save_adapter(model, tmp_path / "adapter")
    cmd = [sys.executable, str(ROOT / "scripts" / "generate.py"), "--adapter",
           str(tmp_path / "adapter"), "--prompt", "The stock market", "--max-new-tokens", "8",
           "--temperature", "0", "--run-config",
           f"model.name='tiny-gpt2' train.seq-len=32 cache-dir='{tiny_cfg.cache_path}'"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout.strip().splitlines()[-1]
    assert text.startswith("the stock market") and len(text) > len("the stock market")
    # The untrained adapter (B = 0) leaves the backbone's output unchanged: same greedy text.
    base = subprocess.run(cmd[:3] + ["none"] + cmd[4:], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert base.stdout.strip().splitlines()[-1] == text


def test_small_device_knobs_bf16_and_gradient_checkpointing(tiny_cfg):
    """Gradient checkpointing gives the same gradients with less memory; bf16 autocast trains
    the adapter (kept in float32) and leaves the backbone frozen."""

    from task.adapters import get_adapter_state, initial_adapter_state, set_adapter_state
    from task.lm.train import train_local

    blocks = torch.randint(0, 1000, (8, tiny_cfg.train.seq_len))
    grads = []
    for checkpointing in (False, True):
        # an equivalence: exact arithmetic (bf16 recomputation rounds differently)
        cfg = tiny_cfg.replace(**{"model.gradient-checkpointing": checkpointing, "model.precision": "fp32"})
        model = shared_lora_model(cfg)
        set_adapter_state(model, initial_adapter_state(cfg))  # the same start for both
        model.train()
        model(input_ids=blocks, labels=blocks).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-6) for k in grads[0])

    model = shared_lora_model(tiny_cfg.replace(**{"model.precision": "bf16"}))
    start = get_adapter_state(model)
    frozen = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n}
    loss = train_local(model, blocks, epochs=1, batch_size=4, lr=0.01, max_steps=2,
                       precision="bf16")
    after = get_adapter_state(model)
    set_adapter_state(model, start)
    assert loss == loss and all(v.dtype == torch.float32 for v in after.values())
    assert any(not torch.equal(start[k], after[k]) for k in start)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_client_app_on_own_files_keeps_its_personal_adapter_in_the_state_dir(tiny_cfg, tmp_path,
                                                                            monkeypatch):
    """The ClientApp's train and evaluate handlers as a SuperNode calls them, with a data-path
    and a state-dir: the personal adapter lands in the node's state folder, evaluate reads it."""

    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

    from flwr.supercore.task_identity import TaskIdentity

    from client_app.app import evaluate, train
    from task.adapters import initial_adapter_state

    # Messages are stamped with the run/task of the process (a SuperNode sets these).
    for key, value in (("_run_id", 5), ("_task_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, key, value)

    folder = _text_folder(tmp_path / "data")
    state_dir = tmp_path / "state"
    run_config = tiny_cfg.flat()
    context = Context(run_id=5, node_id=1, state=RecordDict(), run_config=run_config,
                      node_config={"data-path": str(folder), "state-dir": str(state_dir)})

    def message(kind: str, arrays, **config) -> Message:
        return Message(RecordDict({"arrays": ArrayRecord(arrays),
                                   "config": ConfigRecord({"server-round": 1, **config})}),
                       dst_node_id=1, message_type=kind)

    reply = train(message(MessageType.TRAIN, initial_adapter_state(tiny_cfg)), context)
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] > 0 and metrics["partition-id"] == -1
    adapter = state_dir / "run-5" / "personal-adapter"
    saved = load_adapter_file(adapter)
    uploaded = reply.content["arrays"].to_torch_state_dict()
    assert all(torch.equal(saved[k], uploaded[k]) for k in saved)
    assert list((state_dir / "blocks").glob("*.pt"))

    # fedavg-lora has no personal model of its own: in rounds only the global one is reported
    reply = evaluate(message(MessageType.EVALUATE, initial_adapter_state(tiny_cfg)), context)
    metrics = reply.content["metrics"]
    assert metrics["global-tokens"] > 0 and "personal-tokens" not in metrics

    # the personalization protocol: its result is kept in the state dir, in peft format
    reply = evaluate(message(MessageType.EVALUATE, initial_adapter_state(tiny_cfg), personalize=True,
                             **{"personalize-partitions": "-1"}), context)
    metrics = reply.content["metrics"]
    assert metrics["personal-tokens"] == metrics["global-tokens"] > 0
    assert metrics["protocol-total-steps"] > 0
    assert metrics["protocol-validation-chosen"] <= metrics["protocol-validation-global"]
    assert load_adapter_file(state_dir / "run-5" / "personalized-adapter") is not None
    assert not (tiny_cfg.output_path / "clients").exists(), "nothing personal under output-dir"
