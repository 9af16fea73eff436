"""A one-node SLURM cluster (Debian's slurm-wlm and munge) in a temporary folder, inside a
loopback-only network namespace, for trying hydra/launcher=slurm and for the tests.

    python -m devtools.slurm start DIR     (from scripts/) prints how to enter the cluster
    python -m devtools.slurm stop DIR

The SLURM daemons listen on every interface and have no setting to change that, so they run
in a network namespace of their own that has only `lo` (held open by a `sleep` process); every
command that talks to them (sbatch, squeue, a sweep) runs there too: `Cluster.command()`
prefixes `nsenter --net=...`. Needs root (namespaces, SlurmUser=root). Everything lives in
DIR: slurm.conf, munge key and socket, state, spool, logs and `cluster.json` (process ids).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

STATE_FILE = "cluster.json"
NODE = "node1"
PARTITION = "debug"


class ClusterError(RuntimeError):
    """The cluster could not be started; the message says what to do."""


@dataclass(frozen=True)
class Cluster:
    """A running cluster: its folder, its namespace holder and daemons' process ids."""

    dir: str
    holder_pid: int
    pids: dict[str, int]

    @property
    def conf(self) -> str:
        """Path of slurm.conf, for SLURM_CONF."""
        return str(Path(self.dir) / "slurm.conf")

    @property
    def netns(self) -> str:
        """The network namespace every SLURM command must run in."""
        return f"/proc/{self.holder_pid}/ns/net"

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run inside the cluster's network namespace."""
        return ["nsenter", f"--net={self.netns}", "--", *argv]

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of a command that uses the cluster (SLURM_CONF set)."""
        return {**(os.environ if base is None else base), "SLURM_CONF": self.conf}

    def run(self, argv: list[str], check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a SLURM command (squeue, scontrol...) in the cluster; its output as text."""
        return subprocess.run(self.command(argv), env=self.env(), capture_output=True,
                              text=True, check=check, timeout=timeout)


def _need(tool: str) -> str:
    found = shutil.which(tool) or (f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists()
                                   else None)
    if found is None:
        raise ClusterError(f"{tool} not found; install SLURM: apt-get install -y slurm-wlm munge"
                           " (./dev.sh setup does)")
    return found


def slurm_conf(folder: Path, cpus: int, memory_mb: int) -> str:
    """slurm.conf of a one-node cluster whose every file is under `folder`."""
    return f"""\
ClusterName=fashion
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={folder}/munge.socket
CredType=cred/munge
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=2048
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
JobAcctGatherParams=OverMemoryKill
MailProg=/bin/true
ReturnToService=2
# Seconds from SIGTERM to SIGKILL (SLURM's default): time for a job on a busy node to end
# its run and leave its checkpoint.
KillWait=30
MinJobAge=300
SchedulerParameters=sched_interval=1
NodeName={NODE} NodeAddr=127.0.0.1 NodeHostname={socket.gethostname()} CPUs={cpus} \
RealMemory={memory_mb} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""


def _spawn(holder: int, argv: list[str], log: Path) -> int:
    """Start a daemon in the foreground inside the namespace; returns its process id."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(["nsenter", f"--net=/proc/{holder}/ns/net", "--", *argv],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    return proc.pid


def _namespace() -> int:
    """A process holding a new network namespace with only `lo`, up, with 127.0.0.1 and
    127.0.0.2 (without a second address slurmctld cannot resolve its own host)."""
    holder = subprocess.Popen(["unshare", "-n", "--", "sleep", "infinity"],
                              stdin=subprocess.DEVNULL, start_new_session=True)
    time.sleep(0.2)
    for argv in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", "127.0.0.2/32",
                                                     "dev", "lo"]):
        done = subprocess.run(["nsenter", f"--net=/proc/{holder.pid}/ns/net", "--", *argv],
                              capture_output=True, text=True)
        if done.returncode != 0:
            _kill(holder.pid)
            raise ClusterError(f"network namespace set-up failed ({' '.join(argv)}): "
                               f"{done.stderr.strip()} (root is needed)")
    return holder.pid


