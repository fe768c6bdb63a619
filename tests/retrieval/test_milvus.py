"""The milvus backend (dmuh.retrieval.index.milvus) on Milvus Lite, in this process from a file under tmp_path:
the same results as FAISS flat (ties included), add / remove, the model check, the index file that
names the collection, and one-line errors. A test against a Milvus server runs when DMUH_MILVUS_URI
names one (docs/search.md: the official docker compose)."""

import json

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


@pytest.fixture(scope="module", params=["lite", "server"])
def uri(request, tmp_path_factory):
    """Each test of the backend twice: on Milvus Lite (a file) and on the session's Milvus server
    (tests/conftest.py's `milvus_server`), whose collections this module starts without."""
    if request.param == "lite":
        yield request.getfixturevalue("lite")
        return
    server = request.getfixturevalue("milvus_server")
    drop_every_collection(server.uri)
    yield server.uri


def drop_every_collection(uri):
    from pymilvus import MilvusClient

    client = MilvusClient(uri)
    for name in client.list_collections():
        client.drop_collection(name)
    client.close()


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


def test_a_hand_computed_search_with_ties_in_position_order(uri):
    # 8-bit codes; distances to the query 0b00000000 are the popcounts: 1, 0, 1, 2, 0, 1.
    database = np.array([[0b1], [0b0], [0b10000000], [0b11], [0b0], [0b100]], dtype=np.uint8)
    with MilvusIndex.build(database, bits=8, uri=uri, collection="hand", ids=[10, 11, 12, 13, 14, 15]) as index:
        distances, ids = index.search(np.zeros((1, 1), dtype=np.uint8), k=4)
        assert distances.tolist() == [[0, 0, 1, 1]] and ids.tolist() == [[11, 14, 10, 12]]
        assert index.remove([14]) == 1
        distances, ids = index.search(np.zeros((1, 1), dtype=np.uint8), k=4)
        assert distances.tolist() == [[0, 1, 1, 1]] and ids.tolist() == [[11, 10, 12, 15]]


# (k, distinct codes among 900, cap on Milvus's results a query): each case once per backend, on two
# collections (a collection costs a few seconds on a server).
TIE_CASES = [(1, 2, 160), (150, 2, 160), (150, 2, None), (10, 25, None), (150, 25, None), (600, 25, None)]


def test_flat_equals_faiss_flat_including_ties_past_the_window(uri, monkeypatch):
    completions = []
    complete = MilvusIndex._complete_ties
    monkeypatch.setattr(MilvusIndex, "_complete_ties", lambda self, *a: completions.append(1) or complete(self, *a))
    for distinct in sorted({case[1] for case in TIE_CASES}):
        database, queries = tied_codes(distinct, 900, distinct, 2)  # 16 bits, 900 / distinct copies of each code
        faiss_index = build_index(database, bits=16)
        with MilvusIndex.build(database, bits=16, uri=uri, collection=f"ties{distinct}") as milvus:
            for k, _, cap in (case for case in TIE_CASES if case[1] == distinct):
                completions.clear()
                # Milvus's 16,384 results a query, made small: the ~450 copies at the k-th distance pass it
                monkeypatch.setattr("dmuh.retrieval.index.milvus.MAX_TOPK", cap or 16384)
                assert_same_results(faiss_index, milvus, queries, k)
                # Without the cap the widened window reaches every code first: no search below a bound is needed.
                assert bool(completions) == (cap is not None), (k, distinct, cap)


def test_random_64_bit_codes_add_and_remove_match_faiss(uri):
    rng = np.random.default_rng(3)
    database = rng.integers(0, 256, size=(3000, 8), dtype=np.uint8)
    extra = rng.integers(0, 256, size=(500, 8), dtype=np.uint8)
    queries = np.concatenate([database[:5], rng.integers(0, 256, size=(10, 8), dtype=np.uint8)])
    names = [f"img/{i}.jpg" for i in range(3000)]
    faiss_index = build_index(database, names=names)
    with build_index(database, backend="milvus", uri=uri, collection="random64", names=names) as milvus:
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


def test_the_index_file_names_the_collection_and_load_checks_it(uri, tmp_path):
    rng = np.random.default_rng(4)
    database = rng.integers(0, 256, size=(400, 3), dtype=np.uint8)
    names = [f"{i}.png" for i in range(400)]
    path = tmp_path / "db.dmuhidx"
    with build_index(
        database,
        bits=20,
        backend="milvus",
        uri=uri,
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
            "uri": uri,
            "collection": "saved",
            "index_type": "BIN_FLAT",
        }
        with pytest.raises(DmuhError, match="ef_search applies to hnsw"):
            loaded.search(database[:1], 3, ef_search=10)
        with pytest.raises(DmuhError, match="nprobe applies to ivf"):
            loaded.search(database[:1], 3, nprobe=10)
    # Rebuilt in place with --force: the old file names another index now.
    MilvusIndex.build(database[:10], bits=20, uri=uri, collection="saved", force=True).close()
    with pytest.raises(DmuhError, match="was rebuilt after this index file was written"):
        open_index(path)


