"""What a newcomer sees: `dmuh demo` (a line per run, the table, where the runs are, a second run that
keeps the first), `dmuh train`'s lines (what it trains, 100 columns, no bars in a log file)."""

import re
import subprocess
import sys

import numpy as np

TRAIN = "train --data digits --protocol digits --model smallcnn --model-param input_size=8 --epochs 2".split()


def dmuh(*args, cwd=None, text=True):
    """`python -m dmuh ARGS` as a user runs it; text=False keeps the bytes (text mode would turn a
    carriage return into a newline)."""
    return subprocess.run(
        [sys.executable, "-m", "dmuh", *map(str, args)], capture_output=True, text=text, cwd=cwd, timeout=300
    )


def demo(cwd, *args):
    return dmuh("demo", "--bits", "8", "--epochs", "2", *args, cwd=cwd)


def test_the_demo_shows_progress_and_runs_twice(tmp_path):
    first = demo(tmp_path)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert lines[0].startswith("training regu and dmuh at 8 bits") and "into runs/demo" in lines[0]
    progress = [line.strip().split(" (")[0] for line in lines if line.strip().startswith("[")]
    assert progress == ["[1/2] regu at 8 bits", "[2/2] dmuh at 8 bits"]
    assert "| regu |" in first.stdout and "| dmuh |" in first.stdout
    assert lines[-1].endswith("are in runs/demo")
    table = (tmp_path / "runs" / "demo" / "results.md").read_text()

    second = demo(tmp_path)
    assert second.returncode == 0, second.stderr
    assert "an earlier demo is in runs/demo; this one goes to runs/demo-2" in second.stdout
    assert second.stdout.splitlines()[-1].endswith("are in runs/demo-2")
    assert (tmp_path / "runs" / "demo" / "results.md").read_text() == table  # the first is kept
    assert (tmp_path / "runs" / "demo-2" / "results.md").is_file()


def test_a_bad_argument_is_reported_before_any_file(tmp_path):
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "results.md").write_text("keep")
    result = demo(tmp_path, "--out", "runs/demo", "--epochs", "0")
    assert result.returncode == 2 and "--epochs" in result.stderr and "results.md" not in result.stderr


def test_the_last_line_of_train_rounds_its_figures(tmp_path):
    result = dmuh(*TRAIN, "--method", "regu", "--out", tmp_path / "run", "--quiet")
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"run .*: epoch 2, loss \d\.\d{4}, map \d\.\d{4}, [\d,]+ images/s \(MAP ties expected\)", last)


def test_a_log_file_gets_lines_not_progress_bars(tmp_path):
    """`dmuh train > log 2>&1`: stderr is no terminal, so no bar's carriage returns reach the file."""
    result = dmuh(*TRAIN, "--method", "regu", "--out", tmp_path / "run", text=False)
    assert result.returncode == 0, result.stderr[-500:]
    assert b"\r" not in result.stdout + result.stderr
    assert b"epoch 2 |" in result.stdout


def train_lines(tmp_path, *extra):
    result = dmuh(*TRAIN, "--method", "dmuh", "--out", tmp_path / "run", *extra)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_train_says_what_it_trains_and_its_epoch_lines_fit_100_columns(tmp_path):
    lines = train_lines(tmp_path)
    assert lines[0] == "training dmuh (32 bits, smallcnn) on digits, device cpu"
    assert lines[1] == "split (digits): 300 query / 1,000 train / 1,497 database items; MAP with ties expected"
    assert "warm-up epoch 1/1 | cross_entropy " in "\n".join(lines)  # a line per warm-up epoch
    assert any("warm-up done (cross_entropy" in line and "dmuh's own loss starts now" in line for line in lines)
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert len(epochs) == 2 and all(len(line) <= 100 for line in epochs)
    assert all(" u " in line and "image_uncertainty" not in line and "likelihood" not in line for line in epochs)
    verbose = [line for line in train_lines(tmp_path / "v", "--verbose") if line.startswith("epoch ")]
    assert all("likelihood" in line and "quantization" in line for line in verbose)
    assert all("image_uncertainty " not in line for line in verbose)  # the same number as u: printed once


