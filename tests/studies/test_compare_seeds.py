"""`dmuh compare` over seeds (--seeds, --against) and hyper-parameter grids (--grid), on digits at toy size."""

import csv
import math
import re

import pytest
import yaml

from dmuh.cli import main
from dmuh.errors import DmuhError
from dmuh.runs.config import TrainConfig
from dmuh.runs.layout import LOG, read_log

COMMON = [
    "--data",
    "digits",
    "--protocol",
    "digits",
    "--model",
    "smallcnn",
    "--model-param",
    "input_size=8",
    "--bits",
    "8",
    "--epochs",
    "1",
    "--batch-size",
    "64",
    "--device",
    "cpu",
    "--quiet",
]


def digits_base(tmp_path, **overrides):
    values = dict(
        data="digits",
        protocol="digits",
        model="smallcnn",
        model_params={"input_size": 8},
        bits=8,
        epochs=1,
        batch_size=64,
        device="cpu",
        trace_items=0,
        out=str(tmp_path / "unused"),
    )
    values.update(overrides)
    return TrainConfig(**values)


def table_cell(markdown, title, label):
    """The first cell of row `label` in the table that follows the line starting with `title`."""
    section = markdown[markdown.index(title) :]
    return re.search(rf"^\| {re.escape(label)} \| (.*?) \|$", section, re.M).group(1)


def last_map(run):
    return float(read_log(run / LOG)[-1]["map"])


# --- statistics, against hand-computed numbers --------------------------------------------------


def test_statistics_match_hand_computed_numbers():
    from dmuh.metrics.stats import T_975, mean, paired_interval, sample_sd, t_quantile

    differences = [0.01, 0.03, 0.02]
    assert mean(differences) == pytest.approx(0.02)
    assert sample_sd(differences) == pytest.approx(0.01)
    assert t_quantile(2) == pytest.approx(4.302653, abs=1e-6)
    assert T_975[1] == pytest.approx(4.302653) and T_975[29] == pytest.approx(t_quantile(30), abs=1e-6)
    interval = paired_interval(differences)
    assert interval.n == 3 and interval.mean == pytest.approx(0.02)
    assert interval.half_width == pytest.approx(0.024841, abs=1e-6)
    assert not interval.excludes_zero  # [-0.0048, 0.0448]
    assert paired_interval([0.02, 0.021, 0.019]).excludes_zero
    one = paired_interval([0.05])
    assert one.n == 1 and one.mean == 0.05 and math.isnan(one.half_width) and not one.excludes_zero
    assert math.isnan(sample_sd([0.3])) and math.isnan(mean([]))


def test_tables_leave_a_failed_seed_out_of_n(tmp_path):
    from dmuh.studies.compare import write_tables

    rows = [
        {"method": "regu", "bits": 8, "seed": 0, "map": 0.50, "seconds": 1.0},
        {"method": "regu", "bits": 8, "seed": 1, "map": 0.60, "seconds": 1.0},
        {"method": "regu", "bits": 8, "seed": 2, "map": 0.70, "seconds": 1.0},
        {"method": "dmuh", "bits": 8, "seed": 0, "map": 0.51, "seconds": 1.0},
        {"method": "dmuh", "bits": 8, "seed": 1, "map": 0.63, "seconds": 1.0},
        {"method": "dmuh", "bits": 8, "seed": 2, "map": math.nan, "seconds": 0.0, "error": "dmuh: boom"},
        {"method": "dsh", "bits": 8, "seed": 0, "map": 0.55, "seconds": 1.0},
        {"method": "dsh", "bits": 8, "seed": 3, "map": 0.9, "seconds": 1.0},
    ]
    write_tables(rows, tmp_path, against="regu")
    markdown = (tmp_path / "results.md").read_text()
    assert "ties expected" in markdown.splitlines()[0]
    assert "| Regu | 0.6000 ± 0.1000 (n=3) |" in markdown
    assert "| DMUH | 0.5700 ± 0.0849 (n=2) |" in markdown  # sd of [0.51, 0.63]
    assert "| DSH | 0.7250 ± 0.2475 (n=2) |" in markdown  # the best mean, but one paired seed: no bold
    assert "- dmuh at 8 bits, seed 2: dmuh: boom" in markdown
    # differences of dmuh: [0.01, 0.03]: mean 0.02, sd 0.014142, t(0.975, 1) = 12.706205
    assert "Paired difference against Regu" in markdown and "ties expected" in markdown
    assert table_cell(markdown, "## Paired", "DMUH") == "+0.0200 [-0.1071, +0.1471] (n=2)"
    assert table_cell(markdown, "## Paired", "DSH") == "+0.0500 (n=1, no interval)"  # seed 3 has no pair
    assert "paired over seeds" in markdown and "not the uncertainty from sampling the data" in markdown
    csv_lines = (tmp_path / "results.csv").read_text().splitlines()
    assert csv_lines[0] == "method,8 bits" and float(csv_lines[2].split(",")[1]) == pytest.approx(0.57)
    seeds = list(csv.DictReader((tmp_path / "results_seeds.csv").open()))
    assert len(seeds) == 8 and seeds[5]["error"] == "dmuh: boom" and seeds[5]["map"] == ""


