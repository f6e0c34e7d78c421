"""`cifar-dist <command> [--config FILE.yaml] [key.sub=value ...]`; `cifar-dist config` lists every key;
`cifar-dist bench NAME [args]` runs a benchmark."""
from __future__ import annotations

import argparse
import sys

from cifar_dist.benchmarks import BENCHMARKS
from cifar_dist.config import KEYS_HINT, TTA_LEVELS, load_config
from cifar_dist.errors import ConfigError, ExitCode, UserError
from cifar_dist.inference.inputs import LABEL_FORMATS
from cifar_dist.inference.methods import METHODS

EXPORT_FORMATS = ("onnx", "torchscript")  # `inference.export` imports torch, so they are named here



DELEGATED = {
    "slurm": "submit training or a sweep to Slurm (submitit), requeued across preemption",
    "sweep-summary": "one table of every run under a folder: swept values, accuracies, status",
}


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (defaults apply to keys it leaves out)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="dotted config overrides, e.g. train.epochs=3 data.loader=gpu")


def _add_inference_common(parser: argparse.ArgumentParser, what: str = "checkpoint", batch_size: int = 500,
                          batch_help: str = "images per forward pass") -> None:
    parser.add_argument("--weights", choices=("model", "ema"),
                        help="which weights of a cifar_dist checkpoint (default: the EMA when it has one)")
    parser.add_argument("--batch-size", type=_positive_int, default=batch_size,
                        help=f"{batch_help} (default {batch_size})")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help=f"overrides of the {what}'s config, e.g. data.root=../shared/data data.loader=gpu "
                             "train.device=cpu")


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}")
    return int(text)


def _tta_level(text: str):
    levels = {str(level): level for level in TTA_LEVELS}
    if text not in levels:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(levels)}; got {text!r}")
    return levels[text]


TTA_HELP = ("test-time augmentation: 0 none, 1 + mirror, 2 + mirrors of ±1 px translations (airbench weights), "
            "heavy + ±2 px translations in 4 directions and their mirrors; averaged as the checkpoint's "
            "train.tta_average says (logits unless overridden)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cifar-dist", description=__doc__, epilog=KEYS_HINT)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help, epilog=KEYS_HINT)

    _add_common(command("config", "print the resolved config as YAML, each key with its description"))
    prepare = command("prepare", "raw CIFAR-10 files → train/val/test .beton + manifest.json")
    prepare.add_argument("--force", action="store_true", help="rebuild even when the betons are up to date")
    _add_common(prepare)
    _add_common(command("train", "train a model (also: torchrun -m cifar_dist.train; ./launch/train)"))
    summary = command("model-summary", "the registered models and their options; parameters, FLOPs per image "
                                       "and peak memory of one")
    summary.add_argument("name", nargs="?", help="model name (omit to list the registered models)")
    summary.add_argument("--batch-size", type=int, default=128, help="batch size for the memory figure")
    summary.add_argument("--device", default="cpu")
    _add_common(summary)

    evaluate = command("evaluate", "accuracy, loss, per-class precision/recall/F1, confusion matrix and calibration "
                                   "of a checkpoint on a split (also under torchrun -m cifar_dist evaluate)")
    evaluate.add_argument("--checkpoint", required=True, help="a run's .pt file, or a reference best_ema_model.pth")
    evaluate.add_argument("--split", choices=("val", "test"), default="val")
    evaluate.add_argument("--tta", type=_tta_level, default=0, help=TTA_HELP + " (default 0)")
    evaluate.add_argument("--out", help="output folder (default: eval-<checkpoint>-<weights>-<split>-tta<level> "
                                        "beside the checkpoint)")
    _add_inference_common(evaluate)

    predict = command("predict", "labels for a file of images as an ID,Labels CSV, in the file's id order")
    predict.add_argument("--checkpoint", required=True, help="a run's .pt file, or a reference best_ema_model.pth")
    predict.add_argument("--data", required=True, help="the official test_batch, an unlabeled competition pickle "
                                                       "(data, ids) or an .npz (x_test or images)")
    predict.add_argument("--method", choices=METHODS, default="plain",
                         help="plain; tta; class_specialized: per-class logit offsets fitted on the val split; "
                              "adaptive: plain where confident, else TTA with offsets (threshold fitted on val)")
    predict.add_argument("--tta", type=_tta_level, default=2, help=TTA_HELP + " (for tta and adaptive; default 2)")
    predict.add_argument("--out", default="submission.csv", help="the CSV to write (default submission.csv)")
    predict.add_argument("--probs", help="also write the probabilities (N × classes, float32) to this .npy")
    predict.add_argument("--label-format", choices=LABEL_FORMATS, default="index",
                         help="labels as class indices 0-9 or class names")
    _add_inference_common(predict)

    ensemble = command("ensemble", "checkpoints by averaging probabilities, or submission CSVs by majority vote "
                                   "(a tie goes to the earliest file)")
    sources = ensemble.add_mutually_exclusive_group(required=True)
    sources.add_argument("--checkpoint", action="append", help="a member checkpoint (repeat the option)")
    sources.add_argument("--csv", nargs="+", help="submission CSVs with the same ids in the same order")
    ensemble.add_argument("--data", help="with --checkpoint: the file of images to predict (as for predict)")
    ensemble.add_argument("--tta", type=_tta_level, default=0, help=TTA_HELP + " (for each member; default 0)")
    ensemble.add_argument("--out", default="ensemble.csv", help="the CSV to write (default ensemble.csv)")
    ensemble.add_argument("--probs", help="with --checkpoint: also write the mean probabilities to this .npy")
    ensemble.add_argument("--label-format", choices=LABEL_FORMATS, default="index")
    _add_inference_common(ensemble, "members'")

    export = command("export", "a checkpoint as an ONNX or TorchScript model taking uint8 pixels, run beside "
                               "eager to check it")
    export.add_argument("--checkpoint", required=True, help="a run's .pt file, or a reference best_ema_model.pth")
    export.add_argument("--format", choices=EXPORT_FORMATS, required=True)
    export.add_argument("--out", help="the file to write (default: <checkpoint>-<weights>.onnx or .torchscript.pt "
                                      "beside the checkpoint)")
    export.add_argument("--dynamic-batch", action="store_true", help="any batch size (checked with two sizes)")
    _add_inference_common(export, batch_size=1, batch_help="the batch size of the export (without --dynamic-batch) "
                                                          "and of its check")
    for name, help in DELEGATED.items():  # commands with parsers of their own: `cifar-dist NAME --help`
        commands.add_parser(name, help=help, add_help=False)
    bench = commands.add_parser("bench", help="run a benchmark; results go to benchmarks/results/<hardware>-<date>/",
                                description="run a benchmark (`cifar-dist bench NAME --help` describes one); "
                                            "results go to benchmarks/results/<hardware>-<date>/")
    bench.add_argument("name", choices=BENCHMARKS)
    bench.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's arguments")
    return parser


