"""`cifar-dist slurm`: training (or a sweep) on Slurm through submitit, safe across preemption.

One task per GPU (`--tasks-per-node`, default `--gpus-per-node`, or 1 on CPU partitions) runs
`SlurmTraining`, which exports the rendezvous variables from submitit's job environment
(`submitit.helpers.TorchDistributedEnvironment`: MASTER_ADDR is the first node) and calls the
trainer. How the signals and submitit's own handlers cooperate:
- submitit installs its handlers when a task starts: SIGUSR2 → call our `checkpoint()` and requeue,
  SIGTERM → ignored. They cover only the start-up (data, model) and the end of a task.
- While the training loop runs, the trainer's handlers replace them: SIGUSR2 (the time-limit warning,
  `#SBATCH --signal=USR2@<--signal-delay-s>`) and SIGTERM (preemption, `scancel`, `scontrol requeue`)
  make every task finish its step; rank 0 writes last.pt; the trainer returns 75. From then on the
  task ignores both signals: the state is saved, and a late one must not kill a task (exit 143
  instead of 75) nor start a second requeue through `checkpoint()`.
- Then rank 0 asks Slurm for the job's state (`scontrol show job`, tried again a few times when the
  controller does not answer). RUNNING means Slurm will not end the job itself: a preemption in its
  grace time (PreemptTime set), a time-limit warning or a manual signal. We requeue it with `scontrol
  requeue`. Otherwise Slurm is already requeuing the job (`scontrol requeue`, a preemption past its
  grace time: Restarts went up) or ending it (`scancel`), and we let it.
- Our requeues after a time-limit warning or a manual signal are counted in `<run dir>/slurm.json`
  (once `scontrol requeue` succeeded) and bounded by `--max-requeues`; the same count bounds
  submitit's requeues through `checkpoint()`. Preemptions are not the run's fault: counted apart
  (`preemptions`), never bounded. A finished run, a failed one (exit 2, 3 or a crash) and a cancelled
  one are never requeued. A requeued job resumes from last.pt in the same run dir and continues the
  same wandb run.
- slurm.json's `status` says where the run stands, `cause` (one line) why it ended or stopped, and
  `log` every decision: running, finished, failed (a crash, exit 2 or 3), requeued (by us or by
  Slurm), cancelled (`scancel`), stopped (last.pt written, not requeued: --max-requeues reached, the
  requeue failed, or Slurm ended the job otherwise).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from cifar_dist import run_files
from cifar_dist.atomic import atomic_write
from cifar_dist.config import KEYS_HINT, load_config, parse_override
from cifar_dist.errors import ArgumentParser, ConfigError, ExitCode, at_least, describe_exit, exit_status, one_line

SCONTROL_TRIES = 3  # a controller busy for a moment must not end a run that Slurm keeps running
SCONTROL_RETRY_WAIT_S = 5.0
SCONTROL_TIMEOUT_S = 20  # 3 tries, 2 waits: 70 s at worst, within the default --signal-delay-s of 120

def require_submitit():
    try:
        import submitit
    except ImportError:
        raise ConfigError("`cifar-dist slurm` needs the 'submitit' package: pip install -e .[slurm] "
                          "(or use slurm/train.sbatch, which needs nothing but Slurm)") from None
    return submitit

class SlurmUnavailable(Exception):
    """scontrol failed (or timed out) every time it was tried."""


def scontrol(*args: str) -> str:
    """`scontrol args...`'s output, tried SCONTROL_TRIES times SCONTROL_RETRY_WAIT_S apart; SlurmUnavailable names
    the last failure."""
    for attempt in range(1, SCONTROL_TRIES + 1):
        try:
            result = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=SCONTROL_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as err:
            failure = one_line(err)
        else:
            if result.returncode == 0:
                return result.stdout
            failure = one_line(result.stderr) if result.stderr.strip() else describe_exit(result.returncode)
        if attempt < SCONTROL_TRIES:
            time.sleep(SCONTROL_RETRY_WAIT_S)
    raise SlurmUnavailable(f"`scontrol {' '.join(args)}` failed {SCONTROL_TRIES} times; last: {failure}")


def job_fields(line: str) -> dict[str, str]:
    """The Key=Value fields of one `scontrol show job -o` line ({'JobState': 'RUNNING', 'PreemptTime': 'None', ...})."""
    return dict(field.split("=", 1) for field in line.split() if "=" in field)


def read_job(job_id: str) -> dict[str, str]:
    """The job's `scontrol show job` fields; SlurmUnavailable when scontrol keeps failing."""
    lines = scontrol("show", "job", "-o", job_id).splitlines()
    fields = job_fields(lines[0]) if lines else {}
    if "JobState" not in fields:
        raise SlurmUnavailable(f"`scontrol show job -o {job_id}` printed no JobState: {' '.join(lines)[:200]!r}")
    return fields


