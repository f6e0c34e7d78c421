"""RunLogger: metric files, plot, progress lines and ETAs, TensorBoard, wandb offline / disabled / missing, the
profiler's files. CPU only, no network."""
from __future__ import annotations

import io
import json
import math
import re
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pandas as pd
import pytest

from cifar_dist.config import LoggingConfig, WandbConfig
from cifar_dist.engine.run_log import RunLength, RunLogger, pace
from conftest import tiny_args, train

REPO_ROOT = Path(__file__).resolve().parents[1]
CLASS_NAMES = ["airplane", "automobile", "bird"]
CONFUSION = [[91, 4, 5], [6, 87, 7], [20, 30, 50]]
EMA_CONFUSION = [[93, 3, 4], [5, 90, 5], [15, 25, 60]]


def _scores(confusion) -> dict:
    """Per-class precision, recall, F1 and support by their definitions."""
    size = len(confusion)
    support = [sum(row) for row in confusion]
    predicted = [sum(confusion[r][c] for r in range(size)) for c in range(size)]
    precision = [confusion[c][c] / predicted[c] for c in range(size)]
    recall = [confusion[c][c] / support[c] for c in range(size)]
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall)]
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


SCORES = {"model": _scores(CONFUSION), "ema": _scores(EMA_CONFUSION)}
FINAL = {"model": {"acc": 0.76, "loss": 0.7, "count": 300}}
CONFIG_DICT = {"train": {"lr": 0.1, "epochs": 3}, "model": {"name": "fast"}}


def _cfg(mode: str = "disabled", plot: bool = True, print_every_steps: int = 50) -> LoggingConfig:
    return LoggingConfig(print_every_steps=print_every_steps, plot=plot,
                         wandb=WandbConfig(mode=mode, project="cifar_dist_tests", tags=["test"]))


def _record(epoch: int) -> dict:
    """Distinct values per epoch and key, so a value landing in the wrong place is caught."""
    record = {
        "epoch": epoch, "global_step": 10 * epoch,
        "train_loss": 2.0 / epoch + 0.0123, "train_acc": 0.3 + 0.1 * epoch,
        "val_loss": 1.9 / epoch + 0.0456, "val_acc": 0.35 + 0.1 * epoch,
        "ema_val_loss": 1.8 / epoch + 0.0789, "ema_val_acc": 0.4 + 0.1 * epoch,
        "lr": 0.1 / epoch, "images_per_s": 1000.5 * epoch, "epoch_s": 3.25 * epoch,
        "peak_memory_mb": 512.0 + epoch,
    }
    if epoch == 2:
        record["grad_norm"] = 1.75  # an extra key present in one epoch only
    return record


def _run_epochs(logger: RunLogger, epochs) -> None:
    for epoch in epochs:
        logger.start_epoch(epoch, 4)
        for step_in_epoch in range(1, 5):
            logger.step(step_in_epoch, 10 * (epoch - 1) + step_in_epoch, 1.0 / step_in_epoch, 0.1)
        logger.end_epoch(_record(epoch))


def _metrics_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_disabled_logger_writes_prints_and_starts_nothing(tmp_path, capsys):
    existing_dir, missing_dir = tmp_path / "existing", tmp_path / "missing"
    existing_dir.mkdir()
    for run_dir in (existing_dir, missing_dir):
        # wandb offline is asked for: a rank > 0 must not start it either.
        logger = RunLogger(run_dir, _cfg(mode="offline"), enabled=False, config_dict=CONFIG_DICT)
        _run_epochs(logger, [1, 2])
        logger.load_history([_record(1)])
        logger.log_final(FINAL, SCORES, CONFUSION, CLASS_NAMES)
        logger.close()
        assert logger.history == []
        assert logger.wandb_run_id is None
    assert list(existing_dir.iterdir()) == []
    assert not missing_dir.exists()
    assert capsys.readouterr() == ("", "")


def test_three_epochs_fill_metrics_summary_and_plot(tmp_path, capsys):
    run_dir = tmp_path / "run"
    logger = RunLogger(run_dir, _cfg(), enabled=True, config_dict=CONFIG_DICT)
    _run_epochs(logger, [1, 2, 3])
    logger.close()
    records = [_record(epoch) for epoch in (1, 2, 3)]

    assert _metrics_lines(run_dir) == records
    assert logger.history == records

    summary = pd.read_csv(run_dir / "summary.csv")
    expected_columns = list(_record(1)) + ["grad_norm"]
    assert list(summary.columns) == expected_columns
    assert len(summary) == 3
    for row, record in zip(summary.to_dict("records"), records):
        for key in expected_columns:
            if key in record:
                assert row[key] == pytest.approx(record[key], rel=1e-12), key
            else:
                assert math.isnan(row[key]), key

    png = run_dir / "training_history.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    pixels = matplotlib.image.imread(png)
    assert pixels.shape[0] >= 300 and pixels.shape[1] >= 600
    assert pixels.std() > 0.01  # not a blank canvas
    assert not list(run_dir.glob("*.tmp"))

    out = capsys.readouterr().out
    assert "epoch 2 | train loss 1.0123 acc 0.5000 | val loss 0.9956 acc 0.5500" in out
    assert "| ema val loss 0.9789 acc 0.6000 | lr 0.05 | 2001 img/s 6.5 s | peak 514 MB" in out


