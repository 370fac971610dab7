"""Federated strategies, one module each, picked by the ``strategy.name`` config key.

- registry.py: every strategy, its capabilities, the refusal table, ``check_run``, ``build_strategy``;
- base.py: FedGenStrategy, mixed into each Flower strategy (sampling, validation, defences,
  SecAgg+ rounds, byte accounting, client evaluations);
- records.py (record keys, wire bytes, update checks), accounting.py (bytes per round),
  defences.py (norm screen, robust and DP aggregation, retries), secagg.py (SecAgg+),
  lora_aggregation.py (exact and rank-aware LoRA aggregation);
- one module per algorithm, its docstring citing its paper and saying what is shared and what
  stays on the client.
"""
