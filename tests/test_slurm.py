"""SLURM: template rendering (submit slurm.dry_run=true; the old --flags too), and jobs on a REAL one-node SLURM (tests/slurm_cluster.py):
`sbatch --test-only` per template, a router submitted with `sbatch --wait`, 2-task CPU DDP via `srun`,
and SIGUSR1 preemption -> requeue -> resume with the same metrics as an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from fusion_lightning.config import compose_recipe
from fusion_lightning.submit import SubmitError, build, expand_sweep, main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_cluster import SlurmCluster, slurm_cluster_fixture  # noqa: E402,F401 - registers the fixture

pytestmark = pytest.mark.integration  # starts processes or servers (tests/conftest.py)

# the tiny router every cluster job runs: 300 queries, hashing encoder, one batch per epoch
TINY = ["data.synthetic.n_queries=300", "data.synthetic.models=6", "datamodule.encoder=hashing",
        "datamodule.batch_size=512", "trainer.max_epochs=10", "callbacks.early_stopping.patience=100",
        "logger=none", "callbacks.progress_bar.refresh_rate=0"]


def _directives(script: str) -> dict[str, str | None]:
    return {m.group(1): m.group(2) for m in re.finditer(r"^#SBATCH --([\w-]+)(?:=(\S+))?$", script, re.M)}


@pytest.mark.parametrize(("argv", "expect"), [
    (["slurm.template=ddp", "slurm.gpus_per_node=4"], {"nodes": "1", "ntasks-per-node": "4", "gpus-per-node": "4"}),
    (["slurm.nodes=2", "slurm.gpus_per_node=8"], {"nodes": "2", "ntasks-per-node": "8", "gpus-per-node": "8"}),
    (["slurm.template=cpu", "slurm.ntasks_per_node=2", "slurm.cpus_per_task=1"],
     {"nodes": "1", "ntasks-per-node": "2", "cpus-per-task": "1"}),
])
def test_templates_render_consistent_counts_and_requeue_directives(argv: list[str], expect: dict) -> None:
    script, sbatch_args, log_dir = build(["recipe=router_mlp", *argv, "slurm.time=00:20:00", "slurm.partition=p1",
                                          "trainer.max_epochs=2"])
    d = _directives(script)
    assert {k: d[k] for k in expect} == expect
    assert d["signal"] == "SIGUSR1@90" and "requeue" in d and d["open-mode"] == "append"
    assert d["time"] == "00:20:00" and d["partition"] == "p1"
    assert d["output"] == f"{log_dir}/slurm-%j.out" and d["error"] == f"{log_dir}/slurm-%j.err"
    assert "gpus-per-node" not in d if "slurm.template=cpu" in argv else True
    # the body passes node/task counts from the allocation and the SLURM preset to fit
    assert 'trainer.num_nodes="$NODES" trainer.devices="$TASKS_PER_NODE"' in script and "+cluster=slurm" in script
    assert 'RUN_DIR="$RUNS_ROOT/$RECIPE/slurm-$JOB_TAG"' in script and "WANDB_RUN_GROUP" in script
    assert sbatch_args[-2:] == ["recipe=router_mlp", "trainer.max_epochs=2"]


def test_sweep_becomes_array_job_with_one_combination_per_task() -> None:
    fixed, combos = expand_sweep(["seed=1,2", "model.lr=0.1,0.01", "trainer.max_epochs=3"])
    assert fixed == ["trainer.max_epochs=3"]
    assert combos == [["seed=1", "model.lr=0.1"], ["seed=1", "model.lr=0.01"],
                      ["seed=2", "model.lr=0.1"], ["seed=2", "model.lr=0.01"]]
    script, _, log_dir = build(["-m", "recipe=router_mlp", "seed=1,2", "model.lr=0.1,0.01", "slurm.array=%2"])
    d = _directives(script)
    assert d["array"] == "0-3%2" and d["output"] == f"{log_dir}/slurm-%A_%a.out"
    assert "SWEEP=('seed=1 model.lr=0.1' 'seed=1 model.lr=0.01' 'seed=2 model.lr=0.1' 'seed=2 model.lr=0.01')" in script


@pytest.mark.parametrize(("argv", "message"), [
    (["recipe=router_mlp", "trainer.devices=4"], "set by the template"),
    (["recipe=router_mlp", "run_dir=/x"], "set by the template"),
    (["recipe=nope"], "unknown recipe 'nope'"),
    (["recipe=router_mlp", "trainer.max_epoch=3"], "unknown config key 'trainer.max_epoch'"),
    (["recipe=router_mlp", "slurm.template=cpu", "slurm.gpus_per_node=2"],
     "slurm.gpus_per_node with slurm.template=cpu"),
    (["recipe=router_mlp", "slurm.gpus_per_node=2", "slurm.ntasks_per_node=4"], "one task per GPU"),
    (["-m", "recipe=router_mlp", "seed=1,2", "slurm.array=0-5"], "only a throttle"),
    (["recipe=router_mlp", "--exclusive"], "slurm.sbatch_args"),
    (["recipe=router_mlp", "slurm.node=2"], "unknown config key 'slurm.node'; valid keys under 'slurm': account,"),
    (["recipe=router_mlp", "slurm.nodes=two"], "slurm.nodes=two: a whole number"),
    (["recipe=router_mlp", "slurm.template=gpu"], "unknown template 'gpu'; choose from: ddp, deepspeed, cpu"),
])
def test_bad_submit_requests_are_one_line_errors(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SubmitError, match=re.escape(message)):
        build(argv)
    assert main([*argv, "slurm.dry_run=true"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1  # one line


DRY_RUN = ["recipe=embed", "slurm.nodes=2", "slurm.gpus_per_node=8", "slurm.template=ddp", "slurm.time=02:00:00",
           "slurm.sbatch_args=[--exclusive]", "slurm.wait=true", "slurm.dry_run=true", "data=llmrouter"]


def test_dry_run_prints_the_script_with_the_slurm_settings(capsys) -> None:
    """`slurm.*` is the job: it fills the #SBATCH lines and the sbatch command, and none of it reaches fit."""
    assert main(DRY_RUN) == 0
    out = capsys.readouterr().out
    d = _directives(out)
    assert {k: d[k] for k in ("job-name", "nodes", "gpus-per-node", "ntasks-per-node", "time")} == \
        {"job-name": "fusion-ddp", "nodes": "2", "gpus-per-node": "8", "ntasks-per-node": "8", "time": "02:00:00"}
    assert out.rstrip().splitlines()[-1] == "# sbatch --exclusive --wait --parsable '<script>' recipe=embed data=llmrouter"
    assert "slurm." not in out.replace("slurm/job.sh", "")


