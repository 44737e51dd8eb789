"""The router: gate logits `s(x)` from the gate input (linear, as in Jacobs 1991, Shazeer 2017, Switch)."""

from __future__ import annotations

import torch
from torch import nn

from moecli.errors import check_choice


class Router(nn.Module):
    """Linear gate logits, one gate per task head.

    x `[B, D]` -> logits `[B, E]` (num_tasks == 1) or `[B, H, E]` (one gate per task, MMoE).
    `kind`: "learned" (linear in x; a learned constant when D == 0) or "uniform" (fixed zero logits).
    `hidden`: width of a tanh hidden layer before the linear map (0 = linear gate, as in the papers).
    `init_scale`: std of a truncated-normal init scaled by 1/sqrt(D) (Switch §2.4 uses 0.1); None keeps
    torch's default Linear init. `bias`: whether the linear map has a bias.
    """

    def __init__(self, in_dim: int, num_experts: int, num_tasks: int = 1, kind: str = "learned",
                 init_scale: float | None = None, bias: bool = True, hidden: int = 0):
        super().__init__()
        check_choice("combiner.gate", kind, ["learned", "uniform"])
        self.kind, self.num_experts, self.num_tasks = kind, num_experts, num_tasks
        self.linear, self.hidden = None, None
        if kind == "learned" and in_dim > 0 and hidden > 0:  # an MLP gate: tanh hidden layer, then linear
            self.hidden = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh())
            in_dim = hidden
        if kind == "learned" and in_dim > 0:
            self.linear = nn.Linear(in_dim, num_experts * num_tasks, bias=bias)
            if init_scale is not None:
                std = init_scale / in_dim**0.5
                nn.init.trunc_normal_(self.linear.weight, std=std, a=-2 * std, b=2 * std)
                if bias:
                    nn.init.zeros_(self.linear.bias)
        elif kind == "learned":
            self.constant = nn.Parameter(torch.zeros(num_tasks * num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        if self.linear is not None:
            logits = self.linear(self.hidden(x) if self.hidden is not None else x)
        elif self.kind == "learned":
            logits = self.constant.expand(batch, -1)
        else:
            logits = x.new_zeros(batch, self.num_tasks * self.num_experts)
        if self.num_tasks == 1:
            return logits
        return logits.view(batch, self.num_tasks, self.num_experts)
