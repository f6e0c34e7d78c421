"""A real one-node Slurm for the tests: munged, slurmctld and slurmd started in a temporary folder.

`SlurmCluster(folder).start()` writes a key and a slurm.conf for this host (free ports, its own
state and spool folders; jobs of the URGENT partition preempt those of the default one, which
requeues them after PREEMPT_GRACE_S), starts the three daemons in the foreground as children of
this process, and waits until `sinfo` shows the node idle. `stop()` cancels every job, waits for them to end and
stops exactly those three daemons, by PID. `env` is os.environ plus SLURM_CONF for commands.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from datetime import datetime, timedelta
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
START_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 60.0
REQUEUE_DELAY = timedelta(seconds=5)  # see release_requeued
NODE_CPUS = 8  # more than the machine has (config_overrides): small test jobs may run side by side
URGENT = "urgent"  # a partition whose jobs preempt (requeue) those of the default one, as on shared clusters
PREEMPT_GRACE_S = 30  # SIGTERM, then this long before Slurm requeues a preempted job


def unavailable_reason() -> str | None:
    """Why a Slurm cannot be started here, or None."""
    if os.geteuid() != 0:
        return "the Slurm tests start munged/slurmctld/slurmd as root; not root here"
    missing = [name for name in (*DAEMONS, "mungekey", "sbatch", "srun", "sinfo") if shutil.which(name) is None]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing): run ./launch/setup --with-slurm"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.conf = self.folder / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_config(self) -> None:
        f, host = self.folder, socket.gethostname()
        for sub in ("state", "spool"):
            (f / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text("\n".join([
            "ClusterName=cifartest", f"SlurmctldHost={host}", "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", f"AuthInfo=socket={f / 'munge.socket'}", "CredType=cred/munge",
            f"StateSaveLocation={f / 'state'}", f"SlurmdSpoolDir={f / 'spool'}",
            f"SlurmctldPidFile={f / 'slurmctld.pid'}", f"SlurmdPidFile={f / 'slurmd.pid'}",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            f"SlurmctldLogFile={f / 'slurmctld.log'}", f"SlurmdLogFile={f / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "ReturnToService=2",
            "SchedulerType=sched/backfill", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "JobRequeue=1", "MpiDefault=none", "KillWait=30",
            "MinJobAge=2",
            "PreemptType=preempt/partition_prio", "PreemptMode=REQUEUE",
            f"NodeName={host} CPUs={NODE_CPUS} RealMemory=16000 State=UNKNOWN",
            f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 "
            f"PreemptMode=REQUEUE GraceTime={PREEMPT_GRACE_S}",
            f"PartitionName={URGENT} Nodes={host} MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF", ""]))

    def _spawn(self, name: str, command: list[str]) -> None:
        log = open(self.folder / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        log.close()

    def start(self) -> "SlurmCluster":
        f = self.folder
        self._write_config()
        key = f / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}", "--bits=1024"], check=True, capture_output=True)
        key.chmod(0o400)
        self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={f / 'munge.socket'}",
                               f"--key-file={key}", f"--pid-file={f / 'munged.pid'}",
                               f"--seed-file={f / 'munged.seed'}", f"--log-file={f / 'munged.log'}"])
        self._wait(lambda: (f / "munge.socket").exists(), "munged's socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        self._wait(lambda: self.run("sinfo", "-h", "-o", "%T").stdout.strip() == "idle", "the node to be idle")
        return self

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            dead = [name for name, proc in self.procs.items() if proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "".join((self.folder / f"{name}.out").read_text()[-1500:] for name in self.procs)
                raise RuntimeError(f"Slurm did not start (waiting for {what}; exited: {dead}):\n{logs}")
            time.sleep(0.3)

    def run(self, *command: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(list(command), capture_output=True, text=True, env=self.env, timeout=120, check=check)

    def jobs(self) -> list[str]:
        """Ids of the jobs Slurm still knows (pending, running or completing)."""
        return self.run("squeue", "-h", "-o", "%i").stdout.split()

    def release_requeued(self) -> None:
        """Start requeued jobs sooner: Slurm holds a requeued job about two minutes (reason BeginTime),
        which would only make the tests slow. Not at once: slurmd refuses to launch a job again with
        a credential issued within a second or so of revoking the previous one ("Job credential
        revoked", and the job fails)."""
        now = datetime.now()
        for line in self.run("squeue", "-h", "-t", "PENDING", "-o", "%i %S %r").stdout.splitlines():
            job_id, start, reason = line.split(maxsplit=2)
            if reason.strip() != "BeginTime" or start == "N/A":
                continue
            if datetime.fromisoformat(start) - now > REQUEUE_DELAY * 2:
                self.run("scontrol", "update", f"JobId={job_id}", f"StartTime=now+{REQUEUE_DELAY.seconds}")

    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--user=root")
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            while self.jobs() and time.monotonic() < deadline:
                time.sleep(0.5)
        for name in reversed(DAEMONS):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