def run_config(args) -> int:
    from cifar_dist.config import config_to_yaml

    cfg = load_config(args.config, args.overrides)
    print(config_to_yaml(cfg), end="")
    return 0


def run_prepare(args) -> int:
    from cifar_dist.data.beton import prepare

    cfg = load_config(args.config, args.overrides)
    prepare(cfg.data, force=args.force)
    return 0


def run_train(args) -> int:
    from cifar_dist.train import train_main

    return train_main(args.config, args.overrides)


def run_model_summary(args) -> int:
    from cifar_dist.models import MODELS
    from cifar_dist.models.summary import format_summary, summarize

    if args.name is None:
        load_config(args.config, args.overrides)  # imports run.imports, which may register more models
        for name, entry in MODELS.items():
            options = ", ".join(f"model.{key.name}={key.default}" for key in entry.options) or "no options"
            print(f"{name:<18} {entry.description}\n{'':<18} options: {options}")
        return 0
    cfg = load_config(args.config, [f"model.name={args.name}", *args.overrides])
    info = summarize(cfg.model, batch_size=args.batch_size, device=args.device)
    print(format_summary(cfg.model, info))
    return 0


def run_evaluate(args) -> int:
    from cifar_dist.inference.evaluate import evaluate

    evaluate(args.checkpoint, args.split, args.tta, args.out, args.weights, args.batch_size, args.overrides)
    return 0


def run_predict(args) -> int:
    from cifar_dist.inference.predict import predict

    predict(args.checkpoint, args.data, args.method, args.tta, args.out, args.probs, args.weights,
            args.label_format, args.batch_size, args.overrides)
    return 0


def run_ensemble(args) -> int:
    from cifar_dist.inference.ensemble import ensemble_checkpoints, vote_submissions

    if args.csv:
        vote_submissions(args.csv, args.out, args.label_format)
        return 0
    if not args.data:
        raise ConfigError("ensemble --checkpoint needs --data FILE: the images to predict")
    ensemble_checkpoints(args.checkpoint, args.data, args.out, args.probs, args.tta, args.weights,
                         args.label_format, args.batch_size, args.overrides)
    return 0


def run_export(args) -> int:
    from cifar_dist.inference.export import ExportMismatch, export

    try:
        export(args.checkpoint, args.format, args.out, args.weights, args.dynamic_batch, args.batch_size,
               args.overrides)
    except ExportMismatch as err:
        print(f"cifar-dist export: error: {err}", file=sys.stderr)
        return 1
    return 0


def run_slurm(args) -> int:
    from cifar_dist.launch.slurm import submit

    return submit(args.args)


def run_sweep_summary(args) -> int:
    from cifar_dist.analysis.sweep_summary import main

    return main(args.args)


def run_bench(args) -> int:
    import importlib

    return importlib.import_module(f"cifar_dist.benchmarks.{args.name}").cli(args.args)


COMMANDS = {"config": run_config, "prepare": run_prepare, "train": run_train, "model-summary": run_model_summary,
            "evaluate": run_evaluate, "predict": run_predict, "ensemble": run_ensemble, "export": run_export,
            "slurm": run_slurm, "sweep-summary": run_sweep_summary, "bench": run_bench}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in DELEGATED:  # their own parsers see every argument, --help included
        args = argparse.Namespace(command=argv[0], args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as err:
        print(f"cifar-dist {args.command}: error: {err}", file=sys.stderr)
        return ExitCode.USER_ERROR
    except KeyboardInterrupt:
        print(f"cifar-dist {args.command}: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
