"""`cifar-dist compare`: the t distribution without scipy, Welch's test, runs per side, and the inputs it reads."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cifar_dist.analysis.compare import (describe, main, read_csv, runs_per_side, t_cdf, t_quantile,
                                         welch_test)
from cifar_dist.errors import ConfigError, DataError

# A small fixed example (accuracies in %) whose Welch statistics are exact by hand:
# A: mean 94.05, sum of squared deviations 0.05, variance 0.05/3; B: mean 94.35, 0.175, variance 0.035.
# Squared standard errors 1/240 and 7/1200 sum to 1/100: se = 0.1, t = 0.3 / 0.1 = 3,
# df = (1/100)² / ((1/240)²/3 + (7/1200)²/5) = 135/17.
HAND_A = [94.0, 94.2, 93.9, 94.1]
HAND_B = [94.3, 94.1, 94.6, 94.2, 94.5, 94.4]
HAND_DF = 135 / 17
Z_975, Z_995, Z_80 = 1.959963985, 2.575829304, 0.841621234  # normal quantiles, from a table


def t_density(x: float, df: float) -> float:
    scale = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    return scale * (1 + x * x / df) ** (-(df + 1) / 2)


def t_two_sided_p_by_integration(t: float, df: float, intervals: int = 2000) -> float:
    """1 − 2∫₀^|t| density, by Simpson's rule: independent of the incomplete beta function."""
    h = abs(t) / intervals
    weights = [1] + [4 if i % 2 else 2 for i in range(1, intervals)] + [1]
    return 1 - 2 * h / 3 * sum(w * t_density(i * h, df) for i, w in enumerate(weights))