def stop_reason(fields: dict[str, str], restarts_at_start: int) -> str:
    """Why a job's tasks got SIGTERM or SIGUSR2, from its `scontrol show job` fields read after they stopped.

    'preempted': RUNNING, and PreemptTime (None unless preempted) falls in this run: Slurm preempted
    the job and waits out its grace time. Should the job end in that time, Slurm does not requeue it.
    'warned': RUNNING otherwise: the time-limit warning or a manual signal.
    'requeued': Slurm requeues the job itself (`scontrol requeue`, a preemption past its grace time):
    Restarts went up while JobState still reads COMPLETING.
    'cancelled': `scancel` (JobState CANCELLED, or COMPLETING with no Reason).
    'ending': Slurm ends the job otherwise (Reason=TimeLimit, a node failure).
    restarts_at_start: the job's Restarts when this run started (SLURM_RESTART_COUNT).
    """
    state, reason = fields["JobState"], fields.get("Reason", "None")
    if state == "RUNNING":
        preempt_time, start_time = fields.get("PreemptTime", "None"), fields.get("StartTime", "Unknown")
        if preempt_time in ("None", "Unknown"):
            return "warned"
        # A PreemptTime before StartTime would be an earlier run's (a requeued job keeps its fields).
        earlier = start_time != "Unknown" and datetime.fromisoformat(preempt_time) < datetime.fromisoformat(start_time)
        return "warned" if earlier else "preempted"
    if state.startswith("REQUEUE") or int(fields.get("Restarts", "0")) > restarts_at_start:
        return "requeued"
    if state == "CANCELLED" or (state == "COMPLETING" and reason == "None"):
        return "cancelled"
    return "ending"


class RequeueLedger:
    """The requeue count of one run, kept in <run dir>/slurm.json (written by rank 0)."""

    def __init__(self, run_dir: Path, max_requeues: int):
        self.path, self.max_requeues = Path(run_dir) / run_files.SLURM, max_requeues

    def read(self) -> dict:
        if self.path.is_file():
            return json.loads(self.path.read_text())
        return {"requeues": 0, "preemptions": 0, "starts": 0, "status": "submitted", "cause": None,
                "exit_code": None, "log": []}

    def update(self, **changes) -> dict:
        state = {**self.read(), **changes}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda tmp: tmp.write_text(json.dumps(state, indent=2) + "\n"))
        return state

    def note(self, message: str, **changes) -> None:
        print(f"cifar-dist slurm: {message}", flush=True)
        state = self.read()
        self.update(log=[*state["log"], f"{datetime.now().isoformat(timespec='seconds')} {message}"], **changes)

    def may_requeue(self) -> bool:
        return self.read()["requeues"] < self.max_requeues

