"""Causal language modeling: a frozen decoder, LoRA on attention q and v, perplexity.

- model.py: backbones (SmolLM2-135M offline, tiny GPT-2 from config, any hub id), tokenizer,
  LoRA targets;
- data.py: corpora (Shakespeare offline, PTB from the hub), LDA-topic Dirichlet partitions, token
  blocks, a device's own text files;
- train.py: the local AdamW loop and token-weighted perplexity;
- backdoor.py: the text backdoor of the robustness experiments; generate.py: inference.

- words.py: the words of token blocks, for word-level perplexity.

``ppl`` is per token of the backbone's tokenizer, ``word_ppl`` per word of the PTB-normalized
text (the same summed NLL over the word count, words.py); results.json carries both, with the
token and word counts they are over.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import torch

from task import TaskCapabilities, partition_stats
from task.adapters import compute_precision, lora_parameter_counts
from task.lm import backdoor, data, model, train, words

CAPABILITIES = TaskCapabilities(
    metric="ppl", metric_label="perplexity (per token)", count="tokens",
    figures=("ppl", "word_ppl"), counts=("tokens", "words"),
    datasets=("shakespeare", "ptb"), partitioners=("lda-dirichlet", "iid", "role"),
    linear_lora=True, attacks=("none", "scaled", "sign-flip", "backdoor"),
    precisions=("fp32", "bf16"), own_files=True, gradient_checkpointing=True)

SAMPLE_PROMPT = "to be or not to be"


class LanguageModeling:
    name = "lm"
    caps = CAPABILITIES

    # -- backbone and adapters
    def backbone_name(self, cfg) -> str:
        return cfg.model.name

    def load_backbone(self, cfg, dtype=None):
        return model.load_backbone(cfg, dtype)

    def lora_config(self, cfg, backbone):
        return model.lora_config(cfg, backbone.config.model_type)

    def prepare_adapter(self, peft_model, adapter_name: str) -> None:
        if peft_model.get_base_model().config.model_type == "gpt2":
            model.restrict_c_attn_to_qv(peft_model, adapter_name)

    def model_key(self, cfg) -> tuple:
        return (cfg.train.seq_len if cfg.model.name == "tiny-gpt2" else 0,)  # tiny-gpt2's n_positions

    def parameter_counts(self, peft_model) -> tuple[int, int]:
        if peft_model.get_base_model().config.model_type == "gpt2":
            return model.parameter_counts(peft_model)  # GPT-2's masked k-rows are not counted
        return lora_parameter_counts(peft_model)

    # -- data
    def prepare(self, cfg) -> dict:
        data.load_corpus(cfg)  # the corpus and its LDA fit, once, before any client needs them
        return {}

    def client_data(self, cfg, partition_id: int, num_partitions: int):
        return data.client_blocks(cfg, partition_id, num_partitions)

    def own_data(self, cfg, data_path: str, cache_folder):
        return data.own_blocks(cfg, data_path, cache_folder)

    def partition_stats(self, cfg, num_partitions: int) -> dict:
        """How non-IID the partition is in LDA topics (task/partition_stats.py); the role and
        iid partitioners of a corpus without an LDA fit have no topics to count."""
        corpus = data.load_corpus(cfg)
        # built here, at start, for every partitioner: a split this many clients cannot have
        # (too few roles) stops the run now, naming the keys, not every client in every round
        parts = data.partition_indices(cfg, num_partitions)
        if cfg.data.partitioner != "lda-dirichlet":
            return {"label": "none (no LDA fit for this partitioner)"}
        topics = np.asarray(corpus.topics)
        return {"label": "dominant LDA topic of a document",
                **partition_stats.label_statistics([topics[list(p)] for p in parts],
                                                   topics[corpus.pool], cfg.data.lda_topics)}

    def global_test_data(self, cfg):
        return data.global_test_blocks(cfg)

    # -- local training and evaluation
    def train(self, peft_model, blocks, **kwargs) -> float:
        return train.train_local(peft_model, blocks, **kwargs)

    def evaluator(self, cfg, blocks, *, seed: int, scope: str):
        """Summed NLL, tokens and words of ``blocks`` as ``scope`` reads them: "whole" (all:
        round 0 and the final round on the global test), "round" (the per-round curve: a fixed
        subset of >= eval.server-round-tokens tokens), "client" (>= eval.client-tokens tokens
        of a local test set; 0 = all), "validation" (all: a personalization validation share)."""
        limit = {"round": cfg.eval.server_round_tokens, "client": cfg.eval.client_tokens,
                 "whole": 0, "validation": 0}[scope]
        blocks = eval_subset(blocks, limit, seed)
        block_words = words.words_per_block(model.load_tokenizer(cfg), blocks)
        precision = compute_precision(cfg)

        def evaluate(m) -> dict:
            result = train.evaluate_nll(m, blocks, batch_size=cfg.train.batch_size,
                                        words=block_words, precision=precision)
            return {"nll": result.nll_sum, "tokens": result.tokens, "words": result.words}

        return evaluate

    def summarize(self, rows: list[dict], which: str) -> float:
        return self.figures(rows, which)["ppl"]

    def figures(self, rows: list[dict], which: str) -> dict:
        """Token- and word-level perplexity of the summed NLL of ``rows``, with the counts."""
        nll = sum(r[f"{which}-nll"] for r in rows)
        tokens = int(sum(r[f"{which}-tokens"] for r in rows))
        n_words = int(sum(r.get(f"{which}-words", 0) for r in rows))
        return {"ppl": math.exp(nll / tokens) if tokens else math.nan,
                "word_ppl": math.exp(nll / n_words) if n_words else math.nan,
                "tokens": tokens, "words": n_words}

    def client_state(self, cfg, client_dir):
        return nullcontext()  # a text client keeps nothing but its personal adapter

    # -- results
    def header(self, cfg, test_blocks) -> dict:
        tokenizer = model.load_tokenizer(cfg)
        per_round = eval_subset(test_blocks, cfg.eval.server_round_tokens, cfg.seed)
        return {"metric_unit": "token (ppl) and word (word_ppl)",
                "word_unit": "a whitespace-separated word of the PTB-normalized text (<unk> and N "
                             "included) or a line end (PTB's <eos>); task/lm/words.py",
                "global_test": "the whole global test set at round 0 and the final round; the "
                               "per-round curve on a fixed seeded subset of it",
                "global_test_tokens": test_blocks.numel() - len(test_blocks),
                "global_test_words": int(words.words_per_block(tokenizer, test_blocks).sum()),
                "round_eval_tokens": per_round.numel() - len(per_round),
                "round_eval_words": int(words.words_per_block(tokenizer, per_round).sum())}

    def render_samples(self, cfg, peft_model, folder) -> list:
        """A greedy continuation of a fixed prompt, so checkpoints can be read side by side."""
        tokenizer = model.load_tokenizer(cfg)
        peft_model.eval()
        text = data.ptb_normalize(SAMPLE_PROMPT)
        ids = tokenizer(text, return_tensors="pt")["input_ids"].to(next(peft_model.parameters()).device)
        output = peft_model.generate(input_ids=ids, max_new_tokens=24, do_sample=False,
                                     pad_token_id=tokenizer.eos_token_id)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "sample.txt"
        path.write_text(tokenizer.decode(output[0], skip_special_tokens=True) + "\n")
        return [path]

    def attack_metrics(self, cfg, peft_model, test_blocks) -> dict:
        if cfg.threats.attack != "backdoor":
            return {}
        return backdoor.backdoor_success(cfg, peft_model, model.load_tokenizer(cfg), test_blocks)

    def poison_data(self, cfg, blocks, seed: int):
        return backdoor.backdoor_blocks(cfg, blocks, model.load_tokenizer(cfg), seed)


def eval_subset(blocks: torch.Tensor, min_tokens: int, seed: int) -> torch.Tensor:
    """A fixed seeded subset of whole blocks holding >= ``min_tokens`` predicted tokens, in
    stream order (0, or more than there are: all of them)."""
    n = math.ceil(min_tokens / (blocks.shape[1] - 1)) if min_tokens else len(blocks)
    if n >= len(blocks):
        return blocks
    chosen = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))[:n]
    return blocks[chosen.sort().values]


TASK = LanguageModeling()
