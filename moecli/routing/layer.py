"""What every token-routed combiner shares: owned stacked experts, a linear router, sparse dispatch, shared
experts, loss-free bias balancing, the weighted auxiliary loss and the statistics (methods-routing §0, §6,
§7).

Concrete combiners (`moecli.combiners.{switch,topk,gshard,noisy_topk,expert_choice}`) only say how logits
become a `Routing` record (`route`). The same class serves both slot kinds:

* representation slot: `forward(x [T, D] or [..., D]) -> output` of the same shape, experts are FFNs
  `D -> expert_hidden (slot.expert_hidden) -> D`;
* distribution slot: experts map the gate input to class logits (or Gaussian means); the rule is the weighted
  sum of the chosen experts' outputs (the sparse cooperative blend), turned into a categorical distribution by
  a softmax (or a unit-variance Gaussian). A token dropped by capacity gets the zero blend (uniform classes).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from moecli.combiners.base import Combiner, require
from moecli.errors import ConfigError, check_positive
from moecli.experts import StackedExperts
from moecli.routing.dispatch import one_thread, routed_experts
from moecli.routing.gating import Routing, update_selection_bias
from moecli.routing.losses import entropy_global_loss, entropy_local_loss
from moecli.routing.router import Router
from moecli.rules import Categorical, Gaussian, as_log_probs
from moecli.slots import CombinerOutput, Slot

SAME = "same"


def resolve_eval_capacity(train: float | None, evaluation) -> float | None:
    """`eval_capacity_factor: same` means the training value (null means unbounded)."""
    return train if evaluation == SAME else evaluation


#: Constructor keys that every token-routed combiner shares with RoutedCombiner (YAML key = argument name).
SHARED_KEYS = ("num_experts", "expert_hidden", "activation", "router_init_scale", "router_bias", "expert_dropout",
               "num_shared_experts", "balance_coef", "z_coef", "local_entropy_coef", "global_entropy_coef",
               "min_experts", "bias_balancing", "bias_update_rate", "group_size", "allow_future_leak")


def shared_options(args: dict, **fixed) -> dict:
    """RoutedCombiner's keyword arguments taken from a subclass constructor's `locals()`; `fixed` pins values the
    subclass does not expose (e.g. expert choice has no balance loss). Subclasses keep explicit signatures so that
    each YAML key stays a named argument with the paper's default."""
    return {**{k: args[k] for k in SHARED_KEYS if k in args}, **fixed}


