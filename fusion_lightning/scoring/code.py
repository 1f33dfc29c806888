"""`code_eval` (pass@1): run a response's code against the gold tests in a sandboxed child process.

Layers of the sandbox (each run gets all that the machine allows; `sandbox_report()` says which):

- a separate interpreter, `sys.executable -I -B` (isolated: no env vars, no user site, no .pyc),
  in its own session / process group, with a minimal environment and a fresh temporary working
  directory that is deleted afterwards; stdin is /dev/null;
- a wall-clock timeout (the whole process group is SIGKILLed) and resource limits: RLIMIT_CPU,
  RLIMIT_AS (memory), RLIMIT_FSIZE (stdout/stderr go to size-limited files), RLIMIT_NPROC, no core;
- no network: a new network namespace (`unshare --net`, plus `--pid --fork --kill-child`, so every
  process the code may leave behind dies with it) where the OS allows it, and always an audit
  hook that ends the process on socket creation;
- the audit hook also ends the process (score 0, even if the code catches errors) on fork / exec /
  spawn / subprocess / os.system / kill, on any use of ctypes (imported before the hook, so
  libraries that merely import it, like numpy, still load), on raising resource limits, and on any
  write, delete, rename, mkdir or chdir outside the working directory;
- when run as root and the interpreter's files are world-readable, the child drops to the
  `nobody` user before running the code (then RLIMIT_NPROC binds and the file system protects
  itself). Root is exempt from RLIMIT_NPROC, so without the drop the fork guard is the audit hook.

A pass needs exit status 0 AND a per-run nonce printed after the last test, so `sys.exit(0)` or
`os._exit(0)` in the response does not pass. The audit hook guards against mistakes and casual
escapes, not a determined adversary (e.g. one that patches the interpreter's own modules): run
untrusted code at scale in a container as well.
"""

from __future__ import annotations

import ast
import json
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from fusion_lightning.scoring.text import gold_aliases

_PRELUDE = (Path(__file__).with_name("_sandbox_prelude.py")).read_text(encoding="utf-8")
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_NOBODY = 65534


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock for the whole run
    cpu_s: int = 10
    memory_mb: int = 1024
    file_size_mb: int = 16  # any file the code writes, its stdout and stderr included
    max_processes: int = 64  # RLIMIT_NPROC (binds only for an unprivileged user)
    python: str = sys.executable


@dataclass
class SandboxResult:
    passed: bool
    returncode: int | None
    timed_out: bool
    stdout: str
    stderr: str


def extract_code(response: str) -> str:
    """The last ```python fenced block, else the last fenced block of any language, else the whole text."""
    text = response or ""
    blocks = _FENCE.findall(text)
    py = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
    if py:
        return py[-1]
    if blocks:
        return blocks[-1][1]
    return text


def _entry_point(code: str) -> str | None:
    """The top-level function no other top-level function calls (the solution, not a helper)."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    funcs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    used = {n.id for f in funcs for n in ast.walk(f) if isinstance(n, ast.Name) and n.id != f.name}
    free = [f.name for f in funcs if f.name not in used]
    return free[0] if free else (funcs[-1].name if funcs else None)


def build_tests(ground_truth, code: str = "", entry_point: str | None = None) -> str:
    """Test source from the gold: a list of asserts (or its Python/JSON string), or a test program.

    A HumanEval-style program that defines `check(candidate)` without calling it gets
    `check(<entry point>)` appended: `entry_point`, else the response's top-level function that no
    other top-level function calls.
    """
    items = gold_aliases(ground_truth)
    tests = "\n".join(items)
    if re.search(r"^def check\(", tests, re.M) and not re.search(r"^check\(", tests, re.M):
        entry = entry_point or _entry_point(code)
        if entry:
            tests += f"\n\ncheck({entry})\n"
    return tests


def _world_accessible(path: Path) -> bool:
    """Whether an unprivileged user can reach (and read) `path`."""
    try:
        if not path.stat().st_mode & stat.S_IROTH:
            return False
        return all(p.stat().st_mode & stat.S_IXOTH for p in path.resolve().parents)
    except OSError:
        return False


@lru_cache(maxsize=8)
def _drop_to(python: str) -> tuple[int, int] | None:
    """(uid, gid) to run as: `nobody` when we are root and it can read the interpreter; else None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    exe = Path(python).resolve()
    stdlib = Path(sysconfig.get_paths()["stdlib"]) if python == sys.executable else exe.parent.parent / "lib"
    if not (_world_accessible(exe) and _world_accessible(stdlib)):
        return None
    try:
        import pwd

        pw = pwd.getpwnam("nobody")
        return pw.pw_uid, pw.pw_gid
    except (ImportError, KeyError):
        return _NOBODY, _NOBODY


