"""`fusion-lightning COMMAND [args]`: one way in to every command (`fusion-lightning fit recipe=router_mlp`).

Each command is the module `python -m fusion_lightning.COMMAND` runs; this runs that very command line
(`os.execv`, so the process is the same one `python -m` would start: Lightning's DDP launcher re-runs
it for the other ranks, Hydra sees its own argv, and exit codes and signals are the command's).
"""

from __future__ import annotations

import os
import sys

from fusion_lightning.cache import cache_help

COMMANDS = {  # name -> what it does (the module is fusion_lightning.<name>)
    "fit": "run a recipe end to end: fit, validate and test (fit recipe=NAME [key=value ...])",
    "submit": "run a recipe as a SLURM batch job",
    "embed": "embed a log's queries into the embedding cache",
    "route": "route queries with a router checkpoint (or estimate it off-policy on a request log)",
    "serve": "an OpenAI-compatible server in front of the fused pipeline",
    "collect": "ask backends a set of queries and write a multi-LLM log",
    "evaluate": "one evaluation table: routers, thought level and students on one log",
    "templates": "build or extend a thought-template library",
    "export": "a student checkpoint as a Hugging Face directory",
    "compare": "compare runs (summary.json) side by side",
    "zoo": "the offline models: list, fetch, catalog",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: fusion-lightning COMMAND [args]   (the same as python -m fusion_lightning.COMMAND [args])",
             "", "commands:"]
    lines += [f"  {name.ljust(width)}  {what}" for name, what in COMMANDS.items()]
    lines += ["", "fusion-lightning COMMAND --help: that command's own help", "", cache_help()]
    return "\n".join(lines)


def argv_for(argv: list[str]) -> list[str]:
    """The `python -m` command line a `fusion-lightning` command line stands for."""
    if not argv or argv[0] not in COMMANDS:
        raise ValueError(f"unknown command {argv[0]!r}; choose from: {', '.join(COMMANDS)}" if argv
                         else "give a command")
    return [sys.executable, "-m", f"fusion_lightning.{argv[0]}", *argv[1:]]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    try:
        cmd = argv_for(argv)
    except ValueError as e:
        print(f"error: {e}\n\n{usage()}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)
    return 0  # not reached: execv replaces the process


if __name__ == "__main__":
    raise SystemExit(main())
