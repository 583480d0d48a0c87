"""The mixture-of-experts load-balancing loss (``--hidream_use_load_balancing_loss``).

A mixture-of-experts block routes each token to a few of its experts by a learned gate (router). Left
alone, training can push most tokens to the same experts; the auxiliary loss of the Switch-Transformer
/ DeepSeek family counters that. For each gate, with ``P_i`` the mean router probability of expert ``i``
over the batch's tokens and ``f_i`` the share of token choices it received times the expert count,

    balance = sum_i P_i * f_i

which is 1 when the routing is uniform and grows as it concentrates. diffusers' ``MoEGate`` computes
exactly this (times its ``aux_loss_alpha``, 0.01) in training mode and returns it as the third output
of its forward, but HiDream's feed-forward drops it. A forward hook on every gate the family names
(``ModelFamily.router_gates``) keeps it; the term is

    weight * sum over gates of balance

with ``--hidream_load_balancing_loss_weight`` as the weight (0.01, the gates' own ``aux_loss_alpha``, when
unset). Its gradient reaches the gates' weights through ``P_i`` (``f_i`` counts discrete choices). Logged
as ``load_balancing/balance`` (the mean over gates: 1.0 is perfectly even) and ``load_balancing/loss``.
"""

from __future__ import annotations

import torch

from simpletuner.methods.base import Stateless
from simpletuner.regularizers.base import CaptureSwitch, RegularizerTerm

#: ``--hidream_load_balancing_loss_weight`` when left unset: the ``aux_loss_alpha`` diffusers' gates are built with.
DEFAULT_WEIGHT = 0.01


def build(model, config) -> "LoadBalancing":
    """``--hidream_use_load_balancing_loss`` (the registry's builder)."""
    weight = config.hidream_load_balancing_loss_weight
    return LoadBalancing(DEFAULT_WEIGHT if weight is None else float(weight))


class LoadBalancing(Stateless):
    name = "load_balancing"

    def __init__(self, weight: float):
        self.weight = weight
        self.balances: list[torch.Tensor] = []
        self._handles: list = []
        self._gate_count = 0

    def attach(self, model, capture: CaptureSwitch) -> None:
        gates = getattr(model, "router_gates", lambda: [])()
        if not gates:
            raise ValueError(f"the load-balancing loss needs a mixture-of-experts denoiser; "
                             f"{model.config.model_family}'s has no router gates")
        self._gate_count = len(gates)
        for gate in gates:
            def record(module, inputs, output):
                auxiliary = output[2] if isinstance(output, tuple) and len(output) > 2 else None
                if capture.on and auxiliary is not None:
                    self.balances.append(auxiliary / module.alpha)  # the gate multiplied by its alpha
            self._handles.append(gate.register_forward_hook(record))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def term(self, batch: dict, step: int) -> RegularizerTerm | None:
        balances, self.balances = self.balances, []
        if not balances:
            raise RuntimeError("the load-balancing loss captured no router statistics in this forward pass; the "
                               "routers compute them only in training mode with a positive aux_loss_alpha")
        total = torch.stack([balance.float() for balance in balances]).sum()
        loss = self.weight * total
        return RegularizerTerm(loss, {"balance": total.item() / len(balances), "loss": loss.item()})
