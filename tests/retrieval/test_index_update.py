"""Adding to and removing from a FAISS index (dmuh.retrieval.index.faiss.FaissIndex.add / remove), in Python and with
`dmuh index add|remove`, which rewrite the index file in place."""

import json

import numpy as np
import pytest

pytest.importorskip("faiss")

from dmuh.cli import main  # noqa: E402
from dmuh.codes.file import Codes  # noqa: E402
from dmuh.errors import DmuhError  # noqa: E402
from dmuh.retrieval.index import build_index, open_index  # noqa: E402

MODEL = {"checkpoint_sha256": "c" * 64, "method": "regu"}
# 8-bit codes; distances to the query 0 are their popcounts: 1, 0, 1, 2, 0, 1.
HAND = np.array([[0b1], [0b0], [0b10000000], [0b11], [0b0], [0b100]], dtype=np.uint8)
QUERY = np.zeros((1, 1), dtype=np.uint8)


def brute_force(queries, database, ids, k):
    """Nearest k by (distance, position), independent of FAISS."""
    distances = np.unpackbits(queries[:, None, :] ^ database[None, :, :], axis=2).sum(axis=2)
    order = np.array([np.lexsort((np.arange(len(database)), row))[:k] for row in distances])
    return np.take_along_axis(distances, order, axis=1), ids[order]


@pytest.mark.parametrize("kind, params", [("flat", {}), ("ivf", {"nlist": 2, "nprobe": 2}), ("hnsw", {"m": 4})])
def test_a_hand_computed_removal_for_every_kind(kind, params):
    index = build_index(np.tile(HAND, (10, 1)), bits=8, kind=kind, ids=np.arange(60) + 100, **params)
    assert index.remove(np.arange(100, 160, 6) + 1) == 10  # every copy of HAND[1] (distance 0); HAND[4]'s stay
    distances, ids = index.search(QUERY, k=6)
    assert len(index) == 50
    assert distances.tolist() == [[0] * 6] or kind == "hnsw"  # hnsw is approximate
    assert not np.isin(ids, np.arange(100, 160, 6) + 1).any()
    if kind != "hnsw":  # the copies of HAND[4] (ids 104, 110, ...), in position order
        assert ids.tolist() == [[104, 110, 116, 122, 128, 134]]


@pytest.mark.parametrize("kind, params", [("flat", {}), ("ivf", {"nlist": 8, "nprobe": 8})])
def test_removal_and_adds_equal_brute_force_on_what_remains(kind, params):
    rng = np.random.default_rng(1)
    database = rng.integers(0, 4, size=(800, 2), dtype=np.uint8)  # 16 bits, heavily tied
    extra = rng.integers(0, 4, size=(100, 2), dtype=np.uint8)
    queries = rng.integers(0, 4, size=(7, 2), dtype=np.uint8)
    names = [f"{i}.png" for i in range(800)]
    index = build_index(database, bits=16, kind=kind, names=names, **params)
    removed = rng.choice(800, size=300, replace=False)
    assert index.remove(removed) == 300
    index.add(extra, names=[f"new{i}.png" for i in range(100)])
    keep = np.setdiff1d(np.arange(800), removed)
    remaining = np.concatenate([database[keep], extra])
    remaining_ids = np.concatenate([keep, np.arange(800, 900)])  # default ids continue past the largest
    distances, ids = index.search(queries, k=40)
    expected_distances, expected_ids = brute_force(queries, remaining, remaining_ids, 40)
    np.testing.assert_array_equal(distances, expected_distances)  # ivf: every list searched
    if kind == "flat":  # ties by position; FAISS's ivf keeps any of the codes tied at the k-th distance
        np.testing.assert_array_equal(ids, expected_ids)
    assert np.isin(ids, remaining_ids).all()
    np.testing.assert_array_equal(index.codes_at(np.arange(len(index))), remaining)
    assert index.names[:3] == [names[i] for i in keep[:3]] and index.names[-1] == "new99.png"


def test_a_removed_largest_id_is_not_given_out_again(tmp_path):
    index = build_index(HAND, bits=8)
    index.remove([5])
    index.add(HAND[:1])
    assert index.ids.tolist() == [0, 1, 2, 3, 4, 6]
    index.save(tmp_path / "i.dmuhidx")
    loaded = open_index(tmp_path / "i.dmuhidx")
    loaded.add(HAND[:1])
    assert loaded.ids[-1] == 7


