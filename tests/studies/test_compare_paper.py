"""`dmuh compare` beside the paper: Tables 4-5 as data, the paper column, the `paper` method list."""

import csv

import pytest

from dmuh.cli import main
from dmuh.studies.compare import write_tables
from dmuh.studies.paper import PAPER_METHODS, dataset_for_protocol, paper_map


def test_the_paper_tables_hold_the_printed_figures():
    # Spot checks against the paper's text: Table 4 (CIFAR-10, Clothing1M), Table 5 (NUS-WIDE, MS-COCO).
    assert paper_map("cifar10", "dmuh", 32) == 0.822
    assert paper_map("cifar10", "itq", 12) == 0.261
    assert paper_map("cifar10", "dpsh", 24) == 0.725
    assert paper_map("clothing1m", "lfh", 48) == 0.257
    assert paper_map("nuswide", "sdh", 48) == 0.812
    assert paper_map("coco", "ddsh", 12) == 0.745
    assert paper_map("cifar10", "regu", 32) is None and paper_map("cifar10", "dmuh", 64) is None
    assert PAPER_METHODS == ["dmuh", "ddsh", "dsdh", "dpsh", "dsh", "dhn", "cosdish", "sdh", "fasth", "lfh", "itq"]
    assert dataset_for_protocol("cifar10-54k") == "cifar10" and dataset_for_protocol("digits") is None


def test_the_paper_column_sits_beside_each_measured_one(tmp_path):
    rows = [
        {"label": "dpsh", "method": "dpsh", "bits": 12, "map": 0.5, "seconds": 1.0},
        {"label": "dpsh", "method": "dpsh", "bits": 32, "map": 0.6, "seconds": 1.0},
        {"label": "dmuh alpha=0.5", "method": "dmuh", "bits": 12, "map": 0.4, "seconds": 1.0},
        {"label": "dmuh alpha=0.5", "method": "dmuh", "bits": 32, "map": 0.45, "seconds": 1.0},
    ]
    write_tables(rows, tmp_path, paper="cifar10")
    markdown = (tmp_path / "results.md").read_text()
    assert "| Method | 12 bits | paper | 32 bits | paper |" in markdown
    assert "| DPSH | 0.5000 | 0.712 | 0.6000 | 0.742 |" in markdown  # one seed: nothing bold
    assert "| DMUH alpha=0.5 | 0.4000 |  | 0.4500 |  |" in markdown  # a grid row is not the paper's row
    assert "CIFAR-10 (Table 4)" in markdown
    table = list(csv.reader((tmp_path / "results.csv").open()))
    assert table[0] == ["method", "12 bits", "32 bits", "paper 12 bits", "paper 32 bits"]
    assert table[1] == ["dpsh", "0.5", "0.6", "0.712", "0.742"]
    write_tables(rows, tmp_path / "plain")
    assert "paper" not in (tmp_path / "plain" / "results.md").read_text().split("Training time")[0]


def test_compare_through_the_cli_prints_the_paper_figures(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert (
        main(
            [
                "compare",
                "--methods",
                "itq,lsh",
                "--bits",
                "12",
                "--data",
                "digits",
                "--protocol",
                "digits",
                "--model",
                "smallcnn",
                "--model-param",
                "input_size=8",
                "--model-param",
                "width=16",
                "--epochs",
                "1",
                "--trace-items",
                "0",
                "--quiet",
                "--paper-figures",
                "cifar10",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    markdown = (out / "results.md").read_text()
    itq = next(line for line in markdown.splitlines() if line.startswith("| ITQ |"))
    assert itq.endswith("| 0.261 |")
    lsh = next(line for line in markdown.splitlines() if line.startswith("| LSH |"))
    assert lsh.endswith("|  |")  # LSH is not in the paper's tables


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--paper-figures", "imagenet"], "--paper-figures imagenet"),
        (["--methods", "paper,nope"], "nope"),
    ],
)
def test_bad_paper_flags_are_one_line_errors(tmp_path, capsys, flags, message):
    args = ["compare", "--bits", "12", "--data", "digits", "--protocol", "digits", "--out", str(tmp_path / "x")]
    if "--methods" not in flags:
        args += ["--methods", "itq"]
    assert main(args + flags) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