class RoutedCombiner(Combiner):
    """Base of the token-routed combiners. Subclasses implement `route(logits, x, group_size) -> Routing`.

    Common keys (YAML = constructor arg): num_experts, expert_hidden (distribution slots; representation slots
    use slot.expert_hidden), activation, router_init_scale (Switch §2.3: 0.1; null = torch's Linear init),
    router_bias, expert_dropout (on the expert hidden activation, training only), num_shared_experts
    (DeepSeekMoE §7: ungated FFNs every token uses, weight 1), balance_coef, z_coef, local_entropy_coef,
    global_entropy_coef, min_experts (LIMoE §3, over the `modality` ids given to forward, else over all
    tokens), bias_balancing and bias_update_rate (DeepSeek-V3 §6, token-choice gates only), group_size
    (routing groups of contiguous rows).
    """

    slot_kinds = frozenset({"distribution", "representation"})
    # Distribution slots may get the experts' outputs from the task (`external_experts`, e.g. the per-pixel
    # logits `[T, E, O]` of task=segmentation): the rule is then Σ_kept gate · logits of the chosen experts.
    external_ok = True
    token_choice: ClassVar[bool] = True
    mixes_tokens: ClassVar[bool] = False  # routing of one token depends on the other tokens of its group

    def __init__(
        self,
        slot: Slot,
        num_experts: int | None = 8,
        expert_hidden: int = 0,
        activation: str = "relu",
        router_init_scale: float | None = None,
        router_bias: bool = False,
        expert_dropout: float = 0.0,
        num_shared_experts: int = 0,
        balance_coef: float = 0.0,
        z_coef: float = 0.0,
        local_entropy_coef: float = 0.0,
        global_entropy_coef: float = 0.0,
        min_experts: float | None = 4.0,
        bias_balancing: bool = False,
        bias_update_rate: float = 0.001,
        group_size: int | None = None,
        allow_future_leak: bool = False,
    ):
        super().__init__(slot, num_experts)
        check_positive("combiner.num_shared_experts", num_shared_experts, minimum=0)
        require(0.0 <= expert_dropout < 1.0, f"combiner.expert_dropout={expert_dropout} must be in [0, 1)")
        require(
            not bias_balancing or self.token_choice,
            "combiner.bias_balancing=true applies to token-choice gates only; choose one of: false",
        )
        if group_size is not None:
            check_positive("combiner.group_size", group_size)
        self.causal = bool(slot.extra.get("causal", False)) and self.mixes_tokens and not allow_future_leak
        hidden = slot.expert_hidden if slot.kind == "representation" else expert_hidden
        if slot.kind == "representation":
            check_positive("slot.expert_hidden", hidden)
        else:
            check_positive("combiner.expert_hidden", hidden, minimum=0)
        require(
            not (slot.external_experts and num_shared_experts),
            "combiner.num_shared_experts needs owned experts and this task supplies its experts; "
            "choose one of: 0",
        )
        self.experts = (
            None
            if slot.external_experts
            else StackedExperts(self.num_experts, slot.in_dim, slot.out_dim, hidden, activation)
        )
        self.shared = (
            StackedExperts(num_shared_experts, slot.in_dim, slot.out_dim, hidden, activation)
            if num_shared_experts
            else None
        )
        self.router = Router(
            slot.in_dim, self.num_experts, kind="learned", init_scale=router_init_scale, bias=router_bias
        )
        self.expert_dropout, self.group_size = expert_dropout, group_size
        self.coefs = {
            "balance": balance_coef,
            "z": z_coef,
            "entropy_local": local_entropy_coef,
            "entropy_global": global_entropy_coef,
        }
        self.min_experts = min_experts
        self.bias_balancing, self.bias_update_rate = bias_balancing, bias_update_rate
        self.register_buffer("selection_bias", torch.zeros(self.num_experts), persistent=True)

    # ------------------------------------------------------------------------------------------------ hooks
    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits `[T, E]` in float32 (selective precision, Switch §2.3)."""
        with torch.autocast(x.device.type, enabled=False):
            return self.router(x.float())

    def route(self, logits: torch.Tensor, x: torch.Tensor, group_size: int | None) -> Routing:
        raise NotImplementedError

    @property
    def bias(self) -> torch.Tensor | None:
        """The selection bias for token-choice gates when loss-free balancing is on."""
        return self.selection_bias if self.bias_balancing else None

    # --------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        x: torch.Tensor,
        experts=None,
        mask=None,
        num_sequences: int | None = None,
        modality: torch.Tensor | None = None,
    ) -> CombinerOutput:
        """x `[T, D]` (or `[..., D]`); num_sequences: rows are position-major (row s·N + n), used to group
        token-mixing routers per position in causal slots; modality `[T]` ids for the LIMoE losses."""
        if (experts is not None) != (self.experts is None):
            raise ConfigError(
                f"{type(self).__name__.lower()}: expert outputs must come from the task exactly when its slot "
                "has external_experts"
            )
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        with one_thread(x.device.type == "cpu"):  # small routing operations: no OpenMP regions (dispatch.py)
            record = self.route(self.router_logits(x2), x2, self._group_size(x2.shape[0], num_sequences))
            token, expert, gate = record.assignments()
            weights = record.weights()
        if experts is not None:  # external expert outputs [T, E, O]: weighted sum over the kept assignments
            picked = experts.reshape(x2.shape[0], self.num_experts, -1)[token, expert]
            y = picked.new_zeros(x2.shape[0], picked.shape[-1]).index_add(0, token, gate.unsqueeze(1) * picked)
        else:
            y = routed_experts(x2, token, expert, gate, self.experts, self.expert_dropout, self.training)
        stats = dict(record.stats)
        if self.shared is not None:
            shared = self.shared(x2).sum(1)
            stats["shared_norm"] = shared.detach().norm(dim=-1).mean()
            stats["routed_norm"] = y.detach().norm(dim=-1).mean()
            y = y + shared
        losses = dict(record.losses)
        losses.update(self._entropy_losses(record.probs, modality))
        if self.bias_balancing:
            if self.training:
                update_selection_bias(self.selection_bias, stats["demand"], self.bias_update_rate)
            stats["selection_bias"] = self.selection_bias.detach().clone()
        aux = sum(
            (self.coefs.get(k, 0.0) * v for k, v in losses.items() if self.coefs.get(k, 0.0)), y.new_zeros(())
        )
        return CombinerOutput(self._wrap(y.reshape(*lead, y.shape[-1])), aux, weights, losses, stats)

    def _group_size(self, num_tokens: int, num_sequences: int | None) -> int | None:
        if not self.causal:
            return self.group_size
        if num_sequences is None:
            raise ValueError(
                f"{type(self).__name__} mixes tokens within a routing group; in the causal slot "
                f"'{self.slot.name}' it groups the tokens of one position across sequences and "
                "needs forward(x, num_sequences=N) with position-major rows"
            )
        return num_sequences

    def _entropy_losses(self, probs: torch.Tensor, modality: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if not (self.coefs["entropy_local"] or self.coefs["entropy_global"]):
            return {}
        m = 1 if modality is None else int(modality.max()) + 1
        local = entropy_local_loss(probs, modality, m)
        glob = entropy_global_loss(probs, modality, m, self.min_experts)
        return {"entropy_local": local.sum(), "entropy_global": glob.sum()}

    def _wrap(self, y: torch.Tensor):
        if self.slot.kind == "representation":
            return y
        if self.slot.family == "categorical":
            return Categorical(as_log_probs(y))
        return Gaussian(y, torch.zeros_like(y))


def router_jitter(x: torch.Tensor, eps: float, training: bool) -> torch.Tensor:
    """Switch input jitter: the router's copy of x times U(1 − ε, 1 + ε), training only (never in place)."""
    if not training or eps <= 0:
        return x
    return x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)


def zero_router(router: Router) -> None:
    """Zero-initialise a router (Shazeer 2017: W_g = W_noise = 0)."""
    with torch.no_grad():
        for p in router.parameters():
            nn.init.zeros_(p)
