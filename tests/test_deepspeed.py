"""DeepSpeed presets: the stock strategy's generated config, and ZeRO-2/3 training runs on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate

from fusion_lightning.config import compose_recipe

pytestmark = pytest.mark.integration  # starts processes or servers (tests/conftest.py)

pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed (pip install -e '.[deepspeed]')")

PRESETS = {  # preset -> (stage, optimizer offloaded, parameters offloaded)
    "deepspeed_zero2": (2, False, False),
    "deepspeed_zero3": (3, False, False),
    "deepspeed_zero3_offload": (3, True, True),
}


def _all_values(d):
    for v in d.values():
        if isinstance(v, dict):
            yield from _all_values(v)
        else:
            yield v


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_generates_a_concrete_deepspeed_config(preset: str) -> None:
    cfg = compose_recipe("distill_top_k", [f"strategy={preset}", "datamodule.batch_size=6"])
    strategy = instantiate(cfg.strategy)
    stage, opt_off, param_off = PRESETS[preset]
    config = strategy.config
    assert "auto" not in list(_all_values(config))
    zero = config["zero_optimization"]
    assert zero["stage"] == stage and config["train_micro_batch_size_per_gpu"] == 6
    assert ("offload_optimizer" in zero) == opt_off and ("offload_param" in zero) == param_off
    if opt_off:
        assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert config["zero_allow_untested_optimizer"] is True


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_training_runs_on_cpu(stage: int, tmp_path: Path) -> None:
    script = Path(__file__).with_name("deepspeed_cpu.py")
    r = subprocess.run([sys.executable, str(script), str(stage), str(tmp_path)], capture_output=True, text=True,
                       timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["stage"] == stage and out["steps"] == 6
    assert all(x == x for x in out["losses"]) and out["losses"][-1] < out["losses"][0]


def test_fit_under_zero3_tests_the_best_checkpoint_and_evaluates_the_student(tmp_path: Path) -> None:
    """The fit command under ZeRO-3: validate/test load the best checkpoint (DeepSpeed cannot restore a ZeRO-3
    checkpoint into an engine without an optimizer: fit consolidates it to one file first) and the student
    evaluation saves whole weights (gathered), not ZeRO-3's empty partitions. Both crashed before."""
    script = Path(__file__).with_name("deepspeed_cpu.py")
    r = subprocess.run([sys.executable, str(script), "fit", "3", str(tmp_path)], capture_output=True, text=True,
                       timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    plain, zero = out["plain"], out["zero"]
    # the same seeded training; the tested weights are the best checkpoint's, as without DeepSpeed
    assert zero["test/loss"] == pytest.approx(plain["test/loss"], rel=1e-3)
    assert zero["val/loss"] == pytest.approx(plain["val/loss"], rel=1e-3)
    assert "test/student/perf" in zero and "test/base/perf" in zero
    assert (tmp_path / "zero" / out["zero_artifacts"]["student_eval_md"]).exists()
    assert not list((tmp_path / "zero" / "checkpoints").glob("*.fp32.pt"))  # the consolidated copy is removed
