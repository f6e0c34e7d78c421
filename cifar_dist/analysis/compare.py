"""`cifar-dist compare A B`: is B's accuracy really different from A's, or is the gap noise?

A and B are each a folder (every run folder at or below it: one holding the final.json the trainer
writes when a run finishes; unfinished runs are skipped and noted), a quoted glob of run folders
('runs/muon/seed*'), or a CSV of accuracies from elsewhere: a header row, plain accuracy in a
column named acc, accuracy, plain or val_acc, TTA accuracy in tta_acc, tta or tta_val_acc (either
may be missing), as fractions (0.9401) or percentages (94.01). For plain and TTA accuracy it prints,
in percentage points, each side's n, mean, sample std and standard error, and Welch's t-test of
B − A: the difference, its standard error, the Welch–Satterthwaite degrees of freedom, the
confidence interval and the two-sided p-value; then how many runs per side would resolve it.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Sequence

import pandas as pd

from cifar_dist.errors import ArgumentParser, ConfigError, DataError, one_line
from cifar_dist.run_files import FINAL as FINAL_FILE
from cifar_dist.run_files import find_runs as find_run_dirs
from cifar_dist.tables import markdown_table

PLAIN_COLUMNS = ("acc", "accuracy", "plain", "val_acc")
TTA_COLUMNS = ("tta_acc", "tta", "tta_val_acc")
METRICS = ("plain", "TTA")
POWER = 0.8  # of the runs-per-side estimate: the chance that a true difference of the observed size is resolved
GLOB_CHARS = "*?["

RUNS_PER_SIDE_HELP = """\
runs per side to resolve: n = (z_{1−α/2} + z_{0.8})² · (sA² + sB²) / d², rounded up (at least 2;
∞ when d = 0), with α = 1 − confidence, d = the observed B − A and sA, sB the sample standard
deviations: the runs per side (the same on both) with which a two-sided Welch test at level α has
80% power against a true difference of size d (the normal approximation).
A CSV's TTA column is compared with the runs' <weights>_tta<N> entry as it is: make sure the levels match."""

# The continued fraction of the incomplete beta function (Numerical Recipes' betacf).
_BETACF_EPS = 1e-15
_BETACF_FPMIN = 1e-300
_BETACF_MAX_ITERATIONS = 10_000
_QUANTILE_MAX_BISECTIONS = 200


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b), by the modified Lentz method; converges fast for x < (a+1)/(a+b+2)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) >= _BETACF_FPMIN else _BETACF_FPMIN)
    h = d
    for m in range(1, _BETACF_MAX_ITERATIONS + 1):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)),  # the even step, then the odd one
                   -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) >= _BETACF_FPMIN else _BETACF_FPMIN)
            c = 1.0 + aa / c
            c = c if abs(c) >= _BETACF_FPMIN else _BETACF_FPMIN
            step = d * c
            h *= step
        if abs(step - 1.0) < _BETACF_EPS:
            return h
    raise ArithmeticError(f"the incomplete beta function did not converge for a={a}, b={b}, x={x}")


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with df > 0 degrees of freedom (df need not be whole; inf: the normal)."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be positive; got {df}")
    if math.isinf(df):
        return NormalDist().cdf(t)
    tail = 0.5 * _incomplete_beta(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|), exact for tiny tails
    return tail if t < 0 else 1.0 - tail


def t_quantile(p: float, df: float) -> float:
    """The t with t_cdf(t, df) = p, 0 < p < 1, by bisection on t_cdf."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"a quantile needs 0 < p < 1; got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    for _ in range(_QUANTILE_MAX_BISECTIONS):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Sample:
    """One side's accuracies (%): their number, mean and sample standard deviation (ddof=1)."""

    n: int
    mean: float
    std: float

    @property
    def sem(self) -> float:
        """The standard error of the mean."""
        return self.std / math.sqrt(self.n)


def describe(values: Sequence[float]) -> Sample:
    """n, mean and sample std (ddof=1) of at least 2 values."""
    return Sample(len(values), statistics.fmean(values), statistics.stdev(values))


