"""Hardening II (issue 31) end to end through the CLI: outputs never replace their own inputs,
concurrent writers wait or refuse, amplifying inputs are refused before they are expanded."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dmuh.cli import main

faiss = pytest.importorskip("faiss")

TINY = ["--data", "digits", "--protocol", "per-class", "--protocol-param", "query_per_class=5",
        "--protocol-param", "train_per_class=20", "--model", "smallcnn", "--model-param", "input_size=8",
        "--model-param", "width=8", "--bits", "8", "--epochs", "1", "--batch-size", "50", "--init", "scratch",
        "--trace-items", "4", "--train-map-items", "50", "--quiet"]  # fmt: skip
SRC = str(Path(__file__).resolve().parents[2] / "src")


def one_line(capsys, code, expected=2):
    err = capsys.readouterr().err.strip()
    assert code == expected, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "internal error" not in err, err
    return err


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    assert main(["train", *TINY, "--out", str(root / "run")]) == 0
    assert main(["encode", "--run", str(root / "run"), "--images", "digits", "--out", str(root / "codes.npz")]) == 0
    assert main(["index", "build", "--codes", str(root / "codes.npz"), "--out", str(root / "i.dmuhidx")]) == 0
    return root


@pytest.fixture()
def work(built, tmp_path):
    for name in ("run", "codes.npz", "i.dmuhidx"):
        source = built / name
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, tmp_path / name)
    return tmp_path


def digest(path):
    return Path(path).read_bytes()


# -- class 4: --force never destroys an input of the same command --------------------------------


def test_evaluate_json_onto_the_runs_checkpoint_is_refused_with_force(work, capsys):
    before = digest(work / "run/checkpoint.safetensors")
    code = main(["evaluate", "--run", str(work / "run"), "--json", str(work / "run/checkpoint.safetensors"), "--force"])
    assert "is a file inside the input of --run" in one_line(capsys, code)
    assert digest(work / "run/checkpoint.safetensors") == before


def test_evaluate_json_onto_the_runs_data_file_is_refused(work, capsys):
    features = work / "f.npz"
    from sklearn.datasets import load_digits

    digits = load_digits()
    np.savez(features, features=digits.data.astype(np.float32), labels=digits.target)
    before = digest(features)
    code = main(["evaluate", "--run", str(work / "run"), "--data", f"features:{features}", "--json", str(features),
                 "--force"])  # fmt: skip
    assert "is the input of --data" in one_line(capsys, code)
    assert digest(features) == before


def test_search_out_onto_the_index_it_searches_is_refused_with_force(work, capsys):
    before = digest(work / "i.dmuhidx")
    code = main(["search", "--index", str(work / "i.dmuhidx"), "--queries", str(work / "codes.npz"), "--out",
                 str(work / "i.dmuhidx"), "--force"])  # fmt: skip
    assert "is the input of --index" in one_line(capsys, code)
    assert digest(work / "i.dmuhidx") == before


def test_search_out_through_a_symlink_to_the_queries_is_refused(work, capsys):
    (work / "link.npz").symlink_to(work / "codes.npz")
    before = digest(work / "codes.npz")
    code = main(["search", "--index", str(work / "i.dmuhidx"), "--queries", str(work / "codes.npz"), "--out",
                 str(work / "link.npz"), "--force"])  # fmt: skip
    assert "is the input of --queries" in one_line(capsys, code)
    assert digest(work / "codes.npz") == before


def test_encode_out_onto_an_input_image_is_refused_with_force(work, capsys):
    from PIL import Image

    images = work / "imgs" / "c0"
    images.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(images / f"{i}.png")
    before = digest(images / "0.png")
    code = main(["encode", "--run", str(work / "run"), "--images", str(work / "imgs"), "--out", str(images / "0.png"),
                 "--force"])  # fmt: skip
    assert "is a file inside the input of --images" in one_line(capsys, code)
    assert digest(images / "0.png") == before


def test_index_build_out_onto_its_codes_and_export_onto_the_run_are_refused(work, capsys):
    before = digest(work / "codes.npz")
    code = main(["index", "build", "--codes", str(work / "codes.npz"), "--out", str(work / "codes.npz"), "--force"])
    assert "is the input of --codes" in one_line(capsys, code)
    assert digest(work / "codes.npz") == before
    code = main(["export-onnx", "--run", str(work / "run"), "--out", str(work / "run/config.yaml"), "--force"])
    assert "inside the input of --run" in one_line(capsys, code)


def test_force_still_replaces_an_earlier_output(work, capsys):
    (work / "old.json").write_text("{}")
    code = main(["evaluate", "--run", str(work / "run"), "--json", str(work / "old.json"), "--force", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert "map_by_ties" in (work / "old.json").read_text()


# -- class 6: concurrent writers -------------------------------------------------------------------


def dmuh_process(*argv, cwd):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-m", "dmuh", *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def test_two_index_adds_at_once_both_land(work):
    from dmuh.codes.file import Codes

    codes = Codes.load(work / "codes.npz")
    count = len(codes)
    for name in ("a", "b"):
        part = Codes(codes.packed[:50], codes.bits, [f"{name}:{i}" for i in range(50)], model=codes.model,
                     image_size=codes.image_size, channels=codes.channels)  # fmt: skip
        part.save(work / f"{name}.npz")
    adds = [
        dmuh_process("index", "add", "--index", "i.dmuhidx", "--codes", name, cwd=work) for name in ("a.npz", "b.npz")
    ]
    for process in adds:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
    from dmuh.retrieval.index import open_index

    with open_index(work / "i.dmuhidx") as index:
        assert len(index) == count + 100
    assert not (work / ".i.dmuhidx.lock").exists()


def test_a_second_train_into_the_same_run_directory_refuses(work, tmp_path):
    from dmuh.utils.io import file_lock

    with file_lock(tmp_path / "same", "run directory"):  # as a first `dmuh train --out same` holds it
        second = dmuh_process("train", *TINY, "--out", "same", cwd=tmp_path)
        _, err = second.communicate(timeout=120)
    assert second.returncode == 2
    assert err.strip().splitlines() == [
        f"dmuh train: error: run directory same is being written by another dmuh (process {os.getpid()}); "
        "wait for it to finish and try again"
    ]
    assert not (tmp_path / "same" / "checkpoint.safetensors").exists()


# -- class 1: a tiny input, a huge allocation ------------------------------------------------------

BOMB = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{c}: &{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]
)


def test_an_alias_bomb_config_is_refused_by_train_and_evaluate(work, capsys):
    (work / "bomb.yaml").write_text(BOMB)
    code = main(["train", "--config", str(work / "bomb.yaml"), "--out", str(work / "new")])
    assert "expands to more than" in one_line(capsys, code)
    (work / "run/config.yaml").write_text(BOMB)
    code = main(["evaluate", "--run", str(work / "run"), "--quiet"])
    assert "expands to more than" in one_line(capsys, code)


def test_an_error_quoting_a_huge_value_is_one_short_line(work, capsys):
    (work / "big.yaml").write_text("epochs: " + "x" * 500_000 + "\n")
    err = one_line(capsys, main(["train", "--config", str(work / "big.yaml"), "--out", str(work / "new")]))
    assert len(err) <= 450 and err.endswith("...")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["index", "build", "--kind", "hnsw", "--m", "100000000"], "m=100000000: expected at most 256"),
        (["index", "build", "--kind", "hnsw", "--ef-search", "4294967296"], "expected at most 65,536"),
        (["index", "build", "--kind", "ivf", "--nlist", "4294967296"], "expected at most"),
    ],
)
def test_index_flags_that_imply_memory_are_refused(work, capsys, argv, message):
    code = main([*argv, "--codes", str(work / "codes.npz"), "--out", str(work / "new.dmuhidx")])
    assert message in one_line(capsys, code)
    assert not (work / "new.dmuhidx").exists()


def test_search_nprobe_past_32_bits_is_refused(work, capsys):
    assert main(["index", "build", "--kind", "ivf", "--codes", str(work / "codes.npz"), "--out", str(work / "v")]) == 0
    capsys.readouterr()
    code = main(["search", "--index", str(work / "v"), "--queries", str(work / "codes.npz"), "--nprobe", "4294967296"])
    assert "nprobe=4294967296: expected at most" in one_line(capsys, code)


def test_encode_image_size_past_the_largest_is_refused(work, capsys):
    code = main(["encode", "--run", str(work / "run"), "--images", "digits", "--out", str(work / "c.npz"),
                 "--image-size", "60000"])  # fmt: skip
    assert "--image-size: expected an integer >= 4 and <= 4096, got 60000" in one_line(capsys, code)


def test_a_codes_zip_bomb_is_refused_by_index_build(work, capsys):
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (96 << 20,)})
    with zipfile.ZipFile(work / "bomb.npz", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        fmt = io.BytesIO()
        np.save(fmt, np.array("dmuh-codes"))
        archive.writestr("format.npy", fmt.getvalue())
        with archive.open("codes.npy", "w", force_zip64=True) as member:
            member.write(header.getvalue())
            for _ in range(96):
                member.write(bytes(1 << 20))
    code = main(["index", "build", "--codes", str(work / "bomb.npz"), "--out", str(work / "b.dmuhidx")])
    assert "a zip bomb" in one_line(capsys, code)
