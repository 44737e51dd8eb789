"""Equivalences of the classic combiners built from their YAMLs (methods-classic §1.8, §2.10)."""

from __future__ import annotations

import torch

from moecli.combiners.competitive import Competitive
from moecli.combiners.cooperative import Cooperative
from moecli.combiners.poe import Poe
from moecli.slots import Slot

CAT = Slot("out", "distribution", in_dim=3, out_dim=4, family="categorical")
GAUSS = Slot("out", "distribution", in_dim=3, out_dim=2, family="gaussian")


def test_cooperative_with_a_uniform_gate_is_the_plain_average():
    torch.manual_seed(0)
    coop = Cooperative(CAT, num_experts=3, gate="uniform")
    x = torch.randn(5, 3)
    expert_logits = coop.experts(x)
    torch.testing.assert_close(coop(x).output.log_probs, torch.log_softmax(expert_logits.mean(1), -1))
    coop_g = Cooperative(GAUSS, num_experts=3, gate="uniform")
    torch.testing.assert_close(coop_g(x).output.point(), coop_g.experts(x).mean(1))


def test_poe_of_one_expert_is_that_expert():
    torch.manual_seed(1)
    x = torch.randn(6, 3)
    poe = Poe(CAT, num_experts=1)
    torch.testing.assert_close(poe(x).output.log_probs, torch.log_softmax(poe.experts(x)[:, 0], -1))
    poe_g = Poe(GAUSS, num_experts=1)
    mean, logvar = poe_g.experts(x).chunk(2, -1)
    out = poe_g(x).output
    torch.testing.assert_close(out.mean, mean[:, 0])
    torch.testing.assert_close(out.logvar, logvar[:, 0])


def test_poe_gate_weighting_with_uniform_gate_is_the_plain_product():
    torch.manual_seed(2)
    x = torch.randn(4, 3)
    plain = Poe(CAT, num_experts=3)
    gated = Poe(CAT, num_experts=3, weighting="gate")
    gated.experts.load_state_dict(plain.experts.state_dict())
    torch.nn.init.zeros_(gated.router.linear.weight)
    torch.nn.init.zeros_(gated.router.linear.bias)
    torch.testing.assert_close(gated(x).output.log_probs, plain(x).output.log_probs)


def test_competitive_categorical_gate_gradient_is_p_minus_h():
    torch.manual_seed(3)
    comp = Competitive(CAT, num_experts=3)
    x, y = torch.randn(7, 3), torch.randint(0, 4, (7,))
    logits = comp.router(x).detach().requires_grad_(True)
    q = torch.log_softmax(comp.experts(x).detach(), -1)
    from moecli.rules import CategoricalMixture

    mix = CategoricalMixture(torch.log_softmax(logits, -1), q)
    mix.nll(y).sum().backward()
    torch.testing.assert_close(logits.grad, torch.softmax(logits, -1) - mix.responsibilities(y).detach())


def test_competitive_argmax_expert_output_uses_the_most_probable_expert():
    torch.manual_seed(4)
    comp = Competitive(GAUSS, num_experts=3, output="argmax_expert")
    x = torch.randn(5, 3)
    out = comp(x)
    idx = out.weights.argmax(-1)
    torch.testing.assert_close(out.output.point(), comp.experts(x)[torch.arange(5), idx])


def test_one_expert_mixture_equals_that_expert_for_every_gate_rule():
    torch.manual_seed(5)
    x, y = torch.randn(6, 3), torch.randint(0, 4, (6,))
    for cls in (Cooperative, Competitive):
        comb = cls(CAT, num_experts=1)
        want = -torch.log_softmax(comb.experts(x)[:, 0], -1)[torch.arange(6), y]
        torch.testing.assert_close(comb(x).output.nll(y), want)
