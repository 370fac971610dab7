import pytest
import torch
from peft import PeftModel

from task import adapters as M
from task.lm import data
from task.lm import model as lm_model
from task.lm.train import evaluate_nll, train_local


@pytest.fixture
def lora_model(tiny_cfg):
    return M.add_lora(tiny_cfg, lm_model.load_backbone(tiny_cfg))


def test_backbone_is_loaded_once_per_process(tiny_cfg):
    assert M.shared_lora_model(tiny_cfg) is M.shared_lora_model(tiny_cfg)


def test_only_adapter_parameters_change_in_local_training(tiny_cfg, lora_model):
    before = {n: p.detach().clone() for n, p in lora_model.named_parameters()}
    blocks, _ = data.client_blocks(tiny_cfg, 0, 20)
    train_local(lora_model, blocks, epochs=1, batch_size=4, lr=1e-2, max_steps=3, seed=0)
    changed = {n for n, p in lora_model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "the adapter must learn"
    assert all("lora_" in n for n in changed), f"frozen weights moved: {sorted(changed)[:3]}"
    assert all(not p.requires_grad for n, p in lora_model.named_parameters() if "lora_" not in n)


def test_gpt2_fused_c_attn_adapts_exactly_q_and_v(tiny_cfg, lora_model):
    blocks, _ = data.client_blocks(tiny_cfg, 0, 20)
    train_local(lora_model, blocks, epochs=1, batch_size=4, lr=1e-2, max_steps=3, seed=0)
    layers = [m for n, m in lora_model.named_modules() if n.endswith("c_attn")]
    assert layers
    for layer in layers:
        delta = layer.get_delta_weight("default")  # (in, 3d) for GPT-2's Conv1D
        d = delta.shape[-1] // 3
        assert torch.count_nonzero(delta[:, d:2 * d]) == 0, "k must stay unadapted"
        assert torch.count_nonzero(delta[:, :d]) > 0 and torch.count_nonzero(delta[:, 2 * d:]) > 0


def test_adapter_state_holds_only_lora_tensors_and_round_trips(tiny_cfg, lora_model):
    state = M.get_adapter_state(lora_model)
    assert state and all("lora_" in k for k in state)
    adapter, backbone = lm_model.parameter_counts(lora_model)
    # 2 layers x (A: 8x64 + B: 192x8 with its 64 k-rows masked) = 2 x (512 + 1024)
    assert adapter == 2 * (8 * 64 + 128 * 8) and backbone > 100 * adapter
    shifted = {k: v + 1.0 for k, v in state.items()}
    M.set_adapter_state(lora_model, shifted)
    assert all(torch.equal(M.get_adapter_state(lora_model)[k], shifted[k]) for k in state)
    with pytest.raises(KeyError, match="missing"):
        M.set_adapter_state(lora_model, dict(list(state.items())[1:]))


def test_saved_adapter_reloads_with_plain_peft_and_gives_same_logits(tiny_cfg, lora_model, tmp_path):
    blocks, _ = data.client_blocks(tiny_cfg, 0, 20)
    train_local(lora_model, blocks, epochs=1, batch_size=4, lr=1e-2, max_steps=2, seed=0)
    M.save_adapter(lora_model, tmp_path / "adapter")
    lora_model.eval()
    with torch.no_grad():
        expected = lora_model(input_ids=blocks[:2]).logits
    reloaded = PeftModel.from_pretrained(lm_model.load_backbone(tiny_cfg), tmp_path / "adapter")
    reloaded.eval()
    with torch.no_grad():
        got = reloaded(input_ids=blocks[:2]).logits
    torch.testing.assert_close(got, expected)
    assert M.load_adapter_file(tmp_path / "adapter").keys() == M.get_adapter_state(lora_model).keys()


def test_local_training_lowers_training_loss(tiny_cfg, lora_model):
    blocks, _ = data.client_blocks(tiny_cfg, 0, 20)
    before = evaluate_nll(lora_model, blocks[:8], batch_size=4).perplexity
    train_local(lora_model, blocks[:8], epochs=10, batch_size=4, lr=3e-2, seed=0)
    assert evaluate_nll(lora_model, blocks[:8], batch_size=4).perplexity < 0.9 * before
