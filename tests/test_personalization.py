"""Evaluation that can be trusted and a personalization protocol that cannot silently hurt:
word- vs token-level perplexity on known counts, the protocol's safety, the paired statistics."""

from __future__ import annotations

import math

import pytest
import torch

from task import get_task
from task import adapters as M
from task.lm import data, words
from task.lm import model as lm_model
from task.lm.train import evaluate_nll
from task.personalization import check_steps, personalize, validation_split
from task.results import paired_gains


@pytest.fixture
def lora_model(tiny_cfg):
    return M.add_lora(tiny_cfg, lm_model.load_backbone(tiny_cfg))


def test_word_units_count_ptb_words_and_line_ends(tiny_cfg):
    tokenizer = lm_model.load_tokenizer(tiny_cfg)
    docs = ["to be or not\nto <unk> N be", "<unk> <unk>\n<unk> thee"]
    ids = []
    for encoded in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids += encoded + [tokenizer.eos_token_id]
    units = words.word_units(tokenizer, torch.tensor(ids))
    # 8 + 4 words ("<unk>" is one word of three tokens), 2 newlines, 2 document ends
    assert int(units.sum()) == 8 + 4 + 2 + 2
    assert len(ids) > int(units.sum())  # "<unk>" is several tokens: fewer words than tokens


def test_words_per_block_counts_only_predicted_tokens(tiny_cfg):
    tokenizer = lm_model.load_tokenizer(tiny_cfg)
    stream = torch.tensor(tokenizer(" a b c d e f", add_special_tokens=False)["input_ids"])
    assert len(stream) == 6  # one token per word
    blocks = stream.view(2, 3)
    assert words.words_per_block(tokenizer, blocks).tolist() == [2, 2]  # the first of each is not predicted


def test_word_and_token_perplexity_share_the_summed_nll(tiny_cfg, lora_model):
    task = get_task(tiny_cfg)
    blocks = data.global_test_blocks(tiny_cfg)[:6]
    stats = task.evaluator(tiny_cfg, blocks, seed=0, scope="whole")(lora_model)
    direct = evaluate_nll(lora_model, blocks, batch_size=4)
    assert stats["tokens"] == direct.tokens == 6 * 31
    assert stats["nll"] == pytest.approx(direct.nll_sum)
    n_words = int(words.words_per_block(lm_model.load_tokenizer(tiny_cfg), blocks).sum())
    assert 0 < stats["words"] == n_words < stats["tokens"]
    figures = task.figures([{f"global-{k}": v for k, v in stats.items()}], "global")
    assert figures["ppl"] == pytest.approx(math.exp(direct.nll_sum / direct.tokens))
    assert figures["word_ppl"] == pytest.approx(math.exp(direct.nll_sum / n_words))
    assert figures["word_ppl"] > figures["ppl"]  # the same NLL over fewer units


def test_round_subset_is_fixed_and_holds_enough_tokens(tiny_cfg):
    from task.lm import eval_subset

    blocks = data.global_test_blocks(tiny_cfg)
    subset = eval_subset(blocks, 100, seed=3)
    assert len(subset) == math.ceil(100 / 31) and torch.equal(subset, eval_subset(blocks, 100, seed=3))
    assert torch.equal(eval_subset(blocks, 0, seed=3), blocks)
    assert torch.equal(eval_subset(blocks, 10**9, seed=3), blocks)


def test_validation_split_and_check_steps():
    data_rows = torch.arange(10).view(10, 1)
    fit, val = validation_split(data_rows, 0.2, seed=1)
    assert len(fit) == 8 and len(val) == 2
    assert sorted(torch.cat([fit, val]).view(-1).tolist()) == list(range(10))
    assert torch.equal(val, validation_split(data_rows, 0.2, seed=1)[1])  # seeded
    assert len(validation_split(data_rows[:1], 0.2, seed=1)[1]) == 0
    fit, val = validation_split(torch.arange(100).view(100, 1), 0.2, seed=1, cap=5)
    assert len(val) == 5 and len(fit) == 95  # capped share: the rest stays for fitting
    assert sorted(torch.cat([fit, val]).view(-1).tolist()) == list(range(100))
    assert check_steps(10, 4) == {3, 5, 8, 10} and check_steps(2, 8) == {1, 2} and check_steps(0, 8) == set()


