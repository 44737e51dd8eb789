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


def compatibility_matrix() -> dict[str, dict[str, str | None]]:
    """{task: {combiner: None if it serves every slot of the task's default config, else the reason}}."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    matrix: dict[str, dict[str, str | None]] = {}
    for task_name in group_options("task"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            task = instantiate(compose("config", overrides=[f"task={task_name}"]).task)
        GlobalHydra.instance().clear()
        task.setup(0)
        slots = task.slots()
        matrix[task_name] = {}
        for name in group_options("combiner"):
            reasons = [r for r in (combiner_class(name).incompatibility(s) for s in slots) if r]
            matrix[task_name][name] = reasons[0] if reasons else None
    return matrix


def print_matrix() -> None:
    from rich.console import Console
    from rich.table import Table

    matrix = compatibility_matrix()
    tasks = list(matrix)
    table = Table(title="combiner x task (✓: serves every slot of the task)", title_justify="left")
    table.add_column("combiner")
    for task in tasks:
        table.add_column(task, justify="center")
    for name in group_options("combiner"):
        table.add_row(name, *("[green]✓" if matrix[t][name] is None else "[dim]·" for t in tasks))
    Console().print(table)
