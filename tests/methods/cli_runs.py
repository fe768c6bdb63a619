"""One end-to-end run of a method through the CLI, shared by the methods' tests: train on digits
for one epoch, `--resume` to a second, and read the last log row (in-process, so it is cheap)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Iterable

from dmuh.cli import main
from dmuh.runs.layout import read_log

DIGITS_NETWORK = ["--model", "smallcnn", "--model-param", "input_size=8", "--model-param", "width=16"]


def train_and_resume_on_digits(
    out: Path, method: str, params: Iterable[str] = (), bits: int = 16, extra: Iterable[str] = ()
) -> Dict[str, float]:
    """Train `method` (with `-p` params) one epoch on digits, resume it to two; the last log row.
    Fails the test when either command does not succeed or the MAP is not finite."""
    command = ["train", "--method", method, "--data", "digits", "--protocol", "digits", *DIGITS_NETWORK]
    command += ["--bits", str(bits), "--batch-size", "64", "--trace-items", "0", "--quiet", "--out", str(out)]
    command += [word for param in params for word in ("-p", param)] + list(extra)
    assert main(command + ["--epochs", "1"]) == 0
    assert main(command + ["--epochs", "2", "--resume"]) == 0
    rows = read_log(out / "log.csv")
    last = rows[-1]
    assert last["epoch"] == 2 and math.isfinite(last["map"])
    return last