def start(folder: Path, cpus: int | None = None, memory_mb: int = 8192,
          timeout: float = 30) -> Cluster:
    """Start munged, slurmctld and slurmd for a one-node cluster in `folder`; returns once
    the node is idle and takes jobs."""
    folder = folder.resolve()
    tools = {name: _need(name) for name in ("munged", "slurmctld", "slurmd", "sinfo")}
    for sub in ("state", "spool"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    (folder / "slurm.conf").write_text(slurm_conf(folder, cpus or os.cpu_count() or 1,
                                                  memory_mb))
    holder = _namespace()
    conf = str(folder / "slurm.conf")
    pids = {"munged": _spawn(holder, [tools["munged"], "-F", "--force",
                                      f"--key-file={key}", f"--socket={folder}/munge.socket",
                                      f"--pid-file={folder}/munged.pid",
                                      f"--seed-file={folder}/munged.seed",
                                      f"--log-file={folder}/munged.log"],
                             folder / "munged.out")}
    cluster = Cluster(str(folder), holder, pids)
    try:
        _wait(lambda: (folder / "munge.socket").exists(), 10, "munged", folder / "munged.log")
        pids["slurmctld"] = _spawn(holder, [tools["slurmctld"], "-D", "-i", "-f", conf],
                                   folder / "slurmctld.out")
        pids["slurmd"] = _spawn(holder, [tools["slurmd"], "-D", "-N", NODE, "-f", conf],
                                folder / "slurmd.out")
        _wait(lambda: cluster.run(["sinfo", "-h", "-N", "-o", "%T"], check=False,
                                  timeout=10).stdout.strip() == "idle",
              timeout, "the SLURM node", folder / "slurmctld.log")
    except BaseException:
        stop_cluster(cluster)
        raise
    (folder / STATE_FILE).write_text(json.dumps(asdict(cluster), indent=2))
    return cluster


def _wait(ready: object, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():  # type: ignore[operator]
            return
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
    raise ClusterError(f"{what} did not start in {timeout:.0f} s; log {log}:\n{tail}")


def _kill(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM a process (its session), SIGKILL after `timeout`; returns once it is gone."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return
            time.sleep(0.1)


def stop_cluster(cluster: Cluster) -> None:
    """Stop the daemons and the namespace holder by their process ids (jobs still running
    are killed by slurmd as it stops)."""
    for name in ("slurmd", "slurmctld", "munged"):
        if name in cluster.pids:
            _kill(cluster.pids[name])
    _kill(cluster.holder_pid, timeout=2)


def load(folder: Path) -> Cluster | None:
    """The cluster recorded in a folder, if one was started there."""
    state = folder.resolve() / STATE_FILE
    return Cluster(**json.loads(state.read_text())) if state.is_file() else None


def stop(folder: Path) -> bool:
    """Stop the cluster of a folder; False if none was started there."""
    cluster = load(folder)
    if cluster is None:
        return False
    stop_cluster(cluster)
    (folder.resolve() / STATE_FILE).unlink(missing_ok=True)
    return True


def main() -> None:
    """python -m devtools.slurm start|stop DIR"""
    if len(sys.argv) != 3 or sys.argv[1] not in ("start", "stop"):
        sys.exit("usage: python -m devtools.slurm start|stop DIR")
    folder = Path(sys.argv[2])
    if sys.argv[1] == "stop":
        sys.exit(0 if stop(folder) else f"no cluster recorded in {folder}")
    try:
        cluster = start(folder)
    except ClusterError as err:
        sys.exit(f"slurm: {err}")
    print(f"SLURM is up; run commands in it with:\n  SLURM_CONF={cluster.conf} "
          f"nsenter --net={cluster.netns} -- sinfo")


if __name__ == "__main__":
    main()
