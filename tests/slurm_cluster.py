"""A real one-node Slurm cluster for the tests, private to one temporary folder.

    with SlurmCluster() as cluster:          # installs slurm-wlm (apt) if missing; needs root
        job = cluster.sbatch("slurm/cpu_smoke.sbatch")
        cluster.wait_for(job, "COMPLETED")

Everything lives under a fresh temp folder: slurm.conf (clients find it through SLURM_CONF, which
`cluster.env` sets), state and spool dirs, logs, and a munged with its own key and socket on ports
that were free, so it neither reads nor clobbers a system Slurm/munge set-up. It starts munged (as
the munge user), slurmctld and slurmd in the foreground as children of this process, waits until
sinfo shows the node idle, and on stop cancels its jobs and terminates only those three processes.

Run it by hand to try the templates: `python tests/slurm_cluster.py` starts the cluster, prints the
`export SLURM_CONF=...` line for another shell, and stops it on Ctrl-C.
"""
from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run here (not root, no apt-get, or the install failed); the message says why."""


def ensure_slurm_installed() -> None:
    """slurmctld, slurmd and munged on PATH, installing Debian's slurm-wlm with apt-get if missing."""
    def present():
        return all(shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
                   for tool in ("slurmctld", "slurmd", "munged", "sbatch", "scontrol"))
    if present():
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("Slurm is not installed and installing it needs root "
                               "(as root: apt-get install -y slurm-wlm)")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("Slurm is not installed and there is no apt-get (not Debian/Ubuntu)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "slurm-wlm"]
    result = subprocess.run(install, capture_output=True, text=True, env=env)
    if result.returncode != 0:  # stale package lists: refresh once and retry
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, env=env)
        result = subprocess.run(install, capture_output=True, text=True, env=env)
    if result.returncode != 0 or not present():
        raise SlurmUnavailable(f"apt-get install -y slurm-wlm failed (exit {result.returncode}): "
                               f"{(result.stderr or result.stdout)[-800:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_fields(text: str) -> Dict[str, str]:
    """scontrol show's Key=Value pairs (values without spaces; enough for the keys the tests read)."""
    return dict(re.findall(r"(\w+)=(\S*)", text))


class SlurmCluster:
    def __init__(self, root: Optional[Path] = None, cpus: Optional[int] = None, kill_wait_s: int = 10,
                 keep: bool = False):
        # Not under pytest's tmp_path: that is 0700 root, and munged runs as the munge user.
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="dihn-slurm-"))
        self.remove_root = root is None and not keep and os.environ.get("DIHN_KEEP_SLURM") != "1"
        self.cpus = cpus or os.cpu_count() or 1
        self.kill_wait_s = kill_wait_s
        self.node = socket.gethostname()
        self.processes: List[subprocess.Popen] = []
        self.conf = self.root / "etc" / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- set-up -------------------------------------------------------------------------------------

    def _path(self, *parts: str, owner: Optional[str] = None, mode: int = 0o755) -> Path:
        path = self.root.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(mode)
        if owner:
            entry = pwd.getpwnam(owner)
            os.chown(path, entry.pw_uid, entry.pw_gid)
        return path

    def _start_munged(self) -> None:
        try:
            munge = pwd.getpwnam("munge")
        except KeyError as error:
            raise SlurmUnavailable("there is no munge user (the munge package creates it)") from error
        # mkdtemp makes the root 0700: munged (as munge) must be able to reach its folder under it.
        self.root.chmod(0o755)
        folder = self._path("munge", owner="munge", mode=0o700)
        key = folder / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chown(key, munge.pw_uid, munge.pw_gid)
        key.chmod(0o400)
        self.munge_socket = folder / "munge.socket"
        command = ["munged", "--foreground", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                   f"--pid-file={folder / 'munged.pid'}", f"--log-file={folder / 'munged.log'}",
                   f"--seed-file={folder / 'munged.seed'}"]
        # As the munge user (munged refuses root); the child is munged itself, so stop() signals exactly it.
        as_munge = dict(user=munge.pw_uid, group=munge.pw_gid, extra_groups=[]) if os.geteuid() == 0 else {}
        self._spawn(command, self.root / "munged.out", **as_munge)
        self._wait(lambda: self.munge_socket.exists(), 20, "munged did not create its socket",
                   self.root / "munged.out", folder / "munged.log")

    def _write_conf(self) -> None:
        self._path("etc")
        state, spool, logs = self._path("state"), self._path("spool"), self._path("log")
        # Settings that work on a single unprivileged-container host: no cgroups, root runs the daemons.
        self.conf.write_text(f"""\
ClusterName=dihntest
SlurmctldHost={self.node}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={state}
SlurmdSpoolDir={spool}/%n
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
SlurmctldLogFile={logs}/slurmctld.log
SlurmdLogFile={logs}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
JobRequeue=1
KillWait={self.kill_wait_s}
MinJobAge=600
SchedulerType=sched/backfill
NodeName={self.node} CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, command: List[str], output: Path, **options) -> subprocess.Popen:
        with open(output, "ab") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                       start_new_session=True, **options)
        self.processes.append(process)
        return process

    def _wait(self, condition, timeout_s: float, message: str, *logs: Path) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if condition():
                return
            dead = [p for p in self.processes if p.poll() is not None]
            if dead:
                break
            time.sleep(0.2)
        detail = "".join(f"\n--- {log} ---\n{log.read_text()[-2000:]}" for log in logs if log.exists())
        raise RuntimeError(f"{message} (after {timeout_s:.0f} s){detail}")

    def start(self) -> "SlurmCluster":
        ensure_slurm_installed()
        try:
            self._start_munged()
            self._write_conf()
            logs = self.root / "log"
            self._spawn(["slurmctld", "-D", "-f", str(self.conf)], logs / "slurmctld.out")
            self._spawn(["slurmd", "-D", "-f", str(self.conf)], logs / "slurmd.out")
            self._wait(self.node_idle, 60, f"node {self.node} did not become idle in sinfo",
                       logs / "slurmctld.out", logs / "slurmctld.log", logs / "slurmd.out", logs / "slurmd.log")
        except BaseException:
            self.stop()
            raise
        return self

    def node_idle(self) -> bool:
        result = self.run(["sinfo", "--noheader", "--nodes", self.node, "--format", "%T"], check=False)
        return result.returncode == 0 and result.stdout.strip() == "idle"

    # -- use ----------------------------------------------------------------------------------------

    def run(self, command: List[str], check: bool = True, env: Optional[dict] = None, timeout: float = 60):
        result = subprocess.run(command, capture_output=True, text=True, env={**self.env, **(env or {})},
                                timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed (exit {result.returncode}): {result.stderr.strip()}")
        return result

    def sbatch(self, *args: str, env: Optional[dict] = None) -> str:
        """Submit; returns the job id."""
        out = self.run(["sbatch", "--parsable", *args], env=env).stdout.strip()
        return out.split(";")[0]

    def job(self, job_id: str) -> Dict[str, str]:
        """scontrol show job's fields (JobState, Restarts, Reason, ExitCode, StdOut, ...); {} once purged."""
        result = self.run(["scontrol", "show", "job", job_id], check=False)
        return parse_fields(result.stdout) if result.returncode == 0 else {}

    def wait_for(self, job_id: str, predicate, timeout_s: float, what: str, poll_s: float = 0.5) -> Dict[str, str]:
        """Poll the job until predicate(fields) holds; a clear error with the job's state if it never does."""
        deadline = time.time() + timeout_s
        fields: Dict[str, str] = {}
        while time.time() < deadline:
            fields = self.job(job_id)
            if predicate(fields):
                return fields
            time.sleep(poll_s)
        raise TimeoutError(f"job {job_id}: not {what} after {timeout_s:.0f} s; last state "
                           f"{fields.get('JobState')!r}, reason {fields.get('Reason')!r}, "
                           f"restarts {fields.get('Restarts')!r}, exit {fields.get('ExitCode')!r}")

    def wait_done(self, job_id: str, timeout_s: float) -> Dict[str, str]:
        finished = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                    "DEADLINE", "PREEMPTED"}
        return self.wait_for(job_id, lambda f: f.get("JobState") in finished, timeout_s, "finished")

    # -- tear-down ----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Cancel this cluster's jobs, then terminate the daemons this object started (and nothing else)."""
        alive = [p for p in self.processes if p.poll() is None]
        if len(alive) == len(self.processes) and len(alive) == 3:
            try:
                self.run(["scancel", "--full", "--state", "RUNNING"], check=False, timeout=20)
                self.run(["scancel", "--state", "PENDING"], check=False, timeout=20)
                deadline = time.time() + self.kill_wait_s + 20
                while time.time() < deadline:
                    queue = self.run(["squeue", "--noheader", "--format", "%i"], check=False, timeout=20)
                    if queue.returncode != 0 or not queue.stdout.strip():
                        break
                    time.sleep(0.5)
            except (subprocess.SubprocessError, OSError):
                pass
        for process in reversed(self.processes):  # slurmd, slurmctld, then munged
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=5)
        self.processes = []
        if self.remove_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    # SIGTERM too (and SIGINT even where a background start ignores it): stop the daemons on the way out.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    with SlurmCluster(keep=True) as cluster:
        print(f"Slurm is up in {cluster.root}; in another shell:\n  export SLURM_CONF={cluster.conf}\n"
              f"Ctrl-C stops it.", flush=True)
        try:
            while all(p.poll() is None for p in cluster.processes):
                time.sleep(1)
            print("a daemon exited; see the logs under", cluster.root / "log")
        except KeyboardInterrupt:
            pass
