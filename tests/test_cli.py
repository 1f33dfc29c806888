"""`fusion-lightning COMMAND`: one way in, the very command line `python -m fusion_lightning.COMMAND` runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from fusion_lightning.cli import COMMANDS, argv_for

pytestmark = pytest.mark.integration  # starts processes or servers (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[1]


def test_every_command_is_a_module_with_a_main() -> None:
    import importlib

    for name in COMMANDS:
        module = importlib.import_module(f"fusion_lightning.{name}" + (".__main__" if name == "zoo" else ""))
        assert callable(module.main), name
    assert argv_for(["fit", "recipe=router_mlp", "trainer.max_epochs=1"]) == [
        sys.executable, "-m", "fusion_lightning.fit", "recipe=router_mlp", "trainer.max_epochs=1"]
    with pytest.raises(ValueError, match="unknown command 'fitt'; choose from: fit, submit"):
        argv_for(["fitt"])


def test_the_console_script_is_declared_and_runs_the_commands() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"fusion-lightning": "fusion_lightning.cli:main"}
    exe = shutil.which("fusion-lightning", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "fusion_lightning.cli"]  # an install older than the script
    out = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and all(f"  {name}" in out.stdout for name in COMMANDS)
    fit_help = subprocess.run([*cmd, "fit", "--help"], capture_output=True, text=True, timeout=120)
    direct = subprocess.run([sys.executable, "-m", "fusion_lightning.fit", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert fit_help.returncode == 0 and fit_help.stdout == direct.stdout and "recipes:" in fit_help.stdout
    bad = subprocess.run([*cmd, "nope"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown command 'nope'" in bad.stderr