def test_plot_off_writes_no_png(tmp_path):
    logger = RunLogger(tmp_path, _cfg(plot=False), enabled=True, config_dict=CONFIG_DICT)
    _run_epochs(logger, [1])
    assert (tmp_path / "metrics.jsonl").exists()
    assert not (tmp_path / "training_history.png").exists()


def test_load_history_drops_epochs_logged_after_the_checkpoint(tmp_path):
    first = RunLogger(tmp_path, _cfg(), enabled=True, config_dict=CONFIG_DICT)
    _run_epochs(first, [1, 2, 3, 4])  # the process died after logging epoch 4, checkpoint holds 2
    first.close()
    assert [record["epoch"] for record in _metrics_lines(tmp_path)] == [1, 2, 3, 4]

    resumed = RunLogger(tmp_path, _cfg(), enabled=True, config_dict=CONFIG_DICT)
    resumed.load_history([_record(1), _record(2)])
    assert _metrics_lines(tmp_path) == [_record(1), _record(2)]
    assert len(pd.read_csv(tmp_path / "summary.csv")) == 2

    _run_epochs(resumed, [3])
    resumed.close()
    assert _metrics_lines(tmp_path) == [_record(1), _record(2), _record(3)]
    assert resumed.history == [_record(1), _record(2), _record(3)]
    assert list(pd.read_csv(tmp_path / "summary.csv")["epoch"]) == [1, 2, 3]


def test_fresh_logger_replaces_stale_metrics_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(_record(1)) + "\n" + json.dumps(_record(2)) + "\n")
    logger = RunLogger(tmp_path, _cfg(), enabled=True, config_dict=CONFIG_DICT)
    _run_epochs(logger, [1])
    assert _metrics_lines(tmp_path) == [_record(1)]


def _seconds_per_call(monkeypatch, seconds: float) -> None:
    """The ETAs' clock advances this much at each call (the epoch's start, then each step)."""
    ticks = iter(range(10**6))
    monkeypatch.setattr(pace, "monotonic", lambda: seconds * next(ticks))


def test_plain_progress_lines_every_print_every_steps_with_the_epoch_and_run_eta(tmp_path, capsys, monkeypatch):
    _seconds_per_call(monkeypatch, 1.0)
    # Epoch 3 of 5, 23 steps each: steps 47 to 69 of 115, 64 images a step.
    logger = RunLogger(tmp_path, _cfg(print_every_steps=5), enabled=True, config_dict=CONFIG_DICT,
                       length=RunLength(stop_step=115, steps_per_epoch=23, images_per_step=64))
    capsys.readouterr()
    logger.start_epoch(3, 23)
    for step_in_epoch in range(1, 24):
        logger.step(step_in_epoch, 46 + step_in_epoch, 1.2345 + step_in_epoch, 0.0812)
    captured = capsys.readouterr()
    # The first two steps are warm-up, then 1 s a step: at step 5, 18 s left in the epoch, 115 - 51 = 64 in the run;
    # after five timed steps (step 7, global 53) the run's estimate, once.
    assert captured.out.splitlines() == [
        "epoch 3 step 5/23 loss 6.2345 lr 0.0812 | epoch ETA 18 s | run ETA 1 min 4 s",
        "estimate: about 1 min 2 s for the 2.7 epochs left of 5 at 64 images/s (training steps; each epoch's "
        "evaluation adds to it)",
        "epoch 3 step 10/23 loss 11.2345 lr 0.0812 | epoch ETA 13 s | run ETA 59 s",
        "epoch 3 step 15/23 loss 16.2345 lr 0.0812 | epoch ETA 8 s | run ETA 54 s",
        "epoch 3 step 20/23 loss 21.2345 lr 0.0812 | epoch ETA 3 s | run ETA 49 s",
    ]
    assert captured.err == ""


