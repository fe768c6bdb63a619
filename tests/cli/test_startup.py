"""The command answers --help, --version and flag errors before loading torch (bench/cli_startup.py
times it)."""

import subprocess
import sys

import pytest

PROBE = """
import sys
from dmuh.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print("torch" in sys.modules, code)
"""


@pytest.mark.parametrize(
    "argv, code",
    [
        (["--help"], 0),
        (["--version"], 0),
        (["train", "--help"], 0),
        (["search", "--help"], 0),
        (["inspect", "--help"], 0),
        (["train", "--bits", "x"], 2),
        (["train", "--lr", "-1"], 2),
        (["nonsense"], 2),
    ],
)
def test_no_torch_before_the_arguments_are_checked(argv, code):
    result = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    assert result.stdout.split()[-2:] == ["False", str(code)], result.stderr[-500:]
