"""The runtime's cost removals keep results identical (timings are in bench/, never here)."""

import torch

from task.lm import data


def test_client_blocks_come_from_the_disk_cache_without_tokenizing(tiny_cfg, monkeypatch):
    data.client_blocks.cache_clear()
    path = data.client_blocks_path(tiny_cfg, 3, 20)
    path.unlink(missing_ok=True)
    train, test = data.client_blocks(tiny_cfg, 3, 20)
    assert path.exists()
    data.client_blocks.cache_clear()  # as a fresh process: only the disk cache is left

    def no_tokenizing(*_):
        raise AssertionError("the cached blocks must not be tokenized again")

    monkeypatch.setattr(data, "client_split", no_tokenizing)
    monkeypatch.setattr(data, "load_tokenizer", no_tokenizing)
    train2, test2 = data.client_blocks(tiny_cfg, 3, 20)
    assert torch.equal(train, train2) and torch.equal(test, test2)
    # another sequence length is another cache entry
    assert data.client_blocks_path(tiny_cfg.replace(**{"train.seq-len": 16}),
                                   3, 20) != path


def test_full_state_views_are_frozen_once_serialized(tiny_cfg):
    """fedavg-full uploads views of the live weights (no clone); the ArrayRecord the ClientApp
    builds from them must hold the values of that moment."""
    from flwr.app import ArrayRecord

    from task.adapters import get_full_state, shared_full_model

    model = shared_full_model(tiny_cfg)
    views = get_full_state(model, copy=False)
    expected = {k: v.clone() for k, v in views.items()}
    record = ArrayRecord(views)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    got = record.to_torch_state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_recorder_writes_every_round_but_draws_the_plot_when_due(tmp_path):
    import json

    from task.results import RunRecorder

    recorder = RunRecorder(tmp_path, {"strategy": "x"})
    for rnd in range(3):
        recorder.add_round({"round": rnd, "global_ppl": 10.0 - rnd, "upload_bytes": 5})
    assert len(json.loads((tmp_path / "results.json").read_text())["rounds"]) == 3
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 4
    assert not (tmp_path / "perplexity.png").exists()  # not yet due (30 s)
    recorder.finish({"global_ppl": 8.0})
    assert (tmp_path / "perplexity.png").stat().st_size > 0


def test_the_server_takes_replies_as_they_come_not_every_3_seconds():
    """PromptGrid: Flower's deployment grid sleeps 3 s between pulls; ours polls every 0.1 s,
    returns every reply (or what came before the timeout) and leaves the rest to the grid."""
    import time
    from types import SimpleNamespace

    from flwr.app import RecordDict

    from server_app.app import PromptGrid

    class SlowNodes:  # replies become available over the first pulls
        def __init__(self):
            self.pulls = 0

        def push_messages(self, messages):
            return [f"m{i}" for i, _ in enumerate(messages)]

        def pull_messages(self, ids):
            self.pulls += 1
            ready = sorted(ids)[:1] if self.pulls % 2 == 0 else []  # one reply every other pull
            return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i), content=RecordDict(),
                                    has_error=lambda: False) for i in ready]

        def get_node_ids(self):
            return [7, 8, 9]

    grid, seen = PromptGrid(SlowNodes()), []
    t0 = time.perf_counter()
    replies = grid.send_and_receive([SimpleNamespace(content=RecordDict()) for _ in range(3)],
                                    timeout=30, on_reply=seen.append)
    took = time.perf_counter() - t0
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"] and seen == replies
    assert took < 1.0  # 6 pulls 0.1 s apart, where Flower's grid would wait 15 s
    assert grid.get_node_ids() == [7, 8, 9]  # everything else is the grid's own
    never = PromptGrid(SimpleNamespace(push_messages=lambda m: ["x"], pull_messages=lambda ids: []))
    t0 = time.perf_counter()
    assert never.send_and_receive([SimpleNamespace(content=RecordDict())], timeout=0.3) == [] and time.perf_counter() - t0 < 1.0
