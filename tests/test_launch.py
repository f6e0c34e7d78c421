"""Launching and stopping as users do: ./launch/train, Ctrl-C once and twice, exit codes, the resume hint."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from conftest import (EXIT_INTERRUPTED, REPO, assert_bitwise_equal, kill_last_worker, leftover_processes,
                      start_and_act, states, tiny_args, torchrun_train)


def start_launch_train(args: list[str], nproc: int) -> subprocess.Popen:
    """./launch/train in a process group of its own, as a terminal starts it."""
    return subprocess.Popen(["./launch/train", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True,
                            env={**os.environ, "NPROC": str(nproc), "OMP_NUM_THREADS": "1"})


def ctrl_c_after(proc: subprocess.Popen, after_line: str, presses: int = 1) -> tuple[int, str]:
    """SIGINT to the whole process group once a line contains after_line, as a terminal's Ctrl-C does."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if after_line in line:
            for _ in range(presses):
                os.killpg(proc.pid, signal.SIGINT)
                time.sleep(0.05)
            break
    lines.extend(proc.stdout)
    return proc.wait(timeout=600), "".join(lines)


@pytest.mark.parametrize("nproc", [1, 2])
def test_ctrl_c_saves_exits_130_and_the_printed_command_resumes(data_root, tmp_path, nproc):
    run_dir = tmp_path / "run"
    args = tiny_args(data_root, run_dir, "train.epochs=3")
    code, output = ctrl_c_after(start_launch_train(args, nproc), "epoch 1 step 4/")
    assert code == EXIT_INTERRUPTED, output[-4000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-4000:]
    saved = states(run_dir)
    assert saved["epoch"] == 0 and 4 <= saved["step"] < 14  # mid-epoch: the steps done are kept
    resume_lines = [line for line in output.splitlines() if line.startswith("To resume: ")]
    assert len(resume_lines) == 1, output[-4000:]
    command = shlex.split(resume_lines[0].removeprefix("To resume: "))
    assert command[0] == "./launch/train" and f"run.dir={run_dir}" in command
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "NPROC": str(nproc), "OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    # one numbering: the resume names the epoch as the epoch lines do (epoch 1 is the first)
    assert f"resumed from {run_dir}: in epoch 1, after step {saved['step']} of 42" in again.stdout
    assert states(run_dir)["epoch"] == 3


def test_second_ctrl_c_aborts_at_once_and_leaves_no_worker(data_root, tmp_path):
    proc = start_launch_train(tiny_args(data_root, tmp_path / "run", "train.epochs=50"), 2)
    code, output = ctrl_c_after(proc, "epoch 1 step 2/", presses=2)
    assert code == EXIT_INTERRUPTED, output[-4000:]
    assert "second Ctrl-C" in output and "Traceback" not in output, output[-4000:]
    deadline = time.monotonic() + 10
    while leftover_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leftover_processes() == []


def test_a_killed_rank_restarts_the_group_which_resumes_to_the_same_weights(data_root, tmp_path):
    """The fault table's first row: SIGKILL of one of ./launch/train's two ranks in mid-epoch; the launcher
    restarts the group, which resumes from last.pt and ends (train.deterministic=true) bitwise where an
    uninterrupted run ends."""
    whole = torchrun_train(tiny_args(data_root, tmp_path / "whole", "train.epochs=3"))
    assert whole.returncode == 0, whole.stderr[-4000:]
    cmd = ["./launch/train", *tiny_args(data_root, tmp_path / "killed", "train.epochs=3")]
    code, output = start_and_act(cmd, "epoch 2 step 4/", kill_last_worker, env={"NPROC": "2", "MAX_RESTARTS": "1"})
    assert code == 0, output[-8000:]
    assert "rank 1: killed by SIGKILL" in output and "restart 1 of 1 resumes from last.pt" in output
    assert "resumed from" in output and states(tmp_path / "killed")["epoch"] == 3
    assert_bitwise_equal(states(tmp_path / "killed"), states(tmp_path / "whole"))


def test_config_errors_stop_the_launcher_before_any_worker(data_root, tmp_path):
    result = subprocess.run(["./launch/train", *tiny_args(data_root, tmp_path, "model.name=vgg")], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "NPROC": "2"})
    assert result.returncode == 2
    assert "'model.name' must be one of" in result.stderr and "process(es)" not in result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("env, message", [({"NPROC": "0"}, "NPROC=0: expected a whole number"),
                                          ({"MAX_RESTARTS": "x"}, "MAX_RESTARTS=x: expected a whole number")])
def test_launcher_settings_are_checked(data_root, tmp_path, env, message):
    result = subprocess.run(["./launch/train", *tiny_args(data_root, tmp_path / "run")], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert result.returncode == 2 and message in result.stderr and not (tmp_path / "run").exists()


def test_a_user_error_in_the_ranks_is_not_restarted(data_root, tmp_path):
    # run.dir unwritable: a config error does not fix itself, so the launcher ends with it (no restarts)
    cmd = [sys.executable, "-m", "cifar_dist.launch.local", "--nproc", "2", "--max-restarts", "3", "--",
           *tiny_args(data_root, "/proc/cifar_dist_run")]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2 and "restart" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.count("run.dir /proc/cifar_dist_run cannot be written") >= 1