def test_a_significant_difference_is_starred(tmp_path):
    from dmuh.studies.compare import write_tables

    rows = [
        {"method": m, "bits": 8, "seed": s, "map": v, "seconds": 1.0}
        for m, values in (("regu", [0.5, 0.6, 0.7]), ("dmuh", [0.52, 0.621, 0.719]))
        for s, v in enumerate(values)
    ]
    write_tables(rows, tmp_path, against="regu")
    markdown = (tmp_path / "results.md").read_text()
    cell = table_cell(markdown, "## Paired", "DMUH")
    assert cell.endswith("(n=3) *") and cell.startswith("+0.0200 [")
    assert "| DMUH | **0.6200 ± 0.0995 (n=3)** |" in markdown  # best, and the interval supports it


def test_bold_needs_an_interval_that_excludes_zero_against_every_other_row():
    from dmuh.studies.compare import write_tables

    def table(values: dict) -> str:
        rows = [
            {"method": m, "bits": 8, "seed": s, "map": v, "seconds": 1.0}
            for m, maps in values.items()
            for s, v in enumerate(maps)
        ]
        return write_tables(rows, None)  # no folder: the text alone

    clear = table({"regu": [0.5, 0.6, 0.7], "dmuh": [0.52, 0.621, 0.719], "dsh": [0.4, 0.5, 0.6]})
    assert "**0.6200" in clear and clear.count("**") == 2
    close = table({"regu": [0.5, 0.6, 0.7], "dmuh": [0.52, 0.59, 0.72]})  # differences +0.02, -0.01, +0.02
    assert "**" not in close and "excludes 0" in close
    single = table({"regu": [0.5], "dmuh": [0.5003]})
    assert "**" not in single and "One seed per cell" in single and "cannot show" in single


# --- training over seeds ----------------------------------------------------------------------


def test_seeds_give_mean_sd_and_the_paired_difference_and_are_reused(tmp_path):
    from dmuh.studies.compare import compare

    # LSH (no training) as the reference keeps the test fast; any two rows pair alike
    out = tmp_path / "cmp"
    base = digits_base(tmp_path)
    rows = compare(["lsh", "regu"], [8], base, out, echo=lambda line: None, seeds=[0, 1, 2], against="lsh")
    assert [(r["method"], r["seed"]) for r in rows] == [
        ("lsh", 0),
        ("lsh", 1),
        ("lsh", 2),
        ("regu", 0),
        ("regu", 1),
        ("regu", 2),
    ]
    maps = {}
    for method in ("lsh", "regu"):
        for seed in (0, 1, 2):
            run = out / f"{method}-8bits-seed{seed}"
            assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == seed
            maps[method, seed] = last_map(run)
    assert not (out / "regu-8bits").exists()
    assert [r["map"] for r in rows] == pytest.approx([maps[r["method"], r["seed"]] for r in rows])

    markdown = (out / "results.md").read_text()
    assert "ties expected" in markdown.splitlines()[0]
    for method, label in (("lsh", "LSH"), ("regu", "Regu")):
        values = [maps[method, s] for s in (0, 1, 2)]
        m = sum(values) / 3
        sd = math.sqrt(sum((v - m) ** 2 for v in values) / 2)
        cell = table_cell(markdown, "# MAP", label).strip("*")
        assert cell == f"{m:.4f} ± {sd:.4f} (n=3)"

    differences = [maps["regu", s] - maps["lsh", s] for s in (0, 1, 2)]
    m = sum(differences) / 3
    half = 4.302653 * math.sqrt(sum((d - m) ** 2 for d in differences) / 2) / math.sqrt(3)
    cell = table_cell(markdown, "## Paired difference against LSH", "Regu")
    found = re.fullmatch(r"([+-]\d\.\d{4}) \[([+-]\d\.\d{4}), ([+-]\d\.\d{4})\] \(n=3\)( \*)?", cell)
    assert found, cell
    assert [float(g) for g in found.groups()[:3]] == pytest.approx([m, m - half, m + half], abs=1.5e-4)
    assert bool(found.group(4)) == (m - half > 0 or m + half < 0)
    assert "| LSH |" not in markdown[markdown.index("## Paired") : markdown.index("Training time")]

    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0] == "method,8 bits"
    assert float(csv_lines[2].split(",")[1]) == pytest.approx(sum(maps["regu", s] for s in (0, 1, 2)) / 3)
    per_run = list(csv.DictReader((out / "results_seeds.csv").open()))
    assert [(r["label"], r["seed"]) for r in per_run] == [(r["label"], str(r["seed"])) for r in rows]
    assert float(per_run[4]["map"]) == pytest.approx(maps["regu", 1]) and per_run[4]["ties"] == "expected"

    lines = []
    again = compare(["lsh", "regu"], [8], base, out, echo=lines.append, seeds=[0, 1, 2], against="regu")
    assert sum("reused" in line for line in lines) == 6 and not any("training" in line for line in lines)
    assert [r["map"] for r in again] == pytest.approx([r["map"] for r in rows])
    assert "Paired difference against Regu" in (out / "results.md").read_text()


