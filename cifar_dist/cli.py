"""`cifar-dist <command> ...`: one table of commands (`COMMANDS`), each with its one-line help and the
function that runs it on the rest of the command line. `cifar-dist config` lists every config key.

A `UserError` (bad config, data file, checkpoint or argument) is one line on stderr and exit code 2;
Ctrl-C is one line and 130 (see `errors.ExitCode`). Commands import what they need when they run, so
`cifar-dist --help` and the light commands start without torch.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable

import cifar_dist
from cifar_dist.config import KEYS_HINT, TTA_LEVELS, load_config
from cifar_dist.errors import ArgumentParser, ConfigError, ExitCode, UserError
from cifar_dist.inference import EXPORT_FORMATS
from cifar_dist.inference.inputs import LABEL_FORMATS
from cifar_dist.inference.methods import METHODS

TTA_HELP = ("test-time augmentation: 0 none, 1 + mirror, 2 + mirrors of ±1 px translations (airbench weights), "
            "heavy + ±2 px translations in 4 directions and their mirrors; averaged as the checkpoint's "
            "train.tta_average says (logits unless overridden)")


@dataclass(frozen=True)
class Command:
    help: str
    run: Callable[[list[str]], int]  # the command line after the command's name → exit code


def _parser(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=f"cifar-dist {name}", description=help, epilog=KEYS_HINT)
    add_arguments(parser)
    return parser


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (defaults apply to keys it leaves out)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="dotted config overrides, e.g. train.epochs=3 data.loader=gpu")


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}")
    return int(text)


def _tta_level(text: str):
    levels = {str(level): level for level in TTA_LEVELS}
    if text not in levels:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(levels)}; got {text!r}")
    return levels[text]


def _inference_arguments(parser: argparse.ArgumentParser, what: str = "checkpoint's", batch_size: int = 500,
                         batch_help: str = "images per forward pass") -> None:
    parser.add_argument("--weights", choices=("model", "ema"),
                        help="which weights of a cifar_dist checkpoint (default: the EMA when it has one)")
    parser.add_argument("--batch-size", type=_positive_int, default=batch_size,
                        help=f"{batch_help} (default {batch_size})")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help=f"overrides of the {what} config, e.g. data.root=../shared/data data.loader=gpu "
                             "train.device=cpu")


def _checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a run's .pt file, or a reference best_ema_model.pth")


# --- the commands --------------------------------------------------------------------------------

def run_config(argv: list[str]) -> int:
    from cifar_dist.config import config_to_yaml

    args = _parser("config", COMMANDS["config"].help, _config_arguments).parse_args(argv)
    print(config_to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def run_prepare(argv: list[str]) -> int:
    from cifar_dist.data.beton import prepare

    def arguments(parser):
        parser.add_argument("--force", action="store_true", help="rebuild even when the betons are up to date")
        _config_arguments(parser)

    args = _parser("prepare", COMMANDS["prepare"].help, arguments).parse_args(argv)
    prepare(load_config(args.config, args.overrides).data, force=args.force)
    return 0


def run_train(argv: list[str]) -> int:
    from cifar_dist.train import train_main

    args = _parser("train", COMMANDS["train"].help, _config_arguments).parse_args(argv)
    return train_main(args.config, args.overrides)


def run_model_summary(argv: list[str]) -> int:
    def arguments(parser):
        parser.add_argument("name", nargs="?", help="model name (omit to list the registered models)")
        parser.add_argument("--batch-size", type=_positive_int, default=128, help="batch size for the memory figure")
        parser.add_argument("--device", default="cpu")
        _config_arguments(parser)

    args = _parser("model-summary", COMMANDS["model-summary"].help, arguments).parse_args(argv)
    from cifar_dist.models import MODELS
    from cifar_dist.models.summary import format_summary, summarize

    if args.name is None:
        load_config(args.config, args.overrides)  # imports run.imports, which may register more models
        for name, entry in MODELS.items():
            options = ", ".join(f"model.{key.name}={key.default}" for key in entry.options) or "no options"
            print(f"{name:<18} {entry.description}\n{'':<18} options: {options}")
        return 0
    cfg = load_config(args.config, [f"model.name={args.name}", *args.overrides])
    print(format_summary(cfg.model, summarize(cfg.model, batch_size=args.batch_size, device=args.device)))
    return 0


def run_evaluate(argv: list[str]) -> int:
    def arguments(parser):
        _checkpoint_argument(parser)
        parser.add_argument("--split", choices=("val", "test"), default="val")
        parser.add_argument("--tta", type=_tta_level, default=0, help=TTA_HELP + " (default 0)")
        parser.add_argument("--out", help="output folder (default: eval-<checkpoint>-<weights>-<split>-tta<level> "
                                          "beside the checkpoint)")
        _inference_arguments(parser)

    args = _parser("evaluate", COMMANDS["evaluate"].help, arguments).parse_args(argv)
    from cifar_dist.inference.evaluate import evaluate_checkpoint

    evaluate_checkpoint(args.checkpoint, args.split, args.tta, args.out, args.weights, args.batch_size,
                        args.overrides)
    return 0


def run_predict(argv: list[str]) -> int:
    def arguments(parser):
        _checkpoint_argument(parser)
        parser.add_argument("--data", required=True, help="the official test_batch, an unlabeled competition pickle "
                                                          "(data, ids) or an .npz (x_test or images)")
        parser.add_argument("--method", choices=METHODS, default="plain",
                            help="plain; tta; class_specialized: per-class logit offsets fitted on the val split; "
                                 "adaptive: plain where confident, else TTA with offsets (threshold fitted on val)")
        parser.add_argument("--tta", type=_tta_level, default=2, help=TTA_HELP + " (for tta and adaptive; default 2)")
        parser.add_argument("--out", default="submission.csv", help="the CSV to write (default submission.csv)")
        parser.add_argument("--probs", help="also write the probabilities (N × classes, float32) to this .npy")
        parser.add_argument("--label-format", choices=LABEL_FORMATS, default="index",
                            help="labels as class indices 0-9 or class names")
        _inference_arguments(parser)

    args = _parser("predict", COMMANDS["predict"].help, arguments).parse_args(argv)
    from cifar_dist.inference.predict import predict

    predict(args.checkpoint, args.data, args.method, args.tta, args.out, args.probs, args.weights,
            args.label_format, args.batch_size, args.overrides)
    return 0


def run_ensemble(argv: list[str]) -> int:
    def arguments(parser):
        sources = parser.add_mutually_exclusive_group(required=True)
        sources.add_argument("--checkpoint", action="append", help="a member checkpoint (repeat the option)")
        sources.add_argument("--csv", nargs="+", help="submission CSVs with the same ids in the same order")
        parser.add_argument("--data", help="with --checkpoint: the file of images to predict (as for predict)")
        parser.add_argument("--tta", type=_tta_level, default=0, help=TTA_HELP + " (for each member; default 0)")
        parser.add_argument("--out", default="ensemble.csv", help="the CSV to write (default ensemble.csv)")
        parser.add_argument("--probs", help="with --checkpoint: also write the mean probabilities to this .npy")
        parser.add_argument("--label-format", choices=LABEL_FORMATS, default="index")
        _inference_arguments(parser, "members'")

    args = _parser("ensemble", COMMANDS["ensemble"].help, arguments).parse_args(argv)
    from cifar_dist.inference.ensemble import ensemble_checkpoints, vote_submissions

    if args.csv:
        vote_submissions(args.csv, args.out, args.label_format)
        return 0
    if not args.data:
        raise ConfigError("ensemble --checkpoint needs --data FILE: the images to predict")
    ensemble_checkpoints(args.checkpoint, args.data, args.out, args.probs, args.tta, args.weights,
                         args.label_format, args.batch_size, args.overrides)
    return 0


def run_export(argv: list[str]) -> int:
    def arguments(parser):
        _checkpoint_argument(parser)
        parser.add_argument("--format", choices=EXPORT_FORMATS, required=True)
        parser.add_argument("--out", help="the file to write (default: <checkpoint>-<weights>.onnx or "
                                          ".torchscript.pt beside the checkpoint)")
        parser.add_argument("--dynamic-batch", action="store_true", help="any batch size (checked with two sizes)")
        _inference_arguments(parser, batch_size=1, batch_help="the batch size of the export (without "
                                                              "--dynamic-batch) and of its check")

    args = _parser("export", COMMANDS["export"].help, arguments).parse_args(argv)
    from cifar_dist.inference.export import ExportMismatch, export

    try:
        export(args.checkpoint, args.format, args.out, args.weights, args.dynamic_batch, args.batch_size,
               args.overrides)
    except ExportMismatch as err:
        print(f"cifar-dist export: error: {err}", file=sys.stderr)
        return ExitCode.CRASHED
    return 0


def run_slurm(argv: list[str]) -> int:
    from cifar_dist.launch.slurm import submit

    return submit(argv)


def run_sweep_summary(argv: list[str]) -> int:
    from cifar_dist.analysis.sweep_summary import main

    return main(argv)


def run_compare(argv: list[str]) -> int:
    from cifar_dist.analysis.compare import main

    return main(argv)


def run_bench(argv: list[str]) -> int:
    from cifar_dist.benchmarks import BENCHMARKS, run_benchmark

    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: cifar-dist bench NAME [--help] [options] [key=value ...]\nNAME: {', '.join(BENCHMARKS)}\n"
              "Results go to benchmarks/results/<hardware>-<date>/ (NAME.csv, NAME.md, NAME.png).")
        return 0 if argv else ExitCode.USER_ERROR
    return run_benchmark(argv[0], argv[1:])


COMMANDS = {
    "config": Command("print the resolved config as YAML, each key with its description", run_config),
    "prepare": Command("raw CIFAR-10 files → train/val/test .beton + manifest.json", run_prepare),
    "train": Command("train a model (also: torchrun -m cifar_dist.train; ./launch/train)", run_train),
    "model-summary": Command("the registered models and their keys; parameters, FLOPs per image and peak memory "
                             "of one", run_model_summary),
    "evaluate": Command("accuracy, loss, per-class precision/recall/F1, confusion matrix and calibration of a "
                        "checkpoint on a split (also under torchrun -m cifar_dist evaluate)", run_evaluate),
    "predict": Command("labels for a file of images as an ID,Labels CSV, in the file's id order", run_predict),
    "ensemble": Command("checkpoints by averaging probabilities, or submission CSVs by majority vote (a tie goes "
                        "to the earliest file)", run_ensemble),
    "export": Command("a checkpoint as an ONNX or TorchScript model taking uint8 pixels, run beside eager to "
                      "check it", run_export),
    "slurm": Command("submit training or a sweep to Slurm (submitit), requeued across preemption", run_slurm),
    "sweep-summary": Command("one table of every run under a folder: swept values, accuracies, status",
                             run_sweep_summary),
    "compare": Command("two sets of runs (or CSVs of accuracies): means, the difference, its 95% interval and "
                       "p-value (Welch), and how many runs would resolve it", run_compare),
    "bench": Command("run a benchmark (`cifar-dist bench NAME --help`); results go to "
                     "benchmarks/results/<hardware>-<date>/", run_bench),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: cifar-dist COMMAND [--help] ...  (cifar_dist {cifar_dist.__version__})", "", "commands:"]
    lines += [f"  {name:<{width}}  {command.help}" for name, command in COMMANDS.items()]
    return "\n".join(lines + ["", KEYS_HINT])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else ExitCode.USER_ERROR
    if argv[0] == "--version":
        print(f"cifar_dist {cifar_dist.__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"cifar-dist: error: unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return ExitCode.USER_ERROR
    try:
        return COMMANDS[name].run(rest)
    except UserError as err:
        print(f"cifar-dist {name}: error: {err}", file=sys.stderr)
        return ExitCode.USER_ERROR
    except KeyboardInterrupt:
        print(f"cifar-dist {name}: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
