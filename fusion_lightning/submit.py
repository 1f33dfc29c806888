"""`python -m fusion_lightning.submit recipe=NAME [options] [overrides]`: run a recipe as a SLURM batch job.

Renders one of the templates in `slurm/` (a layout header of `#SBATCH` lines + the shared body
`slurm/job.sh`) with the chosen resources and calls `sbatch`; `--dry-run` prints the script and the
command instead. The recipe and overrides are composed first, so a typo fails here, not in the queue.
`-m` turns Hydra sweep overrides (`seed=1,2,3 model.lr=0.1,0.01`) into an array job whose task i runs
the i-th combination.
"""

from __future__ import annotations

import argparse
import itertools
import re
import shlex
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser

from fusion_lightning.config import ConfigError, compose_recipe, config_root

TEMPLATES = ("ddp", "deepspeed", "cpu")
# set by the template from the allocation; giving them as overrides would contradict the #SBATCH lines
RESERVED = ("run_dir", "trainer.devices", "trainer.num_nodes", "trainer.accelerator", "+cluster", "cluster")


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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fusion_lightning.submit",
        allow_abbrev=False,  # `--dry` must not pass for --dry-run here while main() (exact flag) submits
        description="Render a SLURM template for a recipe and submit it with sbatch.",
        epilog="example: python -m fusion_lightning.submit recipe=distill_top_k --template deepspeed "
               "--nodes 2 --gpus-per-node 8 --time 12:00:00 trainer.max_epochs=3")
    p.add_argument("--template", default=None, choices=TEMPLATES,
                   help="layout: ddp (one node, multi-GPU), deepspeed (multi-node), cpu (debugging); "
                        "default: cpu without --gpus-per-node, deepspeed with --nodes > 1, else ddp")
    p.add_argument("--nodes", type=int)
    p.add_argument("--gpus-per-node", type=int)
    p.add_argument("--ntasks-per-node", type=int, help="default: --gpus-per-node (one task per GPU)")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--mem")
    p.add_argument("--time")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--job-name")
    p.add_argument("--array", help="SLURM array spec; with -m only a throttle like %%4 may be given")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="extra sbatch option, e.g. --sbatch-arg=--exclusive (repeatable)")
    p.add_argument("-m", "--multirun", action="store_true",
                   help="sweep: overrides like seed=1,2,3 become an array job, one task per combination")
    p.add_argument("--wait", action="store_true", help="sbatch --wait: return when the job ends, with its exit code")
    p.add_argument("--dry-run", action="store_true", help="print the script and the sbatch command; submit nothing")
    return p


def build(argv: list[str]) -> tuple[str, list[str], Path]:
    """(script text, sbatch argv after the script path, the recipe's log folder) for a submit command line."""
    args, rest = _parser().parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("-")]
    if unknown:
        raise SubmitError(f"unknown option {unknown[0]!r} (sbatch options go through --sbatch-arg=...)")
    recipes = [a.split("=", 1)[1] for a in rest if a.startswith("recipe=")]
    overrides = [a for a in rest if not a.startswith("recipe=")]
    if len(recipes) != 1:
        raise SubmitError("give exactly one recipe=NAME")
    recipe = recipes[0]
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("~")
        if key in RESERVED:
            raise SubmitError(f"{o!r}: {key} is set by the template from the allocation "
                              "(use --nodes / --gpus-per-node / --ntasks-per-node / --template)")
    fixed, sweep = expand_sweep(overrides) if args.multirun else (overrides, [])
    if args.multirun and not sweep:
        raise SubmitError("-m given but no sweep override (like seed=1,2,3)")
    for combo in sweep or [[]]:  # every task's config must compose before anything is queued
        try:
            cfg = compose_recipe(recipe, [*fixed, *combo, "+cluster=slurm"])
        except ConfigError as e:
            raise SubmitError(f"{' '.join(combo) or 'config'}: {e}") from None

    template = args.template or ("cpu" if not args.gpus_per_node else
                                 "deepspeed" if (args.nodes or 1) > 1 else "ddp")
    if template == "deepspeed" and str(cfg.model.get("_target_", "")).endswith((".EncoderModule", ".LayerProbe")) \
            and not any(o.startswith("strategy=") for o in fixed):
        fixed = [*fixed, "strategy=ddp"]  # recipe=embed / layer_probe predict: DDP across the nodes, no sharded optimizer
    if template == "cpu" and args.gpus_per_node:
        raise SubmitError("--gpus-per-node with --template cpu: pick ddp or deepspeed for GPUs")
    options: dict[str, str | None] = {}
    for key in ("nodes", "cpus_per_task", "mem", "time", "partition", "account", "qos", "job_name"):
        if getattr(args, key) is not None:
            options[key.replace("_", "-")] = str(getattr(args, key))
    if args.gpus_per_node is not None:
        options["gpus-per-node"] = str(args.gpus_per_node)
    tasks = args.ntasks_per_node or args.gpus_per_node
    if tasks is not None:
        options["ntasks-per-node"] = str(tasks)
    if args.gpus_per_node and args.ntasks_per_node and args.ntasks_per_node != args.gpus_per_node:
        raise SubmitError(f"--ntasks-per-node {args.ntasks_per_node} != --gpus-per-node {args.gpus_per_node}: "
                          "Lightning runs one task per GPU (trainer.devices)")
    if sweep:
        throttle = args.array or ""
        if throttle and not throttle.startswith("%"):
            raise SubmitError(f"--array {throttle!r} with -m: the sweep sets the indices; only a throttle like %4")
        options["array"] = f"0-{len(sweep) - 1}{throttle}"
    elif args.array:
        options["array"] = args.array
    runs_root = Path(str(cfg.get("runs_root") or "checkpoints/runs"))
    log_dir = runs_root / recipe
    pattern = "slurm-%A_%a" if "array" in options else "slurm-%j"
    options["output"] = str(log_dir / f"{pattern}.out")
    options["error"] = str(log_dir / f"{pattern}.err")
    script = render(template, options, sweep)
    extra = [*args.sbatch_arg, *(["--wait"] if args.wait else []), "--parsable"]
    return script, [*extra, "\0SCRIPT", f"recipe={recipe}", *fixed], log_dir


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _parser().print_help()
        return 0 if argv else 2
    try:
        script, sbatch_args, log_dir = build(argv)
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    def command(path: Path | str) -> list[str]:
        return ["sbatch", *[str(path) if a == "\0SCRIPT" else a for a in sbatch_args]]

    if "--dry-run" in argv:  # exact: the parser takes no abbreviations
        print(script)
        print("# " + shlex.join(command("<script>")))
        return 0
    if shutil.which("sbatch") is None:  # before writing anything
        print("error: sbatch not found on PATH (run on a SLURM login node, or use --dry-run)", file=sys.stderr)
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