def test_an_add_that_was_not_saved_is_not_part_of_the_index(uri, tmp_path):
    rng = np.random.default_rng(5)
    database = rng.integers(0, 256, size=(100, 2), dtype=np.uint8)
    path = tmp_path / "commit.dmuhidx"
    with MilvusIndex.build(database, bits=16, uri=uri, collection="commit") as index:
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


def test_cli_build_add_remove_and_refusals(uri, tmp_path, capsys):
    rng = np.random.default_rng(6)
    database = rng.integers(0, 256, size=(300, 2), dtype=np.uint8)
    codes = codes_file(tmp_path / "db.npz", database, 16, MODEL)
    index = tmp_path / "photos.dmuhidx"
    build = ["index", "build", "--codes", codes, "--backend", "milvus", "--uri", uri, "--out", index]
    assert main([str(a) for a in build]) == 0
    assert f"Milvus collection 'photos' at {uri}" in capsys.readouterr().out
    one_line(
        capsys,
        [*build[:-2], "--out", tmp_path / "again.dmuhidx", "--collection", "photos"],
        f"Milvus collection 'photos' at {uri} already exists; pass --force to drop and recreate it",
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


def test_a_sharded_manifest_streams_into_milvus(uri, tmp_path, capsys):
    rng = np.random.default_rng(7)
    database = rng.integers(0, 256, size=(250, 2), dtype=np.uint8)
    folder = tmp_path / "shards"
    shards = []
    for number, start in enumerate(range(0, 250, 100)):
        path = codes_file(folder / f"shard-{number:05d}.npz", database[start : start + 100], 16, MODEL, start=start)
        shards.append({"file": path.name, "count": len(Codes.load(path)), "sha256": file_sha256(path)})
    write_manifest(folder, shards, 16, 100, MODEL, "digits")
    out = tmp_path / "sharded.dmuhidx"
    assert main(["index", "build", "--codes", str(folder), "--backend", "milvus", "--uri", uri, "--out", str(out)]) == 0
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


def test_a_milvus_server_ivf_with_nlist_and_nprobe_per_search(milvus_server):
    """BIN_IVF_FLAT on the server (Milvus Lite has BIN_FLAT only; this server version, 2.3.5, has no
    BIN_HNSW): nprobe is a parameter of each search, and with every list probed the distances are exact."""
    database, queries = tied_codes(8, 6000, 6000, 8)  # random 64-bit codes: ivf's hard case
    exact_distances, _ = build_index(database).search(queries, 50)
    with MilvusIndex.build(
        database, kind="ivf", uri=milvus_server.uri, collection="server_ivf", force=True, nlist=16, nprobe=1
    ) as ivf:
        assert ivf.info()["milvus"]["index_type"] == "BIN_IVF_FLAT" and ivf.params == {"nlist": 16, "nprobe": 1}
        everything, _ = ivf.search(queries, 50, nprobe=16)  # every list: exact distances
        np.testing.assert_array_equal(everything, exact_distances)
        one, _ = ivf.search(queries, 50)  # the index's nprobe, 1 of 16 lists: some codes are missed
        assert (one >= exact_distances).all() and (one > exact_distances).any()
        assert np.array_equal(ivf.search(queries, 50, nprobe=16)[0], everything)  # nothing was set on the index


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


def test_a_servers_credentials_come_from_the_environment(monkeypatch):
    """DMUH_MILVUS_TOKEN reaches the server's client (never a flag, never the index file)."""
    import dmuh.retrieval.index.milvus as backend

    made = []

    class Client:
        def __init__(self, **kwargs):
            made.append(kwargs)

    monkeypatch.setattr(backend, "_check_reachable", lambda uri: None)
    monkeypatch.setattr(backend._pymilvus(), "MilvusClient", Client)
    monkeypatch.setattr(backend, "_CLIENTS", {})
    monkeypatch.setenv("DMUH_MILVUS_TOKEN", "reader:secret")
    backend._open_client("http://milvus.example:19530", create=False)
    assert made[-1]["uri"] == "http://milvus.example:19530" and made[-1]["token"] == "reader:secret"
