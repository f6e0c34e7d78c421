"""Slurm and multi-node, against a real one-node Slurm started by the session (CPU, gloo)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cifar_dist.engine import checkpoint
from cifar_dist.launch import slurm
from conftest import REPO, assert_bitwise_equal, free_port, leftover_processes, states, tiny_args, train
from slurm_cluster import NODE_CPUS, URGENT

pytestmark = pytest.mark.slurm
JOB_TIMEOUT_S = 240


def slurm_args(data_root: Path, *extra: str) -> list[str]:
    """The tiny deterministic run of the trainer tests, without run.dir (cifar-dist slurm picks it)."""
    return [a for a in tiny_args(data_root, Path("unused"), *extra) if not a.startswith("run.dir=")]


def job_env(cluster) -> dict:
    return {**cluster.env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests" / "scripts")}


def submit(cluster, root: Path, *args: str) -> list[tuple[str, Path]]:
    """`cifar-dist slurm --root root ...` → [(job id, run dir)], one per job it printed."""
    env = job_env(cluster) if cluster is not None else {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "cifar_dist", "slurm", "--root", str(root), *args], cwd=REPO,
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = re.findall(r"submitted job (\S+): run dir (\S+)", result.stdout)
    assert jobs and all(f"tail -f {root}" in result.stdout for _ in jobs), result.stdout
    return [(job_id, Path(run_dir)) for job_id, run_dir in jobs]


def wait_until(cluster, condition, what: str, timeout_s: float = JOB_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}; Slurm's view:\n{cluster_view(cluster)}"
        if cluster is not None:
            cluster.release_requeued()
        time.sleep(0.5)


def cluster_view(cluster) -> str:
    """What a timeout message needs to tell why a job did not move: its state and reason, and the controller's log."""
    if cluster is None:
        return "(no cluster)"
    jobs = cluster.run("squeue", "-h", "-t", "all", "-o", "%i %T %r %M").stdout
    log = (cluster.folder / "slurmctld.log").read_text()[-3000:]
    return f"squeue:\n{jobs}\nslurmctld.log (end):\n{log}"


def wait_gone(cluster, job_id: str) -> None:
    wait_until(cluster, lambda: not any(j.split("_")[0] == job_id for j in cluster.jobs()), f"job {job_id} to end")


def slurm_state(run_dir: Path) -> dict:
    return json.loads((run_dir / "slurm.json").read_text())


def rank0_log(run_dir: Path, job_id: str) -> str:
    path = run_dir.parent / "submitit" / f"{job_id}_0_log.out"
    return path.read_text() if path.is_file() else ""


def signal_in_epoch_2(cluster, job_id: str, run_dir: Path, command: list[str], after: str = "epoch 2 step 1/") -> None:
    wait_until(cluster, lambda: after in rank0_log(run_dir, job_id), f"'{after}' in job {job_id}'s log")
    cluster.run(*command, job_id, check=True)


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, data_root, tmp_path_factory):
    """A 2-task deterministic run of 12 epochs, not interrupted: the reference of the requeue tests."""
    root = tmp_path_factory.mktemp("slurm_uninterrupted")
    [(job_id, run_dir)] = submit(slurm_cluster, root, "--tasks-per-node", "2", *slurm_args(data_root, "train.epochs=12"))
    wait_gone(slurm_cluster, job_id)
    assert slurm_state(run_dir)["status"] == "finished", rank0_log(run_dir, job_id)[-3000:]
    return run_dir