def _protocol(cfg, model, learning_rate):
    from dataclasses import replace

    cfg = replace(cfg, server=replace(cfg.server, personalize_learning_rate=learning_rate,
                                      personalize_epochs=2, personalize_checks=4))
    train = data.client_blocks(cfg, 0, 4)[0][:20]  # 16 to fit (4 steps per epoch), 4 to validate
    start = M.get_adapter_state(model)
    chosen = personalize(get_task(cfg), cfg, model, global_state=start, start_state=None,
                         load=M.set_adapter_state, snapshot=M.get_adapter_state,
                         train_data=train, seed=7)
    _, validation = validation_split(train, cfg.server.personalize_validation_fraction, 7)
    return cfg, chosen, start, validation


def test_protocol_fine_tunes_when_it_helps_and_reports_what_it_kept(tiny_cfg, lora_model):
    cfg, chosen, start, validation = _protocol(tiny_cfg, lora_model, 3e-2)
    assert chosen.total_steps > 0 and 0 < chosen.chosen_steps <= chosen.total_steps
    assert not chosen.from_global and chosen.validation_chosen < chosen.validation_global
    # the model holds the chosen state, and it scores what the protocol says on validation
    assert all(torch.equal(v, chosen.state[k]) for k, v in M.get_adapter_state(lora_model).items())
    task = get_task(cfg)
    again = task.evaluator(cfg, validation, seed=7, scope="validation")(lora_model)
    assert task.figures([{f"global-{k}": v for k, v in again.items()}], "global")["ppl"] == \
        pytest.approx(chosen.validation_chosen, rel=1e-9)


def test_protocol_never_returns_worse_than_global_on_validation(tiny_cfg, lora_model):
    from dataclasses import replace

    from task.lm.train import train_local

    # A global adapter that has learnt the client's kind of text, then a learning rate that
    # wrecks it: every fine-tuned candidate is worse, so the global one is kept.
    train_local(lora_model, data.client_blocks(tiny_cfg, 1, 4)[0][:32], epochs=5, batch_size=4,
                lr=3e-2, seed=0)
    cfg, chosen, start, validation = _protocol(tiny_cfg, lora_model, 50.0)
    assert chosen.from_global and chosen.chosen_steps == 0
    assert chosen.validation_chosen == chosen.validation_global
    assert all(torch.equal(v, start[k]) for k, v in M.get_adapter_state(lora_model).items())

    # A strategy's own personal model that is worse than the global one is not kept either.
    cfg = replace(tiny_cfg, server=replace(tiny_cfg.server, personalize_learning_rate=50.0))
    broken = {k: v + 5.0 for k, v in start.items()}
    chosen = personalize(get_task(cfg), cfg, lora_model, global_state=start, start_state=broken,
                         load=M.set_adapter_state, snapshot=M.get_adapter_state,
                         train_data=data.client_blocks(cfg, 0, 4)[0][:20], seed=7)
    assert chosen.from_global and chosen.chosen_steps == 0


def test_paired_gains_on_a_constructed_case():
    from scipy.stats import wilcoxon

    g = [float(v) for v in range(100, 120)]
    p = [v * 0.9 for v in g]  # every client 10% better
    stats = paired_gains(g, p)
    assert stats["clients"] == 20 and stats["improved_share"] == 1.0 and stats["worse_share"] == 0.0
    assert stats["mean_gain"] == pytest.approx(0.1) and stats["median_gain"] == pytest.approx(0.1)
    # all 20 differences of one sign: the exact two-sided p is 2 / 2**20
    assert stats["wilcoxon_p"] == pytest.approx(2 / 2**20)

    g, p = [10.0, 10.0, 10.0, 10.0], [9.0, 9.5, 11.0, 10.0]  # gains 10%, 5%, -10%, 0
    stats = paired_gains(g, p)
    assert stats["improved_share"] == 0.5 and stats["worse_share"] == 0.25
    assert stats["mean_gain"] == pytest.approx(0.0125) and stats["median_gain"] == pytest.approx(0.025)
    assert stats["wilcoxon_p"] == pytest.approx(wilcoxon(g, p).pvalue)
    assert paired_gains([10.0], [9.0])["wilcoxon_p"] is None  # one pair: no test
    assert paired_gains([10.0, float("nan")], [9.0, 1.0])["clients"] == 1