def test_unknown_ids_and_names_remove_nothing():
    index = build_index(HAND, bits=8, names=[f"{i}.jpg" for i in range(6)])
    with pytest.raises(DmuhError, match="^id 9 is not in the index; nothing removed$"):
        index.remove([1, 9])
    with pytest.raises(DmuhError, match=r"^ids 7, 8, 9 \(3 in all\) are not in the index; nothing removed$"):
        index.remove([7, 8, 9])
    assert len(index) == 6
    assert index.ids_named(["2.jpg", "4.jpg"]).tolist() == [2, 4]
    with pytest.raises(DmuhError, match="name 'x.jpg' is not in the index"):
        index.ids_named(["x.jpg"])
    assert index.remove(np.arange(6)) == 6 and len(index) == 0
    with pytest.raises(DmuhError, match="larger than the index, which holds 0 codes"):
        index.search(QUERY, k=1)


def one_line(capsys, argv, needle):
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err


def test_cli_add_and_remove_update_the_index_in_place(tmp_path, capsys):
    rng = np.random.default_rng(2)
    packed = rng.integers(0, 256, size=(50, 2), dtype=np.uint8)
    Codes(packed, 12, [f"a{i}.jpg" for i in range(50)], model=MODEL).save(tmp_path / "a.npz")
    Codes(packed[:5], 12, [f"b{i}.jpg" for i in range(5)], model=MODEL).save(tmp_path / "b.npz")
    Codes(packed[:5], 12, [f"c{i}.jpg" for i in range(5)], model={**MODEL, "checkpoint_sha256": "d" * 64}).save(
        tmp_path / "c.npz"
    )
    Codes(packed[:5], 16, [f"d{i}.jpg" for i in range(5)], model=MODEL).save(tmp_path / "d.npz")
    index = tmp_path / "a.dmuhidx"
    assert main(["index", "build", "--codes", str(tmp_path / "a.npz"), "--out", str(index)]) == 0
    assert main(["index", "add", "--index", str(index), "--codes", str(tmp_path / "b.npz")]) == 0
    assert capsys.readouterr().out.strip().endswith(f"index {index}: added 5 codes, 55 codes now")
    one_line(
        capsys,
        ["index", "add", "--index", index, "--codes", tmp_path / "c.npz"],
        "pass --allow-other-model to add them anyway",
    )
    one_line(
        capsys,
        ["index", "add", "--index", index, "--codes", tmp_path / "d.npz"],
        f"--codes {tmp_path / 'd.npz'} holds 16-bit codes but --index {index} holds 12-bit codes",
    )

    (tmp_path / "ids.txt").write_text("0\n52\n")
    (tmp_path / "names.txt").write_text("a7.jpg\nb4.jpg\n")
    assert main(["index", "remove", "--index", str(index), "--ids", str(tmp_path / "ids.txt")]) == 0
    assert main(["index", "remove", "--index", str(index), "--names", str(tmp_path / "names.txt")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"index {index}: removed 2 codes, 51 codes left"
    before = index.read_bytes()
    one_line(
        capsys,
        ["index", "remove", "--index", index, "--ids", tmp_path / "ids.txt"],
        f"--ids {tmp_path / 'ids.txt'}: ids 0, 52 (2 in all) are not in the index; nothing removed",
    )
    one_line(
        capsys,
        ["index", "remove", "--index", index, "--names", tmp_path / "names.txt"],
        f"--names {tmp_path / 'names.txt'}: name 'a7.jpg' is not in the index; nothing removed",
    )
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    one_line(capsys, ["index", "remove", "--index", index, "--ids", tmp_path / "empty.txt"], "lists nothing to remove")
    one_line(capsys, ["index", "remove", "--index", index], "give what to remove: --ids FILE")
    assert index.read_bytes() == before  # a refused update leaves the file as it was

    assert main(["search", "--index", str(index), "--queries", str(tmp_path / "b.npz"), "--k", "51", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    found = {row["id"] for query in report["queries"] for row in query["results"]}
    assert found.isdisjoint({0, 52, 7, 54}) and len(found) == 51
    assert main(["index", "info", str(index), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["next_id"] == 55
