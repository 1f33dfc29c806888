"""`python -m fusion_lightning.submit recipe=NAME [slurm.KEY=VALUE ...] [overrides]`: run a recipe as a SLURM batch job.

Renders one of the templates in `slurm/` (a layout header of `#SBATCH` lines + the shared body
`slurm/job.sh`) with the chosen resources and calls `sbatch`; `slurm.dry_run=true` prints the script and
the command instead. The job's settings are the `slurm.` keys (recipes/submit.yaml: nodes, gpus_per_node,
template, time, ...); every other `key=value` is an override of the recipe, composed first, so a typo fails
here, not in the queue. `-m` turns Hydra sweep overrides (`seed=1,2,3 model.lr=0.1,0.01`) into an array
job whose task i runs the i-th combination. For example:

    python -m fusion_lightning.submit recipe=distill_top_k slurm.template=deepspeed slurm.nodes=2 \\
        slurm.gpus_per_node=8 slurm.time=12:00:00 trainer.max_epochs=3

The old `--nodes 2 --gpus-per-node 8 --dry-run` spelling still works for one release (a note says the new one).
"""

from __future__ import annotations

import itertools
import re
import shlex
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser

from fusion_lightning.config import (
    ConfigError,
    compose_command,
    compose_recipe,
    config_root,
    help_requested,
    legacy_flags,
    primary_config,
)

TEMPLATES = ("ddp", "deepspeed", "cpu")
# set by the template from the allocation; giving them as overrides would contradict the #SBATCH lines
RESERVED = ("run_dir", "trainer.devices", "trainer.num_nodes", "trainer.accelerator", "+cluster", "cluster")
PREFIX = "slurm"  # `slurm.KEY=VALUE` is the job's (recipes/submit.yaml); no recipe has a top-level `slurm` key
COUNTS = ("nodes", "gpus_per_node", "ntasks_per_node", "cpus_per_task")
# the argparse flags of the previous release -> their keys
FLAGS = {f"--{k.replace('_', '-')}": f"{PREFIX}.{k}" for k in (
    "template", *COUNTS, "mem", "time", "partition", "account", "qos", "job_name", "array", "wait", "dry_run")}
FLAGS["--sbatch-arg"] = f"{PREFIX}.sbatch_args"


class SubmitError(ValueError):
    """A bad submit request, as one line."""


def slurm_dir() -> Path:
    return config_root() / "slurm"


def expand_sweep(overrides: list[str]) -> tuple[list[str], list[list[str]]]:
    """Split overrides into fixed ones and the cartesian product of Hydra sweep overrides (`k=a,b`, `range`)."""
    fixed, axes = [], []
    for text, ov in zip(overrides, OverridesParser.create().parse_overrides(overrides), strict=True):
        if ov.is_sweep_override():
            key = ov.get_key_element()
            axes.append([f"{key}={v}" for v in ov.sweep_string_iterator()])
        else:
            fixed.append(text)
    return fixed, [list(c) for c in itertools.product(*axes)] if axes else []


def _parse_header(text: str) -> tuple[list[str], dict[str, str | None]]:
    """Template lines and its `#SBATCH --key[=value]` directives (order kept)."""
    directives: dict[str, str | None] = {}
    for line in text.splitlines():
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if m:
            directives[m.group(1)] = m.group(2)
    return text.splitlines(), directives


