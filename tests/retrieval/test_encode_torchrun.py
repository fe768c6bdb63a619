"""`torchrun --nproc_per_node=2 -m dmuh -- encode --shards`: two gloo processes on the CPU write the
shards of one process (test_encode_shards.py tests the shards themselves)."""

import subprocess
import sys

from test_encode_shards import assert_same_codes, environment, one_file, run  # noqa: F401 - the fixtures

from dmuh.codes.file import Codes


def test_torchrun_two_cpu_processes_encode_the_same_shards(run, one_file, tmp_path):  # noqa: F811 - fixtures
    folder = tmp_path / "torchrun"
    # "--": without it torchrun takes --run for an abbreviation of its --run-path (docs/search.md).
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "dmuh",
        "--",
        "encode",
        "--run",
        str(run),
        "--images",
        "digits",
        "--shards",
        str(folder),
        "--shard-size",
        "300",
        "--quiet",
    ]
    result = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("encoded 1797 items in 6 shards (6 encoded now, 0 already complete)") == 1  # rank 0
    assert_same_codes(Codes.load(folder), one_file)
