"""The config groups are the registry (design §4): `conf/<group>/<name>.yaml` and nothing else lists plug-ins."""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path

GROUPS = ("task", "combiner", "trainer", "logger", "experiment")


def conf_dir() -> Path:
    """The installed config folder (`conf/` in a checkout, `moecli/conf` in a wheel)."""
    return Path(str(resources.files("moecli.conf")))


def group_options(group: str) -> list[str]:
    """Option names of a config group, sorted."""
    folder = conf_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


@cache
def target_of(group: str, name: str) -> str | None:
    """The `_target_` of `conf/<group>/<name>.yaml` (read without composing)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(conf_dir() / group / f"{name}.yaml")
    return cfg.get("_target_")


def combiner_class(name: str):
    from hydra.utils import get_class

    return get_class(target_of("combiner", name))


def compatible_combiners(slot) -> list[str]:
    """Names of the combiners whose class accepts `slot`."""
    return [name for name in group_options("combiner") if combiner_class(name).incompatibility(slot) is None]
