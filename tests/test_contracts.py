"""Contract suite: discovers every combiner and task YAML by itself (design §4, §6.11).

For every combiner and every standard slot it accepts: output shapes, gate weights in [0, 1] summing to at most 1
(exactly 1 for the dense gates), finite gradients reaching the gate and the experts, determinism under a seed.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from moecli import registry
from moecli.errors import ConfigError
from moecli.slots import Slot
from tests.conftest import compose

COMBINERS = registry.group_options("combiner")
TASKS = registry.group_options("task")
DENSE_GATES = {"cooperative", "competitive"}

SLOTS = {
    "categorical": Slot("out", "distribution", in_dim=3, out_dim=4, family="categorical", labels=("a", "b", "c", "d")),
    "gaussian": Slot("out", "distribution", in_dim=3, out_dim=2, family="gaussian"),
    "representation": Slot("ffn", "representation", in_dim=8, out_dim=8, expert_hidden=16),
}


def build(name: str, slot: Slot):
    cfg = OmegaConf.load(registry.conf_dir() / "combiner" / f"{name}.yaml")
    params = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "_target_"}
    return registry.combiner_class(name)(slot=slot, **params)


def run(combiner, slot: Slot, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = 32 if slot.kind == "representation" else 6
    x = torch.randn(n, slot.in_dim, generator=g)
    return x, combiner(x)


def cases():
    for name in COMBINERS:
        for slot_name, slot in SLOTS.items():
            if registry.combiner_class(name).incompatibility(slot) is None:
                yield pytest.param(name, slot_name, id=f"{name}-{slot_name}")


@pytest.mark.parametrize("name,slot_name", list(cases()))
def test_combiner_contract(name, slot_name):
    slot = SLOTS[slot_name]
    torch.manual_seed(0)
    combiner = build(name, slot)
    combiner.train()
    x, out = run(combiner, slot)
    if slot.kind == "representation":
        y = out.output if not isinstance(out.output, (list, tuple)) else out.output[0]
        assert y.shape == x.shape
        target_loss = y.pow(2).mean()
    else:
        point = out.output.point()
        assert point.shape == (x.shape[0], slot.out_dim)
        target = torch.randint(0, slot.out_dim, (x.shape[0],)) if slot.family == "categorical" else torch.randn(
            x.shape[0], slot.out_dim)
        nll = out.output.nll(target)
        assert nll.shape == (x.shape[0],)
        target_loss = nll.mean()
    assert out.aux_loss.dim() == 0
    if out.weights is not None:
        w = out.weights
        assert w.shape[0] == x.shape[0] and w.shape[-1] == combiner.num_experts
        assert (w >= 0).all() and (w <= 1 + 1e-6).all()
        assert (w.sum(-1) <= 1 + 1e-5).all()
        if name in DENSE_GATES:
            torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
    (target_loss + out.aux_loss).backward()
    grads = {n: p.grad for n, p in combiner.named_parameters()}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    with_grad = [n for n, g in grads.items() if g is not None and g.abs().sum() > 0]
    assert with_grad, "no parameter received a gradient"
    if out.weights is not None and any("router" in n for n in grads):
        assert any("router" in n for n in with_grad), "the gate received no gradient"
    if any("expert" in n for n in grads):
        assert any("expert" in n for n in with_grad), "the experts received no gradient"


@pytest.mark.parametrize("name,slot_name", list(cases()))
def test_combiner_is_deterministic_under_a_seed(name, slot_name):
    slot = SLOTS[slot_name]
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        combiner = build(name, slot)
        torch.manual_seed(4)
        _, out = run(combiner, slot, seed=5)
        outs.append(out.output if slot.kind == "representation" else out.output.point())
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_every_combiner_serves_some_slot_or_is_task_specific():
    for name in COMBINERS:
        served = [s for s, slot in SLOTS.items() if registry.combiner_class(name).incompatibility(slot) is None]
        external = [Slot("p", "distribution", 3, 2, family=f, num_experts=2, external_experts=True)
                    for f in ("categorical", "gaussian")]
        # Task-specific: the posterior slot of task=mmvae (one Gaussian expert per modality; issue 6).
        external.append(Slot("p", "distribution", 6, 2, family="gaussian", num_experts=2, external_experts=True,
                             extra={"posterior": True, "modality_dims": (3, 3)}))
        served += [s.family for s in external if registry.combiner_class(name).incompatibility(s) is None]
        multi = Slot("b", "representation", 8, 8, expert_hidden=16, num_tasks=2)
        if registry.combiner_class(name).incompatibility(multi) is None:
            served.append("multitask")
        assert served, f"combiner {name} serves none of the standard slots"


@pytest.mark.parametrize("group", ["combiner", "task"])
def test_yamls_and_classes_correspond_one_to_one(group):
    package = {"combiner": ("moecli/combiners", "moecli.combiners"), "task": ("tasks", "tasks")}[group]
    root = Path(__file__).resolve().parents[1]
    modules = sorted(p.stem for p in (root / package[0]).glob("*.py") if p.stem not in ("__init__", "base"))
    yamls = registry.group_options(group)
    helper_modules = [m for m in modules if m not in yamls]
    for m in helper_modules:  # a module without a YAML must not define a plug-in class
        mod = importlib.import_module(f"{package[1]}.{m}")
        base = importlib.import_module("moecli.combiners.base").Combiner if group == "combiner" else \
            importlib.import_module("moecli.task").Task
        plugins = [v for v in vars(mod).values() if isinstance(v, type) and issubclass(v, base) and v is not base
                   and v.__module__ == mod.__name__]
        assert not plugins, f"{m}.py defines {plugins} but conf/{group}/{m}.yaml is missing"
    for name in yamls:
        target = registry.target_of(group, name)
        assert target is not None, f"conf/{group}/{name}.yaml has no _target_"
        assert target.startswith(f"{package[1]}.{name}."), f"conf/{group}/{name}.yaml targets {target}"
        text = (registry.conf_dir() / group / f"{name}.yaml").read_text()
        assert text.startswith("#"), f"conf/{group}/{name}.yaml must start with a comment naming its source"


@pytest.mark.parametrize("group", ["task", "combiner", "trainer", "logger", "experiment"])
def test_every_yaml_composes(group):
    for name in registry.group_options(group):
        overrides = [f"{group}={name}"]
        cfg, choices = compose(overrides)
        assert choices.get(group) == name or group == "experiment"
        assert cfg.trainer._target_


@pytest.mark.parametrize("task", TASKS)
def test_every_task_has_a_trainer_preset(task):
    assert task in registry.group_options("trainer"), f"conf/trainer/{task}.yaml is missing"


@pytest.mark.parametrize("name", COMBINERS)
def test_every_combiner_yaml_instantiates_on_the_vowel_task(name):
    from moecli.run import build as build_run

    cfg, choices = compose(["task=vowel", f"combiner={name}"])
    try:
        task, model, _ = build_run(cfg, choices)
    except ConfigError as err:  # refused: the message must list the compatible combiners
        assert "compatible combiners:" in str(err)
        return
    x, y = task.data["train"]
    out = model(x[:5])
    assert out.output.point().shape == (5, 4)


def test_incompatible_combiner_is_refused_with_the_compatible_list():
    from moecli.run import combiner_factory

    cfg, _ = compose(["combiner=competitive"])
    make = combiner_factory(cfg.combiner, "competitive", "toy")
    with pytest.raises(ConfigError, match="compatible combiners: .*cooperative.*dense"):
        make(SLOTS["representation"])
