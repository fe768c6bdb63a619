"""dmuh.utils.io's guards: an output never replaces an input of its command; one writer at a time."""

import os
import subprocess
import sys
import time

import pytest

from dmuh.errors import DmuhError
from dmuh.utils.io import file_lock, lock_path, refuse_input_as_output, refuse_overwrite, spec_path


def test_an_output_that_is_an_input_is_refused_even_with_force(tmp_path):
    data = tmp_path / "codes.npz"
    data.write_bytes(b"x")
    with pytest.raises(DmuhError, match=r"--out .* is the input of --codes .*even with --force"):
        refuse_overwrite(data, True, inputs=[("--codes", data)])
    assert data.read_bytes() == b"x"


def test_links_are_followed(tmp_path):
    data = tmp_path / "codes.npz"
    data.write_bytes(b"x")
    (tmp_path / "soft.npz").symlink_to(data)
    os.link(data, tmp_path / "hard.npz")
    for name in ("soft.npz", "hard.npz"):
        with pytest.raises(DmuhError, match="is the input of --codes"):
            refuse_overwrite(tmp_path / name, True, inputs=[("--codes", data)])
    # and an input given through a link
    with pytest.raises(DmuhError, match="is the input of --codes"):
        refuse_overwrite(data, True, inputs=[("--codes", tmp_path / "soft.npz")])


def test_a_file_inside_an_input_folder_is_refused_but_the_commands_own_output_is_not(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.safetensors").write_bytes(b"weights")
    (run / "eval.json").write_text("{}")
    with pytest.raises(DmuhError, match="is a file inside the input of --run"):
        refuse_overwrite(run / "checkpoint.safetensors", True, "--json", inputs=[("--run", run)])
    refuse_overwrite(run / "eval.json", True, "--json", inputs=[("--run", run)], own=[run / "eval.json"])
    refuse_overwrite(run / "new.json", True, "--json", inputs=[("--run", run)])  # a new file destroys nothing


def test_data_specs_name_the_path_they_read(tmp_path):
    features = tmp_path / "f.npz"
    features.write_bytes(b"x")
    assert spec_path(f"features:{features}") == features
    assert spec_path(f"unlabeled:features:{features}") == features
    assert spec_path("http://host:19530") is None and spec_path(None) is None
    with pytest.raises(DmuhError, match="is the input of --images"):
        refuse_input_as_output(features, "--out", [("--images", f"features:{features}")])


def test_a_second_writer_refuses_at_once_or_after_waiting(tmp_path):
    target = tmp_path / "x.dmuhidx"
    with file_lock(target, "index"):
        assert lock_path(target).exists()
        with pytest.raises(DmuhError, match=r"index .*x.dmuhidx is being written by another dmuh \(process \d+\)"):
            with file_lock(target, "index"):
                pass
        started = time.monotonic()
        with pytest.raises(DmuhError, match="after waiting 0.3 s"):
            with file_lock(target, "index", wait_s=0.3):
                pass
        assert time.monotonic() - started >= 0.3
    assert not lock_path(target).exists()  # released and removed
    with file_lock(target, "index"):
        pass


def test_a_waiting_writer_gets_the_lock_when_the_first_releases_it(tmp_path):
    target = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from dmuh.utils.io import file_lock\n"
            f"with file_lock({str(target)!r}, 'run'):\n    print('held', flush=True); time.sleep(1.0)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    started = time.monotonic()
    with file_lock(target, "run directory", wait_s=30):
        waited = time.monotonic() - started
    holder.wait(timeout=30)
    assert 0.2 < waited < 30
