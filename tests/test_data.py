
import numpy as np
import pytest

from task.lm import data
from task.config import RunConfig


def test_ptb_normalize():
    assert data.ptb_normalize("O, 'tis 1,200 Ducats -- well-said!") == "o tis N ducats well said"
    assert data.ptb_normalize("I'll go.") == "i'll go"


def test_vocabulary_cap_maps_rare_words_to_unk():
    docs = ["a a a b\nb c", "a d"]
    assert data.cap_vocabulary(docs, 3) == ["a a a b\nb <unk>", "a <unk>"]


def test_shakespeare_parses_speeches_with_roles():
    speeches = data.shakespeare_speeches()
    plays = {p for p, _, _ in speeches}
    assert len(plays) == 38
    words = sum(len(line.split()) for _, _, lines in speeches for line in lines)
    assert 700_000 < words < 1_000_000
    assert any(p == "hamlet" and s == "HAMLET" for p, s, _ in speeches)


def _topic_skew(cfg: RunConfig, parts) -> float:
    """Mean total-variation distance between each client's topic mix and the pool's."""
    corpus = data.load_corpus(cfg)
    topics = [corpus.topics[i] for i in corpus.pool]
    k = max(topics) + 1
    pool = np.bincount(topics, minlength=k) / len(topics)
    tv = [0.5 * np.abs(np.bincount([corpus.topics[i] for i in p], minlength=k) / len(p) - pool).sum()
          for p in parts]
    return float(np.mean(tv))


def test_partitions_are_reproducible_disjoint_and_non_iid(tiny_cfg):
    parts = data.partition_indices(tiny_cfg, 20)
    data.partition_indices.cache_clear()
    assert data.partition_indices(tiny_cfg, 20) == parts  # same seed, same split (from disk)
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)), "a document belongs to one client"
    corpus = data.load_corpus(tiny_cfg)
    assert not set(flat) & set(corpus.global_test), "global test is held out"
    # The LDA-Dirichlet split is measurably more skewed than an IID split of the same corpus.
    iid = data.partition_indices(tiny_cfg.replace(**{"data.partitioner": "iid"}), 20)
    assert _topic_skew(tiny_cfg, parts) > 2 * _topic_skew(tiny_cfg, iid)
    other_seed = tiny_cfg.replace(**{"seed": 7})
    assert data.partition_indices(other_seed, 20) != parts


def test_role_partitioner_gives_one_speaker_per_client(tiny_cfg):
    cfg = tiny_cfg.replace(**{"data.partitioner": "role"})
    corpus = data.load_corpus(cfg)
    parts = data.partition_indices(cfg, 10)
    roles = [{corpus.roles[i] for i in p} for p in parts]
    assert all(len(r) == 1 for r in roles)
    assert roles[0] == {"hamlet/HAMLET"}  # the longest role in Shakespeare


def test_a_role_split_too_large_for_the_corpus_stops_the_server_at_start(tiny_cfg):
    """The server builds the split with its partition statistics, before any round: too many
    clients for the roles is one clear error there, not a failure of every client."""
    from task import get_task

    cfg = tiny_cfg.replace(**{"data.partitioner": "role"})
    with pytest.raises(ValueError, match="roles have at least two documents"):
        get_task(cfg).partition_stats(cfg, 100_000)
    assert get_task(cfg).partition_stats(cfg, 10)["label"].startswith("none")


def test_client_split_train_and_test_are_disjoint(tiny_cfg):
    train, test = data.client_split(tiny_cfg, 3, 20)
    assert train and test and not set(train) & set(test)
    assert len(test) == max(1, round(tiny_cfg.data.test_fraction * (len(train) + len(test))))
    with pytest.raises(ValueError, match="partition-id"):
        data.client_split(tiny_cfg, 20, 20)


def test_token_blocks_shape(tiny_cfg):
    train, test = data.client_blocks(tiny_cfg, 0, 20)
    assert train.shape[1] == test.shape[1] == tiny_cfg.train.seq_len
    assert train.dtype.is_floating_point is False and len(train) > len(test) > 0


def test_topic_mixture_partition_is_exact_equal_and_skewed_by_alpha():
    rng = np.random.default_rng(0)
    topics = rng.integers(0, 10, size=4000).tolist()
    pool = np.bincount(topics, minlength=10) / len(topics)

    def skew(parts):  # mean total-variation distance of a client's topic shares from the pool's
        return np.mean([0.5 * np.abs(np.bincount([topics[i] for i in p], minlength=10) / len(p) - pool).sum()
                        for p in parts])

    skews = []
    for alpha in (0.1, 1.0, 100.0):  # flwr's DirichletPartitioner gave up at 0.1 with 500 clients
        parts = data.topic_mixture_partition(topics, 500, alpha, seed=1)
        flat = sorted(i for p in parts for i in p)
        assert flat == list(range(4000)), "every document goes to exactly one client"
        assert {len(p) for p in parts} == {8}
        skews.append(skew(parts))
    assert skews[0] > skews[1] > skews[2]
    assert data.topic_mixture_partition(topics, 500, 0.1, seed=1) == data.topic_mixture_partition(topics, 500, 0.1, seed=1)
