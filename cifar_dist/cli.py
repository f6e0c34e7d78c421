"""`cifar-dist <command> [--config FILE.yaml] [key.sub=value ...]`."""
from __future__ import annotations

import argparse
import sys

from cifar_dist.config import ConfigError, load_config
from cifar_dist.data.cifar import DataError

EXIT_USER_ERROR = 2


class UserError(RuntimeError):
    """A problem the user can fix (bad option, missing package); printed without a traceback."""


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (defaults apply to keys it leaves out)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cifar-dist", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser("prepare", help="raw CIFAR-10 files → train/val/test .beton + manifest.json")
    prepare.add_argument("--force", action="store_true", help="rebuild even when the betons are up to date")
    _add_common(prepare)

    train = commands.add_parser("train", help="train a model (also: torchrun -m cifar_dist.train)")
    _add_common(train)

    summary = commands.add_parser("model-summary", help="parameters, FLOPs per image and peak memory")
    summary.add_argument("name", help="model name: attention_resnet, fast or resnet18")
    summary.add_argument("--batch-size", type=int, default=128, help="batch size for the memory figure")
    summary.add_argument("--device", default="cpu")
    _add_common(summary)
    return parser


def run_prepare(args) -> int:
    from cifar_dist.data.beton import prepare

    cfg = load_config(args.config, args.overrides)
    prepare(cfg.data, force=args.force)
    return 0


def run_train(args) -> int:
    from cifar_dist.train import train_main

    return train_main(args.config, args.overrides)


def run_model_summary(args) -> int:
    from cifar_dist.models.summary import format_summary, summarize

    cfg = load_config(args.config, [f"model.name={args.name}", *args.overrides])
    info = summarize(cfg.model, batch_size=args.batch_size, device=args.device)
    print(format_summary(cfg.model, info))
    return 0


COMMANDS = {"prepare": run_prepare, "train": run_train, "model-summary": run_model_summary}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataError, UserError) as err:
        print(f"cifar-dist {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
