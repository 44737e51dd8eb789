"""Soft MoE dispatch and combine weights (Puigcerver et al. 2023; methods-routing §5.2).

Per group X `[G, m, D]` and slot parameters Φ `[D, n·p]`: L = scale · normalize(X) · normalize(Φ);
dispatch D = softmax over the m tokens (axis 1, per slot); combine C = softmax over the n·p slots (axis 2, per
token). Slot inputs X̃ = Dᵀ X; outputs Y = C Ỹ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_moe_weights(
    x: torch.Tensor, phi: torch.Tensor, scale: torch.Tensor | float = 1.0, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dispatch, combine), each `[G, m, S]` with S = n·p slots, from x `[G, m, D]` and phi `[D, S]`.

    dispatch sums to 1 over tokens (axis 1); combine sums to 1 over slots (axis 2). Computed in float32.
    """
    x, phi = x.float(), phi.float()
    if normalize:
        x = F.normalize(x, dim=-1)
        phi = F.normalize(phi, dim=0)
    logits = scale * torch.einsum("gmd,ds->gms", x, phi)
    return torch.softmax(logits, dim=1), torch.softmax(logits, dim=2)
