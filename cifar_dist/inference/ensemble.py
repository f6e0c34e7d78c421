"""`cifar-dist ensemble`: several checkpoints by averaging their probabilities, or several submission
CSVs by majority vote (a tie goes to the earliest file among those voting for a tied label)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cifar_dist.cifar10 import NUM_CLASSES
from cifar_dist.errors import DataError
from cifar_dist.engine.distributed import process_group
from cifar_dist.inference.weights import load_model
from cifar_dist.inference.inputs import read_image_file, read_submission, write_submission
from cifar_dist.inference.methods import accuracy
from cifar_dist.inference.predict import check_outputs, write_outputs
from cifar_dist.outputs import check_writable
from cifar_dist.inference.scoring import DEFAULT_BATCH_SIZE, Scorer


def ensemble_checkpoints(checkpoints: list[Path], data: Path, out: Path, probs_path: Path | None = None,
                         tta_level=0, weights: str | None = None, label_format: str = "index",
                         batch_size: int = DEFAULT_BATCH_SIZE, overrides: list[str] = (), log=print) -> None:
    """The mean of the members' probabilities (each with TTA at tta_level) on every image of data."""
    check_outputs(out, probs_path)
    members = [load_model(path, weights, overrides) for path in checkpoints]  # every file checked before any work
    image_file = read_image_file(data)
    with process_group(members[0].cfg.train.device) as env:
        log = log if env.is_main else (lambda *a, **k: None)
        member_probs = []
        for path, member in zip(checkpoints, members):
            member_probs.append(Scorer(member, env, batch_size).images(image_file.images, tta_level))
            if image_file.labels is not None:
                log(f"{path} ({member.cfg.model.name}, {member.weights}): accuracy "
                    f"{accuracy(member_probs[-1], image_file.labels):.4f} on {data}")
        if not env.is_main:
            return
    probs = sum(member_probs) / len(member_probs)
    if image_file.labels is not None:
        log(f"ensemble of {len(members)}: accuracy {accuracy(probs, image_file.labels):.4f} on {data}")
    write_outputs(out, probs_path, image_file.ids, probs, label_format, log)


def majority_vote(votes: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """votes: files × images class indices → the most voted class per image; a tie goes to the label
    of the earliest file that voted for one of the tied classes."""
    counts = np.zeros((votes.shape[1], num_classes), dtype=np.int64)
    columns = np.arange(votes.shape[1])
    for file_votes in votes:
        counts[columns, file_votes] += 1
    is_top = counts[columns, votes] == counts.max(axis=1)  # files × images: voted for a most-voted class
    return votes[is_top.argmax(axis=0), columns]


def vote_submissions(paths: list[Path], out: Path, label_format: str = "index", log=print) -> None:
    """Majority vote over submission CSVs listing the same ids in the same order."""
    check_writable(out, "--out")
    files = [read_submission(path) for path in paths]
    ids, _ = files[0]
    for path, (other_ids, _) in zip(paths[1:], files[1:]):
        if len(other_ids) != len(ids):
            raise DataError(f"{path} has {len(other_ids)} rows, {paths[0]} has {len(ids)}: the files must list the "
                            "same ids in the same order")
        mismatch = next((row for row, (a, b) in enumerate(zip(ids, other_ids)) if a != b), None)
        if mismatch is not None:
            raise DataError(f"{path}, line {mismatch + 2}: id {other_ids[mismatch]!r} where {paths[0]} has "
                            f"{ids[mismatch]!r}: the files must list the same ids in the same order")
    votes = np.stack([labels for _, labels in files])
    winners = majority_vote(votes)
    unanimous = int(np.all(votes == votes[0], axis=0).sum())
    log(f"{len(paths)} files, {len(ids)} rows: {unanimous} unanimous, {len(ids) - unanimous} decided by vote")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_submission(out, ids, winners, label_format)
    log(f"wrote {out}")