@dataclass(frozen=True)
class WelchTest:
    """B − A by Welch's t-test: the difference, its standard error, Welch–Satterthwaite degrees of
    freedom (NaN when both sides are constant), t, the confidence interval and the two-sided p-value."""

    diff: float
    se: float
    df: float
    t: float
    ci: tuple[float, float]
    p: float
    confidence: float

    @property
    def resolved(self) -> bool:
        """Whether the confidence interval excludes 0 (p < 1 − confidence)."""
        return self.p < 1.0 - self.confidence


def welch_test(a: Sample, b: Sample, confidence: float = 0.95) -> WelchTest:
    """Welch's unequal-variance t-test of B − A, with its confidence interval at `confidence`."""
    var_a, var_b = a.std ** 2 / a.n, b.std ** 2 / b.n
    diff = b.mean - a.mean
    se = math.sqrt(var_a + var_b)
    if se == 0.0:  # both sides constant: the difference is exact
        t = math.copysign(math.inf, diff) if diff else 0.0
        return WelchTest(diff, 0.0, math.nan, t, (diff, diff), 0.0 if diff else 1.0, confidence)
    df = (var_a + var_b) ** 2 / (var_a ** 2 / (a.n - 1) + var_b ** 2 / (b.n - 1))
    t = diff / se
    half_width = t_quantile(0.5 + confidence / 2.0, df) * se
    return WelchTest(diff, se, df, t, (diff - half_width, diff + half_width), 2.0 * t_cdf(-abs(t), df), confidence)


def runs_per_side(diff: float, std_a: float, std_b: float, confidence: float = 0.95, power: float = POWER) -> float:
    """Runs per side with which a two-sided test at level α = 1 − confidence has `power` against a true
    difference diff: (z_{1−α/2} + z_power)² · (std_a² + std_b²) / diff², rounded up, at least 2; inf for
    diff 0."""
    if diff == 0.0:
        return math.inf
    z = NormalDist().inv_cdf
    n = (z(1.0 - (1.0 - confidence) / 2.0) + z(power)) ** 2 * (std_a ** 2 + std_b ** 2) / diff ** 2
    return max(2, math.ceil(n))


@dataclass(frozen=True)
class Runs:
    """The run folders one argument names: the finished ones with their final.json, and the unfinished ones."""

    argument: str
    finals: dict[Path, dict]
    unfinished: list[Path]


@dataclass(frozen=True)
class CsvAccuracies:
    """Accuracies (%) read from a CSV: "plain" and/or "TTA" → one value per row, and where each came from."""

    path: Path
    accuracies: dict[str, list[float]]
    origins: dict[str, str]  # "plain" → "column 'acc' (fractions)"


def read_side(argument: str) -> Runs | CsvAccuracies:
    """What A or B names: a CSV file, a folder of runs, or a glob of run folders."""
    path = Path(argument)
    if path.is_file():
        return read_csv(path)
    if path.is_dir():
        return find_runs(argument, [path])
    if any(char in argument for char in GLOB_CHARS):
        folders = [Path(match) for match in sorted(glob.glob(argument, recursive=True)) if Path(match).is_dir()]
        if not folders:
            raise ConfigError(f"{argument}: the glob matches no folder: expected run folders (e.g. 'runs/muon/seed*', "
                              "quoted so that the shell leaves it to compare); check the pattern")
        return find_runs(argument, folders)
    raise ConfigError(f"{argument}: no such file or folder: expected a folder of runs, a quoted glob of run folders "
                      "or a CSV of accuracies")


