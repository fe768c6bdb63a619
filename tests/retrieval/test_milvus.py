"""The milvus backend (dmuh.retrieval.index.milvus) on Milvus Lite, in this process from a file under tmp_path:
the same results as FAISS flat (ties included), add / remove, the model check, the index file that
names the collection, and one-line errors. A test against a Milvus server runs when DMUH_MILVUS_URI
names one (docs/search.md: the official docker compose)."""

import json
import os

import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("pymilvus", reason="the milvus backend needs pymilvus and milvus-lite (pip install -e '.[milvus]')")
pytest.importorskip("milvus_lite", reason="Milvus Lite (milvus-lite 2.5.1) is not installed")

from dmuh.cli import main  # noqa: E402
from dmuh.codes.file import Codes, write_manifest  # noqa: E402
from dmuh.errors import DmuhError  # noqa: E402
from dmuh.retrieval.index import build_index, open_index  # noqa: E402
from dmuh.retrieval.index.milvus import MilvusIndex, close_connections  # noqa: E402
from dmuh.utils.io import file_sha256  # noqa: E402

MODEL = {"checkpoint_sha256": "a" * 64, "method": "dmuh", "run": "/nowhere"}
OTHER_MODEL = {"checkpoint_sha256": "b" * 64, "method": "dmuh", "run": "/nowhere"}


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    """One Milvus Lite file for the module (each test its own collections): one server to start."""
    yield str(tmp_path_factory.mktemp("milvus") / "codes.db")
    close_connections()  # stops the module's Milvus Lite servers


def tied_codes(seed, n, distinct, width):
    """n packed codes drawn from `distinct` codes: nearly every distance is tied, at the k-th too."""
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 256, size=(distinct, width), dtype=np.uint8)
    return pool[rng.integers(0, distinct, size=n)], rng.integers(0, 256, size=(12, width), dtype=np.uint8)


def assert_same_results(faiss_index, milvus_index, queries, k):
    fd, fi = faiss_index.search(queries, k)
    md, mi = milvus_index.search(queries, k)
    np.testing.assert_array_equal(md, fd)
    np.testing.assert_array_equal(mi, fi)  # ties by position: the same ids in the same order
    for row in range(len(queries)):  # and so the same id set at each distance
        for distance in np.unique(fd[row]):
            assert set(mi[row][md[row] == distance]) == set(fi[row][fd[row] == distance])


def test_a_hand_computed_search_with_ties_in_position_order(lite):
    # 8-bit codes; distances to the query 0b00000000 are the popcounts: 1, 0, 1, 2, 0, 1.
    database = np.array([[0b1], [0b0], [0b10000000], [0b11], [0b0], [0b100]], dtype=np.uint8)
    with MilvusIndex.build(database, bits=8, uri=lite, collection="hand", ids=[10, 11, 12, 13, 14, 15]) as index:
        distances, ids = index.search(np.zeros((1, 1), dtype=np.uint8), k=4)
        assert distances.tolist() == [[0, 0, 1, 1]] and ids.tolist() == [[11, 14, 10, 12]]
        assert index.remove([14]) == 1
        distances, ids = index.search(np.zeros((1, 1), dtype=np.uint8), k=4)
        assert distances.tolist() == [[0, 1, 1, 1]] and ids.tolist() == [[11, 10, 12, 15]]


@pytest.mark.parametrize(
    "k, distinct, cap", [(1, 2, 160), (150, 2, 160), (150, 2, None), (10, 25, None), (150, 25, None), (600, 25, None)]
)
def test_flat_equals_faiss_flat_including_ties_past_the_window(lite, k, distinct, cap, monkeypatch):
    database, queries = tied_codes(k + distinct, 900, distinct, 2)  # 16 bits, 900 / distinct copies of each code
    completions = []
    complete = MilvusIndex._complete_ties
    monkeypatch.setattr(MilvusIndex, "_complete_ties", lambda self, *a: completions.append(1) or complete(self, *a))
    if cap is not None:  # Milvus's 16,384 results a query, made small: the ~450 copies at the k-th distance pass it
        monkeypatch.setattr("dmuh.retrieval.index.milvus.MAX_TOPK", cap)
    with MilvusIndex.build(database, bits=16, uri=lite, collection=f"ties{k}_{distinct}_{cap}") as milvus:
        assert_same_results(build_index(database, bits=16), milvus, queries, k)
    # Without the cap the widened window reaches every code first: no search below a bound is needed.
    assert bool(completions) == (cap is not None)


