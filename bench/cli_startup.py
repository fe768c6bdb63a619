"""Seconds until the `dmuh` command answers --help, --version and an argument error (issue: a command
that imports torch before parsing its arguments costs seconds per typo).

    python bench/cli_startup.py                      # this checkout (src/)
    python bench/cli_startup.py --src OTHER/src      # another checkout, for a before/after table

Each case is a fresh `python -m dmuh ...` process (PYTHONPATH=--src), run --repeats times
interleaved with the references in the same run: `python -c pass` (the interpreter alone) and
`python -c "import torch"`; the table gives the median wall seconds and whether torch was loaded.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    "dmuh --help": ["-m", "dmuh", "--help"],
    "dmuh --version": ["-m", "dmuh", "--version"],
    "dmuh train --help": ["-m", "dmuh", "train", "--help"],
    "dmuh train --bits x (error)": ["-m", "dmuh", "train", "--bits", "x"],
    "python -c pass": ["-c", "pass"],
    "python -c 'import torch'": ["-c", "import torch"],
}
# Run through a wrapper that reports whether torch ended up in sys.modules.
PROBE = (
    "import atexit, sys, runpy; atexit.register(lambda: sys.stderr.write('\\nTORCH=%s\\n' % ('torch' in sys.modules)))\n"
    "args = sys.argv[1:]\n"
    "if args[0] == '-m':\n    sys.argv = [args[1]] + args[2:]; runpy.run_module(args[1], run_name='__main__')\n"
    "else:\n    exec(args[1])\n"
)


def run_once(argv, env) -> tuple:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=env)
    return time.perf_counter() - started, "TORCH=True" in done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", default=str(Path(__file__).resolve().parents[1] / "src"), help="the src/ to time")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(Path(args.src).resolve())}
    times = {name: [] for name in CASES}
    torch_loaded = {}
    for _ in range(args.repeats):
        for name, argv in CASES.items():
            seconds, loaded = run_once(argv, env)
            times[name].append(seconds)
            torch_loaded[name] = loaded
    print(f"src: {args.src}; {args.repeats} runs each, interleaved; median wall seconds")
    print("| command | seconds | torch loaded |")
    print("|---|---:|---|")
    for name in CASES:
        print(f"| {name} | {statistics.median(times[name]):.2f} | {'yes' if torch_loaded[name] else 'no'} |")


if __name__ == "__main__":
    main()