def test_partition_statistics_on_constructed_labels():
    import numpy as np

    from task.partition_stats import js_divergence, label_statistics

    pool = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    iid = label_statistics([np.array([0, 1, 2, 3]), np.array([0, 1, 2, 3])], pool, 4)
    assert iid["js_divergence_mean"] == pytest.approx(0.0) and iid["effective_labels"] == pytest.approx(4.0)
    skewed = label_statistics([np.array([0, 0]), np.array([1, 1]), np.array([2, 3])], pool, 4)
    assert skewed["labels_per_client"] == pytest.approx(4 / 3)
    # one label of four equally likely: JS = H(m) - (H(p) + H(q)) / 2 with m = (5/8, 1/8, 1/8, 1/8)
    m = np.array([5, 1, 1, 1]) / 8
    expected = -(m * np.log2(m)).sum() - (0 + 2) / 2
    assert js_divergence(np.array([1.0, 0, 0, 0]), np.ones(4)) == pytest.approx(expected)
    assert skewed["js_divergence_median"] == pytest.approx(expected)
    assert skewed["items_per_client_min"] == 2


def test_lower_dirichlet_alpha_gives_a_more_skewed_topic_partition(tiny_cfg):
    from dataclasses import replace

    task = get_task(tiny_cfg)
    stats = {a: task.partition_stats(replace(tiny_cfg, data=replace(tiny_cfg.data, dirichlet_alpha=a)), 6)
             for a in (0.1, 10.0)}
    assert stats[0.1]["js_divergence_mean"] > stats[10.0]["js_divergence_mean"]
    assert stats[0.1]["effective_labels"] < stats[10.0]["effective_labels"]


def test_the_protocol_message_goes_only_to_the_chosen_clients(monkeypatch, tiny_cfg):
    """With 500 clients, sending the final model to every node cost most of a run's protocol:
    only the nodes of the chosen partitions get it (node ids are not partition ids)."""
    from dataclasses import replace

    from flwr.app import ArrayRecord

    import server_app.app as server

    cfg = replace(tiny_cfg, server=replace(tiny_cfg.server, personalize_clients=3))
    nodes = {1000 + 7 * pid: pid for pid in range(12)}  # node id -> partition id

    class Grid:
        def get_node_ids(self):
            return list(nodes)

    sent = []
    monkeypatch.setattr(server, "Message", lambda content, message_type, dst_node_id: dst_node_id)
    monkeypatch.setattr(server, "node_partitions", lambda grid, timeout: dict(nodes))
    monkeypatch.setattr(server, "_send_and_receive_with_progress",
                        lambda grid, messages, timeout, progress: sent.extend(messages) or [])
    server._personalize(cfg, Grid(), ArrayRecord())
    chosen = server.personalization_partitions(cfg, 12)
    assert len(chosen) == 3
    assert sorted(nodes[node] for node in sent) == chosen


def test_the_protocol_replaces_clients_it_cannot_measure(tiny_cfg):
    """A role or label partition can leave a client without a local test (or with one training
    row, nothing to validate on): the protocol takes the next partition in the same seeded
    order instead, so it still measures server.personalize-clients clients, and the usable
    draws of the plain sample are kept."""
    from dataclasses import replace

    import server_app.app as server

    cfg = replace(tiny_cfg, server=replace(tiny_cfg.server, personalize_clients=5))
    plain = server.personalization_partitions(cfg, 40)
    unusable = set(plain[:3])

    class Task:
        def client_data(self, cfg, pid, num_partitions):
            if pid == plain[0]:
                return [1, 2, 3], []  # no local test
            if pid == plain[1]:
                return [1], [1]  # one training row: nothing to validate on
            if pid == plain[2]:
                raise ValueError("30 tokens are fewer than one block of seq-len 32")
            return [1, 2], [1]

    chosen = server.personalization_partitions(cfg, 40, Task())
    assert len(chosen) == 5
    assert not unusable & set(chosen)
    assert set(plain[3:]) <= set(chosen)
    assert chosen == server.personalization_partitions(cfg, 40, Task())  # seeded
