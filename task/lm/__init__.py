"""Causal language modeling: a frozen decoder, LoRA on attention q and v, perplexity.

- model.py: backbones (SmolLM2-135M offline, tiny GPT-2 from config, any hub id), tokenizer,
  LoRA targets;
- data.py: corpora (Shakespeare offline, PTB from the hub), LDA-topic Dirichlet partitions, token
  blocks, a device's own text files;
- train.py: the local AdamW loop and token-weighted perplexity;
- backdoor.py: the text backdoor of the robustness experiments; generate.py: inference.

Perplexity here is per token of the backbone's tokenizer (``metric_unit`` in results.json).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

from task import TaskCapabilities
from task.adapters import compute_precision, lora_parameter_counts
from task.lm import backdoor, data, model, train

CAPABILITIES = TaskCapabilities(
    metric="ppl", metric_label="perplexity (per token)", count="tokens",
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

    def global_test_data(self, cfg):
        return data.global_test_blocks(cfg)

    # -- local training and evaluation
    def train(self, peft_model, blocks, **kwargs) -> float:
        return train.train_local(peft_model, blocks, **kwargs)

    def evaluator(self, cfg, blocks, *, seed: int, server: bool):
        """Summed NLL and tokens over the first eval.server-max-batches (server) or
        eval.client-max-batches (client) batches: a fixed, comparable subset."""
        max_batches = cfg.eval.server_max_batches if server else cfg.eval.client_max_batches
        precision = compute_precision(cfg)

        def evaluate(m) -> dict:
            result = train.evaluate_nll(m, blocks, batch_size=cfg.train.batch_size,
                                        max_batches=max_batches, precision=precision)
            return {"nll": result.nll_sum, "tokens": result.tokens}

        return evaluate

    def summarize(self, rows: list[dict], which: str) -> float:
        tokens = sum(r[f"{which}-tokens"] for r in rows)
        return math.exp(sum(r[f"{which}-nll"] for r in rows) / tokens) if tokens else math.nan

    def client_state(self, cfg, client_dir):
        return nullcontext()  # a text client keeps nothing but its personal adapter

    # -- results
    def header(self, cfg, test_blocks) -> dict:
        n_blocks = min(len(test_blocks), cfg.train.batch_size * cfg.eval.server_max_batches)
        return {"metric_unit": "token", "global_test_tokens": n_blocks * (test_blocks.shape[1] - 1)}

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


TASK = LanguageModeling()
