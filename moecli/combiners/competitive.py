"""`competitive`: softmax gate, each expert scored on its own (Jacobs et al. 1991; methods-classic §1.2).

Categorical slots: the mixture likelihood −log Σ_i p_i q_i(y|x) (eq. 4).
Gaussian slots: `objective: nll` is the paper's −log Σ_i p_i exp(−‖d − o_i‖²/2σ²) (eq. 3, `sigma` default 1);
`objective: expected_sq` is Σ_i p_i ‖d − o_i‖² (eq. 2).
`output: blend` predicts with the mixture (the project default); `output: argmax_expert` with the most
probable expert alone (the other reading of the paper's test output).
Posterior slots (multimodal VAE, methods-multimodal §1.3, MMVAE): the task passes its modality posteriors as a
`(mean, logvar)` pair `[B, M, Z]`; the output is the mixture Σ_m π_m q(z|x_m) (a `GaussianPosteriorMixture`,
sampled stratified by the task's objective), π = softmax of the gate over the present modalities:
`gate: uniform` is MMVAE's 1/|S|, `gate: learned` a linear gate on the task's gate input. `objective`, `sigma`
and `output` do not apply there.
"""

from __future__ import annotations

import dataclasses

import torch

from moecli.combiners.base import Combiner, zero_loss
from moecli.errors import check_choice
from moecli.posteriors import GaussianPosteriorMixture
from moecli.routing.router import Router
from moecli.rules import CategoricalMixture, ExpectedSquaredError, GaussianMixture, as_log_probs
from moecli.slots import CombinerOutput, Slot


@dataclasses.dataclass(frozen=True)
class ArgmaxExpert:
    """Wraps a mixture so that `point()` is the output of the most probable expert (training loss unchanged)."""

    mixture: object
    weights: torch.Tensor
    expert_points: torch.Tensor

    def nll(self, target: torch.Tensor) -> torch.Tensor:
        return self.mixture.nll(target)

    def point(self) -> torch.Tensor:
        idx = self.weights.argmax(-1)
        return self.expert_points[torch.arange(idx.shape[0]), idx]


class Competitive(Combiner):
    posterior_ok = True  # MMVAE: the mixture of the modality posteriors (methods-multimodal §1.3)

    def __init__(self, slot: Slot, num_experts: int | None = 4, expert_hidden: int = 0,
                 activation: str = "relu", gate: str = "learned", gate_hidden: int = 0, objective: str = "nll",
                 sigma: float = 1.0, output: str = "blend"):
        super().__init__(slot, num_experts)
        check_choice("combiner.objective", objective, ["nll", "expected_sq"])
        check_choice("combiner.output", output, ["blend", "argmax_expert"])
        self.objective, self.sigma, self.output = objective, sigma, output
        self.router = Router(slot.in_dim, self.num_experts, kind=gate, hidden=gate_hidden)
        self.experts = self.make_experts(expert_hidden, activation)

    def forward(self, x: torch.Tensor, experts=None, mask=None) -> CombinerOutput:
        logits = self.router(x)
        if self.slot.family == "gaussian" and isinstance(experts, tuple):
            return self._posterior_mixture(logits, *experts, mask)
        weights = torch.softmax(logits, dim=-1)
        outputs = experts if experts is not None else self.experts(x)
        if self.slot.family == "categorical":
            outputs = as_log_probs(outputs)
            out = CategoricalMixture(torch.log_softmax(logits, -1), outputs)
            points = outputs.exp()
        elif self.objective == "nll":
            out = GaussianMixture(torch.log_softmax(logits, -1), outputs, self.sigma)
            points = outputs
        else:
            out = ExpectedSquaredError(weights, outputs)
            points = outputs
        if self.output == "argmax_expert":
            out = ArgmaxExpert(out, weights, points)
        return CombinerOutput(out, zero_loss(weights), weights)

    def _posterior_mixture(self, logits, mean, logvar, mask) -> CombinerOutput:
        """Mixture of posterior experts (MMVAE): mean, logvar `[B, M, Z]`, mask `[B, M]` -> π `[B, M]`."""
        if mask is not None:  # absent modalities get no weight; softmax renormalises over the present ones
            logits = logits.masked_fill(~mask.bool(), float("-inf"))
        log_weights = torch.log_softmax(logits, dim=-1)
        out = GaussianPosteriorMixture(log_weights, mean, logvar, kl="mixture")
        return CombinerOutput(out, zero_loss(mean), log_weights.exp())
