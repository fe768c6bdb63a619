"""`dmuh encode / index / search / export-onnx` end to end on small digits runs (CPU, seconds)."""

import importlib.util
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmuh.cli import main
from dmuh.codes.binary import pack_bits, sign
from dmuh.codes.file import Codes
from dmuh.data import DigitsSource
from dmuh.engine.builder import encode
from dmuh.engine.trainer import train
from dmuh.errors import DmuhError
from dmuh.retrieval.encoder import load_encoder
from dmuh.retrieval.index import build_index, open_index
from dmuh.runs.config import TrainConfig

# The re-ranking study lives with the benchmark scripts, not in the library.
_STUDY = importlib.util.spec_from_file_location(
    "rerank_cifar10", Path(__file__).resolve().parents[2] / "bench" / "rerank_cifar10.py"
)
rerank_cifar10 = importlib.util.module_from_spec(_STUDY)
_STUDY.loader.exec_module(rerank_cifar10)
rerank_experiment = rerank_cifar10.rerank_experiment

BITS = 16
# Encoding, ONNX and the re-ranking measurement run without FAISS (as on the GPU machine); indexes need it.
try:
    import faiss  # noqa: F401
except ImportError:
    faiss = None
needs_faiss = pytest.mark.skipif(faiss is None, reason="faiss-cpu is not installed")


def train_run(path, method, epochs):
    config = TrainConfig(
        data="digits",
        protocol="digits",
        model="smallcnn",
        model_params={"input_size": 8},
        method=method,
        bits=BITS,
        epochs=epochs,
        batch_size=64,
        device="cpu",
        out=str(path),
        eval_every=-1,
        trace_items=0,
    )
    train(config, progress=False, echo=lambda line: None)
    return path


@pytest.fixture(scope="module")
def dmuh_run(tmp_path_factory):
    return train_run(tmp_path_factory.mktemp("runs") / "dmuh", "dmuh", epochs=3)


@pytest.fixture(scope="module")
def regu_run(tmp_path_factory):
    return train_run(tmp_path_factory.mktemp("runs") / "regu", "regu", epochs=1)


@pytest.fixture(scope="module")
def digits():
    return DigitsSource()


@pytest.fixture(scope="module")
def digits_codes(dmuh_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("codes") / "digits.npz"
    assert (
        main(["encode", "--checkpoint", str(dmuh_run), "--images", "digits", "--out", str(out), "--uncertainty"]) == 0
    )
    return out


@pytest.fixture(scope="module")
def digits_index(digits_codes):
    out = digits_codes.with_name("digits.dmuhidx")
    assert main(["index", "build", "--codes", str(digits_codes), "--kind", "flat", "--out", str(out)]) == 0
    return out


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def fails_with(capsys, message, *args):
    code, _, err = run_cli(capsys, *args)
    assert code == 2, err
    assert err.count("\n") == 1 and message in err, err  # one line, saying what is wrong
    return err


def save_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[:, :, 0]).save(path)


# -- encode -------------------------------------------------------------------------------------