def find_runs(argument: str, folders: list[Path]) -> Runs:
    """Every run folder at or below the folders (final.json or config.yaml in it), with its final.json if finished."""
    run_dirs = find_run_dirs(folders)
    if not run_dirs:
        raise ConfigError(f"{argument}: no run folders at or below it: expected folders holding the {FINAL_FILE} a run "
                          "writes when it finishes; point at a run, a folder of runs, or a CSV of accuracies")
    finals = {run: read_final(run / FINAL_FILE) for run in run_dirs if (run / FINAL_FILE).is_file()}
    unfinished = [run for run in run_dirs if run not in finals]
    if not finals:
        raise DataError(f"{argument}: none of its {len(unfinished)} runs has finished (no {FINAL_FILE}): wait for "
                        "them, or compare finished ones")
    return Runs(argument, finals, unfinished)


def read_final(path: Path) -> dict:
    """A run's final.json: {"model": {"acc": ...}, "ema_tta2": {...}, ...}."""
    try:
        final = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not readable as JSON ({one_line(err)}): expected the {FINAL_FILE} the trainer "
                        "writes; remove the run or rerun it") from None
    if not isinstance(final, dict):
        raise DataError(f'{path}: expected a JSON object like {{"model": {{"acc": 0.94}}}}; remove the run or '
                        "rerun it")
    return final


def read_csv(path: Path) -> CsvAccuracies:
    """The plain and TTA accuracy columns of a CSV, as percentages."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)  # "n/a" is reported, not read as missing
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not readable as a CSV ({one_line(err)}): expected a header row and one row of "
                        "accuracies per run") from None
    columns = {str(column).strip().lower(): column for column in frame.columns}
    accuracies, origins = {}, {}
    for metric, names in zip(METRICS, (PLAIN_COLUMNS, TTA_COLUMNS)):
        name = next((name for name in names if name in columns), None)
        if name is not None:
            column = columns[name]
            accuracies[metric], unit = _percentages(path, column, frame[column])
            origins[metric] = f"column {column!r} ({unit})"
    if not accuracies:
        raise ConfigError(f"{path}: no accuracy column among {', '.join(map(str, frame.columns)) or 'none'}: expected "
                          f"plain accuracy named {', '.join(PLAIN_COLUMNS)} or TTA accuracy named "
                          f"{', '.join(TTA_COLUMNS)}; rename the column")
    return CsvAccuracies(path, accuracies, origins)


def _percentages(path: Path, column, values: pd.Series) -> tuple[list[float], str]:
    """A column's accuracies in %, and the unit they were read in: fractions when all are ≤ 1, else percentages."""
    numbers = pd.to_numeric(values, errors="coerce")
    bad = numbers.isna() | ~numbers.abs().lt(math.inf)
    if bad.any():
        row = int(bad.to_numpy().argmax())
        found = repr(values.iloc[row]) if values.iloc[row].strip() else "an empty cell"
        raise DataError(f"{path}: column {column!r}, data row {row + 1}: {found} is not a number: expected one "
                        "accuracy per row (0.9401 or 94.01); fix or remove the row")
    fractions = bool((numbers <= 1).all())
    percent = numbers * 100.0 if fractions else numbers
    if not percent.between(0.0, 100.0).all():
        raise DataError(f"{path}: column {column!r} holds values outside 0…100 ({numbers.min()}…{numbers.max()}): "
                        "expected accuracies as fractions (0.9401) or percentages (94.01)")
    return percent.tolist(), "fractions" if fractions else "percentages"


def choose_weights(runs: Sequence[Runs], weights: str | None) -> str | None:
    """weights, checked against every run's final.json; by default "ema" when every run has it, else "model"."""
    finals = [(run, final) for side in runs for run, final in side.finals.items()]
    if not finals:
        return None
    if weights is None:
        return "ema" if all("ema" in final for _, final in finals) else "model"
    for run, final in finals:
        if weights not in final:
            other = "model" if weights == "ema" else "ema"
            raise DataError(f"{run / FINAL_FILE}: no {weights!r} entry (it has {', '.join(final)}): choose "
                            f"--weights {other}, or leave out this run")
    return weights