def test_without_the_run_length_the_lines_give_the_epoch_eta_only(tmp_path, capsys, monkeypatch):
    _seconds_per_call(monkeypatch, 0.5)
    logger = RunLogger(tmp_path, _cfg(print_every_steps=2), enabled=True, config_dict=CONFIG_DICT)
    logger.start_epoch(1, 4)
    for step_in_epoch in range(1, 5):
        logger.step(step_in_epoch, step_in_epoch, 1.0, 0.1)
    assert capsys.readouterr().out.splitlines() == ["epoch 1 step 2/4 loss 1.0000 lr 0.1",  # not timed yet
                                                    "epoch 1 step 4/4 loss 1.0000 lr 0.1 | epoch ETA 0 s"]


def test_a_run_of_more_than_a_day_points_to_the_speed_recipe_once(tmp_path, capsys, monkeypatch):
    _seconds_per_call(monkeypatch, 2.0)  # 500 epochs of 98 steps at 2 s a step: 98,000 s
    logger = RunLogger(tmp_path, _cfg(print_every_steps=0), enabled=True, config_dict=CONFIG_DICT,
                       length=RunLength(stop_step=500 * 98, steps_per_epoch=98, images_per_step=512))
    logger.start_epoch(1, 98)
    for step_in_epoch in range(1, 30):
        logger.step(step_in_epoch, step_in_epoch, 1.0, 0.1)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("estimate: about 1 d 3 h for 500 epochs at 256 images/s (training steps; each epoch's "
                        "evaluation adds to it)")
    assert lines[1].startswith("note: that is more than a day on this machine") and len(lines) == 2
    assert lines[1].endswith("./launch/train --config configs/fast.yaml")


def test_tensorboard_events_hold_each_epochs_scalars_at_its_global_step(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def read_back():
        events = EventAccumulator(str(tmp_path / "tensorboard"))
        events.Reload()
        return events

    cfg = LoggingConfig(plot=False, tensorboard=True, wandb=WandbConfig(mode="disabled"))
    logger = RunLogger(tmp_path, cfg, enabled=True, config_dict=CONFIG_DICT)
    _run_epochs(logger, [1, 2, 3])
    logger.log_final(FINAL, SCORES, CONFUSION, CLASS_NAMES)
    logger.close()
    events = read_back()
    assert set(_record(1)) | {"grad_norm", "final/model_acc"} <= set(events.Tags()["scalars"])
    for key in ("epoch", "train_loss", "val_acc", "images_per_s", "peak_memory_mb"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [10, 20, 30], key
        assert [s.value for s in scalars] == pytest.approx([_record(e)[key] for e in (1, 2, 3)], rel=1e-6), key
    assert [s.step for s in events.Scalars("grad_norm")] == [20]
    assert [(s.step, s.value) for s in events.Scalars("final/model_acc")] == [(30, pytest.approx(0.76))]

    # A resume from the checkpoint of epoch 2 (the process died after logging epoch 3): what came after step 20
    # is dropped from the display, and epoch 3 is there once, as the resumed run logged it.
    resumed = RunLogger(tmp_path, cfg, enabled=True, config_dict=CONFIG_DICT)
    resumed.load_history([_record(1), _record(2)])
    resumed.end_epoch({**_record(3), "train_loss": 0.125})
    resumed.close()
    events = read_back()
    assert [(s.step, s.value) for s in events.Scalars("train_loss")] == [
        (10, pytest.approx(_record(1)["train_loss"])), (20, pytest.approx(_record(2)["train_loss"])), (30, 0.125)]
    assert events.Scalars("final/model_acc") == []


def test_tensorboard_without_its_package_is_a_one_line_config_error(monkeypatch):
    import importlib.util

    from cifar_dist.config import load_config
    from cifar_dist.engine.build import preflight
    from cifar_dist.errors import ConfigError

    cfg = load_config(None, ["model.name=fast", "data.loader=gpu", "logging.tensorboard=true"])
    preflight(cfg)  # installed: no error
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))
    with pytest.raises(ConfigError) as error:
        preflight(cfg)
    message = str(error.value)
    assert "'tensorboard' package" in message and "pip install -e .[tensorboard]" in message
    assert "logging.tensorboard=false" in message and "\n" not in message


def test_terminal_gets_a_bar_and_no_plain_lines(tmp_path, capsys, monkeypatch):
    class FakeTerminal(io.StringIO):
        def isatty(self):
            return True

    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    logger = RunLogger(tmp_path, _cfg(print_every_steps=5), enabled=True, config_dict=CONFIG_DICT)
    logger.start_epoch(3, 23)
    for step_in_epoch in range(1, 24):
        logger.step(step_in_epoch, 100 + step_in_epoch, 1.2345, 0.0812)
    logger.end_epoch(_record(3))
    logger.close()
    assert "step" not in capsys.readouterr().out
    assert "epoch 3" in terminal.getvalue() and "/23" in terminal.getvalue()


