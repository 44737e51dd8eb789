"""The wheel carries the configs as moecli/conf (no top-level `conf` package) and every Python package."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_package():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for base in ("moecli", "tasks")
             for p in (ROOT / base).rglob("__init__.py")}
    assert found | {"moecli.conf"} == listed


def test_wheel_ships_configs_inside_moecli(tmp_path):
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    (wheel,) = tmp_path.glob("moecli-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "moecli/conf/config.yaml" in names
    yamls = {p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml")}
    assert yamls <= {n[len("moecli/conf/"):] for n in names if n.startswith("moecli/conf/")}
    assert not any(n.startswith("conf/") for n in names)
    assert "tasks/vowel.py" in names and "moecli/cli.py" in names