def choose_tta_key(runs: Sequence[Runs], weights: str, tta_level: str | None) -> str | None:
    """The final.json entry compared as TTA: <weights>_tta<level>; by default the one level found, None if none."""
    prefix = f"{weights}_tta"
    finals = [(run, final) for side in runs for run, final in side.finals.items()]
    levels = sorted({key[len(prefix):] for _, final in finals for key in final if key.startswith(prefix)})
    if tta_level is not None:
        key = prefix + tta_level
        for run, final in finals:
            if key not in final:
                raise DataError(f"{run / FINAL_FILE}: no {key!r} entry (it has {', '.join(final)}): choose a "
                                f"--tta-level every run was evaluated with (found: {', '.join(levels) or 'none'})")
        return key
    if len(levels) > 1:
        raise ConfigError(f"the runs were evaluated at TTA levels {', '.join(levels)}: choose one with --tta-level")
    return prefix + levels[0] if levels else None


def run_accuracies(runs: Runs, weights: str, tta_key: str | None) -> dict[str, list[float]]:
    """Accuracies (%) of the runs: "plain" from the weights' entry, "TTA" from tta_key where every run has it."""
    accuracies = {"plain": [_accuracy(run, final, weights) for run, final in runs.finals.items()]}
    if tta_key and all(tta_key in final for final in runs.finals.values()):
        accuracies["TTA"] = [_accuracy(run, final, tta_key) for run, final in runs.finals.items()]
    return accuracies


def _accuracy(run: Path, final: dict, key: str) -> float:
    entry = final[key]
    acc = entry.get("acc") if isinstance(entry, dict) else None
    if isinstance(acc, bool) or not isinstance(acc, (int, float)) or not 0.0 <= acc <= 1.0:
        raise DataError(f"{run / FINAL_FILE}: {key!r} has no accuracy fraction (found {entry!r}): expected "
                        f'{{"acc": 0.9401, ...}}; remove the run or rerun it')
    return 100.0 * acc


def _signed(value: float) -> str:
    """+0.05, −0.04; a bound that rounds to zero keeps its sign (−0.00…+0.20 holds 0)."""
    return "0.00" if value == 0 else f"{value:+.2f}".replace("-", "−")


def _p_text(p: float) -> str:
    return "< 0.0001" if p < 1e-4 else f"= {p:.2g}"


def _runs_text(runs: float) -> str:
    return "∞" if math.isinf(runs) else str(runs)


def verdict(metric: str, test: WelchTest, runs: float) -> str:
    """One sentence: the difference, its interval and p-value, whether it is resolved, and the runs that would."""
    low, high = test.ci
    head = (f"{metric}: B − A = {_signed(test.diff)} ± {test.se:.2f} ({100 * test.confidence:g}% CI "
            f"{_signed(low)}…{_signed(high)}, p {_p_text(test.p)})")
    if test.resolved:
        return f"{head}: resolved, B is {'higher' if test.diff > 0 else 'lower'}; about {runs} runs per side " \
               "resolve a difference this size."
    if math.isinf(runs):
        return f"{head}: not resolved; the observed difference is zero, so no number of runs would resolve it."
    return f"{head}: not resolved; about {runs} runs per side would resolve a difference this size."


def report(accuracies: Sequence[dict[str, list[float]]], labels: Sequence[str], confidence: float) -> str:
    """The table of both sides and B − A for each metric both have, then one sentence per metric."""
    rows, sentences = [], []
    ci_column = f"{100 * confidence:g}% CI"
    for metric in (m for m in METRICS if all(m in side for side in accuracies)):
        a, b = (describe(side[metric]) for side in accuracies)
        test = welch_test(a, b, confidence)
        runs = runs_per_side(test.diff, a.std, b.std, confidence)
        for name, label, sample in (("A", labels[0], a), ("B", labels[1], b)):
            rows.append({"accuracy (%)": metric, "side": f"{name}: {label}", "n": str(sample.n),
                         "mean": f"{sample.mean:.2f}", "std": f"{sample.std:.3f}", "SE": f"{sample.sem:.3f}"})
        rows.append({"accuracy (%)": metric, "side": "B − A", "mean": _signed(test.diff), "SE": f"{test.se:.3f}",
                     "df": "—" if math.isnan(test.df) else f"{test.df:.1f}",
                     ci_column: f"{_signed(test.ci[0])}…{_signed(test.ci[1])}", "p": _p_text(test.p).lstrip("= "),
                     "runs/side to resolve": _runs_text(runs)})
        sentences.append(verdict(metric, test, runs))
    table = pd.DataFrame(rows).fillna("")
    return markdown_table(table) + "\n\n" + "\n".join(sentences)