def test_two_tasks_form_one_group_and_match_a_single_process(slurm_cluster, data_root, tmp_path):
    common = ["model.name=tiny_nobn", "run.imports=[tiny_models]", "data.train_subset=64", "train.epochs=1",
              "train.ema_decay=0", "train.grad_clip_norm=0", "augment.crop_padding=0", "augment.flip=none",
              "augment.brightness=0", "augment.contrast=0", "augment.saturation=0", "augment.hue=0",
              "augment.mixup_prob=0", "augment.cutmix_prob=0"]
    [(job_id, run_dir)] = submit(slurm_cluster, tmp_path / "root", "--tasks-per-node", "2",
                                 *slurm_args(data_root, *common))
    wait_gone(slurm_cluster, job_id)
    assert slurm_state(run_dir)["status"] == "finished", rank0_log(run_dir, job_id)[-3000:]
    assert json.loads((run_dir / "plan.json").read_text())["world_size"] == 2
    single = train(tiny_args(data_root, tmp_path / "single", *common))
    assert single.returncode == 0, single.stderr[-4000:]
    two, one = checkpoint.load(run_dir / "last.pt")["model"], checkpoint.load(tmp_path / "single" / "last.pt")["model"]
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("how", ["usr2", "scontrol_requeue"])
def test_a_stopped_job_is_requeued_once_and_ends_bitwise_equal(slurm_cluster, data_root, uninterrupted, tmp_path,
                                                                how):
    [(job_id, run_dir)] = submit(slurm_cluster, tmp_path / "root", "--tasks-per-node", "2",
                                 *slurm_args(data_root, "train.epochs=12"))
    command = ["scancel", "--signal=USR2"] if how == "usr2" else ["scontrol", "requeue"]
    signal_in_epoch_2(slurm_cluster, job_id, run_dir, command)
    wait_until(slurm_cluster, lambda: slurm_state(run_dir).get("status") == "finished", "the requeued job to finish")
    wait_gone(slurm_cluster, job_id)
    state, log = slurm_state(run_dir), rank0_log(run_dir, job_id)
    assert state["starts"] == 2, log[-3000:]
    assert state["requeues"] == (1 if how == "usr2" else 0)  # after scontrol requeue Slurm requeues by itself
    assert ("requeueing job" if how == "usr2" else "Slurm requeues the job itself") in log
    assert "state saved in" in log and "resumed from" in log  # a stop at an epoch end saves the epoch's checkpoint
    assert_bitwise_equal(states(run_dir), states(uninterrupted))


def test_max_requeues_bounds_the_requeues_and_says_why(slurm_cluster, data_root, tmp_path):
    [(job_id, run_dir)] = submit(slurm_cluster, tmp_path / "root", "--tasks-per-node", "2", "--max-requeues", "1",
                                 *slurm_args(data_root, "train.epochs=40"))
    signal_in_epoch_2(slurm_cluster, job_id, run_dir, ["scancel", "--signal=USR2"])
    wait_until(slurm_cluster, lambda: "resumed from" in rank0_log(run_dir, job_id), "the requeued job to resume")
    signal_in_epoch_2(slurm_cluster, job_id, run_dir, ["scancel", "--signal=USR2"], after="epoch 4 step 1/")
    wait_gone(slurm_cluster, job_id)
    state = slurm_state(run_dir)
    assert (state["starts"], state["requeues"], state["status"]) == (2, 1, "stopped")
    assert "not requeued: --max-requeues 1 reached" in state["log"][-1]
    assert "not requeued: --max-requeues 1 reached" in rank0_log(run_dir, job_id)
    assert checkpoint.load(run_dir / "last.pt")["progress"]["epoch"] < 40


