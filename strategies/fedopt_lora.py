"""Server optimizers over adapter deltas: FedAdam and FedYogi on LoRA adapters.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021. Clients train exactly as in FedAvg;
the server treats (weighted mean of the client adapters - current global adapter) as a pseudo-
gradient and applies Adam or Yogi to it (Flower's FedAdam / FedYogi, ``server-learning-rate``).

Shared: the LoRA adapter. Stays on the client: data, backbone, its latest local adapter.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAdam, FedYogi

from strategies.base import FedGenStrategy
from strategies.fedavg_lora import (  # noqa: F401
    client_eval_states,
    client_train,
    server_global_state,
    server_initial_state,
)


class FedAdamLoRA(FedGenStrategy, FedAdam):
    pass


class FedYogiLoRA(FedGenStrategy, FedYogi):
    pass