def test_encode_gives_the_evaluation_codes_and_uncertainty(dmuh_run, digits_codes, digits):
    codes = Codes.load(digits_codes)
    assert codes.bits == BITS and len(codes) == len(digits) and codes.ids == digits.ids
    np.testing.assert_array_equal(codes.labels, digits.labels)
    assert codes.model["method"] == "dmuh" and len(codes.model["checkpoint_sha256"]) == 64
    assert codes.image_size == 8 and codes.channels == 1

    from dmuh.studies.evaluate import load_run

    exp = load_run(dmuh_run)
    h = encode(exp.model, exp.method, exp.images, exp.pipeline, exp.execution)
    np.testing.assert_array_equal(codes.packed, pack_bits(sign(h).numpy()))
    exp.momentum.network.eval()
    with torch.no_grad():
        m = exp.method.continuous_codes(exp.momentum.network(exp.pipeline(exp.images)))
    u = (h - m).abs().numpy()
    assert codes.bit_uncertainty.shape == (len(digits), BITS) and codes.bit_uncertainty.dtype == np.float16
    np.testing.assert_allclose(codes.bit_uncertainty.astype(np.float32), u, atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(codes.uncertainty, u.mean(axis=1), atol=1e-5)


def test_encode_folders_zips_and_lists(dmuh_run, digits_codes, digits, tmp_path, capsys):
    images = digits.decode(np.arange(12))
    for i, image in enumerate(images):
        save_png(tmp_path / "classes" / str(i % 3) / f"{i:02d}.png", image)
        save_png(tmp_path / "flat" / f"{i:02d}.png", image)
    with zipfile.ZipFile(tmp_path / "classes.zip", "w") as archive:
        for path in sorted((tmp_path / "classes").rglob("*.png")):
            archive.write(path, path.relative_to(tmp_path / "classes").as_posix())
    (tmp_path / "list.txt").write_text("".join(f"flat/{i:02d}.png\n" for i in range(12)))
    code, _, err = run_cli(
        capsys,
        "encode",
        "--checkpoint",
        dmuh_run,
        "--images",
        tmp_path / "flat" / "03.png",
        "--out",
        tmp_path / "one.npz",
    )
    assert code == 0, err
    assert Codes.load(tmp_path / "one.npz").ids == ["03.png"]
    expected = Codes.load(digits_codes).packed[:12]
    for name, images_spec in (("folder", "classes"), ("zip", "classes.zip"), ("flat", "flat"), ("list", "list.txt")):
        out = tmp_path / f"{name}.npz"
        code, stdout, err = run_cli(
            capsys, "encode", "--checkpoint", dmuh_run, "--images", tmp_path / images_spec, "--out", out
        )
        assert code == 0, err
        codes = Codes.load(out)
        order = np.argsort([int(i.split("/")[-1][:2]) for i in codes.ids])
        np.testing.assert_array_equal(codes.packed[order], expected)  # lossless PNGs: the same codes
        if name in ("folder", "zip"):
            assert codes.class_names == ["0", "1", "2"] and codes.labels.shape == (12, 3)
            assert "labels" in stdout
        else:
            assert codes.labels is None and codes.uncertainty is None


def test_encode_refuses_bad_input(dmuh_run, regu_run, digits, tmp_path, capsys):
    save_png(tmp_path / "imgs" / "ok.png", digits.decode(np.arange(1))[0])
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG not really")
    fails_with(
        capsys,
        "broken.png: cannot read image",
        "encode",
        "--checkpoint",
        dmuh_run,
        "--images",
        tmp_path / "imgs",
        "--out",
        tmp_path / "x.npz",
    )
    assert not (tmp_path / "x.npz").exists()
    fails_with(
        capsys,
        "--uncertainty needs a DMUH run",
        "encode",
        "--checkpoint",
        regu_run,
        "--images",
        "digits",
        "--out",
        tmp_path / "x.npz",
        "--uncertainty",
    )
    fails_with(
        capsys,
        "not a run directory",
        "encode",
        "--checkpoint",
        tmp_path,
        "--images",
        "digits",
        "--out",
        tmp_path / "x.npz",
    )
    (tmp_path / "exists.npz").write_bytes(b"keep")
    fails_with(
        capsys,
        "exists.npz already exists; pass --force",
        "encode",
        "--checkpoint",
        dmuh_run,
        "--images",
        "digits",
        "--out",
        tmp_path / "exists.npz",
    )
    assert (tmp_path / "exists.npz").read_bytes() == b"keep"
    code, _, _ = run_cli(
        capsys, "encode", "--checkpoint", regu_run, "--images", "digits", "--out", tmp_path / "exists.npz", "--force"
    )
    assert code == 0 and len(Codes.load(tmp_path / "exists.npz")) == len(digits)


# -- index and search ---------------------------------------------------------------------------


@needs_faiss
def test_index_info(digits_index, capsys):
    code, out, _ = run_cli(capsys, "index", "info", digits_index)
    assert code == 0 and "checksum ok" in out and "count: 1797" in out and f"bits: {BITS}" in out
    code, out, _ = run_cli(capsys, "index", "info", digits_index, "--json")
    info = json.loads(out)
    assert info["kind"] == "flat" and info["meta"]["model"]["method"] == "dmuh" and info["meta"]["image_size"] == 8


@needs_faiss
def test_search_images_and_batches(dmuh_run, digits_index, digits_codes, digits, tmp_path, capsys):
    images = digits.decode(np.array([5, 600, 1200]))
    for item, image in zip((5, 600, 1200), images):
        save_png(tmp_path / f"q{item}.png", image)
    code, out, err = run_cli(
        capsys,
        "search",
        "--index",
        digits_index,
        "--checkpoint",
        dmuh_run,
        "--image",
        tmp_path / "q5.png",
        "--k",
        10,
        "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    (query,) = report["queries"]
    results = query["results"]
    assert [r["rank"] for r in results] == list(range(1, 11))
    assert results[0]["distance"] == 0 and 5 in [r["id"] for r in results if r["distance"] == 0]
    assert all(r["path"] == f"digits:{r['id']}" for r in results)
    # The CLI's ranking is the API's on the same codes.
    codes = Codes.load(digits_codes)
    distances, ids = open_index(digits_index).search(codes.packed[5:6], k=10)
    assert [r["id"] for r in results] == ids[0].tolist() and [r["distance"] for r in results] == distances[0].tolist()

    (tmp_path / "queries.txt").write_text("q5.png\nq600.png\n\nq1200.png\n")
    code, out, err = run_cli(
        capsys,
        "search",
        "--index",
        digits_index,
        "--checkpoint",
        dmuh_run,
        "--queries",
        tmp_path / "queries.txt",
        "--k",
        3,
        "--out",
        tmp_path / "results.json",
    )
    assert code == 0, err
    assert out.count("query ") == 3 and "distance" in out
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [len(q["results"]) for q in saved["queries"]] == [3, 3, 3]

    code, out, err = run_cli(capsys, "search", "--index", digits_index, "--queries", digits_codes, "--k", 2, "--json")
    assert code == 0, err
    assert len(json.loads(out)["queries"]) == 1797


@needs_faiss
def test_search_with_reranking(dmuh_run, digits_index, digits_codes, digits, tmp_path, capsys):
    save_png(tmp_path / "q.png", digits.decode(np.array([7]))[0])
    code, out, err = run_cli(
        capsys,
        "search",
        "--index",
        digits_index,
        "--checkpoint",
        dmuh_run,
        "--image",
        tmp_path / "q.png",
        "--k",
        20,
        "--rerank",
        200,
        "--tau",
        0.5,
        "--json",
    )
    assert code == 0, err
    results = json.loads(out)["queries"][0]["results"]
    weighted = [r["weighted_distance"] for r in results]
    assert weighted == sorted(weighted) and all(w <= r["distance"] + 1e-6 for w, r in zip(weighted, results))
    code, out, err = run_cli(capsys, "search", "--index", digits_index, "--queries", digits_codes, "--k", 5, "--rerank")
    assert code == 0, err
    assert "weighted" in out


@needs_faiss
def test_search_refuses_bad_input(dmuh_run, regu_run, digits_index, digits_codes, digits, tmp_path, capsys):
    save_png(tmp_path / "q.png", digits.decode(np.array([0]))[0])
    query = ("--checkpoint", dmuh_run, "--image", tmp_path / "q.png")
    # An index of 12-bit codes searched with the 16-bit model.
    build_index(np.ones((50, 12), dtype=np.float32)).save(tmp_path / "12bit.dmuhidx")
    fails_with(
        capsys, "holds 12-bit codes but the model of --run", "search", "--index", tmp_path / "12bit.dmuhidx", *query
    )
    # Truncated and corrupted index files.
    data = digits_index.read_bytes()
    (tmp_path / "cut.dmuhidx").write_bytes(data[: len(data) - 10])
    fails_with(capsys, "cut.dmuhidx: truncated index", "search", "--index", tmp_path / "cut.dmuhidx", *query)
    flipped = bytearray(data)
    flipped[-50] ^= 1
    (tmp_path / "flip.dmuhidx").write_bytes(bytes(flipped))
    fails_with(capsys, "flip.dmuhidx: corrupted index", "search", "--index", tmp_path / "flip.dmuhidx", *query)
    fails_with(capsys, "flip.dmuhidx: corrupted index", "index", "info", tmp_path / "flip.dmuhidx")
    # Unreadable and missing query images.
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    fails_with(
        capsys,
        "bad.jpg: cannot read image",
        "search",
        "--index",
        digits_index,
        "--checkpoint",
        dmuh_run,
        "--image",
        tmp_path / "bad.jpg",
    )
    fails_with(
        capsys,
        "gone.jpg: image not found",
        "search",
        "--index",
        digits_index,
        "--checkpoint",
        dmuh_run,
        "--image",
        tmp_path / "gone.jpg",
    )
    # k larger than the index.
    fails_with(
        capsys,
        "k=5000 is larger than the index, which holds 1797 codes",
        "search",
        "--index",
        digits_index,
        *query,
        "--k",
        5000,
    )
    # Queries from another model, and re-ranking without uncertainty.
    fails_with(
        capsys,
        "come from another model",
        "search",
        "--index",
        digits_index,
        "--checkpoint",
        regu_run,
        "--image",
        tmp_path / "q.png",
    )
    fails_with(
        capsys,
        "--rerank needs a DMUH run",
        "search",
        "--index",
        digits_index,
        "--checkpoint",
        regu_run,
        "--image",
        tmp_path / "q.png",
        "--allow-other-model",
        "--rerank",
    )
    code, _, err = run_cli(capsys, "search", "--index", digits_index, "--image", tmp_path / "q.png")
    assert code == 0, err  # no --run: the run recorded in the index (tests/test_cli_polish.py: when it is gone)
    # Results are not written over an existing file.
    (tmp_path / "out.json").write_text("keep")
    fails_with(
        capsys,
        "already exists; pass --force",
        "search",
        "--index",
        digits_index,
        *query,
        "--out",
        tmp_path / "out.json",
    )
    assert (tmp_path / "out.json").read_text() == "keep"


@needs_faiss
def test_index_build_refuses_bad_input(digits_codes, digits_index, tmp_path, capsys):
    data = digits_codes.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 3])
    fails_with(
        capsys,
        "cut.npz: truncated or corrupted codes file",
        "index",
        "build",
        "--codes",
        tmp_path / "cut.npz",
        "--out",
        tmp_path / "x.dmuhidx",
    )
    fails_with(
        capsys,
        "--nlist applies to --kind ivf, not flat",
        "index",
        "build",
        "--codes",
        digits_codes,
        "--nlist",
        4,
        "--out",
        tmp_path / "x.dmuhidx",
    )
    before = digits_index.read_bytes()
    fails_with(
        capsys,
        "already exists; pass --force",
        "index",
        "build",
        "--codes",
        digits_codes,
        "--kind",
        "hnsw",
        "--out",
        digits_index,
    )
    assert digits_index.read_bytes() == before
    for kind, extra in (("ivf", ["--nlist", 16, "--nprobe", 16]), ("hnsw", ["--m", 8])):
        out = tmp_path / f"{kind}.dmuhidx"
        code, stdout, err = run_cli(
            capsys, "index", "build", "--codes", digits_codes, "--kind", kind, *extra, "--out", out
        )
        assert code == 0 and kind in stdout, err
        assert open_index(out).kind == kind and len(open_index(out)) == 1797


