"""`dmuh --version`, `dmuh search` without --run, counts in words, and one help style
("[default: X]") for every flag of encode, index, search, export-onnx, evaluate, figure and demo."""

import argparse
import importlib.metadata
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dmuh.cli import build_parser, main

pytest.importorskip("faiss")


def test_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"dmuh {importlib.metadata.version('dmuh')}"


def subcommands(parser, path=()):
    """(name, parser) of every leaf command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from subcommands(sub, path + (name,))
            return
    yield " ".join(path), parser


OWNED = (
    "features",
    "encode",
    "index build",
    "index info",
    "index add",
    "index remove",
    "search",
    "export-onnx",
    "evaluate",
    "figure uncertainty",
    "figure curves",
    "figure topk",
    "demo",
    "serve",
    "inspect",
)


def test_every_flag_states_its_default_and_choices():
    commands = dict(subcommands(build_parser()))
    for name in OWNED:
        for action in commands[name]._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            flag = action.option_strings[0] if action.option_strings else action.dest
            text = action.help or ""
            assert text.endswith("(required)") or ("[default: " in text and text.endswith("]")), (name, flag, text)
            for choice in action.choices or ():
                assert str(choice) in text, (name, flag, choice)


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "regu"
    assert (
        main(
            [
                "train",
                "--data",
                "digits",
                "--protocol",
                "digits",
                "--model",
                "smallcnn",
                "--model-param",
                "input_size=8",
                "--model-param",
                "width=8",
                "--bits",
                "16",
                "--batch-size",
                "100",
                "--method",
                "regu",
                "--epochs",
                "1",
                "--eval-every",
                "-1",
                "--trace-items",
                "0",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def save_digits(folder, count):
    from dmuh.data import DigitsSource

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(DigitsSource().decode(np.arange(count))):
        Image.fromarray(image[:, :, 0]).save(folder / f"{i}.png")
    return folder


def test_counts_in_words_and_search_with_the_indexs_run(image_run, tmp_path, capsys):
    images = save_digits(tmp_path / "images", 2)
    assert (
        main(["encode", "--run", str(image_run), "--images", str(images / "0.png"), "--out", str(tmp_path / "1.npz")])
        == 0
    )
    assert capsys.readouterr().out.startswith("encoded 1 image into 16-bit codes: ")
    assert main(["encode", "--run", str(image_run), "--images", str(images), "--out", str(tmp_path / "2.npz")]) == 0
    assert capsys.readouterr().out.startswith("encoded 2 images into 16-bit codes: ")
    assert main(["index", "build", "--codes", str(tmp_path / "1.npz"), "--out", str(tmp_path / "1.idx")]) == 0
    assert capsys.readouterr().out.strip() == f"index {tmp_path / '1.idx'}: flat, 1 code of 16 bits"
    assert main(["index", "build", "--codes", str(tmp_path / "2.npz"), "--out", str(tmp_path / "2.idx")]) == 0
    assert "2 codes of 16 bits" in capsys.readouterr().out
    # No --run: the index's header names the run that encoded it.
    assert (
        main(["search", "--index", str(tmp_path / "2.idx"), "--image", str(images / "1.png"), "--k", "2", "--json"])
        == 0
    )
    captured = capsys.readouterr()
    assert '"distance": 0' in captured.out and captured.err == ""
    assert main(["search", "--index", str(tmp_path / "2.idx"), "--image", str(images / "1.png"), "--k", "3"]) == 2
    assert "which holds 2 codes" in capsys.readouterr().err


def one_line(capsys, argv, needle):
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err


def test_search_without_run_when_the_index_names_none_or_a_gone_one(image_run, tmp_path, capsys):
    from dmuh.codes.file import Codes

    images = save_digits(tmp_path / "images", 1)
    copy = Path(shutil.copytree(image_run, tmp_path / "copy"))
    assert main(["encode", "--run", str(copy), "--images", str(images), "--out", str(tmp_path / "c.npz")]) == 0
    codes = Codes.load(tmp_path / "c.npz")
    codes.model = {}
    codes.save(tmp_path / "anonymous.npz")
    for name in ("c", "anonymous"):
        assert (
            main(["index", "build", "--codes", str(tmp_path / f"{name}.npz"), "--out", str(tmp_path / f"{name}.idx")])
            == 0
        )
    capsys.readouterr()
    one_line(
        capsys,
        ["search", "--index", tmp_path / "anonymous.idx", "--image", images / "0.png"],
        "query images need --run RUN (the run that encoded the index): --index",
    )
    shutil.rmtree(copy)
    one_line(
        capsys,
        ["search", "--index", tmp_path / "c.idx", "--image", images / "0.png"],
        f"the run --index {tmp_path / 'c.idx'} records, {copy.resolve()}, is no longer there",
    )
    assert (
        main(
            [
                "search",
                "--index",
                str(tmp_path / "c.idx"),
                "--run",
                str(image_run),
                "--allow-other-model",
                "--image",
                str(images / "0.png"),
                "--k",
                "1",
            ]
        )
        == 0
    )