def render(template: str, options: dict[str, str | None], sweep: list[list[str]]) -> str:
    """The complete batch script: the template's header with `options` replacing or adding directives,
    the sweep table, then the shared body."""
    if template not in TEMPLATES:
        raise SubmitError(f"unknown template {template!r}; choose from: {', '.join(TEMPLATES)}")
    header = (slurm_dir() / f"{template}.sbatch").read_text()
    lines, directives = _parse_header(header)
    merged = {**directives, **options}
    out, done = [], set()
    for line in lines:
        m = re.match(r"#SBATCH\s+--([\w-]+)", line)
        if m:
            out.append(_directive(m.group(1), merged[m.group(1)]))
            done.add(m.group(1))
        elif line.startswith("SWEEP=(") and sweep:
            table = " ".join(shlex.quote(" ".join(shlex.quote(o) for o in combo)) for combo in sweep)
            out.append(f"SWEEP=({table})")
        else:
            out.append(line)
    extra = [_directive(k, v) for k, v in options.items() if k not in done]
    last = max(i for i, line in enumerate(out) if line.startswith("#SBATCH"))
    out[last + 1:last + 1] = extra
    return "\n".join(out) + "\n\n" + (slurm_dir() / "job.sh").read_text()


def _directive(key: str, value: str | None) -> str:
    return f"#SBATCH --{key}" if value is None else f"#SBATCH --{key}={value}"


def parse(argv: list[str] | tuple[str, ...]) -> tuple[bool, list[str], dict[str, Any]]:
    """(-m given, the recipe's arguments, the job's settings: recipes/submit.yaml's `slurm` node with the
    `slurm.` arguments) for a submit command line; the old flags are translated first."""
    try:
        args = legacy_flags(argv, FLAGS, switches=("--wait", "--dry-run"), lists=("--sbatch-arg",),
                            keep=("-m", "--multirun"), hint=f"sbatch options go through {PREFIX}.sbatch_args=[--exclusive]")
    except ConfigError as e:
        raise SubmitError(str(e)) from None
    multirun = any(a in ("-m", "--multirun") for a in args)
    mine = [a for a in args if a.split("=", 1)[0].lstrip("+~").split(".", 1)[0] == PREFIX]
    rest = [a for a in args if a not in ("-m", "--multirun") and a not in mine]
    try:
        job = compose_command("submit", mine)[PREFIX]
    except ConfigError as e:  # `+slurm.KEY=` adds nothing the job reads: no such advice
        raise SubmitError(re.sub(r" \(use \+[\w.]+=\.\.\. to add a new key\)", "", str(e))) from None
    if not isinstance(job, dict) or set(job) - set(primary_config("submit")[PREFIX]):
        raise SubmitError(f"{' '.join(mine)}: the slurm keys are {', '.join(primary_config('submit')[PREFIX])}")
    for key in COUNTS:
        if job[key] is not None and (not isinstance(job[key], int) or isinstance(job[key], bool) or job[key] < 1):
            raise SubmitError(f"{PREFIX}.{key}={job[key]}: a whole number ≥ 1")
    for key in ("wait", "dry_run"):
        if not isinstance(job[key], bool):
            raise SubmitError(f"{PREFIX}.{key}={job[key]}: true or false")
    if not isinstance(job["sbatch_args"], list):
        job["sbatch_args"] = [job["sbatch_args"]]
    return multirun, rest, job


def build(argv: list[str] | tuple[str, ...]) -> tuple[str, list[str], Path]:
    """(script text, sbatch argv after the script path, the recipe's log folder) for a submit command line."""
    return assemble(*parse(argv))