# wandb's offline transaction log (run-<id>.wandb): a 7-byte header (":W&B", magic 0xBEE1,
# version 0), then LevelDB-log framing: 32 KiB blocks, each chunk headed by crc32 (over type byte
# and payload), length and type (1 full, 2 first, 3 middle, 4 last); chunks are protobuf Records.
_BLOCK_BYTES, _CHUNK_HEADER_BYTES = 32768, 7


def _read_wandb_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0), "unknown .wandb file format"
    payloads, pending, position = [], b"", 7
    while position + _CHUNK_HEADER_BYTES <= len(data):
        left_in_block = _BLOCK_BYTES - position % _BLOCK_BYTES
        if left_in_block < _CHUNK_HEADER_BYTES:
            position += left_in_block
            continue
        checksum, length, chunk_type = struct.unpack("<IHB", data[position:position + 7])
        if chunk_type == 0 and length == 0:  # zero padding at the end of a block
            position += left_in_block
            continue
        chunk = data[position + 7:position + 7 + length]
        assert zlib.crc32(bytes([chunk_type]) + chunk) == checksum, f"corrupt chunk at byte {position}"
        position += _CHUNK_HEADER_BYTES + length
        pending = chunk if chunk_type in (1, 2) else pending + chunk
        if chunk_type in (1, 4):
            payloads.append(pending)
    records = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def _wandb_history(records) -> list[dict]:
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for record in records if record.WhichOneof("record_type") == "history"]


def _wandb_run_record(records):
    (run_record,) = [record.run for record in records if record.WhichOneof("record_type") == "run"]
    return run_record


def _is_offline_run_folder_of(folder: Path, run_id: str) -> bool:
    # wandb adds "-1", "-2" when a folder of the same id and second already exists.
    return re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", folder.name) is not None


