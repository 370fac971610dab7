"""Privacy accounting for DP-FedAvg with client-level clipping and Gaussian noise.

Each round the server releases the mean of the sampled clients' clipped adapter changes plus
Gaussian noise of std ``z * clip / n`` (McMahan et al., "Learning Differentially Private
Recurrent Language Models", ICLR 2018). That is one step of the sampled Gaussian mechanism with
noise multiplier ``z`` and sampling rate ``q`` = clients per round / clients, so the privacy
spent after T rounds is the RDP composition of T such steps, converted to (epsilon, delta):
opacus' RDP accountant (Mironov, "Renyi Differential Privacy", CSF 2017) does exactly that.

The guarantee is user-level (one client's whole data), against anyone who sees the released
global adapters. The accountant assumes Poisson sampling of clients, as DP-FedAvg's analysis
does; the server samples a fixed-size seeded subset, the usual approximation of it.
"""

from __future__ import annotations

import logging

_root = logging.getLogger()
_handlers_before = list(_root.handlers)
from opacus.accountants import RDPAccountant

# opacus calls logging.basicConfig at import; that root handler would print every Flower log
# line a second time (Flower's own handler already prints them), so take it off again.
for _handler in _root.handlers[:]:
    if _handler not in _handlers_before:
        _root.removeHandler(_handler)


class PrivacyAccountant:
    """Epsilon spent so far at ``delta``, one ``step`` per released aggregate."""

    def __init__(self, noise_multiplier: float, sample_rate: float, delta: float) -> None:
        if noise_multiplier <= 0 or not 0 < sample_rate <= 1:
            raise ValueError("need noise_multiplier > 0 and 0 < sample_rate <= 1")
        self.noise_multiplier, self.sample_rate, self.delta = noise_multiplier, sample_rate, delta
        self._rdp = RDPAccountant()

    @property
    def releases(self) -> int:
        return sum(steps for _, _, steps in self._rdp.history)

    def step(self, rounds: int = 1) -> float:
        """Account ``rounds`` released rounds; the total epsilon after them."""
        for _ in range(rounds):
            self._rdp.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return self.epsilon

    @property
    def epsilon(self) -> float:
        return float(self._rdp.get_epsilon(self.delta)) if self._rdp.history else 0.0