def test_random_64_bit_codes_add_and_remove_match_faiss(lite):
    rng = np.random.default_rng(3)
    database = rng.integers(0, 256, size=(3000, 8), dtype=np.uint8)
    extra = rng.integers(0, 256, size=(500, 8), dtype=np.uint8)
    queries = np.concatenate([database[:5], rng.integers(0, 256, size=(10, 8), dtype=np.uint8)])
    names = [f"img/{i}.jpg" for i in range(3000)]
    faiss_index = build_index(database, names=names)
    with build_index(database, backend="milvus", uri=lite, collection="random64", names=names) as milvus:
        assert isinstance(milvus, MilvusIndex) and (milvus.backend, milvus.kind, len(milvus)) == (
            "milvus",
            "flat",
            3000,
        )
        assert_same_results(faiss_index, milvus, queries, 50)
        removed = np.arange(0, 3000, 7)
        assert milvus.remove(removed) == faiss_index.remove(removed) == len(removed)
        more_names = [f"new/{i}.jpg" for i in range(500)]
        milvus.add(extra, names=more_names)
        faiss_index.add(extra, names=more_names)
        assert len(milvus) == len(faiss_index) == 3000 - len(removed) + 500
        assert_same_results(faiss_index, milvus, queries, 50)
        _, ids = milvus.search(queries, 200)
        assert not np.isin(ids, removed).any()
        uncertainty = rng.random((len(queries), 64)).astype(np.float32)  # re-ranking reads the stored codes
        expected = faiss_index.search_reranked(queries, uncertainty, 10, depth=100)
        reranked = milvus.search_reranked(queries, uncertainty, 10, depth=100)
        np.testing.assert_array_equal(reranked["ids"], expected["ids"])
        np.testing.assert_allclose(reranked["weighted"], expected["weighted"], rtol=1e-6)
        assert set(range(3000, 3500)) <= set(milvus.ids.tolist())  # new codes got the next ids
        _, positions = milvus.search_positions(queries[:3], 5)
        _, faiss_positions = faiss_index.search_positions(queries[:3], 5)
        np.testing.assert_array_equal(milvus.codes_at(positions), faiss_index.codes_at(faiss_positions))
        assert milvus.names_at(positions) == faiss_index.names_at(faiss_positions)
        with pytest.raises(DmuhError, match="id 0 is not in Milvus collection 'random64'; nothing removed"):
            milvus.remove([0, 1])
        assert len(milvus) == len(faiss_index)


def test_the_index_file_names_the_collection_and_load_checks_it(lite, tmp_path):
    rng = np.random.default_rng(4)
    database = rng.integers(0, 256, size=(400, 3), dtype=np.uint8)
    names = [f"{i}.png" for i in range(400)]
    path = tmp_path / "db.dmuhidx"
    with build_index(
        database,
        bits=20,
        backend="milvus",
        uri=lite,
        collection="saved",
        names=names,
        ids=np.arange(400) * 3,
        meta={"model": MODEL, "image_size": 8},
    ) as index:
        before = index.search(database[:4], 9)
        index.save(path)
    with open_index(path) as loaded:
        assert isinstance(loaded, MilvusIndex)
        assert (loaded.kind, loaded.bits, len(loaded), loaded.meta) == (
            "flat",
            20,
            400,
            {"model": MODEL, "image_size": 8},
        )
        assert loaded.names == names and loaded.ids.tolist() == list(range(0, 1200, 3))
        after = loaded.search(database[:4], 9)
        np.testing.assert_array_equal(before[0], after[0])
        np.testing.assert_array_equal(before[1], after[1])
        info = loaded.info()
        assert info["backend"] == "milvus" and info["milvus"] == {
            "uri": lite,
            "collection": "saved",
            "index_type": "BIN_FLAT",
        }
        with pytest.raises(DmuhError, match="ef_search applies to hnsw"):
            loaded.search(database[:1], 3, ef_search=10)
        with pytest.raises(DmuhError, match="nprobe applies to ivf"):
            loaded.search(database[:1], 3, nprobe=10)
    # Rebuilt in place with --force: the old file names another index now.
    MilvusIndex.build(database[:10], bits=20, uri=lite, collection="saved", force=True).close()
    with pytest.raises(DmuhError, match="was rebuilt after this index file was written"):
        open_index(path)


def test_an_add_that_was_not_saved_is_not_part_of_the_index(lite, tmp_path):
    rng = np.random.default_rng(5)
    database = rng.integers(0, 256, size=(100, 2), dtype=np.uint8)
    path = tmp_path / "commit.dmuhidx"
    with MilvusIndex.build(database, bits=16, uri=lite, collection="commit") as index:
        index.save(path)
    with open_index(path) as interrupted:  # adds, then "crashes" before rewriting the file
        interrupted.add(database[:30])
        assert len(interrupted) == 130
    with open_index(path) as reader:
        assert len(reader) == 100
        _, ids = reader.search(database[:30], 5)
        assert ids.max() < 100
        reader.add(database[:2])  # the interrupted add's rows are cleared first
        reader.save(path)
    with open_index(path) as index:
        assert len(index) == 102 and sorted(index.ids.tolist()) == list(range(102))


