"""A real one-node SLURM cluster on localhost for tests: munged, slurmctld and slurmd from Debian's packages.

Everything (munge key and socket, slurm.conf, state, spool, logs) lives in a temp dir; the daemons run in
the foreground as children of the test process, so they are stopped by PID at the end, also on failure.
`start_cluster` raises `SlurmUnavailable` with the reason when the packages are missing or a daemon does not
come up; the pytest fixture turns that into a visible skip.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo")
INSTALL_HINT = ("apt-get install slurmctld slurmd slurm-client munge (as root; .ci/run does it with "
                "DEBIAN_FRONTEND=noninteractive)")


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed or started here; the message says why."""


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster (SLURM_CONF set); raise with its output on failure."""
        env = {**self.env, **kw.pop("env", {})}
        out = subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=timeout, **kw)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} -> rc {out.returncode}\nstdout: {out.stdout}\nstderr: {out.stderr}"
                               f"\n{self.logs()}")
        return out

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, BatchFlag, ...)."""
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(tok.split("=", 1) for tok in text.split() if "=" in tok)

    def wait_state(self, job_id: str, states: set[str], timeout: float = 120) -> dict[str, str]:
        end = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > end:
                raise TimeoutError(f"job {job_id} not in {states} after {timeout}s: {info}\n{self.logs()}")
            time.sleep(0.5)

    def logs(self, tail: int = 30) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            p = self.root / "log" / name
            if p.exists():
                lines = p.read_text(errors="replace").splitlines()[-tail:]
                parts.append(f"--- {name} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel leftover jobs, then stop every daemon this cluster started, by PID (TERM, then KILL)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--user", str(os.getuid())], env=self.env,
                           capture_output=True, timeout=20, check=False)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_conf(root: Path, user: str, cpus: int, memory_mb: int, gpus: int) -> str:
    ctld, slurmd = _free_port(), _free_port()
    return f"""\
ClusterName=fltest
SlurmctldHost=localhost
SlurmUser={user}
SlurmdUser={user}
SlurmctldPort={ctld}
SlurmdPort={slurmd}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/slurmd-%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=5
MinJobAge=600
SchedulerParameters=sched_interval=2
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} Gres=gpu:{gpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def start_cluster(root: Path, cpus: int = 2, memory_mb: int = 4000, gpus: int = 8,
                  timeout: float = 60) -> SlurmCluster:
    """Write the config, start munged, slurmctld and slurmd, and wait until the node is idle.

    The node declares `gpus` count-only GPU gres (no device files) so that GPU templates can be checked
    with `sbatch --test-only`; nothing here runs on a GPU.
    """
    missing = [b for b in BINARIES if shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None]
    if missing:
        raise SlurmUnavailable(f"SLURM/munge not installed (missing {', '.join(missing)}); {INSTALL_HINT}")
    if os.geteuid() != 0:
        raise SlurmUnavailable("the test cluster's slurmd must run as root (job steps switch user)")
    for d in ("munge", "state", "spool", "run", "log"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "munge", 0o700)
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, user, cpus, memory_mb, gpus))
    for i in range(gpus):  # stand-in device files: gres/gpu wants one file per GPU
        (root / "dev" / f"fakegpu{i}").parent.mkdir(exist_ok=True)
        (root / "dev" / f"fakegpu{i}").touch()
    (root / "gres.conf").write_text(f"AutoDetect=off\nNodeName=localhost Name=gpu File={root}/dev/fakegpu[0-{gpus - 1}]\n")
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}
    for var in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
        env.pop(var)  # a test run inside a SLURM job must not leak that job's settings into ours
    cluster = SlurmCluster(root=root, conf=conf, env=env)
    key = root / "munge" / "munge.key"

    def daemon(name: str, *cmd: str) -> None:
        log = open(root / "log" / f"{name}.stdout", "w")  # noqa: SIM115 - the daemon owns it for its lifetime
        cluster.procs[name] = subprocess.Popen(list(cmd), env=env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True)

    try:
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True,
                       env=env, timeout=30)
        daemon("munged", "munged", "--foreground", "--force", f"--socket={root}/munge/munge.socket",
               f"--key-file={key}", f"--pid-file={root}/run/munged.pid", f"--log-file={root}/log/munged.log",
               f"--seed-file={root}/munge/munged.seed")
        _wait(lambda: (root / "munge" / "munge.socket").exists(), 15, "munged socket", cluster)
        daemon("slurmctld", "slurmctld", "-D", "-i", "-f", str(conf))
        daemon("slurmd", "slurmd", "-D", "-N", "localhost", "-f", str(conf))

        def node_idle() -> bool:
            for name, proc in cluster.procs.items():
                if proc.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited with {proc.returncode}\n{cluster.logs()}")
            out = subprocess.run(["sinfo", "-h", "-n", "localhost", "-o", "%T"], env=env, capture_output=True,
                                 text=True, timeout=10)
            return out.returncode == 0 and out.stdout.strip() == "idle"

        _wait(node_idle, timeout, "node localhost idle", cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait(cond, timeout: float, what: str, cluster: SlurmCluster) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise SlurmUnavailable(f"timed out after {timeout}s waiting for {what}\n{cluster.logs()}")
        time.sleep(0.3)


@pytest.fixture(scope="session", name="slurm_cluster")
def slurm_cluster_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A running one-node cluster for the whole session; skips (with the reason) where SLURM is unavailable."""
    # short path: munge's unix socket path must fit in sockaddr_un (108 bytes)
    root = Path(os.environ.get("FUSION_LIGHTNING_SLURM_ROOT") or tmp_path_factory.mktemp("slurm", numbered=True))
    try:
        cluster = start_cluster(root)
    except SlurmUnavailable as e:
        pytest.skip(f"real SLURM unavailable: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()
