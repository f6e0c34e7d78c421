"""Shared fixtures: the real data folder, small synthetic CIFAR-10 copies, a CLI runner; and the
check that the suite leaves no process behind."""
from __future__ import annotations

import ctypes
import os
import pickle
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PR_SET_CHILD_SUBREAPER = 36
LEFTOVER_GRACE_S = 10.0


def pytest_configure(config):
    # Processes orphaned by a test are re-parented to this one instead of init, so the check at the
    # end of the session sees them (daemons, data-loader workers, torchrun groups, FFCV writers).
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1)
    # A SIGTERM (a CI timeout, `kill`) ends the run like Ctrl-C, so fixtures still stop what they
    # started (the Slurm daemons) and the leftover check runs.
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(_signum, _frame):
    raise KeyboardInterrupt


def leftover_processes() -> list:
    """Descendants of this pytest process still running (zombies are reaped, not counted)."""
    import psutil

    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
    return running(psutil.Process().children(recursive=True))


def running(processes: list) -> list:
    """Those of processes (psutil) still running; zombies count as ended."""
    import psutil

    alive = []
    for process in processes:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


def pytest_sessionstart(session):
    """Let the tests' commands take Ctrl-C as a terminal's foreground job does. A shell without job control
    starts `cmd &` with SIGINT ignored, every process it starts inherits that, and a Python started so
    never raises KeyboardInterrupt: the Ctrl-C tests would see a command ignore Ctrl-C. Installing a
    handler here (rather than SIG_IGN) makes every command the tests start begin with the default."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if a test left a process behind; end those processes."""
    try:
        import psutil
    except ImportError:  # the GPU machines have no psutil (benchmarks/gpu_check.sh runs tests/test_cuda.py there)
        print("\nnote: psutil is not installed, so the check for leftover processes is skipped", file=sys.stderr)
        return
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    while (left := leftover_processes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    if not left:
        return
    lines = []
    for proc in left:
        try:
            lines.append(f"  pid {proc.pid}: {' '.join(proc.cmdline())[:200]}")
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    print("\nerror: the test suite left these processes running (now killed):\n" + "\n".join(lines), file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def find_real_data() -> Path | None:
    """The folder holding cifar-10-batches-py: $CIFAR_DIST_DATA (what .ci/run sets), else where ./launch/train
    looks (./data), else ../shared/data beside the checkout; else the official archive downloaded into ./data
    (MD5-checked) when the network allows. None when all fail."""
    from cifar_dist.data.cifar import DataError, load_cifar10

    value = os.environ.get("CIFAR_DIST_DATA")
    if value:
        return Path(value) if (Path(value) / "cifar-10-batches-py").is_dir() else None
    for place in (REPO / "data", REPO.parent / "shared" / "data"):
        if (place / "cifar-10-batches-py").is_dir():
            return place
    try:
        load_cifar10(REPO / "data", download=True)
    except DataError:
        return None
    with tarfile.open(REPO / "data" / "cifar-10-python.tar.gz") as archive:  # the folder form, as tests read it
        archive.extractall(REPO / "data", filter="data")
    return REPO / "data"


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """The real CIFAR-10, found by find_real_data; also exported as CIFAR_DIST_DATA for the subprocesses."""
    root = find_real_data()
    if root is None:
        pytest.fail(f"real CIFAR-10 not found: CIFAR_DIST_DATA={os.environ.get('CIFAR_DIST_DATA')!r}, "
                    f"{REPO / 'data'}, {REPO.parent / 'shared' / 'data'} and a download all failed; point "
                    "CIFAR_DIST_DATA at a folder holding cifar-10-batches-py")
    os.environ["CIFAR_DIST_DATA"] = str(root)
    return root


def id_images(count: int, seed: int = 0) -> np.ndarray:
    """NHWC uint8 images whose first two bytes encode their index (to track them through loaders)."""
    images = np.random.default_rng(seed).integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(count) % 256
    images[:, 0, 0, 1] = np.arange(count) // 256
    return images


def decode_ids(images_nchw) -> np.ndarray:
    """Inverse of id_images for a uint8 NCHW batch (any device)."""
    first = images_nchw[:, :2, 0, 0].cpu().numpy().astype(np.int64)
    return first[:, 0] + 256 * first[:, 1]


def shifted(images, dy: int, dx: int):
    """out[i, j] = in[reflect(i + dy), reflect(j + dx)] of an N × C × S × S batch, by explicit index lists."""
    size = images.shape[-1]

    def reflect(k: int) -> int:
        return -k if k < 0 else (2 * (size - 1) - k if k >= size else k)

    rows = [reflect(i + dy) for i in range(size)]
    cols = [reflect(j + dx) for j in range(size)]
    return images[:, :, rows][:, :, :, cols]


def balanced_labels(count: int) -> np.ndarray:
    return np.arange(count) % 10


def write_batches_folder(root: Path, x_train, y_train, x_test, y_test) -> Path:
    """The official python layout, pickled like Python 2 did (protocol 2, bytes keys)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name, x, y):
        rows = x.transpose(0, 3, 1, 2).reshape(len(x), -1)
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in y], b"data": rows}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)

    for i, (xs, ys) in enumerate(zip(np.array_split(x_train, 5), np.array_split(y_train, 5)), start=1):
        dump(f"data_batch_{i}", xs, ys)
    dump("test_batch", x_test, y_test)
    return folder


@pytest.fixture
def small_cifar(tmp_path) -> Path:
    """A data root with a 500/100-image balanced copy in the official layout."""
    root = tmp_path / "data"
    write_batches_folder(root, id_images(500), balanced_labels(500), id_images(100, seed=1), balanced_labels(100))
    return root


def run_cli(*args, cwd=REPO, timeout=600, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cifar_dist", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(nproc: int, module_args: list, cwd=REPO, timeout=600, extra=(), env=None):
    """`torchrun --nproc-per-node N ... -m <module args>` on loopback, gloo."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), *extra, *map(str, module_args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


# --- training runs on a tiny synthetic copy (trainer and launcher tests) -------------------------

SCRIPT = "tests/scripts/train_run.py"
EXIT_DIVERGED, EXIT_PREEMPTED, EXIT_INTERRUPTED = 3, 75, 130  # the README's table, on purpose not imported


def tiny_args(data_root: Path, run_dir: Path, *extra) -> list[str]:
    """Smoke config on the small synthetic copy: 450 train images, 14 steps of 32 per epoch."""
    return ["--config", str(REPO / "configs/smoke.yaml"), f"data.root={data_root}", "data.require_full_size=false",
            f"run.dir={run_dir}", "model.widths=[8,16,16]", "train.global_batch_size=32", "train.epochs=2",
            "train.deterministic=true", "logging.print_every_steps=1", *extra]


def train(args: list[str], env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def torchrun_train(args: list[str], env=None, extra=()) -> subprocess.CompletedProcess:
    return run_torchrun(2, [SCRIPT, *args], env=env, extra=extra)


def states(run_dir: Path, name: str = "last.pt") -> dict:
    from cifar_dist.engine import checkpoint

    state = checkpoint.load(run_dir / name)
    return {"model": state["model"], "ema": state["ema"]["module"], "step": state["progress"]["global_step"],
            "epoch": state["progress"]["epoch"]}


def assert_bitwise_equal(a: dict, b: dict) -> None:
    import torch

    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs"


def start_and_act(cmd: list[str], after_line: str, act, env=None) -> tuple[int, str]:
    """Start cmd, call act(process) once a stdout line contains after_line; (exit code, all output)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if after_line in line:
            act(proc)
            break
    lines.extend(proc.stdout)
    return proc.wait(timeout=600), "".join(lines)


def start_and_signal(cmd: list[str], after_line: str, sig=signal.SIGTERM, env=None) -> tuple[int, str]:
    """Start cmd, send sig once a stdout line contains after_line; (exit code, all output)."""
    return start_and_act(cmd, after_line, lambda proc: proc.send_signal(sig), env)


def kill_last_worker(proc, script: str = "") -> None:
    """SIGKILL the last of a launcher's two training workers (children whose command line holds script)."""
    import psutil

    workers = [p for p in psutil.Process(proc.pid).children() if script in " ".join(p.cmdline())]
    assert len(workers) == 2
    workers[-1].kill()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """500 train / 100 test synthetic images in the official layout (450 train, 50 val after the split)."""
    root = tmp_path_factory.mktemp("trainer") / "data"
    write_batches_folder(root, id_images(500), balanced_labels(500), id_images(100, seed=1), balanced_labels(100))
    return root


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real one-node Slurm (see slurm_cluster.py), started once for the session and stopped after it."""
    from slurm_cluster import SlurmCluster, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()