@lru_cache(maxsize=1)
def _namespace_prefix() -> tuple[str, ...]:
    """The `unshare` command line that works here (network + pid namespaces, else network only), or ()."""
    exe = shutil.which("unshare")
    if not exe:
        return ()
    for prefix in ((exe, "--net", "--pid", "--fork", "--kill-child"), (exe, "--net"),
                   (exe, "--map-root-user", "--net")):
        try:
            ok = subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
        if ok:
            return prefix
    return ()


def sandbox_report(limits: SandboxLimits | None = None) -> dict:
    """What isolation runs get on this machine (for logs and reports)."""
    limits = limits or SandboxLimits()
    prefix = _namespace_prefix()
    return {"network_namespace": "--net" in prefix, "pid_namespace": "--pid" in prefix,
            "drops_to_uid": (_drop_to(limits.python) or (None,))[0], "audit_hook": True, **asdict(limits)}


def run_program(code: str, tests: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `code` then `tests` (one namespace) in the sandbox; passed iff both ran to the end."""
    limits = limits or SandboxLimits()
    drop = _drop_to(limits.python)
    nonce = secrets.token_hex(16)
    config = {"uid": drop[0] if drop else None, "gid": drop[1] if drop else None, "limits": {
        "cpu_s": max(1, int(limits.cpu_s)), "memory_bytes": int(limits.memory_mb) << 20,
        "file_size_bytes": int(limits.file_size_mb) << 20, "max_processes": int(limits.max_processes)}}
    work = Path(tempfile.mkdtemp(prefix="fl_code_eval_"))
    try:
        (work / "solution.py").write_text(code, encoding="utf-8", errors="replace")
        (work / "tests.py").write_text(tests, encoding="utf-8", errors="replace")
        if drop:
            os.chown(work, *drop)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
               "PYTHONIOENCODING": "utf-8"}
        argv = [*_namespace_prefix(), limits.python, "-I", "-B", "-c", _PRELUDE, json.dumps(config)]
        with open(work / ".stdout", "w+b") as out, open(work / ".stderr", "w+b") as err:
            proc = subprocess.Popen(argv, cwd=work, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                    start_new_session=True)
            timed_out = False
            try:
                proc.stdin.write(nonce.encode() + b"\n")
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the group we started; its leader is not reaped yet
                except OSError:
                    proc.kill()
                proc.wait()
            stdout, stderr = _tail(out), _tail(err)
        passed = not timed_out and proc.returncode == 0 and stdout.rstrip().endswith(nonce)
        return SandboxResult(passed, proc.returncode, timed_out, stdout.replace(nonce, "").rstrip(), stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _tail(fh, limit: int = 8192) -> str:
    fh.seek(0, os.SEEK_END)
    fh.seek(max(0, fh.tell() - limit))
    return fh.read().decode("utf-8", errors="replace")


def code_eval(response: str, ground_truth, *, limits: SandboxLimits | None = None,
              entry_point: str | None = None) -> float:
    """pass@1: 1.0 iff the response's code (see `extract_code`) passes every gold test in the sandbox."""
    tests = build_tests(ground_truth, extract_code(response), entry_point)
    if not tests.strip():
        return 0.0
    try:
        return float(run_program(extract_code(response), tests, limits).passed)
    except OSError:  # could not even start the child (no temp space, fork failed): not a pass
        return 0.0