# -- ONNX ---------------------------------------------------------------------------------------


def test_export_onnx_codes_equal_pytorch(dmuh_run, digits, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    out = tmp_path / "model.onnx"
    code, stdout, err = run_cli(capsys, "export-onnx", "--checkpoint", dmuh_run, "--out", out)
    assert code == 0, err
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert (
        meta["bits"] == str(BITS) and meta["image_size"] == "8" and json.loads(meta["dmuh_model"])["method"] == "dmuh"
    )
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    encoder = load_encoder(dmuh_run)
    for items in (np.arange(64), np.array([3])):  # the batch dimension is dynamic
        images = digits.decode(items)
        pixels = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)
        codes, binary = session.run(["codes", "binary"], {"inputs": pixels})
        h, _ = encoder.continuous(torch.from_numpy(images).permute(0, 3, 1, 2))
        np.testing.assert_allclose(codes, h.numpy(), atol=1e-5)
        np.testing.assert_array_equal(binary, sign(h).numpy().astype(np.int8))
    fails_with(capsys, "already exists; pass --force", "export-onnx", "--checkpoint", dmuh_run, "--out", out)


# -- re-ranking measurement ---------------------------------------------------------------------


def test_rerank_experiment_reports_every_ranking(dmuh_run, regu_run):
    report = rerank_experiment(dmuh_run, depth=100, taus=(0.5, 2), ks=(10, 100))
    names = [row["ranking"] for row in report["results"]]
    assert names == [
        "hamming",
        "weighted tau=0.5",
        "weighted tau=2",
        "tie-break tau=1",
        "margin tau=0.5",
        "margin tau=2",
    ]
    assert report["query"] == 300 and report["database"] == 1497 and report["map_at"] == "all"
    for row in report["results"]:
        assert 0.0 <= row["map"] <= 1.0 and 0.0 <= row["p@10"] <= 1.0 and "p@100" in row
    try:
        from dmuh.metrics.ranking import mean_average_precision  # noqa: F401
    except ImportError:
        return
    from dmuh.studies.evaluate import load_run

    exp = load_run(dmuh_run)
    labels = torch.from_numpy(np.asarray(exp.source.labels))
    query, database = (
        encode(exp.model, exp.method, exp.images[torch.from_numpy(part)], exp.pipeline, exp.execution)
        for part in (exp.split.query, exp.split.database)
    )
    reference = mean_average_precision(
        sign(query), sign(database), labels[exp.split.query], labels[exp.split.database], topk=None, ties="index"
    )
    assert report["results"][0]["map"] == pytest.approx(float(reference), abs=1e-5)
    with pytest.raises(DmuhError, match="needs a DMUH run"):
        rerank_experiment(regu_run)