def test_grid_through_the_cli_makes_one_row_per_value(tmp_path, capsys):
    out = tmp_path / "grid"
    # a grid on a method not in --methods adds it (here the only method)
    assert (
        main(["compare", *COMMON, "--grid", "dmuh.alpha=0.5,0.9", "--against", "dmuh alpha=0.5", "--out", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "| DMUH alpha=0.5 |" in printed and "| DMUH alpha=0.9 |" in printed and "| DMUH |" not in printed
    assert "Paired difference against DMUH alpha=0.5" in printed and "n=1, no interval" in printed
    for value in (0.5, 0.9):  # without --seeds: no -seedS suffix
        config = yaml.safe_load((out / f"dmuh-alpha={value}-8bits" / "config.yaml").read_text())
        assert config["method"] == "dmuh" and config["method_params"] == {"alpha": value}
    assert (out / "results.csv").read_text().splitlines()[1].startswith("dmuh alpha=0.5,")


def test_grid_rows_cross_product_and_checks():
    from dmuh.studies.compare import comparison_run_dir, table_rows

    rows = table_rows(["regu"], {"dmuh": {"gamma": 1}}, {"dmuh": {"alpha": [0.5, 0.9], "beta": [30, 50]}})
    assert [r.label for r in rows] == [
        "regu",
        "dmuh alpha=0.5 beta=30",
        "dmuh alpha=0.5 beta=50",
        "dmuh alpha=0.9 beta=30",
        "dmuh alpha=0.9 beta=50",
    ]
    assert rows[1].params == {"gamma": 1, "alpha": 0.5, "beta": 30}
    assert comparison_run_dir("o", rows[1].label, 8, 2).name == "dmuh-alpha=0.5-beta=30-8bits-seed2"
    assert comparison_run_dir("o", "x y/z", 8).name == "x-y_z-8bits"
    with pytest.raises(DmuhError, match="dmuh.alpha is given both"):
        table_rows(["dmuh"], {"dmuh": {"alpha": 0.5}}, {"dmuh": {"alpha": [0.6]}})
    with pytest.raises(DmuhError, match="has no parameter 'alhpa'"):
        table_rows(["dmuh"], {}, {"dmuh": {"alhpa": [0.6]}})


def test_bad_arguments_fail_before_training(tmp_path):
    from dmuh.studies.compare import compare

    base = digits_base(tmp_path)
    with pytest.raises(DmuhError, match="--against 'nope' is not among"):
        compare(["regu"], [8], base, tmp_path / "a", against="nope")
    with pytest.raises(DmuhError, match="bad parameter value"):
        compare(["regu"], [8], base, tmp_path / "a", grid={"dmuh": {"alpha": ["high"]}})
    with pytest.raises(DmuhError, match="--seeds"):
        compare(["regu"], [8], base, tmp_path / "a", seeds=[])
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seeds", "a,b"], "--seeds 'a,b'"),
        (["--against", "nope"], "--against 'nope'"),
        (["--grid", "dmuh.alpha"], "--grid 'dmuh.alpha': expected METHOD.PARAM="),
        (["--grid", "alpha=1"], "--grid 'alpha=1': name the method"),
        (["--grid", "dmuh.alpha="], "--grid 'dmuh.alpha=': no values"),
        (["--grid", "dmuh.nope=1,2"], "method 'dmuh' has no parameter 'nope'"),
        (["--grid", "dmuh.alpha=0.5", "-p", "dmuh.alpha=0.6"], "--grid dmuh.alpha and -p dmuh.alpha=0.6"),
    ],
)
def test_cli_errors_are_one_line_naming_the_flag(tmp_path, capsys, flags, message):
    out = tmp_path / "cmp"
    assert main(["compare", *COMMON, "--methods", "regu,dmuh", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