def t_two_sided_p_even_df(t: float, df: int) -> float:
    """1 − A(t|ν) for even ν, the finite series of Abramowitz & Stegun 26.7.3."""
    theta = math.atan(abs(t) / math.sqrt(df))
    term, total = 1.0, 1.0
    for k in range(1, df // 2):
        term *= (2 * k - 1) / (2 * k) * math.cos(theta) ** 2
        total += term
    return 1 - math.sin(theta) * total


def write_run(folder: Path, **accuracies: float) -> None:
    """A finished run folder: config.yaml and the final.json the trainer writes (accuracies as fractions)."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("run:\n  name: test\n")
    (folder / "final.json").write_text(json.dumps(
        {key: {"acc": acc, "loss": 0.3, "count": 10000} for key, acc in accuracies.items()}))


def write_side(root: Path, percents: list[float], tta_levels=("2",)) -> Path:
    """One run per accuracy: model = ema − 1 point; each ema_tta<level> = ema + level/10 points."""
    for seed, acc in enumerate(percents):
        entries = {"model": (acc - 1) / 100, "ema": acc / 100}
        entries.update({f"ema_tta{level}": (acc + int(level) / 10) / 100 for level in tta_levels})
        entries.update({f"model_tta{level}": (acc - 1 + int(level) / 10) / 100 for level in tta_levels})
        write_run(root / f"seed{seed}", **entries)
    return root


def table_rows(out: str) -> list[dict]:
    lines = [line for line in out.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


def row(out: str, metric: str, side: str) -> dict:
    return next(r for r in table_rows(out) if r["accuracy (%)"] == metric and r["side"].startswith(side))


def run_compare(capsys, *argv) -> str:
    assert main([str(arg) for arg in argv]) == 0
    return capsys.readouterr().out


# The t distribution.

@pytest.mark.parametrize("p, df, expected", [(0.975, 10, 2.228139), (0.975, 1, 12.706205), (0.995, 30, 2.749996),
                                             (0.95, 5, 2.015048), (0.975, 2, 4.302653), (0.999, 3, 10.214532)])
def test_t_quantile_matches_the_table(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=1e-5)
    assert t_quantile(1 - p, df) == pytest.approx(-expected, abs=1e-5)
    assert t_cdf(expected, df) == pytest.approx(p, abs=1e-6)


def test_t_cdf_matches_closed_forms():
    for df in (1, 2.5, 10, 137.2):
        assert t_cdf(0.0, df) == 0.5
    for t in (-30.0, -2.0, 0.3, 1.0, 12.7):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)  # Cauchy
        for df in (2, 4, 10):
            tail = t_two_sided_p_even_df(t, df) / 2
            assert t_cdf(t, df) == pytest.approx(tail if t < 0 else 1 - tail, abs=1e-12)
    assert t_cdf(1.959964, math.inf) == pytest.approx(0.975, abs=1e-7)
    assert t_quantile(0.975, 1e7) == pytest.approx(Z_975, abs=1e-5)


# Welch's test.

def test_welch_test_matches_the_hand_computation():
    a, b = describe(HAND_A), describe(HAND_B)
    assert (a.n, a.mean, a.std ** 2) == (4, pytest.approx(94.05), pytest.approx(0.05 / 3))
    assert (b.n, b.mean, b.std ** 2) == (6, pytest.approx(94.35), pytest.approx(0.035))
    assert a.sem == pytest.approx(math.sqrt(0.05 / 3 / 4))
    test = welch_test(a, b, 0.95)
    assert test.diff == pytest.approx(0.3)
    assert test.se == pytest.approx(0.1)
    assert test.t == pytest.approx(3.0)
    assert test.df == pytest.approx(HAND_DF)
    assert test.p == pytest.approx(t_two_sided_p_by_integration(3.0, HAND_DF), abs=1e-9)
    half_width = test.ci[1] - 0.3
    assert test.ci[0] == pytest.approx(0.3 - half_width)
    assert t_two_sided_p_by_integration(half_width / 0.1, HAND_DF) == pytest.approx(0.05, abs=1e-9)
    assert test.resolved  # p ≈ 0.018 < 0.05


def test_welch_test_with_equal_variances_uses_the_tables_t():
    a = [93.9, 94.0, 94.1, 94.2, 94.3, 94.4]  # variance 0.035
    b = [94.15, 94.25, 94.35, 94.45, 94.55, 94.65]  # the same, shifted by 0.25
    test = welch_test(describe(a), describe(b), 0.95)
    se = math.sqrt(2 * 0.035 / 6)
    assert (test.se, test.df) == (pytest.approx(se), pytest.approx(10.0))
    assert test.ci == (pytest.approx(0.25 - 2.228139 * se, abs=1e-6), pytest.approx(0.25 + 2.228139 * se, abs=1e-6))
    assert test.p == pytest.approx(t_two_sided_p_even_df(0.25 / se, 10), abs=1e-10)
    assert test.p > 0.04 and test.resolved  # t = 2.31 > 2.228
    assert not welch_test(describe(a), describe(b), 0.99).resolved  # t < t_{0.995, 10} = 3.169


def test_welch_test_agrees_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    expected = stats.ttest_ind(HAND_B, HAND_A, equal_var=False)
    test = welch_test(describe(HAND_A), describe(HAND_B), 0.95)
    assert test.t == pytest.approx(expected.statistic)
    assert test.p == pytest.approx(expected.pvalue, rel=1e-8)
    if hasattr(expected, "df"):
        assert test.df == pytest.approx(expected.df)
        assert test.ci == pytest.approx(tuple(expected.confidence_interval(0.95)), rel=1e-8)


# Runs per side.

def test_runs_per_side_matches_the_hand_computation():
    # (1.959964 + 0.841621)² · (0.12² + 0.10²) / 0.05² = 7.848880 · 0.0244 / 0.0025 = 76.6 → 77
    assert (Z_975 + Z_80) ** 2 * 0.0244 / 0.0025 == pytest.approx(76.60, abs=0.01)
    assert runs_per_side(0.05, 0.12, 0.10) == 77
    assert runs_per_side(-0.05, 0.12, 0.10) == 77
    assert runs_per_side(0.05, 0.12, 0.12) == 91  # 7.848880 · 0.0288 / 0.0025 = 90.42, rounded up
    # at 99%: (2.575829 + 0.841621)² · 0.0244 / 0.0025 = 113.99 → 114
    assert runs_per_side(0.05, 0.12, 0.10, confidence=0.99) == 114
    # the hand example: 7.848880 · (0.05/3 + 0.035) / 0.09 = 4.51 → 5
    assert runs_per_side(0.3, math.sqrt(0.05 / 3), math.sqrt(0.035)) == 5
    assert runs_per_side(1.0, 0.01, 0.01) == 2  # a test needs 2 per side
    assert runs_per_side(0.0, 0.12, 0.10) == math.inf


# Inputs and output.

def test_a_folder_and_a_glob_of_runs(tmp_path, capsys):
    a = write_side(tmp_path / "runs" / "muon", HAND_A)
    write_side(tmp_path / "runs" / "adam", HAND_B)
    (a / "seed9").mkdir()
    (a / "seed9" / "config.yaml").write_text("run:\n  name: test\n")  # started, not finished
    wandb_files = a / "seed0" / "wandb" / "offline-run-1" / "files"
    wandb_files.mkdir(parents=True)
    (wandb_files / "config.yaml").write_text("lr: 0.1\n")  # inside a run: not a run of its own
    out = run_compare(capsys, a, f"{tmp_path}/runs/adam/seed*", "--labels", "muon", "adam")
    assert f"note: A: 1 unfinished run(s) skipped (no final.json): {a / 'seed9'}" in out
    assert "ema weights, TTA = ema_tta2" in out
    assert row(out, "plain", "A") == {"accuracy (%)": "plain", "side": "A: muon", "n": "4", "mean": "94.05",
                                      "std": "0.129", "SE": "0.065", "df": "", "95% CI": "", "p": "",
                                      "runs/side to resolve": ""}
    p = t_two_sided_p_by_integration(3.0, HAND_DF)
    difference = row(out, "plain", "B − A")
    assert (difference["mean"], difference["SE"], difference["df"]) == ("+0.30", "0.100", "7.9")
    assert (difference["p"], difference["runs/side to resolve"]) == (f"{p:.2g}", "5")
    low, high = difference["95% CI"].split("…")
    assert float(low.replace("−", "-")) == pytest.approx(0.3 - 0.1 * t_quantile(0.975, HAND_DF), abs=0.005)
    assert float(high) == pytest.approx(0.3 + 0.1 * t_quantile(0.975, HAND_DF), abs=0.005)
    assert row(out, "TTA", "A")["mean"] == "94.25"  # ema_tta2 = ema + 0.2
    assert f"plain: B − A = +0.30 ± 0.10 (95% CI {low}…{high}, p = {p:.2g}): resolved, B is higher" in out


def test_csv_in_percent_and_in_fractions_give_the_runs_result(tmp_path, capsys):
    percent, fractions = tmp_path / "percent.csv", tmp_path / "fractions.csv"
    percent.write_text("seed,acc,tta\n" + "".join(f"{i},{x},{x + 0.2:.2f}\n" for i, x in enumerate(HAND_A)))
    fractions.write_text("seed,Accuracy,tta_acc\n" + "".join(f"{i},{x / 100:.4f},{(x + 0.2) / 100:.4f}\n"
                                                           for i, x in enumerate(HAND_A)))
    for path in (percent, fractions):
        accuracies = read_csv(path).accuracies
        assert accuracies["plain"] == pytest.approx(HAND_A)
        assert accuracies["TTA"] == pytest.approx([x + 0.2 for x in HAND_A])
    b = write_side(tmp_path / "b", HAND_B)
    outputs = [run_compare(capsys, a, b, "--labels", "A", "B") for a in (percent, fractions, write_side(
        tmp_path / "a", HAND_A))]
    assert "plain from column 'Accuracy' (fractions), TTA from column 'tta_acc' (fractions)" in outputs[1]
    results = [out.split("\n\n", 1)[1] for out in outputs]  # the table and sentences, after where the data came from
    assert results[0] == results[1] == results[2]


def test_weights_and_tta_level(tmp_path, capsys):
    a = write_side(tmp_path / "a", HAND_A, tta_levels=("1", "2"))
    b = write_side(tmp_path / "b", HAND_B, tta_levels=("1", "2"))
    with pytest.raises(ConfigError, match="TTA levels 1, 2: choose one with --tta-level"):
        main([str(a), str(b)])
    out = run_compare(capsys, a, b, "--tta-level", "1")
    assert (row(out, "plain", "A")["mean"], row(out, "TTA", "A")["mean"]) == ("94.05", "94.15")  # ema, ema_tta1
    out = run_compare(capsys, a, b, "--tta-level", "2", "--weights", "model")
    assert "model weights, TTA = model_tta2" in out
    assert (row(out, "plain", "A")["mean"], row(out, "TTA", "A")["mean"]) == ("93.05", "93.25")
    assert row(out, "plain", "B − A")["mean"] == "+0.30"
    with pytest.raises(DataError, match=r"seed0/final.json: no 'ema_tta0' entry.*found: 1, 2"):
        main([str(a), str(b), "--tta-level", "0"])


def test_the_default_weights_are_the_model_unless_every_run_has_an_ema(tmp_path, capsys):
    write_run(tmp_path / "a" / "seed0", model=0.940)
    write_run(tmp_path / "a" / "seed1", model=0.942, ema=0.945)
    write_run(tmp_path / "b" / "seed0", model=0.943, ema=0.946)
    write_run(tmp_path / "b" / "seed1", model=0.944, ema=0.947)
    out = run_compare(capsys, tmp_path / "a", tmp_path / "b")
    assert "model weights, no TTA entry" in out and "| TTA |" not in out
    assert row(out, "plain", "B − A")["mean"] == "+0.25"
    with pytest.raises(DataError, match=r"a/seed0/final.json: no 'ema' entry .*--weights model"):
        main([str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "ema"])


# Bad input: one line naming the file or argument, what was expected, what to do.

def test_a_csv_without_a_known_column(tmp_path):
    path = tmp_path / "record.csv"
    path.write_text("seed,score\n0,94.0\n1,94.1\n")
    with pytest.raises(ConfigError, match=rf"{path}: no accuracy column among seed, score: expected plain accuracy"):
        main([str(path), str(path)])


def test_a_csv_with_a_non_numeric_value(tmp_path):
    path = tmp_path / "record.csv"
    path.write_text("seed,acc\n0,94.0\n1,n/a\n")
    with pytest.raises(DataError, match=rf"{path}: column 'acc', data row 2: 'n/a' is not a number"):
        main([str(path), str(path)])
    path.write_text("seed,acc\n0,94.0\n1,94.1\n2,\n")
    with pytest.raises(DataError, match=rf"{path}: column 'acc', data row 3: an empty cell is not a number"):
        main([str(path), str(path)])
    path.write_text("seed,acc\n0,94.0\n1,194.1\n")
    with pytest.raises(DataError, match=rf"{path}: column 'acc' holds values outside 0…100"):
        main([str(path), str(path)])


def test_a_side_with_one_run(tmp_path):
    one = write_side(tmp_path / "one", [94.0])
    with pytest.raises(DataError, match=rf"A \({one}\): 1 run\(s\) with plain accuracy: .*at least 2 per side"):
        main([str(one), str(write_side(tmp_path / "b", HAND_B))])


def test_an_empty_folder_a_csv_without_rows_and_a_glob_without_match(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    b = write_side(tmp_path / "b", HAND_B)
    with pytest.raises(ConfigError, match=rf"{empty}: no run folders at or below it"):
        main([str(b), str(empty)])
    header_only = tmp_path / "header.csv"
    header_only.write_text("seed,acc\n")
    with pytest.raises(DataError, match=rf"B \({header_only}\): 0 run\(s\)"):
        main([str(b), str(header_only)])
    with pytest.raises(ConfigError, match=rf"{tmp_path}/nothing\*: the glob matches no folder"):
        main([str(b), f"{tmp_path}/nothing*"])
    unfinished = tmp_path / "unfinished" / "seed0"
    unfinished.mkdir(parents=True)
    (unfinished / "config.yaml").write_text("run:\n  name: test\n")
    with pytest.raises(DataError, match=r"unfinished: none of its 1 runs has finished"):
        main([str(tmp_path / "unfinished"), str(b)])
