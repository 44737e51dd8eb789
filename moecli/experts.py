"""Stacked expert networks: every expert's weights live in one tensor, `[E, D, H]` and `[E, H, O]`.

`StackedExperts` evaluates all experts densely on the same input, which is what the classic small tasks want
(Jacobs 1991: every expert sees every case). Sparse, routed evaluation for representation slots lives in
`moecli.routing.dispatch` and uses the same stacked layout.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moecli.errors import check_choice

ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "gelu": nn.functional.gelu, "sigmoid": torch.sigmoid}


def activation(name: str):
    """Look up an activation by its YAML name."""
    check_choice("activation", name, ACTIVATIONS)
    return ACTIVATIONS[name]


def _uniform_(tensor: torch.Tensor, fan_in: int) -> torch.Tensor:
    # Same scale as torch.nn.Linear's default, applied expert by expert.
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    return nn.init.uniform_(tensor, -bound, bound)


class StackedExperts(nn.Module):
    """E independent MLPs (or linear maps when `hidden == 0`) evaluated together.

    x `[B, D]` -> `[B, E, O]`. Weights: w1 `[E, D, H]`, b1 `[E, H]`, w2 `[E, H, O]`, b2 `[E, O]`.
    """

    def __init__(self, num_experts: int, in_dim: int, out_dim: int, hidden: int = 0, act: str = "relu"):
        super().__init__()
        self.num_experts, self.hidden = num_experts, hidden
        self.act = activation(act)
        first_out = hidden if hidden > 0 else out_dim
        self.w1 = nn.Parameter(_uniform_(torch.empty(num_experts, in_dim, first_out), in_dim))
        self.b1 = nn.Parameter(_uniform_(torch.empty(num_experts, first_out), in_dim))
        if hidden > 0:
            self.w2 = nn.Parameter(_uniform_(torch.empty(num_experts, hidden, out_dim), hidden))
            self.b2 = nn.Parameter(_uniform_(torch.empty(num_experts, out_dim), hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("bd,edh->beh", x, self.w1) + self.b1
        if self.hidden == 0:
            return h
        return torch.einsum("beh,eho->beo", self.act(h), self.w2) + self.b2


class MLP(nn.Module):
    """One network `[B, D] -> [B, O]` with one hidden layer (or linear when `hidden == 0`)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 0, act: str = "relu"):
        super().__init__()
        self.act = activation(act)
        if hidden > 0:
            self.layers = nn.ModuleList([nn.Linear(in_dim, hidden), nn.Linear(hidden, out_dim)])
        else:
            self.layers = nn.ModuleList([nn.Linear(in_dim, out_dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == 0 else layer(self.act(x))
        return x
