"""Runs inside the sandboxed child process (never imported by the framework; read as text and passed
to `python -I -B -c`). Stdlib only.

argv[1]: JSON config {"limits": {...}, "uid": int | None, "gid": int | None}; stdin: one line, the
nonce printed after the tests pass (so code that exits early with status 0 does not pass).
Sets resource limits, drops to an unprivileged user when asked, installs an audit hook that ends
the process (status 97) on any fork/exec/spawn, socket, foreign (ctypes) call, or write outside the
working directory, then runs solution.py and tests.py in one namespace.
"""

import builtins
import contextlib
import ctypes  # noqa: F401 - loaded before the audit hook: libraries that merely import it (numpy) still work
import json
import os
import resource
import sys
import traceback

if __name__ != "__main__":
    raise ImportError("the sandbox prelude runs only as `python -c` text (see fusion_lightning.scoring.code)")

_cfg = json.loads(sys.argv[1])
_NONCE = [sys.stdin.readline().strip().encode()]
_devnull = os.open(os.devnull, os.O_RDONLY)
os.dup2(_devnull, 0)
sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's stdin for its whole life


def _limit(name, value):
    if value is None or not hasattr(resource, name):
        return
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(getattr(resource, name), (value, value))


_lim = _cfg["limits"]
_limit("RLIMIT_CORE", 0)
_limit("RLIMIT_AS", _lim["memory_bytes"])
_limit("RLIMIT_CPU", _lim["cpu_s"])
_limit("RLIMIT_FSIZE", _lim["file_size_bytes"])
if _cfg["uid"] is not None and os.geteuid() == 0:
    os.setgroups([])
    os.setgid(_cfg["gid"])
    os.setuid(_cfg["uid"])
_limit("RLIMIT_NPROC", _lim["max_processes"])

_HOME = os.path.realpath(os.getcwd())
_realpath, _fspath, _exit, _write, _join = os.path.realpath, os.fspath, os._exit, os.write, os.path.join
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_BLOCKED = ("os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
            "os.kill", "os.killpg", "socket.", "ctypes.", "resource.setrlimit", "resource.prlimit", "pty.spawn",
            "os.startfile", "_posixsubprocess")
_PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.symlink", "os.link",
                "os.truncate", "os.utime", "os.chflags", "os.lchflags", "os.lchmod", "os.lchown", "os.mkfifo",
                "os.mknod", "shutil.rmtree", "shutil.copyfile", "shutil.copytree", "shutil.move", "os.chdir"}


def _deny(what):
    _write(2, f"sandbox: blocked {what}\n".encode(errors="replace"))
    _exit(97)


def _inside(path):
    try:
        p = _fspath(path)
        if isinstance(p, bytes):
            p = p.decode(errors="replace")
        full = _realpath(_join(_HOME, p))
    except Exception:  # noqa: BLE001 - anything odd is outside
        return False
    return full == _HOME or full.startswith(_HOME + "/")


def _hook(event, args):
    if event == "open":
        path, mode, flags = (tuple(args) + (None, None, None))[:3]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS)
        if writing and not isinstance(path, int) and not _inside(path):
            _deny(f"write to {path!r}")
    elif event == "os.chdir" and not (args and isinstance(args[0], (str, bytes, os.PathLike))):
        _deny("os.fchdir")  # relative paths must stay relative to the working directory
    elif event in _PATH_EVENTS:
        for a in args:
            if isinstance(a, (str, bytes, os.PathLike)) and not _inside(a):
                _deny(f"{event} on {a!r}")
    elif event.startswith(_BLOCKED):
        _deny(event)


def _run(nonce):
    with open("solution.py", encoding="utf-8") as fh:
        code = fh.read()
    with open("tests.py", encoding="utf-8") as fh:
        tests = fh.read()
    sys.addaudithook(_hook)
    ns = {"__name__": "__solution__", "__builtins__": builtins}
    try:
        exec(compile(code, "solution.py", "exec"), ns)
        exec(compile(tests, "tests.py", "exec"), ns)
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - SystemExit too: code that exits early has not passed
        traceback.print_exc(limit=5)
        sys.stderr.flush()
        _exit(1)
    _write(1, b"\n" + nonce + b"\n")
    _exit(0)


sys.dont_write_bytecode = True
sys.path.insert(0, _HOME)
_run(_NONCE.pop())  # the nonce lives only in _run's frame from here on
