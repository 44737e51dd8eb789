"""`moecli train`: validate the overrides (one clear line per mistake), then run Hydra's app.

Hydra's own error output spans many lines and hints at stack traces; the common mistakes (an unknown group
option, an unknown key, a bad value type, an occupied run folder) are caught here first with one line each.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Hydra flags that consume the next argument.
_VALUE_FLAGS = {"-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn", "--config-name", "-cd",
                "--config-dir", "--experimental-rerun"}
_PASS_THROUGH = {"-h", "--help", "--hydra-help", "--info", "--shell-completion", "--version"}


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate Hydra's flags from the overrides."""
    flags, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in _VALUE_FLAGS and i + 1 < len(argv):
            flags += [arg, argv[i + 1]]
            i += 2
            continue
        (flags if arg.startswith("-") else overrides).append(arg)
        i += 1
    return flags, overrides


def validate(overrides: list[str], multirun: bool) -> str | None:
    """Return a one-line error for the first bad override, or None when the config composes."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from moecli.registry import GROUPS, group_options

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        return f"cannot parse overrides: {str(err).splitlines()[0]}"
    first: list[str] = []
    for override in parsed:
        key = override.get_key_element().lstrip("+~")
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [
            override.get_value_element_as_str()]
        if key in GROUPS:
            options = group_options(key)
            for value in values:
                if value not in options and not (key == "experiment" and value == "null"):
                    return f"{key}={value} is not a known {key}; choose one of: {', '.join(options)}"
        prefix = override.input_line.split("=", 1)[0]
        first.append(f"{prefix}={values[0]}" if override.is_sweep_override() else override.input_line)
    return _compose_error(first, multirun)


def _compose_error(overrides: list[str], multirun: bool) -> str | None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from moecli.registry import conf_dir

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
            if not multirun:
                run_dir = Path(OmegaConf.select(cfg, "hydra.run.dir", default=""))
                occupied = (run_dir / "summary.json").exists() or (run_dir / "checkpoints").exists()
                if occupied and not cfg.trainer.get("resume", False):
                    return (f"hydra.run.dir={run_dir} already holds a run; pass trainer.resume=true to continue "
                            "it, or choose another hydra.run.dir")
    except Exception as err:  # noqa: BLE001 - turned into one line for the user
        return _one_line(err)
    finally:
        GlobalHydra.instance().clear()
    return None


def _one_line(err: Exception) -> str:
    """The informative line of a Hydra/OmegaConf composition error."""
    text = str(err)
    cause = err.__cause__
    full_key = getattr(cause, "full_key", None) or getattr(err, "full_key", None)
    if "not in struct" in text or (cause is not None and "not in struct" in str(cause)):
        if full_key and "." in full_key:
            group = full_key.rsplit(".", 1)[0]
            valid = _keys_of(group)
            return (f"{full_key} is not a key of {group}; valid keys: {', '.join(valid)} "
                    f"(use +{full_key}=… to add a new key)")
        return f"{full_key or text.splitlines()[0]} is not a config key"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if cause is not None and str(cause).strip():
        lines.append(str(cause).splitlines()[0].strip())
    return " — ".join(dict.fromkeys(lines[:2] + lines[-1:]))


def _keys_of(group_path: str) -> list[str]:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from moecli.registry import conf_dir

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            node = OmegaConf.select(compose("config"), group_path)
            return sorted(k for k in node.keys() if k != "_target_") if node is not None else []
    except Exception:  # noqa: BLE001
        return []
    finally:
        GlobalHydra.instance().clear()


def train_command(argv: list[str]) -> int:
    flags, overrides = split_args(argv)
    if not any(f in _PASS_THROUGH for f in flags):
        error = validate(overrides, multirun=("-m" in flags or "--multirun" in flags))
        if error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    from moecli.hydra_app import run_hydra

    return run_hydra(argv)
