"""`cifar-dist <command> [--config FILE.yaml] [key.sub=value ...]`; `cifar-dist config` lists every key;
`cifar-dist bench NAME [args]` runs a benchmark."""
from __future__ import annotations

import argparse
import sys

from cifar_dist.bench import BENCHMARKS
from cifar_dist.config import ConfigError, load_config
from cifar_dist.data.cifar import DataError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
KEYS_HINT = "Config keys: `cifar-dist config [--config FILE] [key=value ...]` prints them all, resolved, with " \
            "their descriptions and allowed values."


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (defaults apply to keys it leaves out)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="dotted config overrides, e.g. train.epochs=3 data.loader=gpu")


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
        cfg = load_config(args.config, args.overrides)
        for name, entry in MODELS.items():
            options = ", ".join(f"model.{key}={getattr(cfg.model, key)}" for key in entry.options) or "no options"
            print(f"{name:<18} {entry.description}\n{'':<18} options: {options}")
        return 0
    cfg = load_config(args.config, [f"model.name={args.name}", *args.overrides])
    info = summarize(cfg.model, batch_size=args.batch_size, device=args.device)
    print(format_summary(cfg.model, info))
    return 0


def run_bench(args) -> int:
    import importlib

    return importlib.import_module(f"cifar_dist.bench.{args.name}").cli(args.args)


COMMANDS = {"config": run_config, "prepare": run_prepare, "train": run_train, "model-summary": run_model_summary,
            "bench": run_bench}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataError) as err:
        print(f"cifar-dist {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"cifar-dist {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
