"""Per-round statistics of a strategy, with every wire byte counted in this one place.

The strategy hands each message it sends and each reply it receives to :class:`RoundLedger`
(training payloads, evaluation payloads, SecAgg+ protocol stages); results.json's
``upload_bytes`` / ``download_bytes`` / ``eval_bytes`` come from here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

from flwr.app import Message

from strategies.records import model_bytes, wire_bytes


def _new_round() -> dict:
    return {"upload_bytes": 0, "download_bytes": 0, "eval_upload_bytes": 0,
            "eval_download_bytes": 0, "num_updates": 0, "failures": 0, "rejected": 0, "dropped": 0,
            "train_loss": math.nan, "retries": 0, "skipped": 0, "train_phase_s": math.nan,
            "aggregate_s": math.nan}


class RoundLedger:
    """round -> its statistics (bytes, updates, failures, rejections, loss, ...)."""

    def __init__(self) -> None:
        self.rounds: dict[int, dict] = {}
        self._train_start: dict[int, float] = {}
        self._aggregate_start: dict[int, float] = {}

    # Where a round's time goes: ``train_phase_s`` from the training messages going out to the
    # replies in hand (the messages, every node's training; SecAgg+: its whole protocol), and
    # ``aggregate_s`` the screening, any retries and the aggregation; the server app adds its own
    # evaluation's ``server_eval_s``.
    def train_started(self, server_round: int) -> None:
        self._train_start[server_round] = time.perf_counter()

    def train_done(self, server_round: int) -> None:
        now = time.perf_counter()
        if (start := self._train_start.pop(server_round, None)) is not None:
            self(server_round)["train_phase_s"] = round(now - start, 3)
        self._aggregate_start[server_round] = now

    def aggregated(self, server_round: int) -> None:
        if (start := self._aggregate_start.pop(server_round, None)) is not None:
            self(server_round)["aggregate_s"] = round(time.perf_counter() - start, 3)

    def __call__(self, server_round: int) -> dict:
        return self.rounds.setdefault(server_round, _new_round())

    def __getitem__(self, server_round: int) -> dict:
        return self.rounds[server_round]

    def get(self, server_round: int, default=None):
        return self.rounds.get(server_round, default)

    def train_sent(self, server_round: int, messages: Iterable[Message]) -> None:
        """Training payloads: the model arrays each client downloads."""
        self(server_round)["download_bytes"] += sum(model_bytes(m.content) for m in messages)

    def train_received(self, server_round: int, replies: Iterable[Message]) -> None:
        """Training replies: the model arrays each client uploads (as sent: compressed ones
        count their encoded size)."""
        self(server_round)["upload_bytes"] += sum(model_bytes(m.content) for m in replies
                                                  if not m.has_error())

    def eval_sent(self, server_round: int, messages: Iterable[Message]) -> None:
        self(server_round)["eval_download_bytes"] += sum(wire_bytes(m.content) for m in messages)

    def eval_received(self, server_round: int, replies: Iterable[Message]) -> None:
        self(server_round)["eval_upload_bytes"] += sum(wire_bytes(m.content) for m in replies
                                                       if not m.has_error())

    def protocol(self, server_round: int, sent: int, received: int) -> None:
        """SecAgg+: every protocol stage's messages, both ways (keys, shares, masked vectors)."""
        stats = self(server_round)
        stats["download_bytes"] += sent
        stats["upload_bytes"] += received
