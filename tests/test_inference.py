"""evaluate, predict, ensemble, export on one small model trained here on real CIFAR-10 (CPU).

The module trains once (fast net 16/32/32, 512 images, one epoch, a 2% val split of 1000 images)
and every test reads that checkpoint. The commands run in this process through `cli.main`, except
training and the torchrun evaluation.
"""
from __future__ import annotations

import csv
import json
import math
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from cifar_dist.augment.pipeline import EvalTransform
from cifar_dist.cli import main
from cifar_dist.config import config_to_dict, load_config
from cifar_dist.data.cifar import read_image_pickle
from cifar_dist.cifar10 import CLASS_NAMES
from cifar_dist.engine import checkpoint
from cifar_dist.engine.build import build_model_for
from cifar_dist.errors import CheckpointError
from cifar_dist.engine.evaluation import tta_output, tta_views
from cifar_dist.inference import export as export_module
from cifar_dist.inference.weights import load_model
from cifar_dist.inference.ensemble import majority_vote
from cifar_dist.inference.methods import Fit, FitStore, apply_fit, fit_offsets, fit_threshold, with_offsets
from conftest import REPO, run_cli, run_torchrun, shifted

VAL_IMAGES = 1000  # data.val_fraction=0.02 of 50,000


@pytest.fixture(scope="module")
def trained(tmp_path_factory, real_data_root):
    """A run folder with last.pt (model + EMA) of a fast net trained for one short epoch."""
    run_dir = tmp_path_factory.mktemp("inference") / "run"
    result = run_cli("train", "--config", REPO / "configs/smoke.yaml", f"data.root={real_data_root}",
                     "data.val_fraction=0.02", "data.train_subset=512", "model.widths=[16,32,32]",
                     "train.epochs=1", "train.lr=0.2", f"run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def test_batch(real_data_root):
    """(NHWC images, ids, labels) of the official test batch."""
    return read_image_pickle(real_data_root / "cifar-10-batches-py" / "test_batch")


@pytest.fixture(scope="module")
def test_evaluation(trained, tmp_path_factory):
    """evaluate --split test on the EMA weights: (results.json, rows of predictions.csv, out folder)."""
    out = tmp_path_factory.mktemp("evaluation")
    assert main(["evaluate", "--checkpoint", str(trained / "last.pt"), "--split", "test", "--out", str(out)]) == 0
    return json.loads((out / "results.json").read_text()), _csv_rows(out / "predictions.csv"), out


@pytest.fixture(scope="module")
def competition_pickle(test_batch, tmp_path_factory):
    """2,000 test images shuffled, ids remapped, as an unlabeled pickle (N × 32 × 32 × 3, bytes keys).

    Returns (path, the test-batch index of each row, the ids)."""
    images, _, _ = test_batch
    rng = np.random.default_rng(7)
    order = rng.permutation(len(images))[:2000]
    ids = [f"img{value}" for value in rng.choice(10**6, size=len(order), replace=False)]
    path = tmp_path_factory.mktemp("competition") / "cifar_test.pkl"
    path.write_bytes(pickle.dumps({b"data": images[order], b"ids": ids}, protocol=2))
    return path, order, ids


@pytest.fixture(scope="module")
def small_pickle(competition_pickle, tmp_path_factory):
    """The first 200 rows of the competition pickle, for the tests that predict several times."""
    images, ids, _ = read_image_pickle(competition_pickle[0])
    path = tmp_path_factory.mktemp("small") / "small.pkl"
    path.write_bytes(pickle.dumps({"data": images[:200], "ids": ids[:200]}))
    return path


@pytest.fixture(scope="module")
def val_evaluation(trained, tmp_path_factory):
    """evaluate --split val (TTA 0) in this process: its output folder."""
    out = tmp_path_factory.mktemp("val")
    assert main(["evaluate", "--checkpoint", str(trained / "last.pt"), "--split", "val", "--out", str(out)]) == 0
    return out


def _csv_rows(path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"cifar-dist {command}: error: "), err
    return err


def _no_files_named(folder, name: str) -> bool:
    """Neither the file nor a temporary of it in folder."""
    return not [p for p in folder.iterdir() if p.name == name or p.name.startswith(f".{name}.tmp")]


# --- the trainer's end-of-run report -----------------------------------------------------------

def test_trainer_report_has_per_class_precision_recall_f1(trained):
    rows = _csv_rows(trained / "per_class.csv")  # the schema evaluate writes too (with its one set of weights)
    assert rows[0] == ["class", "support", "model_precision", "model_recall", "model_f1",
                       "ema_precision", "ema_recall", "ema_f1"]
    confusion = np.array([[int(v) for v in row[1:]] for row in _csv_rows(trained / "confusion_matrix.csv")[1:]])
    assert confusion.sum() == VAL_IMAGES
    for index, row in enumerate(rows[1:]):
        tp, predicted, support = confusion[index, index], confusion[:, index].sum(), confusion[index].sum()
        precision, recall = (tp / predicted if predicted else 0.0), tp / support
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        assert row[0] == CLASS_NAMES[index] and int(row[1]) == support
        assert [float(v) for v in row[2:5]] == pytest.approx([precision, recall, f1], abs=1e-12)
        assert all(0 <= float(v) <= 1 for v in row[5:8])


# --- evaluate ----------------------------------------------------------------------------------

def test_evaluate_per_class_scores_agree_with_its_predictions(test_evaluation):
    results, rows, out = test_evaluation
    assert rows[0] == ["index", "label", "prediction", "confidence"] and len(rows) == 10_001
    labels = [int(r[1]) for r in rows[1:]]
    predictions = [int(r[2]) for r in rows[1:]]
    assert [int(r[0]) for r in rows[1:]] == list(range(10_000))
    assert results["images"] == 10_000 and results["split"] == "test" and results["weights"] == "ema"
    assert results["accuracy"] == sum(p == y for p, y in zip(predictions, labels)) / 10_000
    report = (out / "classification_report.md").read_text()
    for cls, name in enumerate(CLASS_NAMES):
        tp = sum(p == cls and y == cls for p, y in zip(predictions, labels))
        fp = sum(p == cls and y != cls for p, y in zip(predictions, labels))
        fn = sum(p != cls and y == cls for p, y in zip(predictions, labels))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        scores = results["per_class"][name]
        assert [scores["precision"], scores["recall"], scores["f1"]] == pytest.approx([precision, recall, f1],
                                                                                      abs=1e-12)
        assert scores["support"] == tp + fn == 1000
        assert f"| {name} | {precision:.4f} | {recall:.4f} | {f1:.4f} | 1000 |" in report
    # Expected calibration error, recomputed from the per-image confidences (rounded to 6 digits there).
    bins = [[0, 0.0, 0] for _ in range(15)]
    for row in rows[1:]:
        confidence = float(row[3])
        b = min(max(math.ceil(confidence * 15) - 1, 0), 14)
        bins[b][0] += 1
        bins[b][1] += confidence
        bins[b][2] += row[1] == row[2]
    ece = sum(abs(right / n - total / n) * n for n, total, right in bins if n) / 10_000
    assert results["calibration"]["ece"] == pytest.approx(ece, abs=1e-5)
    assert 0 < results["loss"] < 10 and results["averages"]["macro avg"]["support"] == 10_000
    pytest.importorskip("matplotlib")
    for name in ("confusion_matrix.png", "reliability_diagram.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_under_torchrun_counts_each_image_once(trained, val_evaluation, tmp_path):
    result = run_torchrun(2, ["-m", "cifar_dist", "evaluate", "--checkpoint", trained / "last.pt", "--split", "val",
                              "--out", tmp_path])
    assert result.returncode == 0, result.stderr[-3000:]
    two, one = (json.loads((folder / "results.json").read_text()) for folder in (tmp_path, val_evaluation))
    assert two["world_size"] == 2 and one["world_size"] == 1 and two["images"] == VAL_IMAGES
    assert two["confusion"] == one["confusion"] and two["accuracy"] == one["accuracy"]
    assert _csv_rows(tmp_path / "predictions.csv") == _csv_rows(val_evaluation / "predictions.csv")


# --- predict -----------------------------------------------------------------------------------

def test_predict_on_shuffled_pickle_matches_evaluate_row_by_row(trained, test_evaluation, competition_pickle,
                                                              tmp_path):
    path, order, ids = competition_pickle
    out, probs = tmp_path / "submission.csv", tmp_path / "probs.npy"
    assert main(["predict", "--checkpoint", str(trained / "last.pt"), "--data", str(path), "--out", str(out),
                 "--probs", str(probs)]) == 0
    rows = _csv_rows(out)
    evaluated = test_evaluation[1][1:]
    assert rows[0] == ["ID", "Labels"]
    assert [r[0] for r in rows[1:]] == ids
    assert [r[1] for r in rows[1:]] == [evaluated[index][2] for index in order]
    p = np.load(probs)
    assert p.shape == (2000, 10) and p.dtype == np.float32
    assert np.allclose(p.sum(axis=1), 1, atol=1e-5) and (p.argmax(axis=1).astype(str) == [r[1] for r in rows[1:]]).all()
    assert np.allclose(p.max(axis=1), [float(evaluated[index][3]) for index in order], atol=2e-6)


def test_predict_reads_official_batch_and_npz_and_writes_names(trained, test_batch, tmp_path):
    images, _, labels = test_batch
    np.savez(tmp_path / "few.npz", images=images[:30].transpose(0, 3, 1, 2).reshape(30, -1), ids=np.arange(500, 530))
    out = tmp_path / "names.csv"
    assert main(["predict", "--checkpoint", str(trained / "last.pt"), "--data", str(tmp_path / "few.npz"),
                 "--out", str(out), "--label-format", "name"]) == 0
    rows = _csv_rows(out)
    assert [r[0] for r in rows[1:]] == [str(i) for i in range(500, 530)]
    by_index = tmp_path / "index.csv"
    official = tmp_path / "test_batch"
    official.write_bytes(pickle.dumps({"data": images[:30].transpose(0, 3, 1, 2).reshape(30, -1),
                                       "labels": labels[:30].tolist()}))
    assert main(["predict", "--checkpoint", str(trained / "last.pt"), "--data", str(official),
                 "--out", str(by_index)]) == 0
    assert [CLASS_NAMES[int(r[1])] for r in _csv_rows(by_index)[1:]] == [r[1] for r in rows[1:]]
    assert [r[0] for r in _csv_rows(by_index)[1:]] == [str(i) for i in range(30)]


def test_fitted_methods_fit_on_val_reuse_and_zero_offsets_give_plain(trained, small_pickle, val_evaluation,
                                                                     tmp_path, capsys):
    path = small_pickle
    fitted_file = trained / "last.fitted.json"

    def predict(method: str) -> list[list[str]]:
        out = tmp_path / f"{method}.csv"
        assert main(["predict", "--checkpoint", str(trained / "last.pt"), "--data", str(path), "--method", method,
                     "--tta", "1", "--out", str(out)]) == 0
        return _csv_rows(out)

    plain = predict("plain")
    predict("class_specialized")
    first = capsys.readouterr().out
    assert "fitted on the val split" in first and f"val accuracy ({VAL_IMAGES} images): plain " in first
    stored = json.loads(fitted_file.read_text())
    fit = stored["fits"]["class_specialized/ema"]
    assert len(fit["offsets"]) == 10 and fit["val_accuracy"]["images"] == VAL_IMAGES
    assert fit["val_accuracy"]["class_specialized"] >= fit["val_accuracy"]["plain"]
    # The plain val accuracy it reports is evaluate's on the val split.
    assert fit["val_accuracy"]["plain"] == json.loads((val_evaluation / "results.json").read_text())["accuracy"]

    adaptive = predict("adaptive")
    fits = json.loads(fitted_file.read_text())["fits"]
    assert set(fits) == {"class_specialized/ema", "adaptive/ema/tta1"}
    assert 0 <= fits["adaptive/ema/tta1"]["threshold"] <= 1
    assert [r[0] for r in adaptive] == [r[0] for r in plain]

    fits["class_specialized/ema"]["offsets"] = [0.0] * 10  # reused as stored: zero offsets must give plain
    fitted_file.write_text(json.dumps({**stored, "fits": fits}))
    capsys.readouterr()
    assert predict("class_specialized") == plain
    assert "reusing the fit" in capsys.readouterr().out
    fits["class_specialized/ema"]["offsets"] = [0.0] * 3  # malformed: fitted again
    fitted_file.write_text(json.dumps({**stored, "fits": fits}))
    predict("class_specialized")
    assert "fitted on the val split" in capsys.readouterr().out
    assert len(json.loads(fitted_file.read_text())["fits"]["class_specialized/ema"]["offsets"]) == 10


def test_fit_store_is_valid_for_one_checkpoint_and_split(tmp_path):
    weights = tmp_path / "best.pt"
    weights.write_bytes(b"weights")
    store = FitStore(weights, {"val_fraction": 0.1, "split_seed": 0})
    fitted = Fit([0.5] + [0.0] * 9, 0.7, {"plain": 0.5})
    assert store.put("adaptive/ema/tta2", fitted) is None and (tmp_path / "best.fitted.json").is_file()
    assert store.get("adaptive/ema/tta2", 10) == fitted
    assert store.get("adaptive/ema/tta1", 10) is None and store.get("adaptive/ema/tta2", 100) is None
    assert FitStore(weights, {"val_fraction": 0.2, "split_seed": 0}).get("adaptive/ema/tta2", 10) is None
    weights.write_bytes(b"retrained")
    assert FitStore(weights, {"val_fraction": 0.1, "split_seed": 0}).get("adaptive/ema/tta2", 10) is None


def test_zero_offsets_and_fitting_on_known_cases():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(10), size=500).astype(np.float32)
    zero = with_offsets(probs, np.zeros(10))
    assert (zero.argmax(axis=1) == probs.argmax(axis=1)).all() and np.allclose(zero, probs, atol=1e-6)
    assert (apply_fit("class_specialized", Fit([0.0] * 10, None, {}), probs, None).argmax(1) == probs.argmax(1)).all()
    # Class 3 is under-predicted by a factor e^0.5: its best offset is about +0.5, and it helps.
    labels = probs.argmax(axis=1)
    shrunk = probs.copy()
    shrunk[:, 3] *= math.exp(-0.5)
    offsets = fit_offsets(shrunk, labels)
    before, after = (shrunk.argmax(1) == labels).mean(), (with_offsets(shrunk, offsets).argmax(1) == labels).mean()
    assert before < 0.95 and after > 0.99 and offsets.argmax() == 3 and 0.3 <= offsets[3] <= 0.7
    assert np.count_nonzero(fit_offsets(probs, labels)) == 0  # already perfect: nothing moves
    # τ: plain is right above confidence 0.6 only, the fallback below it.
    confident = np.array([[0.9, 0.1], [0.7, 0.3], [0.55, 0.45], [0.52, 0.48]])
    fallback = np.array([[0.1, 0.9], [0.2, 0.8], [0.2, 0.8], [0.1, 0.9]])
    assert fit_threshold(confident, fallback, np.array([0, 0, 1, 1])) == 0.56


# --- TTA -----------------------------------------------------------------------------------------

class FlipInvariant(nn.Module):
    """m(x) + m(mirror x): exactly invariant, since float addition commutes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        x = x.contiguous()
        return self.model(x) + self.model(x.flip(-1).contiguous())


def test_tta_level1_flip_invariant_model_and_hand_average(trained, test_batch):
    model = load_model(trained / "last.pt").on(torch.device("cpu"))
    images = EvalTransform(channels_last=True)(torch.from_numpy(test_batch[0][:16]).permute(0, 3, 1, 2))
    with torch.no_grad():
        invariant = FlipInvariant(model)
        assert torch.equal(tta_output(invariant, images, 1, "probabilities"),
                           tta_output(invariant, images, 0, "probabilities"))
        by_hand = 0.5 * torch.softmax(model(images), 1) + 0.5 * torch.softmax(model(images.flip(-1)), 1)
        torch.testing.assert_close(tta_output(model, images, 1, "probabilities"), by_hand, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(by_hand, torch.softmax(model(images), 1), atol=1e-4)  # the mirror matters


def test_heavy_tta_views_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 5))
    images = torch.rand(3, 3, 32, 32)

    def p(view):
        return torch.softmax(model(view), 1)

    def pair(view):
        return p(view) + p(view.flip(-1))

    level2 = 0.25 * pair(images) + 0.125 * (pair(shifted(images, -1, -1)) + pair(shifted(images, 1, 1)))
    two_px = sum(pair(shifted(images, dy, dx)) for dy, dx in ((2, 0), (-2, 0), (0, 2), (0, -2)))
    with torch.no_grad():
        torch.testing.assert_close(tta_output(model, images, "heavy", "probabilities"), 0.75 * level2 + two_px / 32,
                                   rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(tta_output(model, images, 2, "probabilities"), level2, rtol=1e-6, atol=1e-6)
    assert [w for w, _ in tta_views(images, "heavy")] == [3 / 16] * 2 + [3 / 32] * 4 + [1 / 32] * 8


def test_one_tta_rule_logits_or_probabilities_and_the_selective_share():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 5))
    images = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        views = tta_views(images, 2)
        logits = sum(w * model(v) for w, v in views)
        torch.testing.assert_close(tta_output(model, images, 2), logits, rtol=1e-6, atol=1e-6)  # logits by default
        plain = model(images)
        least_confident = torch.softmax(plain, 1).amax(1).argsort()[:2]  # 25% of 8 images
        expected = plain.clone()
        expected[least_confident] = logits[least_confident]
        selective = tta_output(model, images, 2, "logits", fraction=0.25)
        torch.testing.assert_close(selective, expected, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(selective, logits)  # the others kept their plain output
        probabilities = tta_output(model, images, 2, "probabilities", fraction=0.25)
        expected = torch.softmax(plain, 1)
        expected[least_confident] = tta_output(model, images, 2, "probabilities")[least_confident]
        torch.testing.assert_close(probabilities, expected, rtol=1e-6, atol=1e-6)


# --- ensemble ----------------------------------------------------------------------------------

def test_ensemble_of_one_checkpoint_equals_its_member(trained, small_pickle, tmp_path):
    path = small_pickle
    common = ["--data", str(path)]
    assert main(["predict", "--checkpoint", str(trained / "last.pt"), *common, "--out", str(tmp_path / "p.csv"),
                 "--probs", str(tmp_path / "p.npy")]) == 0
    assert main(["ensemble", "--checkpoint", str(trained / "last.pt"), *common, "--out", str(tmp_path / "e.csv"),
                 "--probs", str(tmp_path / "e.npy")]) == 0
    assert np.array_equal(np.load(tmp_path / "p.npy"), np.load(tmp_path / "e.npy"))
    assert (tmp_path / "p.csv").read_text() == (tmp_path / "e.csv").read_text()


def test_ensemble_of_two_averages_probabilities(trained, small_pickle, tmp_path):
    path = small_pickle
    for weights in ("model", "ema"):
        assert main(["predict", "--checkpoint", str(trained / "last.pt"), "--weights", weights, "--data", str(path),
                     "--out", str(tmp_path / f"{weights}.csv"), "--probs", str(tmp_path / f"{weights}.npy")]) == 0
    state = checkpoint.load(trained / "last.pt")
    state["model"] = state["ema"]["module"]
    torch.save(state, tmp_path / "ema_as_model.pt")
    assert main(["ensemble", "--checkpoint", str(trained / "last.pt"), "--checkpoint",
                 str(tmp_path / "ema_as_model.pt"), "--weights", "model", "--data", str(path),
                 "--probs", str(tmp_path / "e.npy"), "--out", str(tmp_path / "e.csv")]) == 0
    model, ema = np.load(tmp_path / "model.npy"), np.load(tmp_path / "ema.npy")
    assert not np.allclose(model, ema, atol=1e-3)
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), (model + ema) / 2, rtol=0, atol=1e-6)
    predicted = [int(r[1]) for r in _csv_rows(tmp_path / "e.csv")[1:]]
    assert predicted == ((model + ema) / 2).argmax(axis=1).tolist()


def test_csv_majority_vote_with_ties(tmp_path, capsys):
    files = {"a.csv": ["3", "1", "cat", "7", "2"], "b.csv": ["3", "2", "4", "airplane", "5"],
             "c.csv": ["3", "2", "5", "0", "6"]}
    for name, labels in files.items():
        (tmp_path / name).write_text("ID,Labels\n" + "".join(f"id{i},{label}\n" for i, label in enumerate(labels)))
    out = tmp_path / "vote.csv"
    assert main(["ensemble", "--csv", *(str(tmp_path / n) for n in files), "--out", str(out)]) == 0
    # unanimous 3; 2 beats 1; a three-way tie goes to the first file (cat = 3); airplane = 0 twice; tie → a's 2
    assert _csv_rows(out) == [["ID", "Labels"], ["id0", "3"], ["id1", "2"], ["id2", "3"], ["id3", "0"], ["id4", "2"]]
    assert majority_vote(np.array([[1, 1], [2, 2], [2, 3], [1, 3]])).tolist() == [1, 3]  # 2-2 tie: file 0's label
    assert majority_vote(np.array([[5], [1], [1], [2], [2]])).tolist() == [1]  # tie of 1 and 2: earliest voter's
    (tmp_path / "short.csv").write_text("ID,Labels\nid0,3\nid1,2\n")
    (tmp_path / "renamed.csv").write_text("ID,Labels\n" + "".join(f"x{i},1\n" for i in range(5)))
    (tmp_path / "bad.csv").write_text("ID,Labels\nid0,11\n")
    capsys.readouterr()
    for other, message in (("short.csv", "2 rows"), ("renamed.csv", "id 'x0'"), ("bad.csv", "line 2")):
        assert main(["ensemble", "--csv", str(tmp_path / "a.csv"), str(tmp_path / other),
                     "--out", str(tmp_path / "mismatch.csv")]) == 2
        assert message in _error_line(capsys, "ensemble")
        assert _no_files_named(tmp_path, "mismatch.csv")


# --- reference weights -------------------------------------------------------------------------

# Our module prefixes → names like the reference project's (top level as in its best_ema_model.pth).
REFERENCE_TOP = (("stem.0.0.", "conv1."), ("stem.0.1.", "bn1."), ("head.0.0.", "extra_conv."),
                 ("head.0.1.", "extra_bn."))
REFERENCE_BLOCK = (("residual.0.0.", "conv1."), ("residual.0.1.", "bn1."), ("residual.2.0.", "conv2."),
                   ("residual.2.1.", "bn2."), ("residual.3.mlp.0.", "ca.fc1."), ("residual.3.mlp.2.", "ca.fc2."),
                   ("residual.4.conv.", "sa.conv1."))


def reference_name(key: str) -> str:
    """stages.3.residual.2.0.weight → layer2.1.conv2.weight; stem.0.1.bias → bn1.bias; fc.weight stays."""
    if key.startswith("stages."):
        _, block, rest = key.split(".", 2)
        for ours, theirs in REFERENCE_BLOCK:
            if rest.startswith(ours):
                rest = theirs + rest[len(ours):]
        return f"layer{int(block) // 2 + 1}.{int(block) % 2}.{rest}"
    for ours, theirs in REFERENCE_TOP:
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return key


def test_reference_state_dict_loads_with_identical_logits(tmp_path, capsys):
    cfg = load_config(None, ["model.name=attention_resnet", "model.width=4", "train.amp=false"])
    model = build_model_for(cfg, torch.device("cpu"), channels_last=False).eval()
    with torch.no_grad():  # BN statistics away from their defaults, so that a wrong mapping shows
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    ours = {"format_version": checkpoint.FORMAT_VERSION, "config": config_to_dict(cfg), "model": model.state_dict(),
            "ema": None}
    torch.save(ours, tmp_path / "ours.pt")
    reference = {f"module.{reference_name(k)}": v for k, v in model.state_dict().items()}  # as DataParallel saves
    assert {k.split(".")[1] for k in reference} == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4",
                                                    "extra_conv", "extra_bn", "fc"}
    torch.save(reference, tmp_path / "best_ema_model.pth")
    images = torch.randn(2, 3, 32, 32)
    loaded = load_model(tmp_path / "best_ema_model.pth")
    assert loaded.weights == "reference" and loaded.cfg.model.options["width"] == 4
    with torch.no_grad():
        logits = loaded.model(images)
        assert torch.equal(logits, load_model(tmp_path / "ours.pt").model(images))
        assert torch.equal(logits, model(images))

    def broken(name: str, change) -> str:
        state = dict(reference)
        change(state)
        torch.save(state, tmp_path / name)
        with pytest.raises(CheckpointError) as err:
            load_model(tmp_path / name)
        return str(err.value)

    assert "missing layer4" in broken("no_layer4.pth", lambda s: [s.pop(k) for k in list(s) if ".layer4." in k])
    assert "unexpected head" in broken("extra.pth", lambda s: s.update({"head.weight": torch.zeros(1)}))
    shortcut = "module.layer2.0.shortcut.0.weight"
    assert "layer2 holds" in broken("short.pth", lambda s: s.pop(shortcut))
    assert "does not fit" in broken("shape.pth", lambda s: s.update({shortcut: torch.zeros(8, 8, 3, 3)}))
    # A plain ResNet-18 (no extra_conv / extra_bn) is another architecture: one line, exit 2, nothing written.
    resnet = {k: v for k, v in reference.items() if "extra_" not in k}
    torch.save(resnet, tmp_path / "resnet18.pth")
    out = tmp_path / "out.csv"
    np.savez(tmp_path / "x.npz", x_test=np.zeros((2, 32, 32, 3), np.uint8))
    assert main(["predict", "--checkpoint", str(tmp_path / "resnet18.pth"), "--data", str(tmp_path / "x.npz"),
                 "--out", str(out)]) == 2
    assert "missing extra_conv, extra_bn" in _error_line(capsys, "predict") and _no_files_named(tmp_path, "out.csv")


# --- export ------------------------------------------------------------------------------------

def _eager_logits(trained, pixels: torch.Tensor) -> torch.Tensor:
    model = load_model(trained / "last.pt").model
    with torch.no_grad():
        return model(EvalTransform(channels_last=False)(pixels))


def test_export_torchscript_round_trip(trained, test_batch, tmp_path, capsys):
    out = tmp_path / "model.torchscript.pt"
    assert main(["export", "--checkpoint", str(trained / "last.pt"), "--format", "torchscript", "--dynamic-batch",
                 "--out", str(out)]) == 0
    assert "largest difference" in capsys.readouterr().out
    pixels = torch.from_numpy(test_batch[0][:16]).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        exported = torch.jit.load(str(out))(pixels)
    torch.testing.assert_close(exported, _eager_logits(trained, pixels), rtol=1e-5, atol=1e-5)


def test_export_that_differs_from_eager_writes_nothing(trained, tmp_path, monkeypatch, capsys):
    original = export_module._torchscript

    def off_by_one(*args):
        run, how = original(*args)
        return (lambda pixels: run(pixels) + 1.0), how

    monkeypatch.setattr(export_module, "_torchscript", off_by_one)
    assert main(["export", "--checkpoint", str(trained / "last.pt"), "--format", "torchscript",
                 "--out", str(tmp_path / "m.pt")]) == 1
    assert "differs from the eager model by up to 1" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_export_onnx_round_trip(trained, test_batch, tmp_path, capsys):
    try:
        import onnx  # noqa: F401
    except ImportError:
        assert main(["export", "--checkpoint", str(trained / "last.pt"), "--format", "onnx",
                     "--out", str(tmp_path / "m.onnx")]) == 2
        assert "needs the 'onnx' package" in _error_line(capsys, "export") and list(tmp_path.iterdir()) == []
        pytest.skip("onnx is not installed here (the error above was checked); the round trip needs it")
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(trained / "last.pt"), "--format", "onnx", "--dynamic-batch",
                 "--out", str(out)]) == 0
    onnxruntime = pytest.importorskip("onnxruntime", reason="onnx is installed but onnxruntime is not: the export "
                                                            "was only checked with onnx.checker")
    pixels = torch.from_numpy(test_batch[0][:16]).permute(0, 3, 1, 2).contiguous()
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    exported = torch.from_numpy(session.run(None, {"pixels": pixels.numpy()})[0])
    torch.testing.assert_close(exported, _eager_logits(trained, pixels), rtol=1e-4, atol=1e-4)


# --- bad inputs --------------------------------------------------------------------------------

def _pickle(path, **batch) -> str:
    path.write_bytes(pickle.dumps(batch, protocol=2))
    return str(path)


def test_bad_inputs_one_line_exit_2_nothing_written(trained, test_batch, tmp_path, capsys):
    images = test_batch[0][:20]
    good = _pickle(tmp_path / "good.pkl", data=images, ids=list(range(20)))
    truncated_checkpoint = tmp_path / "truncated.pt"
    truncated_checkpoint.write_bytes((trained / "last.pt").read_bytes()[:50_000])
    no_ema = checkpoint.load(trained / "last.pt")
    no_ema["ema"] = None
    torch.save(no_ema, tmp_path / "no_ema.pt")
    truncated_pickle = tmp_path / "truncated.pkl"
    truncated_pickle.write_bytes((tmp_path / "good.pkl").read_bytes()[:5000])
    np.savez(tmp_path / "labels_only.npz", y_test=np.zeros(3))
    last = str(trained / "last.pt")
    cases = {
        "missing key": ([last, _pickle(tmp_path / "nodata.pkl", ids=[1, 2])], "missing key 'data'"),
        "wrong shape": ([last, _pickle(tmp_path / "shape.pkl", data=np.zeros((4, 100), np.uint8))], "(N, 3072)"),
        "wrong dtype": ([last, _pickle(tmp_path / "dtype.pkl", data=images.astype(np.float32))], "uint8"),
        "ids not unique": ([last, _pickle(tmp_path / "ids.pkl", data=images, ids=[1] * 20)], "not unique"),
        "ids too few": ([last, _pickle(tmp_path / "few.pkl", data=images, ids=[1, 2])], "2 ids for 20 images"),
        "truncated pickle": ([last, str(truncated_pickle)], "truncated"),
        "npz without images": ([last, str(tmp_path / "labels_only.npz")], "missing array 'x_test' or 'images'"),
        "truncated checkpoint": ([str(truncated_checkpoint), good], "is corrupt"),
        "missing checkpoint": ([str(tmp_path / "nope.pt"), good], "does not exist"),
        "another architecture": ([last, good, "model.widths=[8,16,16]"], "do not fit model.name=fast"),
        "no EMA": ([str(tmp_path / "no_ema.pt"), good, "--weights", "ema"], "holds no EMA"),
        "fit on test refused": ([last, good, "--method", "class_specialized", "data.val_fraction=0"],
                                "fitting on the test split is refused"),
    }
    out = tmp_path / "out" / "submission.csv"
    for name, ((checkpoint_path, data, *extra), message) in cases.items():
        code = main(["predict", "--checkpoint", checkpoint_path, "--data", data, "--out", str(out),
                     "--probs", str(tmp_path / "out" / "p.npy"), *extra])
        err = _error_line(capsys, "predict")
        assert code == 2 and message in err, (name, err)
        assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir()), name
    assert main(["evaluate", "--checkpoint", str(truncated_checkpoint), "--out", str(tmp_path / "ev")]) == 2
    assert "is corrupt" in _error_line(capsys, "evaluate") and not (tmp_path / "ev").exists()
    assert main(["export", "--checkpoint", str(truncated_checkpoint), "--format", "torchscript",
                 "--out", str(tmp_path / "m.pt")]) == 2
    assert "is corrupt" in _error_line(capsys, "export") and not (tmp_path / "m.pt").exists()


# --- every output checked before any work, several written together ----------------------------

@pytest.mark.parametrize("argv, option", [
    (["evaluate", "--out", "/proc/cifar_dist_x"], "--out /proc/cifar_dist_x cannot be written"),
    (["export", "--format", "torchscript", "--out", "/proc/x.pt"], "--out /proc/x.pt cannot be written"),
])
def test_an_unwritable_output_is_one_line_before_any_work(trained, capsys, argv, option):
    assert main([argv[0], "--checkpoint", str(trained / "last.pt"), *argv[1:]]) == 2
    assert option in _error_line(capsys, argv[0])


def test_predict_writes_both_outputs_or_neither_and_shows_progress(trained, small_pickle, tmp_path, capsys):
    out = tmp_path / "ok.csv"
    argv = ["predict", "--checkpoint", str(trained / "last.pt"), "--data", str(small_pickle), "--out", str(out)]
    assert main([*argv, "--probs", "/proc/p.npy"]) == 2
    assert "--probs /proc/p.npy cannot be written" in _error_line(capsys, "predict") and not out.exists()
    assert main([*argv, "--probs", str(tmp_path / "p.npy")]) == 0
    assert out.is_file() and (tmp_path / "p.npy").is_file()
    assert "TTA 0: 1/1 batches" in capsys.readouterr().err  # progress, as plain lines off a terminal


def test_a_folder_given_for_a_file_is_named_as_a_folder(trained, tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(trained)]) == 2
    assert "is a folder; pass a checkpoint file in it" in _error_line(capsys, "evaluate")
    assert main(["predict", "--checkpoint", str(trained / "last.pt"), "--data", str(tmp_path)]) == 2
    assert "is a folder; expected a test pickle" in _error_line(capsys, "predict")
    assert main(["train", "--config", str(tmp_path)]) == 2
    assert "is a folder; pass a YAML file" in _error_line(capsys, "train")


def test_sweep_summary_checks_its_output_folder_first(trained, capsys):
    assert main(["sweep-summary", str(trained.parent), "--out", "/proc/x"]) == 2
    assert "--out /proc/x cannot be written" in _error_line(capsys, "sweep-summary")
