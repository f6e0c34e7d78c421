"""Files from elsewhere run no code: every command that reads a checkpoint, a reference state dict or a
CIFAR-10 pickle refuses one whose unpickling would call a function (one line, exit 2), and a checkpoint
whose entries are not what the code relies on is refused at load, naming the entry."""
from __future__ import annotations

import os
import pickle
import random
import tarfile
import zipfile

import numpy as np
import pytest
import torch

from cifar_dist.cli import main
from cifar_dist.engine import checkpoint
from cifar_dist.errors import CheckpointError
from cifar_dist.inference.weights import load_model
from conftest import balanced_labels, id_images, run_cli, tiny_args, train, write_batches_folder

SYSTEM = f"{os.system.__module__}.system"  # how pickle names os.system: posix.system


class Payload:
    """Unpickling it runs `touch marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "MARKER"


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    """A run folder whose last.pt the current `capture` wrote (one epoch of the tiny model)."""
    run_dir = tmp_path_factory.mktemp("safety") / "run"
    result = train(tiny_args(data_root, run_dir, "train.epochs=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def assert_refused(code: int, stderr: str, marker, *names: str) -> None:
    """Exit 2, one error line naming the refused call and the file(s), no traceback, the payload not run."""
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "refused" in errors[0] and f"`{SYSTEM}`" in errors[0], stderr[-3000:]
    assert all(name in errors[0] for name in names), (names, errors[0])
    assert not marker.exists()


# --- checkpoints -------------------------------------------------------------------------------

def test_capture_writes_what_torch_loads_weights_only(trained):
    state = torch.load(trained / "last.pt", weights_only=True)
    assert state["format_version"] == checkpoint.FORMAT_VERSION and "rng" not in state


def _respelled(path, old: bytes, new: bytes, out):
    """A copy of a torch.save file with a module name respelled in its pickle (protocol 2: GLOBAL lines)."""
    with zipfile.ZipFile(path) as zipped, zipfile.ZipFile(out, "w") as copy:
        for name in zipped.namelist():
            data = zipped.read(name)
            copy.writestr(name, data.replace(old, new) if name.endswith("data.pkl") else data)
    return out


def test_checkpoint_of_the_earlier_format_with_numpy_rng_state_still_loads(trained, tmp_path):
    state = checkpoint.load(trained / "last.pt")
    state["rng"] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": None}
    torch.save(state, tmp_path / "old.pt")
    numpy1 = _respelled(tmp_path / "old.pt", b"numpy._core.multiarray", b"numpy.core.multiarray", tmp_path / "np1.pt")
    for path in (tmp_path / "old.pt", numpy1):
        assert checkpoint.load(path)["progress"] == state["progress"]
        assert load_model(path).weights == "ema"


def _payload_checkpoint(path, marker):
    torch.save({"format_version": checkpoint.FORMAT_VERSION, "model": {}, "hook": Payload(marker)}, path)
    return path


@pytest.mark.parametrize("command", ["evaluate", "predict", "ensemble", "export", "predict-reference"])
def test_commands_refuse_a_checkpoint_that_would_run_code(command, tmp_path, marker, capsys):
    if command == "predict-reference":  # a best_ema_model.pth: a state dict of tensors, one of them not
        path = tmp_path / "best_ema_model.pth"
        torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.weight": Payload(marker)}, path)
        command = "predict"
    else:
        path = _payload_checkpoint(tmp_path / "payload.pt", marker)
    np.savez(tmp_path / "x.npz", x_test=np.zeros((2, 32, 32, 3), np.uint8))
    data = ["--data", str(tmp_path / "x.npz")]
    args = {"evaluate": ["--checkpoint", path, "--out", tmp_path / "ev"],
            "predict": ["--checkpoint", path, *data, "--out", tmp_path / "out.csv"],
            "ensemble": ["--checkpoint", path, "--checkpoint", path, *data, "--out", tmp_path / "out.csv"],
            "export": ["--checkpoint", path, "--format", "torchscript", "--out", tmp_path / "m.pt"]}[command]
    code = main([command, *map(str, args)])
    assert_refused(code, capsys.readouterr().err, marker, f"checkpoint {path}")
    assert {p.name for p in tmp_path.iterdir()} == {path.name, "x.npz"}  # nothing written


def test_resume_refuses_a_last_checkpoint_that_would_run_code(data_root, tmp_path, marker):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _payload_checkpoint(run_dir / "last.pt", marker)
    result = train(tiny_args(data_root, run_dir, "train.resume=auto"))
    assert_refused(result.returncode, result.stderr, marker, str(run_dir / "last.pt"))


@pytest.mark.parametrize("last", ["corrupt", "missing", "payload"])
def test_resume_fallback_to_the_previous_checkpoint_refuses_code_too(last, trained, data_root, tmp_path, marker):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if last == "payload":  # a file that would run code is no torn write: no fallback past it
        _payload_checkpoint(run_dir / "last.pt", marker)
        (run_dir / "last.prev.pt").write_bytes((trained / "last.pt").read_bytes())
        refused = run_dir / "last.pt"
    else:
        if last == "corrupt":
            (run_dir / "last.pt").write_bytes(b"half a checkpoint")
        refused = _payload_checkpoint(run_dir / "last.prev.pt", marker)
    result = train(tiny_args(data_root, run_dir, "train.resume=auto"))
    assert_refused(result.returncode, result.stderr, marker, f"checkpoint {refused} ")


# --- a checkpoint's entries, checked at load ---------------------------------------------------

def _edited(trained, tmp_path, edit):
    state = checkpoint.load(trained / "last.pt")
    edit(state)
    torch.save(state, tmp_path / "edited.pt")
    return tmp_path / "edited.pt"


def _wrong_shape(state):
    key = next(iter(state["model"]))
    state["model"][key] = state["ema"]["module"][key] = torch.zeros(3)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("config"), "no 'config' dict"),
    (lambda s: s.update(model=[1, 2]), "'model' is list, expected a dict of tensors"),
    (_wrong_shape, "do not fit model.name="),
])
def test_evaluate_refuses_a_malformed_checkpoint_in_one_line(edit, message, trained, tmp_path):
    path = _edited(trained, tmp_path, edit)
    result = run_cli("evaluate", "--checkpoint", path, "--out", tmp_path / "ev")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.count("\n") == 1 and message in result.stderr and str(path) in result.stderr
    assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(format_version=1), "has format 1"),
    (lambda s: s["config"].pop("train"), "'config.train' is NoneType, expected a dict"),
    (lambda s: s["model"].update({"extra": "text"}), "'model.extra' is str, expected a tensor"),
    (lambda s: s.update(ema={"weights": {}}), "expected None or {'module': tensors}"),
    (lambda s: s.pop("optimizer"), "no 'optimizer' entry"),
    (lambda s: s.update(world_size="1"), "'world_size' is str, expected int"),
    (lambda s: s["progress"].update(epochs=3), "'progress' holds unknown entries 'epochs'"),
    (lambda s: s["rank_local"].append(s["rank_local"][0]), "'rank_local' holds 2 entries for world_size 1"),
    (lambda s: s["rank_local"][0].update(model=None), "'rank_local[0].model' is not a list of tensors"),
])
def test_load_names_the_first_missing_or_mistyped_entry(edit, message, trained, tmp_path):
    with pytest.raises(CheckpointError, match="^checkpoint .*edited.pt") as err:
        checkpoint.load(_edited(trained, tmp_path, edit))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_resume_of_a_checkpoint_with_a_wrong_shape_is_one_line(trained, data_root, tmp_path):
    path = _edited(trained, tmp_path, _wrong_shape)
    result = train(tiny_args(data_root, tmp_path / "run", f"train.resume={path}"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "does not fit this run (" in errors[0] and "size mismatch" in errors[0]


# --- CIFAR-10 pickles --------------------------------------------------------------------------

def test_predict_refuses_an_image_pickle_that_would_run_code(trained, tmp_path, marker, capsys):
    path = tmp_path / "cifar_test.pkl"
    path.write_bytes(pickle.dumps({b"data": Payload(marker), b"ids": [1, 2]}, protocol=2))
    code = main(["predict", "--checkpoint", str(trained / "last.pt"), "--data", str(path),
                 "--out", str(tmp_path / "out.csv")])
    assert_refused(code, capsys.readouterr().err, marker, str(path))
    assert not (tmp_path / "out.csv").exists()


def _payload_data_root(root, layout: str, marker):
    """The small official layout with a data_batch_1 that would run code: as a folder or inside the .tar.gz."""
    folder = write_batches_folder(root, id_images(50), balanced_labels(50), id_images(10, seed=1),
                                  balanced_labels(10))
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": Payload(marker), b"labels": [0]}, protocol=2))
    if layout == "archive":
        with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
            tar.add(folder, arcname=folder.name)
        for file in folder.iterdir():
            file.unlink()
        folder.rmdir()
        return root / "cifar-10-python.tar.gz/data_batch_1"
    return folder / "data_batch_1"


@pytest.mark.parametrize("layout", ["folder", "archive"])
@pytest.mark.parametrize("command", ["prepare", "train"])
def test_data_batch_that_would_run_code_is_refused(command, layout, tmp_path, marker, capsys):
    source = _payload_data_root(tmp_path / "data", layout, marker)
    if command == "prepare":
        pytest.importorskip("ffcv")
        code = main(["prepare", f"data.root={tmp_path / 'data'}", "data.require_full_size=false",
                     f"data.beton_dir={tmp_path / 'betons'}"])
        stderr = capsys.readouterr().err
    else:
        result = train(tiny_args(tmp_path / "data", tmp_path / "run"))
        code, stderr = result.returncode, result.stderr
    assert_refused(code, stderr, marker, f"{source}: holds")
    assert not (tmp_path / "betons").exists()


def test_image_pickles_as_numpy_and_python_wrote_them_still_load(tmp_path):
    from cifar_dist.data.cifar import load_pickle_bytes

    rows = id_images(4).transpose(0, 3, 1, 2).reshape(4, -1)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        for key in (str, str.encode):
            batch = {key("data"): rows, key("nhwc"): id_images(4), key("labels"): list(np.arange(4)),
                     key("ids"): np.array(["a", "b", "c", "d"]), key("batch_label"): b"", key("scale"): np.float32(2)}
            loaded = load_pickle_bytes(pickle.dumps(batch, protocol=protocol), "x.pkl")
            assert np.array_equal(loaded[key("data")], rows) and loaded[key("labels")] == [0, 1, 2, 3]
            assert np.array_equal(loaded[key("nhwc")], id_images(4)) and loaded[key("ids")][3] == "d"