def test_a_folder_without_class_folders_trains_with_no_protocol_flag(tmp_path):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(120):
        Image.fromarray((rng.random((8, 8, 3)) * 255).astype("uint8")).save(folder / f"{i:03d}.png")
    run = tmp_path / "run"
    result = dmuh("train", "--data", folder, "--method", "lsh", "--bits", "8", "--out", run)
    assert result.returncode == 0, result.stderr
    assert (
        "protocol auto chose unsupervised: the data has no labels: 12 random query items of 120, "
        "train = database = the rest (--protocol overrides)"
    ) in result.stdout
    assert "split (unsupervised): 12 query / 108 train / 108 database items" in result.stdout
    assert '"protocol":"unsupervised"' in (run / "split.json").read_text()  # the run records what auto chose


def train_in_process(*args) -> None:
    """A finished run to tabulate, trained in this process (the runs are the input here, not the subject)."""
    from dmuh.cli import main

    assert main([*TRAIN, "--epochs", "1", "--init", "scratch", "--quiet", *map(str, args)]) == 0


def test_compare_tabulates_finished_runs_without_training(tmp_path):
    for method, seed in (("regu", 0), ("regu", 1), ("dmuh", 0), ("dmuh", 1)):
        train_in_process("--bits", "8", "--method", method, "--seed", seed, "--out", tmp_path / f"{method}{seed}")
    runs = [arg for name in ("regu0", "dmuh0", "regu1", "dmuh1") for arg in ("--run", tmp_path / name)]
    table = dmuh("compare", *runs, "--against", "regu", "--out", tmp_path / "table")
    assert table.returncode == 0, table.stderr
    assert "training in" not in table.stdout and "(n=2)" in table.stdout  # seeds 0 and 1 make one cell
    assert (
        "Same backbone, recipe and budget for every method: data digits, protocol digits, model smallcnn, 1 epoch"
        in (table.stdout)
    )
    assert "Paired difference against Regu" in table.stdout and (tmp_path / "table" / "results.md").is_file()
    single = dmuh("compare", "--run", tmp_path / "regu0", "--run", tmp_path / "dmuh0")
    assert single.returncode == 0 and "One seed per cell" in single.stdout and "**" not in single.stdout

    other = tmp_path / "other-split"
    train_in_process("--bits", "8", "--method", "regu", "--split-seed", "1", "--out", other)
    refused = dmuh("compare", "--run", tmp_path / "regu0", "--run", other)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "scored on other query or database items" in refused.stderr
    flagged = dmuh("compare", "--run", tmp_path / "regu0", "--epochs", "3")
    assert flagged.returncode == 2 and "--epochs: compare --run tabulates finished runs" in flagged.stderr


def test_labels_print_as_class_names_from_classes_txt(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    lines = []
    for c in range(3):
        for i in range(14):
            path = tmp_path / "img" / f"{c}-{i}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray((rng.random((8, 8, 3)) * 80 + 80 * c).astype("uint8")).save(path)
            lines.append(f"img/{path.name} " + " ".join("1" if k == c else "0" for k in range(3)))
    (tmp_path / "photos.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "classes.txt").write_text("cat\ndog\nbird\n")
    run = tmp_path / "run"
    trained = dmuh(
        "train", "--data", tmp_path / "photos.txt", "--data-root", tmp_path, "--method", "regu", "--bits", "8",
        "--model", "smallcnn", "--epochs", "1", "--init", "scratch", "--out", run,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    inspected = dmuh("inspect", run, "--out", tmp_path / "review")
    assert inspected.returncode == 0, inspected.stderr
    labels = {row.split(",")[4] for row in (tmp_path / "review" / "items.csv").read_text().splitlines()[1:]}
    assert labels == {"cat", "dog", "bird"}