class SlurmTraining:
    """The callable submitit runs in every task: one training run in run_dir (see the module notes)."""

    def __init__(self, config_path: str | None, overrides: list[str], run_dir: str, max_requeues: int):
        self.config_path, self.overrides = config_path, list(overrides)
        self.run_dir, self.max_requeues = run_dir, max_requeues

    def __call__(self) -> int:
        import submitit

        from cifar_dist.train import train_main

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        environment = submitit.JobEnvironment()
        job_id = environment.job_id
        is_main = os.environ["RANK"] == "0"
        ledger = RequeueLedger(Path(self.run_dir), self.max_requeues)
        if is_main:
            ledger.update(starts=ledger.read()["starts"] + 1, status="running", cause=None, exit_code=None,
                          job_id=job_id)
        try:
            code = train_main(self.config_path, [*self.overrides, f"run.dir={self.run_dir}"])
        except submitit.core.utils.UncompletedJobError:  # checkpoint() said not to requeue, and recorded why
            raise
        except Exception as err:  # OOM, NCCL, a bug: say so in slurm.json, then end the task as before
            if is_main:
                cause = f"{type(err).__name__}: {one_line(err)}"
                ledger.note(f"failed: {cause}; not requeued", status="failed", cause=cause,
                            exit_code=ExitCode.CRASHED)
            raise
        if is_main:
            self._after(code, job_id, ledger, environment.paths.stderr)
        if code not in (ExitCode.FINISHED, ExitCode.PREEMPTED):
            raise RuntimeError(f"training in {self.run_dir} ended with {describe_exit(code)}; not requeued")
        return code

    def _after(self, code: int, job_id: str, ledger: RequeueLedger, stderr: Path) -> None:
        if code == ExitCode.FINISHED:
            ledger.note("finished", status="finished", exit_code=code)
            return
        if code != ExitCode.PREEMPTED:
            cause = f"{describe_exit(code)}, see {stderr}"
            ledger.note(f"{exit_status(code)}: {cause}; not requeued", status=exit_status(code), cause=cause,
                        exit_code=code)
            return
        saved = "stopped with last.pt written"
        try:
            fields = read_job(job_id)
        except SlurmUnavailable as err:
            ledger.note(f"{saved}; not requeued: cannot read the job's state: {err}", status="stopped",
                        cause=f"cannot read the job's state: {err}", exit_code=code)
            return
        reason = stop_reason(fields, int(os.environ.get("SLURM_RESTART_COUNT", "0")))
        seen = f"JobState={fields['JobState']}, Reason={fields.get('Reason')}, Restarts={fields.get('Restarts')}"
        if reason == "preempted":
            self._requeue(job_id, ledger, code, f"preempted (PreemptTime={fields['PreemptTime']}): requeueing job "
                          f"{job_id}, not counted toward --max-requeues", "preemptions")
        elif reason == "warned" and ledger.may_requeue():
            count = ledger.read()["requeues"] + 1
            self._requeue(job_id, ledger, code, f"requeueing job {job_id} ({count} of at most {self.max_requeues})",
                          "requeues")
        elif reason == "warned":
            ledger.note(f"{saved}; not requeued: --max-requeues {self.max_requeues} reached. Resubmit the same "
                        "command to continue", status="stopped",
                        cause=f"--max-requeues {self.max_requeues} reached", exit_code=code)
        elif reason == "requeued":
            ledger.note(f"{saved}; Slurm requeues the job itself ({seen}): `scontrol requeue` or a preemption",
                        status="requeued", exit_code=code)
        elif reason == "cancelled":
            ledger.note(f"{saved}; cancelled ({seen}): not requeued", status="cancelled",
                        cause=f"cancelled ({seen})", exit_code=code)
        else:
            ledger.note(f"{saved}; Slurm is ending the job ({seen}): not requeued", status="stopped",
                        cause=f"Slurm ended the job ({seen})", exit_code=code)

    @staticmethod
    def _requeue(job_id: str, ledger: RequeueLedger, code: int, what: str, counter: str) -> None:
        """`scontrol requeue` the job, then add one to slurm.json's counter ('requeues' or 'preemptions')."""
        try:
            scontrol("requeue", job_id)
        except SlurmUnavailable as err:
            ledger.note(f"stopped with last.pt written; {what} failed: {err}", status="stopped",
                        cause=f"requeue failed: {err}", exit_code=code)
            return
        ledger.note(f"stopped with last.pt written; {what}", status="requeued", exit_code=code,
                    **{counter: ledger.read().get(counter, 0) + 1})

    def checkpoint(self):
        """submitit's SIGUSR2 handler calls this outside the training loop: requeue while allowed."""
        import submitit

        ledger = RequeueLedger(Path(self.run_dir), self.max_requeues)
        if not ledger.may_requeue():
            ledger.note(f"signal outside the training loop; not requeued: --max-requeues {self.max_requeues} reached",
                        status="stopped", cause=f"--max-requeues {self.max_requeues} reached")
            return None
        # Counted before submitit's own `scontrol requeue`, which runs after this returns. Should that
        # fail, its error ends the task: recorded as failed by __call__ when it stops the start-up.
        ledger.note("signal outside the training loop; submitit requeues the job",
                    requeues=ledger.read()["requeues"] + 1, status="requeued")
        return submitit.helpers.DelayedSubmission(self)