def assemble(multirun: bool, rest: list[str], job: dict[str, Any]) -> tuple[str, list[str], Path]:
    """`build` from a parsed command line (`parse`)."""
    recipes = [a.split("=", 1)[1] for a in rest if a.startswith("recipe=")]
    overrides = [a for a in rest if not a.startswith("recipe=")]
    if len(recipes) != 1:
        raise SubmitError("give exactly one recipe=NAME")
    recipe = recipes[0]
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("~")
        if key in RESERVED:
            raise SubmitError(f"{o!r}: {key} is set by the template from the allocation (use {PREFIX}.nodes / "
                              f"{PREFIX}.gpus_per_node / {PREFIX}.ntasks_per_node / {PREFIX}.template)")
    fixed, sweep = expand_sweep(overrides) if multirun else (overrides, [])
    if multirun and not sweep:
        raise SubmitError("-m given but no sweep override (like seed=1,2,3)")
    for combo in sweep or [[]]:  # every task's config must compose before anything is queued
        try:
            cfg = compose_recipe(recipe, [*fixed, *combo, "+cluster=slurm"])
        except ConfigError as e:
            raise SubmitError(f"{' '.join(combo) or 'config'}: {e}") from None

    gpus, tasks_given = job["gpus_per_node"], job["ntasks_per_node"]
    template = job["template"] or ("cpu" if not gpus else "deepspeed" if (job["nodes"] or 1) > 1 else "ddp")
    if template == "deepspeed" and str(cfg.model.get("_target_", "")).endswith((".EncoderModule", ".LayerProbe")) \
            and not any(o.startswith("strategy=") for o in fixed):
        fixed = [*fixed, "strategy=ddp"]  # recipe=embed / layer_probe predict: DDP across the nodes, no sharded optimizer
    if template == "cpu" and gpus:
        raise SubmitError(f"{PREFIX}.gpus_per_node with {PREFIX}.template=cpu: pick ddp or deepspeed for GPUs")
    options: dict[str, str | None] = {}
    for key in ("nodes", "cpus_per_task", "mem", "time", "partition", "account", "qos", "job_name"):
        if job[key] is not None:
            options[key.replace("_", "-")] = str(job[key])
    if gpus is not None:
        options["gpus-per-node"] = str(gpus)
    tasks = tasks_given or gpus
    if tasks is not None:
        options["ntasks-per-node"] = str(tasks)
    if gpus and tasks_given and tasks_given != gpus:
        raise SubmitError(f"{PREFIX}.ntasks_per_node={tasks_given} != {PREFIX}.gpus_per_node={gpus}: "
                          "Lightning runs one task per GPU (trainer.devices)")
    array = None if job["array"] is None else str(job["array"])
    if sweep:
        throttle = array or ""
        if throttle and not throttle.startswith("%"):
            raise SubmitError(f"{PREFIX}.array={throttle} with -m: the sweep sets the indices; only a throttle like %4")
        options["array"] = f"0-{len(sweep) - 1}{throttle}"
    elif array:
        options["array"] = array
    runs_root = Path(str(cfg.get("runs_root") or "checkpoints/runs"))
    log_dir = runs_root / recipe
    pattern = "slurm-%A_%a" if "array" in options else "slurm-%j"
    options["output"] = str(log_dir / f"{pattern}.out")
    options["error"] = str(log_dir / f"{pattern}.err")
    script = render(template, options, sweep)
    extra = [*map(str, job["sbatch_args"]), *(["--wait"] if job["wait"] else []), "--parsable"]
    return script, [*extra, "\0SCRIPT", f"recipe={recipe}", *fixed], log_dir


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if (code := help_requested(argv, __doc__, "submit")) is not None:
        return code
    try:
        multirun, rest, job = parse(argv)
        script, sbatch_args, log_dir = assemble(multirun, rest, job)
    except (SubmitError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    def command(path: Path | str) -> list[str]:
        return ["sbatch", *[str(path) if a == "\0SCRIPT" else a for a in sbatch_args]]

    if job["dry_run"]:
        print(script)
        print("# " + shlex.join(command("<script>")))
        return 0
    if shutil.which("sbatch") is None:  # before writing anything
        print(f"error: sbatch not found on PATH (run on a SLURM login node, or use {PREFIX}.dry_run=true)",
              file=sys.stderr)
        return 2
    log_dir.mkdir(parents=True, exist_ok=True)  # sbatch opens --output before the job starts
    path = log_dir / f"submit-{datetime.now():%Y-%m-%d_%H-%M-%S-%f}.sbatch"
    path.write_text(script)
    cmd = command(path)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    job = proc.stdout.strip().split(";")[0]
    if job:
        print(f"submitted job {job}; script {path}; logs {log_dir}/slurm-{job}*.out; run dir "
              f"{log_dir}/slurm-{job}[_<task>]")
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
