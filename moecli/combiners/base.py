"""The abstract combiner (design §1): a gate plus a rule over E experts, serving one task slot."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from moecli.errors import ConfigError, check_positive
from moecli.experts import StackedExperts
from moecli.slots import CombinerOutput, Slot


class Combiner(nn.Module, ABC):
    """Base of every named combiner. Concrete combiners are final; shared behaviour is in plain functions.

    Class attributes declare what the combiner can serve; `incompatibility(slot)` turns them into a reason,
    which the build site reports with the list of compatible combiners.

    Distribution slots: `forward(x, experts=None, mask=None)`; `x` is the gate input `[B, D]`; `experts` holds the
    expert outputs when the task evaluates them (`slot.external_experts`): logits `[B, E, O]` for a categorical
    slot, a `(mean, logvar)` pair of `[B, E, Z]` for a Gaussian slot. Otherwise the combiner owns a
    `StackedExperts` of `num_experts` networks with `expert_hidden` hidden units (0 = linear, as in Jacobs 1991).
    Representation slots: `forward(x)` with x `[T, D]`, output `[T, D]`.
    """

    slot_kinds: ClassVar[frozenset[str]] = frozenset({"distribution"})
    families: ClassVar[frozenset[str]] = frozenset({"categorical", "gaussian"})
    external_ok: ClassVar[bool] = True
    owned_ok: ClassVar[bool] = True
    #: fuses the per-modality posterior experts of a multimodal VAE (slot.extra["posterior"]; multimodal §1)
    posterior_ok: ClassVar[bool] = False

    @classmethod
    def incompatibility(cls, slot: Slot) -> str | None:
        """Why this combiner cannot serve `slot`, or None when it can."""
        if slot.kind not in cls.slot_kinds:
            return f"it does not serve {slot.kind} slots"
        if slot.kind == "distribution":
            if slot.family not in cls.families:
                return f"it does not combine {slot.family} experts"
            if slot.external_experts and not cls.external_ok:
                return "it needs to own its experts, and this task supplies them"
            if not slot.external_experts and not cls.owned_ok:
                return "it combines experts supplied by the task, and this task has none"
            if slot.extra.get("posterior") and not cls.posterior_ok:
                return "it has no meaning as a fusion of posterior experts"
        return None

    def __init__(self, slot: Slot, num_experts: int | None = None):
        super().__init__()
        self.slot = slot
        if slot.num_experts is not None:
            num_experts = slot.num_experts  # the task fixes E (one expert per modality or domain)
        check_positive("combiner.num_experts", num_experts)
        self.num_experts = int(num_experts)

    def make_experts(self, expert_hidden: int, activation: str, out_mult: int = 1) -> StackedExperts | None:
        """Build the owned expert stack for a distribution slot (None when the task supplies experts)."""
        if self.slot.external_experts:
            return None
        check_positive("combiner.expert_hidden", expert_hidden, minimum=0)
        return StackedExperts(self.num_experts, self.slot.in_dim, self.slot.out_dim * out_mult, expert_hidden,
                              activation)

    @abstractmethod
    def forward(self, x: torch.Tensor, experts=None, mask: torch.Tensor | None = None) -> CombinerOutput:
        """Combine; see the class docstring for the argument shapes."""


def zero_loss(like: torch.Tensor) -> torch.Tensor:
    """A scalar zero on the same device and dtype, for combiners without auxiliary losses."""
    return like.new_zeros(())


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless `condition` holds (user-facing checks in constructors)."""
    if not condition:
        raise ConfigError(message)