def sbatch_refusal(script: str) -> str | None:
    """Slurm's one-line objection to an sbatch script (`sbatch --test-only`: nothing is submitted), or None."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "check.sh"
        path.write_text(script)
        result = subprocess.run(["sbatch", "--test-only", str(path)], capture_output=True, text=True, timeout=120)
    if result.returncode == 0:
        return None
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    return lines[0] if lines else f"sbatch --test-only exited with {result.returncode}"

def sweep_points(sweeps: list[str]) -> list[list[str]]:
    """`key=v1,v2` (repeatable) → the cartesian product as lists of overrides; [[]] without sweeps."""
    axes = []
    for text in sweeps:
        key, _, raw = parse_override(text)
        values = [v.strip() for v in raw.split(",") if v.strip()]
        if not values:
            raise ConfigError(f"--sweep {text!r}: expected key=value1,value2,...")
        axes.append([f"{key}={v}" for v in values])
    return [list(point) for point in itertools.product(*axes)]

def point_name(point: list[str]) -> str:
    """'lr=0.1,label_smoothing=0' for the overrides train.lr=0.1 train.label_smoothing=0: each key's last part
    and its value, so that a run dir's name says which value of which key it ran."""
    return ",".join(f"{key.split('.')[-1]}={value}" for key, value in (o.split("=", 1) for o in point)) or "run"


def sbatch_script(executor, array_size: int) -> str:
    """The sbatch script submitit will submit (with `#SBATCH --array` for a sweep of array_size points).

    submitit renders it only inside its submission, so this calls its SlurmExecutor's own renderer: a
    private method, hence the pinned submitit version in setup.cfg and the dry-run tests that read it."""
    slurm = executor._executor
    saved = dict(slurm.parameters)
    if array_size > 1:
        slurm.parameters["map_count"] = array_size  # what submitit sets for an array job
    try:
        return slurm._make_submission_file_text(slurm._submitit_command_str, "dry-run")
    finally:
        slurm.parameters.clear()
        slurm.parameters.update(saved)

def executor_for(args, folder: Path, tasks_per_node: int):
    submitit = require_submitit()
    executor = submitit.AutoExecutor(folder=folder, cluster=None if args.cluster == "slurm" else args.cluster)
    extra = dict(item.split("=", 1) for item in args.sbatch)
    slurm = {"slurm_partition": args.partition, "slurm_account": args.account, "slurm_qos": args.qos,
             "slurm_constraint": args.constraint, "slurm_exclude": args.exclude}  # the cluster's defaults when None
    parameters = dict(
        name=args.name, nodes=args.nodes, tasks_per_node=tasks_per_node, gpus_per_node=args.gpus_per_node or None,
        cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb, timeout_min=args.time_min,
        slurm_signal_delay_s=args.signal_delay_s, slurm_array_parallelism=args.array_parallelism,
        slurm_additional_parameters={"requeue": True, **extra}, **slurm)
    executor.update_parameters(**{key: value for key, value in parameters.items() if value is not None})
    return executor

