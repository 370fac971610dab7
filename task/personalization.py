"""The personalization protocol: fine-tune a starting model on a client's own data, keep the
step count that is best on a held-out validation share of that data.

The paper (section 4.4.3) personalizes by one local epoch from the final global adapter. Plain
fine-tuning can make a client worse (a learning rate too high for its little data, or a few
steps that overfit), so the protocol keeps the choice honest and safe:

- a seeded ``server.personalize-validation-fraction`` of the client's training blocks is held out;
- the model trains ``server.personalize-epochs`` full epochs (not capped by ``train.max-steps``;
  ``server.personalize-max-steps`` can cap them, for smoke runs) on the rest at ``server.personalize-learning-rate`` (full-model strategies: scaled by
  train.full-learning-rate / train.learning-rate, their own step size);
- at ``server.personalize-checks`` evenly spaced steps the validation metric is measured; the
  best of those, of the start, and of the global model itself is kept. So the result is never
  worse than the global model on the validation share (the client's test data is never read).

Strategies with a personal model of their own (Ditto's v, FedPer's and FedSA-LoRA's personal
parts, local-only's adapter) start from it; the others from the global model. Every strategy gets
the same budget, so the comparison is fair. Lower is better for every task metric (perplexity, FID).

Plain ML: no flwr. The ClientApp runs it on its node (client_app/app.py); the centralized
baselines run it in the ServerApp on each protocol client's data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from task.adapters import compute_precision

State = dict[str, torch.Tensor]


@dataclass
class Personalized:
    """What the protocol chose, for the client's reply (all numbers) and its personal folder."""
    state: State                  # the chosen model (adapter tensors, or every weight)
    chosen_steps: int             # optimizer steps of fine-tuning kept (0: the start itself)
    total_steps: int              # steps the budget allowed
    from_global: bool             # the global model was kept (it beat every candidate)
    validation_global: float      # validation metric of the global model
    validation_chosen: float      # validation metric of the chosen one
    validation_count: int         # what the validation share holds (training blocks / images)

    def metrics(self) -> dict[str, float | int]:
        return {"chosen-steps": self.chosen_steps, "total-steps": self.total_steps,
                "kept-global": int(self.from_global),
                "validation-global": self.validation_global,
                "validation-chosen": self.validation_chosen,
                "validation-blocks": self.validation_count}


def validation_split(data: torch.Tensor, fraction: float, seed: int,
                     cap: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, validation) rows of ``data``: a seeded share (at most ``cap`` rows, 0 = no cap), at
    least one row each when there are two or more (with one row there is nothing to validate on:
    validation is empty)."""
    n = len(data)
    if n < 2:
        return data, data[:0]
    n_val = min(n - 1, max(1, round(fraction * n)))
    if cap:
        n_val = min(n_val, cap)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return data[order[n_val:].sort().values], data[order[:n_val].sort().values]


def check_steps(total_steps: int, checks: int) -> set[int]:
    """Evenly spaced step counts (the last one included) at which validation is measured."""
    return {max(1, math.ceil(total_steps * k / checks)) for k in range(1, checks + 1)} if total_steps else set()


def personalize(task, cfg, model, *, global_state: State, start_state: State | None,
                load: Callable, snapshot: Callable, train_data: torch.Tensor, seed: int,
                full_model: bool = False) -> Personalized:
    """Run the protocol on ``model`` (the shared per-process model: it ends holding the chosen
    state). ``start_state``: the strategy's own personal model, or None to start from the
    global one. ``load(model, state)`` / ``snapshot(model)`` move states in and out."""
    s = cfg.server
    fit, validation = validation_split(train_data, s.personalize_validation_fraction, seed,
                                       s.personalize_validation_cap)
    batch = cfg.train.batch_size
    total = s.personalize_epochs * math.ceil(len(fit) / batch) if len(validation) else 0
    if s.personalize_max_steps:
        total = min(total, s.personalize_max_steps)
    if not len(validation):  # one block: nothing to choose on, so keep the global model
        load(model, global_state)
        return Personalized(global_state, 0, 0, True, math.nan, math.nan, 0)
    score_validation = task.evaluator(cfg, validation, seed=seed, scope="validation")

    def score() -> float:
        return task.summarize([{f"global-{k}": v for k, v in score_validation(model).items()}], "global")

    load(model, global_state)
    best = {"value": score(), "state": global_state, "steps": 0, "global_": True}
    validation_global = best["value"]
    if start_state is not None:  # the strategy's own personal model
        load(model, start_state)
        value = score()
        if value < best["value"]:
            best = {"value": value, "state": start_state, "steps": 0, "global_": False}
    else:
        start_state = global_state
    load(model, start_state)
    checks = check_steps(total, s.personalize_checks)

    def after_step(step: int) -> None:
        if step in checks:
            value = score()
            if value < best["value"]:
                best.update(value=value, state=snapshot(model), steps=step, global_=False)

    lr = s.personalize_learning_rate
    if full_model:  # a full model trains at its own, much smaller, step size
        lr *= cfg.train.full_learning_rate / cfg.train.learning_rate
    task.train(model, fit, epochs=s.personalize_epochs, batch_size=batch, lr=lr,
               weight_decay=cfg.train.weight_decay, max_steps=total, seed=seed,
               after_step=after_step, precision=compute_precision(cfg))
    load(model, best["state"])
    return Personalized(best["state"], best["steps"], total, best["global_"], validation_global,
                        best["value"], len(validation))
