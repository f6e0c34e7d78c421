"""What survives what: Ctrl-C in the middle of prepare, a disk that fills up while a beton or a checkpoint is
written. Each runs the real command in a subprocess (the disk is made full by tests/scripts/full_disk.py)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

from cifar_dist.config import load_config
from cifar_dist.data.beton import checked_beton
from cifar_dist.engine import checkpoint
from conftest import REPO, SCRIPT, running, tiny_args

FULL_DISK = "tests/scripts/full_disk.py"
SMALL = ["data.require_full_size=false", "data.num_workers=2"]


def run(cmd: list, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, cmd)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_ctrl_c_during_prepare_stops_the_writers_and_leaves_nothing(real_data_root, tmp_path):
    import psutil

    beton_dir = tmp_path / "beton"
    proc = subprocess.Popen([sys.executable, "-m", "cifar_dist", "prepare", f"data.root={real_data_root}",
                             f"data.beton_dir={beton_dir}", "data.num_workers=2"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in proc.stdout:
            if "writing train.beton" in line:
                break
        prepare, deadline, workers = psutil.Process(proc.pid), time.monotonic() + 60, []
        while len(workers) < 2 and time.monotonic() < deadline:  # both writer workers run
            children = prepare.children()
            workers = [c for c in children if "resource_tracker" not in " ".join(c.cmdline())]
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal does: to the whole process group
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert len(workers) == 2
    assert proc.returncode == 130, stderr
    assert stderr.splitlines() == ["cifar-dist prepare: interrupted"]
    assert list(beton_dir.iterdir()) == []  # no temporary, no manifest
    deadline = time.monotonic() + 10
    while running(children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running(children) == []


def test_disk_full_during_prepare_keeps_the_previous_betons(small_cifar):
    args = ["prepare", f"data.root={small_cifar}", *SMALL]
    assert run(["-m", "cifar_dist", *args]).returncode == 0
    beton_dir = small_cifar / "beton"
    before = {p.name: p.read_bytes() for p in beton_dir.iterdir()}

    result = run([FULL_DISK, "beton", 0, "-m", "cifar_dist", *args, "--force"])
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    folder = re.escape(str(beton_dir))
    assert re.fullmatch(rf"cifar-dist prepare: error: the disk holding {folder} is full: cannot write the betons "
                        r"\([\d.]+ [kMGT]?B free, about [\d.]+ MB needed\); no beton was replaced: free some space "
                        r"there, or set data.beton_dir to a folder on another disk\n", result.stderr), result.stderr
    assert {p.name: p.read_bytes() for p in beton_dir.iterdir()} == before  # no temporary; the old set vouched for
    checked_beton(load_config(None, [f"data.root={small_cifar}", *SMALL]).data, "train")


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoints(data_root, tmp_path):
    # last.pt is written at the end of each epoch: the third write (epoch 3) finds the disk full
    result = run([FULL_DISK, "checkpoint", 3, SCRIPT, *tiny_args(data_root, tmp_path, "train.epochs=3")])
    assert result.returncode == 2, result.stderr[-8000:]
    assert len(result.stderr.splitlines()) == 1, result.stderr[-8000:]
    folder = re.escape(str(tmp_path))
    assert re.fullmatch(rf"cifar-dist train: error: the disk holding {folder} is full: cannot write last.pt "
                        r"\([\d.]+ [kMGT]?B free, about [\d.]+ kB needed\); nothing was replaced: free some space "
                        r"there, then run the same command again: it resumes from the last checkpoint written whole "
                        rf"\(the run's files are in {folder}\)\n", result.stderr), result.stderr
    assert not list(tmp_path.glob(".last.pt.tmp*"))
    warnings = []
    state = checkpoint.load_resume_state(tmp_path, "auto", log=warnings.append)
    assert warnings == []  # last.pt itself, no fallback
    assert (state["progress"]["epoch"], state["progress"]["global_step"]) == (2, 28)
    assert checkpoint.load(tmp_path / "last.prev.pt")["progress"]["global_step"] == 14
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "failed" and "is full" in status["cause"]