def test_old_flags_give_the_same_job_and_a_note_with_the_new_spelling(capsys) -> None:
    old = ["recipe=embed", "--nodes", "2", "--gpus-per-node=8", "--template", "ddp", "--time", "02:00:00",
           "--sbatch-arg=--exclusive", "--wait", "--dry-run", "data=llmrouter"]
    assert main(DRY_RUN) == 0
    new_out = capsys.readouterr()
    assert main(old) == 0
    old_out = capsys.readouterr()
    assert old_out.out == new_out.out and new_out.err == ""
    assert old_out.err == ("note: --nodes 2 --gpus-per-node=8 --template ddp --time 02:00:00 --sbatch-arg=--exclusive "
                           "--wait --dry-run is now slurm.nodes=2 slurm.gpus_per_node=8 slurm.template=ddp "
                           "slurm.time=02:00:00 'slurm.sbatch_args=[--exclusive]' slurm.wait=true slurm.dry_run=true "
                           "(the --flag spelling goes in the next release)\n")
    assert build(["-m", "recipe=router_mlp", "seed=1,2", "--array", "%2"]) == \
        build(["-m", "recipe=router_mlp", "seed=1,2", "slurm.array=%2"])


def test_help_prints_the_job_keys(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("`python -m fusion_lightning.submit recipe=NAME") and "\nslurm:\n  template: null" in out


def test_the_slurm_prefix_is_no_config_key_of_fit() -> None:
    """`slurm.KEY` arguments are submit's: no recipe, group option or the SLURM preset may have a top-level `slurm`."""
    from fusion_lightning.config import recipes_dir

    assert "slurm" not in compose_recipe("router_mlp", ["+cluster=slurm"])
    tops = {p for p in recipes_dir().rglob("*.yaml") if p.name != "submit.yaml"
            and "slurm" in (yaml.safe_load(p.read_text()) or {})}
    assert not tops


def test_slurm_preset_adds_lightning_slurm_environment_and_requeue_callback() -> None:
    cfg = compose_recipe("router_mlp", ["+cluster=slurm"])
    (plugin,) = cfg.trainer.plugins
    assert plugin._target_.endswith("SLURMEnvironment") and plugin.auto_requeue is True
    assert cfg.callbacks.slurm_requeue._target_ == "fusion_lightning.callbacks.slurm.SLURMRequeue"
    assert cfg.callbacks.resume_state  # RNG state goes into the hpc checkpoint too (Lightning saves none)


# ---------------------------------------------------------------- real SLURM


def _job_env(cluster: SlurmCluster, tmp: Path) -> dict[str, str]:
    return {**cluster.env, "FL_PYTHON": sys.executable, "FUSION_LIGHTNING_CACHE": str(tmp / "cache"),
            "PATH": f"{Path(sys.executable).parent}:{cluster.env['PATH']}", "PYTHONUNBUFFERED": "1"}


def _submit(cluster: SlurmCluster, tmp: Path, *argv: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fusion_lightning.submit", "recipe=router_mlp", "slurm.template=cpu",
           "slurm.cpus_per_task=2", "slurm.time=00:10:00", f"runs_root={tmp / 'runs'}", *TINY, *argv]
    return subprocess.run(cmd, cwd=tmp, env=_job_env(cluster, tmp), capture_output=True, text=True, timeout=300)


def _job_id(out: subprocess.CompletedProcess) -> str:
    m = re.search(r"submitted job (\d+)", out.stdout)
    assert m, f"rc {out.returncode}\n{out.stdout}\n{out.stderr}"
    return m.group(1)


@pytest.mark.parametrize("argv", [
    ["slurm.template=ddp", "slurm.gpus_per_node=2", "slurm.cpus_per_task=1"],
    ["slurm.template=deepspeed", "slurm.nodes=1", "slurm.gpus_per_node=2", "slurm.cpus_per_task=1"],
    ["slurm.template=cpu", "slurm.ntasks_per_node=2", "slurm.cpus_per_task=1"],
])
def test_each_template_passes_sbatch_test_only(slurm_cluster: SlurmCluster, tmp_path: Path, argv: list[str]) -> None:
    script, sbatch_args, _ = build(["recipe=router_mlp", *argv, "slurm.time=00:05:00"])
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    out = slurm_cluster.run("sbatch", "--test-only", str(path), *sbatch_args[-1:], check=False, cwd=tmp_path)
    assert out.returncode == 0 and "to start at" in out.stderr, out.stderr


@pytest.fixture(scope="module")
def reference_run(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny router submitted through `fusion_lightning.submit slurm.wait=true` (the uninterrupted run)."""
    tmp = tmp_path_factory.mktemp("ref")
    out = _submit(slurm_cluster, tmp, "slurm.wait=true")
    job = _job_id(out)
    run = tmp / "runs" / "router_mlp" / f"slurm-{job}"
    log = run.with_name(f"slurm-{job}.out")
    assert out.returncode == 0, f"{out.stderr}\n{log.read_text() if log.exists() else ''}"
    return {"job": job, "run": run, "log": log, "summary": json.loads((run / "summary.json").read_text())}


def test_router_submitted_with_sbatch_wait_writes_summary(reference_run: dict, slurm_cluster: SlurmCluster) -> None:
    s = reference_run["summary"]
    assert s["recipe"] == "router_mlp" and s["seed"] == 42 and s["data"]["queries"] == 300
    m = s["metrics"]
    assert 0.0 <= m["test/perf"] <= m["test/oracle/perf"] + 1e-9 and m["test/oracle/perf"] > m["test/random/perf"]
    cfg = yaml.safe_load((reference_run["run"] / "config.yaml").read_text())
    assert cfg["trainer"]["num_nodes"] == 1 and cfg["trainer"]["devices"] == 1
    assert cfg["trainer"]["max_epochs"] == 10 and cfg["datamodule"]["encoder"] == "hashing"
    log = reference_run["log"].read_text()
    assert f"job {reference_run['job']} restart 0" in log and "run dir: " in log
    info = slurm_cluster.job(reference_run["job"])
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0"


def test_two_task_cpu_ddp_via_srun(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    cmd = ["srun", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=00:10:00",
           sys.executable, "-m", "fusion_lightning.fit", "recipe=router_mlp", *TINY, "trainer.max_epochs=1",
           "+cluster=slurm", "trainer.accelerator=cpu", "trainer.devices=2", "strategy=ddp", f"run_dir={run}"]
    out = slurm_cluster.run(*cmd, cwd=tmp_path, env=_job_env(slurm_cluster, tmp_path), timeout=240)
    text = out.stdout + out.stderr
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in text and "GLOBAL_RANK: 1, MEMBER: 2/2" in text, text[-3000:]
    s = json.loads((run / "summary.json").read_text())
    assert s["data"]["queries"] == 300 and "test/perf" in s["metrics"]


def test_embed_recipe_submitted_as_two_ddp_tasks_covers_every_text_once(slurm_cluster: SlurmCluster,
                                                                        tmp_path: Path) -> None:
    """`submit recipe=embed` as users send it: sbatch, two CPU tasks under SLURMEnvironment, DDP; the two
    ranks' shards hold every unique query exactly once, and both ranks' progress lines reach its .out file."""
    out_dir = tmp_path / "emb"
    cmd = [sys.executable, "-m", "fusion_lightning.submit", "recipe=embed", "slurm.template=cpu",
           "slurm.ntasks_per_node=2", "slurm.cpus_per_task=1", "slurm.time=00:10:00", "slurm.wait=true",
           f"runs_root={tmp_path / 'runs'}", "data.synthetic.n_queries=300", "encoder=hashing",
           "datamodule.shard_size=64", f"out={out_dir}", "progress_interval=0.01"]
    out = subprocess.run(cmd, cwd=tmp_path, env=_job_env(slurm_cluster, tmp_path), capture_output=True, text=True,
                         timeout=300)
    job = _job_id(out)
    run = tmp_path / "runs" / "embed" / f"slurm-{job}"
    log = run.with_name(f"slurm-{job}.out")
    text = (log.read_text() + log.with_suffix(".err").read_text()) if log.exists() else ""
    assert out.returncode == 0, f"{out.stderr[-2000:]}\n{text[-3000:]}"
    e = json.loads((run / "summary.json").read_text())["embed"]
    assert e["world_size"] == 2 and e["embedded"] == e["planned"] == e["unique"] and e["shards_written"] == e["shards"]
    keys = [k for f in sorted((out_dir / e["encoder"]).glob("shard-*.npz")) for k in np.load(f)["keys"]]
    assert len(keys) == len(set(keys)) == e["unique"]
    for rank in (0, 1):
        assert re.search(rf"\[embed\] rank {rank}: [\d,]+/[\d,]+ texts", log.read_text()), text[-3000:]
    assert slurm_cluster.job(job)["JobState"] == "COMPLETED"


def test_preempted_job_requeues_resumes_and_matches_uninterrupted_run(
        reference_run: dict, slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job = _job_id(_submit(slurm_cluster, tmp_path))
    run = tmp_path / "runs" / "router_mlp" / f"slurm-{job}"
    log = run.with_name(f"slurm-{job}.out")
    end = time.monotonic() + 150
    while not (run / "checkpoints" / "last.ckpt").exists():  # at least one epoch done, handlers installed
        assert time.monotonic() < end and slurm_cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), \
            f"{slurm_cluster.job(job)}\n{log.read_text() if log.exists() else ''}"
        time.sleep(0.2)
    slurm_cluster.run("scancel", "--signal=USR1", job)
    info = slurm_cluster.wait_state(job, {"PENDING", "REQUEUED", "REQUEUE_HOLD", "COMPLETED", "FAILED"}, 120)
    assert info["JobState"] != "COMPLETED" or int(info["Restarts"]) >= 1, \
        f"finished without requeue: {info}\n{log.read_text()}"
    slurm_cluster.wait_state(job, {"PENDING"}, 60)
    slurm_cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")  # skip the requeue hold
    info = slurm_cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 180)
    text = log.read_text() + log.with_suffix(".err").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{text}"
    assert f"job {job} restart 0" in text and f"job {job} restart 1" in text
    assert "Handling auto-requeue signal" in text and (run / "hpc_ckpt_1.ckpt").exists(), text[-3000:]
    assert "interrupted by SIGUSR1 (SLURM requeue)" in text and "SLURM requeued the job" in text, text[-3000:]
    restored = re.search(r"Restored all states from the checkpoint at (\S+)", text)
    assert restored and restored.group(1).endswith("hpc_ckpt_1.ckpt"), text[-3000:]
    got = json.loads((run / "summary.json").read_text())["metrics"]
    ref = reference_run["summary"]["metrics"]
    assert set(got) == set(ref)
    assert got == pytest.approx(ref, rel=1e-6, abs=1e-9)


def test_multirun_through_hydra_submitit_launcher(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """`fit -m ... hydra/launcher=submitit_slurm`: Hydra's own SLURM launcher runs one job per combination,
    each writes its run dir under the sweep dir, and the sweep summary covers both."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "fusion_lightning.fit", "-m", "recipe=router_mlp", *TINY, "trainer.max_epochs=2",
           "seed=1,2", "hydra/launcher=submitit_slurm", "hydra.launcher.timeout_min=10",
           "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", f"hydra.sweep.dir={sweep}"]
    out = subprocess.run(cmd, cwd=tmp_path, env=_job_env(slurm_cluster, tmp_path), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    summaries = sorted(sweep.glob("*/summary.json"))
    assert [p.parent.name for p in summaries] == ["0", "1"], out.stderr[-3000:]
    assert [json.loads(p.read_text())["seed"] for p in summaries] == [1, 2]
    record = json.loads((sweep / "sweep.json").read_text())  # the jobs' callbacks ran inside the SLURM jobs
    assert [(j["num"], j["status"]) for j in record["jobs"]] == [(0, "completed"), (1, "completed")]
    assert len(record["finished_runs"]) == 2 and (sweep / "comparison" / "comparison.md").is_file()
    logs = list((sweep / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2  # one SLURM job each (submitit's own logs)


def test_slurm_tests_do_not_leave_jobs(slurm_cluster: SlurmCluster) -> None:
    assert os.environ.get("SLURM_CONF") is None  # the cluster's config never leaks into the test process
    assert slurm_cluster.run("squeue", "-h").stdout.strip() == ""