def describe_side(name: str, label: str, side: Runs | CsvAccuracies, weights: str | None,
                  tta_key: str | None) -> list[str]:
    """Where a side's accuracies came from, and what was skipped: the lines above the table."""
    argument = str(side.path) if isinstance(side, CsvAccuracies) else side.argument
    head = f"{name} = {label}" + (f" ({argument})" if label != argument else "")
    if isinstance(side, CsvAccuracies):
        origins = ", ".join(f"{metric} from {origin}" for metric, origin in side.origins.items())
        return [f"{head}: {len(next(iter(side.accuracies.values())))} rows; {origins}"]
    tta = f", TTA = {tta_key}" if tta_key else ", no TTA entry"
    lines = [f"{head}: {len(side.finals)} finished runs; {weights} weights{tta}"]
    if side.unfinished:
        shown = ", ".join(map(str, side.unfinished[:3])) + (", …" if len(side.unfinished) > 3 else "")
        lines.append(f"note: {name}: {len(side.unfinished)} unfinished run(s) skipped (no {FINAL_FILE}): {shown}")
    if tta_key and not all(tta_key in final for final in side.finals.values()):
        lacking = sum(tta_key not in final for final in side.finals.values())
        lines.append(f"note: {name}: TTA not compared: {lacking} of {len(side.finals)} runs have no {tta_key!r} entry")
    return lines


def _confidence(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, e.g. 0.95; got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="cifar-dist compare", description=__doc__,
                                     epilog=RUNS_PER_SIDE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("a", "b"):
        parser.add_argument(name, metavar=name.upper(),
                            help="a folder of runs, a quoted glob of run folders, or a CSV of accuracies")
    parser.add_argument("--weights", choices=("model", "ema"),
                        help="which weights of each run's final.json (default: ema when every run has it, else model)")
    parser.add_argument("--tta-level", metavar="N",
                        help="compare <weights>_tta<N> as TTA accuracy, e.g. 2 or heavy (default: the one level found)")
    parser.add_argument("--labels", nargs=2, metavar=("NAME_A", "NAME_B"),
                        help="names of A and B in the table (default: the arguments as given)")
    parser.add_argument("--confidence", type=_confidence, default=0.95,
                        help="of the confidence interval; 1 − confidence is the test's level α (default 0.95)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    labels = args.labels or [args.a, args.b]
    sides = [read_side(argument) for argument in (args.a, args.b)]
    runs = [side for side in sides if isinstance(side, Runs)]
    weights = choose_weights(runs, args.weights)
    tta_key = choose_tta_key(runs, weights, args.tta_level) if weights else None
    accuracies = [side.accuracies if isinstance(side, CsvAccuracies) else run_accuracies(side, weights, tta_key)
                  for side in sides]
    metrics = [metric for metric in METRICS if all(metric in side for side in accuracies)]
    if not metrics:
        raise ConfigError(f"nothing to compare: A ({args.a}) has {' and '.join(accuracies[0])} accuracy, B ({args.b}) "
                          f"{' and '.join(accuracies[1])}; give both sides plain or TTA accuracies")
    for name, argument, side in zip("AB", (args.a, args.b), accuracies):
        for metric in metrics:
            if len(side[metric]) < 2:
                raise DataError(f"{name} ({argument}): {len(side[metric])} run(s) with {metric} accuracy: Welch's "
                                "test needs at least 2 per side; add runs")
    for name, label, side in zip("AB", labels, sides):
        print("\n".join(describe_side(name, label, side, weights, tta_key)))
    print()
    print(report(accuracies, labels, args.confidence))
    return 0
