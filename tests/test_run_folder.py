"""The run folder: made only after the checks, one writer, status.json, train.log, absolute paths, the last line."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import yaml

from cifar_dist import run_files

from conftest import REPO, SCRIPT, run_cli, start_and_act, tiny_args, train


def test_a_failed_start_leaves_no_run_folder(data_root, tmp_path):
    for bad in ("train.global_batch_size=4096", "train.sync_bn=on", "data.root=/nonexistent",
                "data.loader=torchvision"):
        extra = ["augment.flip=alternating"] if bad == "data.loader=torchvision" else []
        result = train(tiny_args(data_root, tmp_path / "run", bad, *extra, "data.download=false"))
        assert result.returncode == 2, (bad, result.stderr[-2000:])
        assert not (tmp_path / "run").exists(), bad
    # the default run.dir (runs/<name>-<timestamp>) is not made either
    args = [a for a in tiny_args(data_root, "unused", "train.sync_bn=on") if not a.startswith("run.dir")]
    result = subprocess.run([sys.executable, str(REPO / SCRIPT), *args], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and not (tmp_path / "runs").exists()


def test_one_writer_per_run_folder_and_the_lock_dies_with_its_holder(data_root, tmp_path):
    run_dir = tmp_path / "run"
    first = [sys.executable, SCRIPT, *tiny_args(data_root, run_dir, "train.epochs=50")]
    seen = {}

    def second_try_then_kill(proc):
        status = json.loads((run_dir / "status.json").read_text())
        seen["status"] = status["status"]
        seen["second"] = train(tiny_args(data_root, run_dir, "train.epochs=50"))
        proc.send_signal(signal.SIGKILL)

    code, output = start_and_act(first, "epoch 1 step 3/", second_try_then_kill)
    assert code == -signal.SIGKILL
    second = seen["second"]
    assert seen["status"] == "running"
    assert second.returncode == 2 and "is being written by another training (host " in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1, second.stderr
    summary = run_cli("sweep-summary", tmp_path)  # no epoch has finished yet: no column to sort by, no error
    assert summary.returncode == 0, summary.stderr
    assert "| crashed |" in summary.stdout and "no process holds the run folder" in summary.stdout
    # the killed holder left status "running" and no lock: a new start takes the folder and resumes
    third = train(tiny_args(data_root, run_dir, "train.epochs=2"))
    assert third.returncode == 0, third.stderr[-4000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "finished" and status["exit_code"] == 0


def test_status_log_paths_and_last_line_of_a_max_steps_stop(data_root, tmp_path):
    run_dir = tmp_path / "run"
    result = train(tiny_args(data_root, run_dir, "train.max_steps=20"))  # stops in epoch 2 (14 steps an epoch)
    assert result.returncode == 0, result.stderr[-4000:]
    last = result.stdout.strip().splitlines()
    assert last[-2] == f"reached train.max_steps: state saved in {run_dir}/last.pt (exit code 0)."
    assert last[-1].startswith("To resume: ") and "train.max_steps" not in last[-1]
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["status"], status["step"], status["exit_code"]) == ("max_steps", 20, 0)
    assert run_files.run_status(run_dir)[0] == "max_steps"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, round(1 + 6 / 14, 3)] and records[1]["partial"]
    plan = json.loads((run_dir / "plan.json").read_text())
    assert (plan["total_steps"], plan["stop_step"], plan["run_dir"]) == (28, 20, str(run_dir))
    log = (run_dir / "train.log").read_text()
    assert "run plan:" in log and last[-2] in log  # the console, last line included
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["root"] == str(data_root.resolve())  # absolute: the config works from any folder
    again = train(tiny_args(data_root, run_dir))  # resume to the end: the partial record is replaced
    assert again.returncode == 0, again.stderr[-4000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and not any(r.get("partial") for r in records)
    assert (run_dir / "train.log").read_text().startswith(log)  # appended across resumes
    assert again.stdout.strip().splitlines()[-1] == f"finished: the run's files are in {run_dir} (exit code 0)"


def test_a_divergence_is_recorded(data_root, tmp_path):
    run_dir = tmp_path / "run"
    result = train(tiny_args(data_root, run_dir, "model.name=nan_after", "model.nan_after=3",
                             "train.max_nonfinite_steps=1", "train.ema_decay=0"))
    assert result.returncode == 3
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "diverged" and status["exit_code"] == 3


def test_one_status_vocabulary_for_how_a_run_ended():
    """status.json (the trainer), slurm.json (the launcher) and sweep-summary use the same words."""
    from cifar_dist.engine.trainer import Outcome
    from cifar_dist.errors import ExitCode, exit_status

    for outcome in Outcome:
        if outcome is not Outcome.MAX_STEPS:  # max_steps is a finished run (exit 0) that says why it stopped early
            assert exit_status(outcome.exit_code) == outcome.status, outcome
    assert exit_status(ExitCode.USER_ERROR) == exit_status(ExitCode.CRASHED) == exit_status(17) == "failed"