def codes_file(path, packed, bits, model, start=0):
    Codes(
        packed,
        bits,
        [f"photo{i}.jpg" for i in range(start, start + len(packed))],
        model=model,
        image_size=8,
        channels=1,
    ).save(path)
    return path


def one_line(capsys, argv, needle):
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err


def test_cli_build_add_remove_and_refusals(lite, tmp_path, capsys):
    rng = np.random.default_rng(6)
    database = rng.integers(0, 256, size=(300, 2), dtype=np.uint8)
    codes = codes_file(tmp_path / "db.npz", database, 16, MODEL)
    index = tmp_path / "photos.dmuhidx"
    build = ["index", "build", "--codes", codes, "--backend", "milvus", "--uri", lite, "--out", index]
    assert main([str(a) for a in build]) == 0
    assert f"Milvus collection 'photos' at {lite}" in capsys.readouterr().out
    one_line(
        capsys,
        [*build[:-2], "--out", tmp_path / "again.dmuhidx", "--collection", "photos"],
        f"Milvus collection 'photos' at {lite} already exists; pass --force to drop and recreate it",
    )
    assert main(["index", "info", str(index), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["count"] == 300 and info["meta"]["model"] == MODEL and info["backend"] == "milvus"

    (tmp_path / "ids.txt").write_text("# the first two\n0\n1\n\n")
    assert main(["index", "remove", "--index", str(index), "--ids", str(tmp_path / "ids.txt")]) == 0
    assert capsys.readouterr().out.strip() == f"index {index}: removed 2 codes, 298 codes left"
    (tmp_path / "names.txt").write_text("photo5.jpg\n")
    assert main(["index", "remove", "--index", str(index), "--names", str(tmp_path / "names.txt")]) == 0
    capsys.readouterr()
    one_line(
        capsys,
        ["index", "remove", "--index", index, "--ids", tmp_path / "ids.txt"],
        f"--ids {tmp_path / 'ids.txt'}: ids 0, 1 (2 in all) are not in Milvus collection 'photos'; nothing removed",
    )
    (tmp_path / "bad.txt").write_text("3\ncat.jpg\n")
    one_line(
        capsys,
        ["index", "remove", "--index", index, "--ids", tmp_path / "bad.txt"],
        "line 2: 'cat.jpg' is not an integer id",
    )

    new = codes_file(tmp_path / "new.npz", database[:10], 16, MODEL, start=300)
    assert main(["index", "add", "--index", str(index), "--codes", str(new)]) == 0
    assert capsys.readouterr().out.strip() == f"index {index}: added 10 codes, 307 codes now"
    other = codes_file(tmp_path / "other.npz", database[:10], 16, OTHER_MODEL)
    one_line(
        capsys,
        ["index", "add", "--index", index, "--codes", other],
        "come from another model (checkpoint sha256 bbbbbbbbbbbb...) than the index's (aaaaaaaaaaaa...); "
        "pass --allow-other-model to add them anyway",
    )
    wide = codes_file(tmp_path / "wide.npz", np.zeros((3, 3), dtype=np.uint8), 24, MODEL)
    one_line(capsys, ["index", "add", "--index", index, "--codes", wide], "holds 24-bit codes but --index")
    assert main(["index", "add", "--index", str(index), "--codes", str(other), "--allow-other-model"]) == 0
    capsys.readouterr()

    assert main(["search", "--index", str(index), "--queries", str(new), "--k", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    first = report["queries"][0]["results"]  # the query is database[0], its id 0 removed; added twice since
    assert [(r["distance"], r["id"], r["path"]) for r in first[:2]] == [
        (0, 300, "photo300.jpg"),
        (0, 310, "photo0.jpg"),
    ]
    assert all(r["id"] not in (0, 1, 5) for q in report["queries"] for r in q["results"])


def test_a_sharded_manifest_streams_into_milvus(lite, tmp_path, capsys):
    rng = np.random.default_rng(7)
    database = rng.integers(0, 256, size=(250, 2), dtype=np.uint8)
    folder = tmp_path / "shards"
    shards = []
    for number, start in enumerate(range(0, 250, 100)):
        path = codes_file(folder / f"shard-{number:05d}.npz", database[start : start + 100], 16, MODEL, start=start)
        shards.append({"file": path.name, "count": len(Codes.load(path)), "sha256": file_sha256(path)})
    write_manifest(folder, shards, 16, 100, MODEL, "digits")
    out = tmp_path / "sharded.dmuhidx"
    assert (
        main(["index", "build", "--codes", str(folder), "--backend", "milvus", "--uri", lite, "--out", str(out)]) == 0
    )
    assert "250 codes of 16 bits" in capsys.readouterr().out
    with open_index(out) as index:
        assert index.names == [f"photo{i}.jpg" for i in range(250)] and index.ids.tolist() == list(range(250))
        assert_same_results(build_index(database, bits=16), index, database[:6], 20)


def test_bad_uris_and_a_missing_collection_are_one_line_errors(lite, tmp_path, capsys):
    codes = codes_file(tmp_path / "db.npz", np.zeros((5, 2), dtype=np.uint8), 16, MODEL)
    build = ["index", "build", "--codes", codes, "--backend", "milvus", "--out", tmp_path / "x.dmuhidx", "--uri"]
    one_line(
        capsys,
        [*build, "http://127.0.0.1:9"],
        "--uri http://127.0.0.1:9: cannot reach a Milvus server at 127.0.0.1:9 (connection refused)",
    )
    one_line(capsys, [*build, tmp_path / "codes.sqlite"], "expected a Milvus Lite file ending in .db or a server uri")
    one_line(capsys, [*build, lite, "--kind", "ivf"], "--kind ivf (BIN_IVF_FLAT) needs a Milvus server")
    one_line(capsys, [*build, lite, "--kind", "hnsw"], "--backend milvus has flat (BIN_FLAT) and ivf (BIN_IVF_FLAT)")
    one_line(capsys, [*build, lite, "--collection", "no-dashes"], "--collection 'no-dashes': a Milvus collection name")
    one_line(
        capsys,
        ["index", "build", "--codes", codes, "--uri", lite, "--out", tmp_path / "y.dmuhidx"],
        "--uri applies to --backend milvus",
    )
    assert main([str(a) for a in [*build, lite, "--collection", "doomed"]]) == 0
    capsys.readouterr()
    from pymilvus import MilvusClient

    MilvusClient(lite).drop_collection("doomed")
    one_line(capsys, ["index", "info", tmp_path / "x.dmuhidx"], "Milvus collection 'doomed' at")
    one_line(
        capsys,
        ["search", "--index", tmp_path / "x.dmuhidx", "--queries", codes, "--k", "1"],
        "not found (dropped? rebuild it with `dmuh index build --backend milvus`)",
    )
    gone = tmp_path / "gone.db"
    with MilvusIndex.build(np.zeros((3, 1), dtype=np.uint8), bits=8, uri=str(gone)) as index:
        index.save(tmp_path / "gone.dmuhidx")
    gone.unlink()
    one_line(
        capsys,
        ["search", "--index", tmp_path / "gone.dmuhidx", "--queries", codes, "--k", "1"],
        f"Milvus Lite file {gone} not found",
    )
    assert not gone.exists()  # loading never creates an empty Milvus Lite file


@pytest.mark.skipif(
    not os.environ.get("DMUH_MILVUS_URI"),
    reason="set DMUH_MILVUS_URI=http://HOST:19530 to test against a Milvus server (docs/search.md)",
)
def test_a_milvus_server_flat_and_ivf():
    uri = os.environ["DMUH_MILVUS_URI"]
    database, queries = tied_codes(8, 5000, 400, 8)
    faiss_flat = build_index(database)
    with MilvusIndex.build(database, uri=uri, collection="dmuh_test_flat", force=True) as flat:
        assert_same_results(faiss_flat, flat, queries, 100)
        flat.remove([0, 1, 2])
        faiss_flat.remove([0, 1, 2])
        assert_same_results(faiss_flat, flat, queries, 100)
    with MilvusIndex.build(
        database, kind="ivf", uri=uri, collection="dmuh_test_ivf", force=True, nlist=16, nprobe=16
    ) as ivf:  # every list searched: exact distances
        distances, _ = ivf.search(queries, 50)
        np.testing.assert_array_equal(distances, build_index(database).search(queries, 50)[0])


def test_search_out_onto_the_indexs_milvus_lite_file_is_refused(lite, tmp_path, capsys):
    """Issue 31, class 4: the Milvus Lite file a milvus index reads is an input of `dmuh search`."""
    codes = codes_file(tmp_path / "db.npz", np.zeros((5, 2), dtype=np.uint8), 16, MODEL)
    out = tmp_path / "m.dmuhidx"
    build = ["index", "build", "--codes", codes, "--backend", "milvus", "--uri", lite, "--out", out]
    assert main([str(a) for a in build + ["--collection", "guard"]]) == 0
    capsys.readouterr()
    before = file_sha256(lite)
    one_line(
        capsys,
        ["search", "--index", out, "--queries", codes, "--out", lite, "--force"],
        "is the input of the index's --uri",
    )
    assert file_sha256(lite) == before