def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="cifar-dist slurm", description=__doc__.split("\n\n")[0],
                                     epilog=KEYS_HINT)
    add = parser.add_argument
    add("--config", help="YAML config file")
    add("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    add("--nodes", type=at_least(1), default=1)
    add("--gpus-per-node", type=at_least(0), default=0, help="0 on CPU partitions")
    add("--tasks-per-node", type=at_least(0), default=0, help="default: one per GPU, or 1 without GPUs")
    add("--cpus-per-task", type=at_least(1), default=None)
    add("--mem-gb", type=at_least(1), default=None)
    add("--partition"), add("--account"), add("--qos"), add("--constraint"), add("--exclude")
    add("--time-min", type=at_least(1), default=60, help="time limit of each job, minutes")
    add("--signal-delay-s", type=at_least(0), default=120,
        help="SIGUSR2 this long before the time limit (less than --time-min)")
    add("--sbatch", action="append", default=[], metavar="KEY=VALUE", help="any other sbatch option (repeatable)")
    add("--cluster", choices=("slurm", "local", "debug"), default="slurm",
        help="local and debug run submitit's jobs on this machine, without Slurm")
    add("--max-requeues", type=at_least(0), default=10, help="requeues after time-limit signals, per run")
    add("--root", default="runs/slurm", help="shared folder for run dirs and submitit logs")
    add("--name", default="cifar_dist", help="Slurm job name")
    add("--sweep", action="append", default=[], metavar="KEY=V1,V2", help="sweep a key (repeatable): a job array")
    add("--array-parallelism", type=at_least(1), default=16, help="array jobs running at once")
    add("--dry-run", action="store_true", help="print the sbatch script; submit nothing")
    args = parser.parse_args(argv)
    bad = [item for item in args.sbatch if "=" not in item or item.startswith("=")]
    if bad:
        parser.error(f"--sbatch takes KEY=VALUE (e.g. --sbatch mail-type=END); got {', '.join(bad)}")
    if args.signal_delay_s >= args.time_min * 60:
        parser.error(f"--signal-delay-s {args.signal_delay_s} must be shorter than the time limit --time-min "
                     f"{args.time_min} ({args.time_min * 60} s): the stop signal would come before the job starts")
    return args

def submit(argv: list[str]) -> int:
    """Submit the run (or the sweep's array); print job ids, run dirs and how to follow the logs."""
    args = parse_args(argv)
    points = sweep_points(args.sweep)
    for point in points:  # check every config before anything is written or submitted
        load_config(args.config, [*args.overrides, *point])
    root = Path(args.root).resolve()
    if str(root).startswith("/tmp"):
        print(f"warning: --root {root} lies under /tmp, which compute nodes do not share; "
              "pick a shared folder for real clusters", file=sys.stderr)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    batch = root / f"{args.name}-{stamp}"
    tasks_per_node = args.tasks_per_node or max(1, args.gpus_per_node)
    config_path = str(Path(args.config).resolve()) if args.config else None
    callables = []
    for index, point in enumerate(points):
        run_dir = batch / (f"{index:03d}_{point_name(point)}" if args.sweep else "run")
        wandb_name = [f"logging.wandb.name={args.name}-{point_name(point)}"] if args.sweep else []
        callables.append(SlurmTraining(config_path, [*args.overrides, *point, *wandb_name], str(run_dir),
                                       args.max_requeues))
    executor = executor_for(args, batch / "submitit", tasks_per_node)
    script = sbatch_script(executor, len(callables))
    try:
        if args.dry_run:
            print(script)
            if args.sweep:
                print(f"# {len(points)} sweep points, one array task each:")
                for training, point in zip(callables, points):
                    print(f"#   {Path(training.run_dir).name}: {' '.join(point)}")
            return 0
        if args.cluster == "slurm":
            refusal = sbatch_refusal(script)
            if refusal:
                raise ConfigError(f"sbatch refused the job: {refusal}")
        with executor.batch():
            jobs = [executor.submit(job) for job in callables]
    finally:
        if not any(batch.rglob("*.pkl")):  # nothing submitted: leave nothing behind
            shutil.rmtree(batch, ignore_errors=True)
    for job, training in zip(jobs, callables):
        print(f"submitted job {job.job_id}: run dir {training.run_dir}\n  follow: tail -f {job.paths.stdout}")
    return 0