def test_wandb_offline_logs_epochs_tables_and_resumes_same_id(tmp_path):
    pytest.importorskip("wandb")
    logger = RunLogger(tmp_path, _cfg(mode="offline"), enabled=True, config_dict=CONFIG_DICT)
    run_id = logger.wandb_run_id
    assert re.fullmatch(r"[a-z0-9]{8}", run_id)
    _run_epochs(logger, [1, 2])
    logger.log_final(FINAL, SCORES, CONFUSION, CLASS_NAMES)
    logger.close()

    (first_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    assert _is_offline_run_folder_of(first_dir, run_id)
    wandb_file = first_dir / f"run-{run_id}.wandb"
    assert wandb_file.stat().st_size > 0
    records = _read_wandb_records(wandb_file)

    run_record = _wandb_run_record(records)
    assert run_record.run_id == run_id
    assert run_record.project == "cifar_dist_tests"
    assert not run_record.resume
    config = {update.key: json.loads(update.value_json) for update in run_record.config.update}
    assert config["train"] == CONFIG_DICT["train"] and config["model"] == CONFIG_DICT["model"]

    history = _wandb_history(records)
    epoch_rows = [row for row in history if "train_loss" in row]
    assert len(epoch_rows) == 2
    for row, epoch in zip(epoch_rows, (1, 2)):
        assert row["_step"] == 10 * epoch
        assert {key: row[key] for key in _record(epoch)} == _record(epoch)

    # log_final: both tables land in the run's files as wandb table JSON.
    (final_row,) = [row for row in history if "per_class/path" in row]
    assert final_row["final/model_acc"] == 0.76
    per_class_table = json.loads((first_dir / "files" / final_row["per_class/path"]).read_text())
    assert per_class_table["columns"] == ["class", "support", "model_precision", "model_recall", "model_f1",
                                          "ema_precision", "ema_recall", "ema_f1"]  # per_class.csv's schema
    assert per_class_table["data"] == [[name, 100] + [SCORES[kind][metric][i] for kind in ("model", "ema")
                                                      for metric in ("precision", "recall", "f1")]
                                       for i, name in enumerate(CLASS_NAMES)]
    confusion_table = json.loads((first_dir / "files" / final_row["confusion_matrix_table/path"]).read_text())
    assert confusion_table["columns"] == ["Actual", "Predicted", "nPredictions"]
    assert confusion_table["data"] == [[actual, predicted, CONFUSION[i][j]]
                                       for i, actual in enumerate(CLASS_NAMES)
                                       for j, predicted in enumerate(CLASS_NAMES)]

    # A resumed run (id from the checkpoint) continues the same wandb run id.
    resumed = RunLogger(tmp_path, _cfg(mode="offline"), enabled=True, config_dict=CONFIG_DICT,
                        wandb_run_id=run_id)
    assert resumed.wandb_run_id == run_id
    resumed.load_history([_record(1), _record(2)])
    _run_epochs(resumed, [3])
    resumed.close()
    (second_dir,) = [path for path in (tmp_path / "wandb").glob("offline-run-*") if path != first_dir]
    assert _is_offline_run_folder_of(second_dir, run_id)
    resumed_records = _read_wandb_records(second_dir / f"run-{run_id}.wandb")
    resumed_run_record = _wandb_run_record(resumed_records)
    assert resumed_run_record.run_id == run_id and resumed_run_record.resume
    (epoch_3_row,) = [row for row in _wandb_history(resumed_records) if "train_loss" in row]
    assert epoch_3_row["_step"] == 30 and epoch_3_row["train_loss"] == _record(3)["train_loss"]


def test_wandb_disabled_creates_no_folder_and_never_imports_wandb(tmp_path):
    result = _run_python(f"""
        import sys
        from pathlib import Path
        from cifar_dist.config import ConfigError, LoggingConfig, WandbConfig
        from cifar_dist.engine.run_log import RunLogger

        logger = RunLogger(Path({str(tmp_path)!r}), LoggingConfig(wandb=WandbConfig(mode="disabled")),
                           enabled=True, config_dict={{}})
        logger.start_epoch(1, 2)
        logger.step(1, 1, 0.5, 0.1)
        logger.end_epoch({{"epoch": 1, "global_step": 2, "train_loss": 0.5}})
        logger.log_final({{}}, {{"model": {{"precision": [1.0], "recall": [1.0], "f1": [1.0], "support": [1]}}}},
                         [[1]], ["cat"])
        logger.close()
        print("wandb imported:", "wandb" in sys.modules, "run id:", logger.wandb_run_id)
    """)
    assert result.returncode == 0, result.stderr
    assert "wandb imported: False run id: None" in result.stdout
    assert (tmp_path / "metrics.jsonl").exists()  # the logger did run
    assert not (tmp_path / "wandb").exists()


def test_wandb_missing_is_an_actionable_error(tmp_path):
    result = _run_python(f"""
        import sys
        sys.modules["wandb"] = None  # as if the package were not installed
        from pathlib import Path
        from cifar_dist.config import ConfigError, LoggingConfig, WandbConfig
        from cifar_dist.engine.run_log import RunLogger

        cfg = LoggingConfig(wandb=WandbConfig(mode="offline"))
        RunLogger(Path({str(tmp_path)!r}) / "rank1", cfg, enabled=False, config_dict={{}})  # no error off rank 0
        try:
            RunLogger(Path({str(tmp_path)!r}) / "rank0", cfg, enabled=True, config_dict={{}})
        except ConfigError as error:
            print("ERROR:", error)
    """)
    assert result.returncode == 0, result.stderr
    assert "ERROR:" in result.stdout, "no ConfigError raised"
    message = result.stdout.split("ERROR:", 1)[1]
    assert "'wandb'" in message
    assert "pip install -e .[wandb]" in message
    assert "logging.wandb.mode=disabled" in message
    assert "logging.wandb.mode=offline" in message


def test_profile_writes_a_trace_and_the_top_operators_and_attaches_them_to_wandb(data_root, tmp_path):
    pytest.importorskip("wandb")
    result = train(tiny_args(data_root, tmp_path, "train.epochs=1", "train.profile=2:4", "logging.wandb.mode=offline"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    trace, table = tmp_path / "profile" / "steps_2-4_rank0.trace.json", tmp_path / "profile" / "steps_2-4_rank0.top_ops.txt"
    assert f"profile: {trace}, {table}" in result.stdout
    names = {event.get("name") for event in json.loads(trace.read_text())["traceEvents"]}
    assert "aten::convolution" in names and "aten::convolution_backward" in names
    assert {"ProfilerStep#0", "ProfilerStep#1"} <= names and "ProfilerStep#2" not in names  # steps 3 and 4
    assert "Self CPU" in table.read_text() and "aten::" in table.read_text()
    (wandb_file,) = (tmp_path / "wandb").glob("offline-run-*/*.wandb")
    artifacts = [r.artifact for r in _read_wandb_records(wandb_file) if r.WhichOneof("record_type") == "artifact"
                 and r.artifact.type == "profile"]
    assert [sorted(entry.path for entry in a.manifest.contents) for a in artifacts] == [
        ["profile/steps_2-4_rank0.top_ops.txt", "profile/steps_2-4_rank0.trace.json"]]