def sweep_summary_statuses(root: Path) -> list[str]:
    result = subprocess.run([sys.executable, "-m", "cifar_dist", "sweep-summary", str(root)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    import pandas as pd

    return list(pd.read_csv(root / "sweep_summary.csv")["status"])


def test_a_crash_in_mid_epoch_is_recorded_as_failed_and_not_requeued(slurm_cluster, data_root, tmp_path):
    root = tmp_path / "root"
    crash = ["model.name=crash_after", "model.crash_after=20", "run.imports=[tiny_models]", "train.epochs=3"]
    [(job_id, run_dir)] = submit(slurm_cluster, root, *slurm_args(data_root, *crash))
    wait_gone(slurm_cluster, job_id)  # a requeued job would wait in the queue
    state, log = slurm_state(run_dir), rank0_log(run_dir, job_id)
    assert (state["status"], state["exit_code"], state["starts"], state["requeues"]) == ("failed", 1, 1, 0), \
        log[-3000:]
    assert re.fullmatch(r"RuntimeError: crash_after: training forward \d+ fails on purpose", state["cause"]), state
    assert "epoch 2 step 1/" in log and "epoch 3 step" not in log  # 14 steps an epoch: it crashed in epoch 2
    assert sweep_summary_statuses(root) == ["failed"]  # the same word in slurm.json, status.json and the summary


def test_scancel_is_recorded_as_cancelled_and_not_requeued(slurm_cluster, data_root, tmp_path):
    [(job_id, run_dir)] = submit(slurm_cluster, tmp_path / "root", *slurm_args(data_root, "train.epochs=40"))
    signal_in_epoch_2(slurm_cluster, job_id, run_dir, ["scancel"])
    wait_gone(slurm_cluster, job_id)
    state = slurm_state(run_dir)
    assert (state["status"], state["starts"], state["requeues"]) == ("cancelled", 1, 0), rank0_log(run_dir, job_id)
    assert state["cause"].startswith("cancelled (JobState=") and "state saved in" in rank0_log(run_dir, job_id)


def test_a_preemption_is_requeued_but_not_counted_toward_max_requeues(slurm_cluster, data_root, tmp_path):
    """A job of the urgent partition preempts ours (PreemptMode=REQUEUE, GraceTime): with --max-requeues 0
    it is requeued all the same; the time-limit warning of its next run is counted and stops it."""
    [(job_id, run_dir)] = submit(slurm_cluster, tmp_path / "root", "--max-requeues", "0",
                                 *slurm_args(data_root, "train.epochs=40"))
    wait_until(slurm_cluster, lambda: "epoch 2 step 1/" in rank0_log(run_dir, job_id), "epoch 2")
    slurm_cluster.run("sbatch", f"--partition={URGENT}", f"--cpus-per-task={NODE_CPUS}", "--output=/dev/null",
                      "--wrap=sleep 1", check=True)
    wait_until(slurm_cluster, lambda: "resumed from" in rank0_log(run_dir, job_id), "the preempted job to resume")
    signal_in_epoch_2(slurm_cluster, job_id, run_dir, ["scancel", "--signal=USR2"], after="epoch 4 step 1/")
    wait_gone(slurm_cluster, job_id)
    state = slurm_state(run_dir)
    assert (state["starts"], state["preemptions"], state["requeues"], state["status"]) == (2, 1, 0, "stopped"), state
    assert state["cause"] == "--max-requeues 0 reached"
    assert any("preempted (PreemptTime=" in line and "not counted" in line for line in state["log"])


# `scontrol show job -o` lines of Slurm 22.05.8 (the test cluster's), fields the decision does not read left out.
PREEMPTED = ("JobId=1 JobState=RUNNING Reason=None Restarts=0 ExitCode=0:0 StartTime=2026-12-03T08:21:49 "
             "EndTime=Unknown PreemptTime=2026-12-03T08:21:52")
WARNED = ("JobId=1 JobState=RUNNING Reason=None Restarts=0 ExitCode=0:0 StartTime=2026-12-03T08:22:42 "
          "EndTime=Unknown PreemptTime=None")
CANCELLED = ("JobId=1 JobState=COMPLETING Reason=None Restarts=0 ExitCode=0:15 StartTime=2026-12-03T08:22:42 "
             "EndTime=2026-12-03T08:22:44 PreemptTime=None")
REQUEUED = ("JobId=1 JobState=COMPLETING Reason=None Restarts=1 ExitCode=0:0 StartTime=2026-12-03T08:23:00 "
            "EndTime=Unknown")
TIMED_OUT = ("JobId=1 JobState=COMPLETING Reason=TimeLimit Restarts=0 ExitCode=0:0 StartTime=2026-12-03T08:25:23 "
             "EndTime=2026-12-03T08:26:50 PreemptTime=None")
# Made up: a requeued run (Restarts=1, a later StartTime) still showing its first run's PreemptTime.
WARNED_AFTER_PREEMPTION = ("JobId=1 JobState=RUNNING Reason=None Restarts=1 ExitCode=0:0 "
                           "StartTime=2026-12-03T08:22:30 EndTime=Unknown PreemptTime=2026-12-03T08:21:52")


@pytest.mark.parametrize("line, restarts_at_start, reason", [
    (PREEMPTED, 0, "preempted"), (WARNED, 0, "warned"), (WARNED_AFTER_PREEMPTION, 1, "warned"),
    (CANCELLED, 0, "cancelled"), (REQUEUED, 0, "requeued"), (REQUEUED, 1, "cancelled"), (TIMED_OUT, 0, "ending"),
    ("JobId=1 JobState=CANCELLED Reason=None Restarts=0", 0, "cancelled"),
])
def test_stop_reason_reads_scontrol_lines(line, restarts_at_start, reason):
    assert slurm.stop_reason(slurm.job_fields(line), restarts_at_start) == reason


def fake_scontrol(folder: Path, failures: int, requeue_works: bool) -> Path:
    """A folder for PATH with an `scontrol` that fails its first `failures` calls as a busy controller does,
    then shows a RUNNING job (WARNED) and succeeds or fails at `requeue`; it appends each call to calls.log."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    requeue = "exit 0" if requeue_works else \
        'echo "slurm_requeue error: Unable to contact slurm controller (connect failure)" >&2; exit 1'
    (bin_dir / "scontrol").write_text(f"""#!/bin/bash
echo "$*" >> {folder}/calls.log
if [ "$(wc -l < {folder}/calls.log)" -le {failures} ]; then
  echo "slurm_load_jobs error: Socket timed out on send/recv operation" >&2; exit 1
fi
case "$1" in show) echo '{WARNED}' ;; requeue) {requeue} ;; esac
""")
    (bin_dir / "scontrol").chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("failures, requeue_works, status, requeues, cause, calls", [
    (2, True, "requeued", 1, None, ["show job -o 7"] * 3 + ["requeue 7"]),
    (0, False, "stopped", 0, "requeue failed: `scontrol requeue 7` failed 3 times; last: slurm_requeue error: "
     "Unable to contact slurm controller (connect failure)", ["show job -o 7"] + ["requeue 7"] * 3),
    (3, True, "stopped", 0, "cannot read the job's state: `scontrol show job -o 7` failed 3 times; last: "
     "slurm_load_jobs error: Socket timed out on send/recv operation", ["show job -o 7"] * 3),
])
def test_scontrol_is_tried_again_and_a_failed_requeue_is_a_recorded_stop(tmp_path, monkeypatch, failures,
                                                                          requeue_works, status, requeues, cause,
                                                                          calls):
    monkeypatch.setenv("PATH", f"{fake_scontrol(tmp_path, failures, requeue_works)}:{os.environ['PATH']}")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.setattr(slurm, "SCONTROL_RETRY_WAIT_S", 0.0)
    run_dir = tmp_path / "run"
    training = slurm.SlurmTraining(None, [], str(run_dir), max_requeues=3)
    training._after(75, "7", slurm.RequeueLedger(run_dir, max_requeues=3), tmp_path / "7_0_log.err")
    state = slurm_state(run_dir)
    assert (state["status"], state["requeues"], state["cause"], state["exit_code"]) == (status, requeues, cause, 75)
    assert (tmp_path / "calls.log").read_text().splitlines() == calls


def test_a_sweep_is_one_job_array_and_the_summary_lists_both_points(slurm_cluster, data_root, tmp_path):
    root = tmp_path / "root"
    jobs = submit(slurm_cluster, root, "--sweep", "train.lr=0.05,0.2", "--array-parallelism", "2",
                  *slurm_args(data_root, "train.epochs=1", "train.deterministic=false"))
    assert len(jobs) == 2 and len({job_id.split("_")[0] for job_id, _ in jobs}) == 1  # one array
    for job_id, _ in jobs:
        wait_gone(slurm_cluster, job_id.split("_")[0])
    assert [slurm_state(run_dir)["status"] for _, run_dir in jobs] == ["finished", "finished"]
    batch = jobs[0][1].parent
    result = subprocess.run([sys.executable, "-m", "cifar_dist", "sweep-summary", str(batch), "--sort-by", "train.lr"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    import pandas as pd

    table = pd.read_csv(batch / "sweep_summary.csv")
    assert list(table["train.lr"]) == [0.2, 0.05] and list(table["status"]) == ["finished", "finished"]
    assert list(table["epochs"]) == [1, 1] and table["best_val_acc"].between(0, 1).all()
    assert table["end_model_acc"].between(0, 1).all() and table["end_ema_acc"].between(0, 1).all()
    assert "| train.lr |" in result.stdout and (batch / "sweep_summary.md").is_file()
    assert {json.loads((run_dir / "plan.json").read_text())["world_size"] for _, run_dir in jobs} == {1}


def test_sbatch_template_runs_and_requeues_itself_on_exit_75(slurm_cluster, data_root, tmp_path):
    run_dir = tmp_path / "run"
    args = tiny_args(data_root, run_dir, "train.epochs=12")
    result = subprocess.run(["sbatch", "--parsable", "--ntasks-per-node=2", f"--output={tmp_path}/job-%j.out",
                             str(REPO / "slurm" / "train.sbatch"), *args], cwd=REPO, capture_output=True, text=True,
                            env=job_env(slurm_cluster), timeout=120)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    log = tmp_path / f"job-{job_id}.out"
    wait_until(slurm_cluster, lambda: log.is_file() and "epoch 2 step 1/" in log.read_text(), "epoch 2 in the template's job")
    slurm_cluster.run("scancel", "--signal=USR2", job_id, check=True)
    wait_until(slurm_cluster, lambda: (run_dir / "final.json").is_file(), "the requeued template job to finish")
    wait_gone(slurm_cluster, job_id)
    text = log.read_text()
    assert "requeueing job" in text and "start 2 on" in text and "resumed from" in text, text[-3000:]
    assert json.loads((run_dir / "plan.json").read_text())["world_size"] == 2
    assert states(run_dir)["epoch"] == 12


@pytest.mark.parametrize("bad, message", [
    (["--partition", "nowhere"], "invalid partition"),
    (["--sbatch", "no-such-option=1"], "unrecognized option"),
])
def test_bad_slurm_options_are_one_line_errors_and_leave_nothing(slurm_cluster, data_root, tmp_path, bad, message):
    root = tmp_path / "root"
    result = subprocess.run([sys.executable, "-m", "cifar_dist", "slurm", "--root", str(root), *bad,
                             *slurm_args(data_root)], cwd=REPO, capture_output=True, text=True,
                            env=job_env(slurm_cluster), timeout=120)
    assert result.returncode == 2 and message in result.stderr.lower(), result.stderr
    errors = [line for line in result.stderr.splitlines() if not line.startswith("warning: --root")]  # tmp_path
    assert len(errors) == 1 and errors[0].startswith("cifar-dist slurm: error: sbatch refused the job: "), errors
    assert not root.exists() or not any(root.iterdir())


def test_dry_run_prints_the_script_and_submits_nothing(data_root, tmp_path):
    result = subprocess.run([sys.executable, "-m", "cifar_dist", "slurm", "--root", str(tmp_path / "root"),
                             "--dry-run", "--nodes", "2", "--gpus-per-node", "4", "--time-min", "30",
                             *slurm_args(data_root)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --signal=USR2@120", "#SBATCH --requeue", "#SBATCH --time=30"):
        assert line in result.stdout, result.stdout
    assert not any((tmp_path / "root").rglob("*.pkl"))


def test_dry_run_of_a_sweep_shows_the_array_and_its_points(data_root, tmp_path):
    result = subprocess.run([sys.executable, "-m", "cifar_dist", "slurm", "--root", str(tmp_path / "root"),
                             "--dry-run", "--array-parallelism", "2", "--sweep", "train.lr=0.1,0.2",
                             "--sweep", "train.label_smoothing=0,0.1", *slurm_args(data_root)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --array=0-3%2" in result.stdout
    assert "# 4 sweep points, one array task each:" in result.stdout
    assert "#   001_lr=0.1,label_smoothing=0.1: train.lr=0.1 train.label_smoothing=0.1" in result.stdout
    assert not (tmp_path / "root").exists() or not any((tmp_path / "root").rglob("*.pkl"))


@pytest.mark.parametrize("bad, message", [
    (["--nodes", "0"], "--nodes: must be at least 1, got 0"),
    (["--gpus-per-node", "-1"], "--gpus-per-node: must be at least 0, got -1"),
    (["--time-min", "1", "--signal-delay-s", "120"], "--signal-delay-s 120 must be shorter than the time limit"),
])
def test_impossible_slurm_arguments_are_one_line_errors(data_root, tmp_path, bad, message):
    result = subprocess.run([sys.executable, "-m", "cifar_dist", "slurm", "--root", str(tmp_path / "root"),
                             "--dry-run", *bad, *slurm_args(data_root)], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "root").exists()


def test_two_node_processes_through_train_multinode(data_root, tmp_path):
    env = {**os.environ, "NNODES": "2", "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}", "NPROC": "1",
           "OMP_NUM_THREADS": "1", "RDZV_ID": f"test-{os.getpid()}"}
    args = tiny_args(data_root, tmp_path / "run", "train.epochs=1")
    nodes = [subprocess.Popen(["./launch/train-multinode", *args], cwd=REPO, env={**env, "NODE_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["world_size"] == 2
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["val_count"] == 50


def test_local_cluster_runs_the_job_on_this_machine_without_slurm(data_root, tmp_path):
    root = tmp_path / "root"
    [(_, run_dir)] = submit(None, root, "--cluster", "local", "--tasks-per-node", "2",
                            *slurm_args(data_root, "train.epochs=1"))
    wait_until(None, lambda: (run_dir / "slurm.json").is_file() and slurm_state(run_dir)["status"] == "finished",
               "the local job to finish")
    assert json.loads((run_dir / "plan.json").read_text())["world_size"] == 2

    def job_processes():  # submitit's controller and task processes name the job's folder
        return [p for p in leftover_processes() if str(root) in " ".join(p.cmdline())]

    wait_until(None, lambda: not job_processes(), "submitit's local job processes to end", timeout_s=60)
