"""Rank-preserving hashing's search path: the neighbour metrics, `FeatureDecoder`'s bytes, an index
that carries a decoder (`CodeIndex.search_decoded`, its file) and `dmuh search --rerank decoder` end
to end, with the database's features, the training data and the run deleted first."""

import contextlib
import io
import json
import shutil
import struct

import numpy as np
import pytest
import torch

from dmuh.cli import main
from dmuh.codes.file import Codes
from dmuh.errors import DmuhError
from dmuh.metrics.ranking import neighbour_recall, true_neighbours
from dmuh.models.decoder import FeatureDecoder

faiss = pytest.importorskip("faiss")

from dmuh.retrieval.index import build_index, open_index  # noqa: E402
from dmuh.retrieval.index.file import read_index_file, write_index_file  # noqa: E402

# -- true_neighbours / neighbour_recall ------------------------------------------------------------

DB_2D = np.array([[1, 0], [0, 1], [1, 1], [2, 0], [-1, 0]], dtype=np.float32)


def test_true_neighbours_cosine_order_by_hand():
    # Query (1, 0.1): cos to (1,0) = (2,0) = 0.995 (a tie: scale does not count, position 0 first),
    # (1,1) 0.774, (0,1) 0.0995, (-1,0) -0.995.
    # Query (0, 3): (0,1) 1, (1,1) 0.707, then (1,0), (2,0), (-1,0) all exactly 0: positions 0, 3, 4.
    queries = np.array([[1, 0.1], [0, 3]], dtype=np.float32)
    got = true_neighbours(queries, DB_2D, 5)
    assert got.dtype == np.int64 and got.shape == (2, 5)
    assert got.tolist() == [[0, 3, 2, 1, 4], [1, 2, 0, 3, 4]]
    # k keeps the first k of that order.
    assert true_neighbours(queries, DB_2D, 2).tolist() == [[0, 3], [1, 2]]
    # Moving the tied rows swaps their order: ties go by position, not by the vector.
    swapped = DB_2D[[3, 1, 2, 0, 4]]  # (2,0) now at 0, (1,0) at 3
    assert true_neighbours(queries[:1], swapped, 2).tolist() == [[0, 3]]
    # A negative multiple of the query is the farthest.
    assert true_neighbours(np.array([[-2.0, 0.0]]), DB_2D, 1).tolist() == [[4]]


def test_true_neighbours_matches_brute_force_across_chunks():
    rng = np.random.default_rng(3)
    db = rng.normal(size=(40, 6)).astype(np.float32)
    queries = rng.normal(size=(1100, 6)).astype(np.float32)  # more than one 1024-query block
    got = true_neighbours(queries, db, 7)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    dn = db / np.linalg.norm(db, axis=1, keepdims=True)
    expected = np.argsort(-(qn.astype(np.float64) @ dn.T.astype(np.float64)), axis=1, kind="stable")[:, :7]
    assert got.shape == (1100, 7)
    assert np.array_equal(got, expected)


@pytest.mark.parametrize(
    "queries, db, k, message",
    [
        (np.ones((2, 3)), np.ones((4, 2)), 1, "same D"),
        (np.ones((2, 3, 1)), np.ones((4, 3)), 1, "same D"),
        (np.ones((2, 3)), np.ones((4, 3)), 0, "k=0"),
        (np.ones((2, 3)), np.ones((4, 3)), 5, "k=5"),
    ],
)
def test_true_neighbours_refusals(queries, db, k, message):
    with pytest.raises(DmuhError, match=message):
        true_neighbours(queries, db, k)


def test_true_neighbours_one_dimensional_query_is_a_dmuh_error():
    with pytest.raises(DmuhError):
        true_neighbours(np.ones(3), np.ones((4, 3)), 1)


def test_neighbour_recall_by_hand():
    neighbours = np.array([[0, 3, 2], [1, 2, 0]])
    retrieved = np.array([[0, 3, -1], [1, -1, -1]])
    # k = 3 (the columns): row 0 finds {0, 3} of {0, 3, 2}, row 1 finds {1} of {1, 2, 0}: (2/3 + 1/3) / 2.
    assert neighbour_recall(retrieved, neighbours) == pytest.approx(0.5)
    assert neighbour_recall(retrieved, neighbours, 3) == pytest.approx(0.5)
    # k = 2: [0, 3] vs [0, 3] -> 2/2; [1, -1] vs [1, 2] -> 1/2.
    assert neighbour_recall(retrieved, neighbours, 2) == pytest.approx(0.75)
    # Only the first k results count: 0 at rank 3 is no hit at k = 2.
    assert neighbour_recall(np.array([[5, 6, 0]]), np.array([[0, 1, 9]]), 2) == 0.0
    # A repeated result counts once; -1 never matches (even a -1 in the neighbours).
    assert neighbour_recall(np.array([[0, 0, 0]]), np.array([[0, 1, 2]])) == pytest.approx(1 / 3)
    assert neighbour_recall(np.array([[-1, -1]]), np.array([[-1, 4]])) == 0.0
    # Order within the first k does not matter.
    assert neighbour_recall(np.array([[2, 1, 0]]), np.array([[0, 1, 2]])) == 1.0
    # More retrieved columns than neighbours: k defaults to the neighbours' width.
    assert neighbour_recall(np.array([[7, 1, 0, 2]]), np.array([[0, 1]])) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "retrieved, neighbours, k, message",
    [
        (np.zeros((2, 3)), np.zeros((2, 3)), 4, "recall@4"),
        (np.zeros((2, 3)), np.zeros((2, 3)), 0, "recall@0"),
        (np.zeros((2, 2)), np.zeros((2, 3)), 3, "recall@3"),  # fewer results than k
        (np.zeros((2, 3)), np.zeros((3, 3)), None, "one row per query"),
        (np.zeros(3), np.zeros((1, 3)), None, "one row per query"),
    ],
)
def test_neighbour_recall_refusals(retrieved, neighbours, k, message):
    with pytest.raises(DmuhError, match=message):
        neighbour_recall(retrieved, neighbours, k)


def test_neighbour_recall_one_dimensional_neighbours_is_a_dmuh_error():
    with pytest.raises(DmuhError):
        neighbour_recall(np.zeros(3), np.zeros(3))


# -- FeatureDecoder bytes --------------------------------------------------------------------------

ALL_8BIT = np.arange(256, dtype=np.uint8)[:, None]  # every packed 8-bit code


def seeded_decoder(bits=8, dim=5, hidden=16, seed=0):
    torch.manual_seed(seed)
    return FeatureDecoder(bits, dim, hidden)


def test_decoder_bytes_round_trip():
    decoder = seeded_decoder()
    decoder.train()  # decode_packed must not depend on (or change) the mode
    data = decoder.to_bytes()
    assert isinstance(data, bytes)
    rebuilt = FeatureDecoder.from_bytes(decoder.config, data, "here")
    assert rebuilt.config == {"bits": 8, "dim": 5, "hidden": 16}
    assert not rebuilt.training
    before = decoder.decode_packed(ALL_8BIT)
    assert decoder.training
    assert before.shape == (256, 5) and before.dtype == np.float32
    assert np.array_equal(rebuilt.decode_packed(ALL_8BIT), before)
    norms = np.linalg.norm(before, axis=1)
    assert np.allclose(norms[norms > 0], 1, atol=1e-5)
    # Another seed decodes differently: the equality above is not a constant.
    assert not np.allclose(seeded_decoder(seed=1).decode_packed(ALL_8BIT), before)
    # Bytes are deterministic for the same weights.
    assert rebuilt.to_bytes() == data


def test_decoder_round_trip_of_non_byte_bits():
    decoder = seeded_decoder(bits=12, dim=3, hidden=7, seed=2)
    packed = np.random.default_rng(0).integers(0, 256, size=(20, 2), dtype=np.uint8)
    rebuilt = FeatureDecoder.from_bytes(decoder.config, decoder.to_bytes(), "x")
    assert np.array_equal(rebuilt.decode_packed(packed), decoder.decode_packed(packed))
    # Bits past the 12th (padding) are not read.
    padded = packed | np.array([0, 0x0F], dtype=np.uint8)
    assert np.array_equal(rebuilt.decode_packed(padded), decoder.decode_packed(packed))


@pytest.mark.parametrize(
    "config, message",
    [
        ({"bits": 16, "dim": 5, "hidden": 16}, "corrupted decoder"),
        ({"bits": 8, "dim": 6, "hidden": 16}, "corrupted decoder"),
        ({"bits": 8, "dim": 5, "hidden": 32}, "corrupted decoder"),
        ({"bits": 8, "dim": 5}, "unreadable decoder description"),
        ({"bits": 8, "dim": 5, "hidden": 16, "extra": 1}, "unreadable decoder description"),
        ([8, 5, 16], "unreadable decoder description"),
        (None, "unreadable decoder description"),
        ({"bits": "8", "dim": 5, "hidden": 16}, "bits"),
        ({"bits": 8.0, "dim": 5, "hidden": 16}, "bits"),
        ({"bits": 8, "dim": 0, "hidden": 16}, "dim"),
        ({"bits": 8, "dim": 5, "hidden": True}, "hidden"),
    ],
)
def test_decoder_from_bytes_wrong_config(config, message):
    data = seeded_decoder().to_bytes()
    with pytest.raises(DmuhError, match=message):
        FeatureDecoder.from_bytes(config, data, "somewhere.dmuhidx")


def _garbage_cases():
    from safetensors.torch import save

    good = seeded_decoder().to_bytes()
    state = seeded_decoder().state_dict()
    return {
        "empty": b"",
        "text": b"not a safetensors blob at all",
        "random": np.random.default_rng(7).integers(0, 256, 300, dtype=np.uint8).tobytes(),
        "truncated": good[:-10],
        "length only": good[:8],
        "huge header length": struct.pack("<Q", 2**60) + b"{}",
        "bad json header": struct.pack("<Q", 5) + b"{abc}",
        "non utf8 header": struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc",
        "other tensors": save({"x": torch.zeros(3)}),
        "an extra tensor": save({**state, "z": torch.zeros(1)}),
        "a missing tensor": save({k: v for k, v in state.items() if k != "layers.2.bias"}),
        "a wrong shape": save({**state, "layers.0.bias": torch.zeros(3)}),
    }


@pytest.mark.parametrize("case", list(_garbage_cases()))
def test_decoder_from_bytes_garbage(case):
    data = _garbage_cases()[case]
    with pytest.raises(DmuhError, match=r"^somewhere\.dmuhidx: corrupted decoder"):
        FeatureDecoder.from_bytes({"bits": 8, "dim": 5, "hidden": 16}, data, "somewhere.dmuhidx")


def test_decoder_from_bytes_absurd_size_is_a_dmuh_error():
    with pytest.raises(DmuhError):
        FeatureDecoder.from_bytes({"bits": 8, "dim": 5, "hidden": 2**62}, seeded_decoder().to_bytes(), "x")


# -- An index with a decoder, by hand -----------------------------------------------------------------

# Six 8-bit codes (bit 0 first, np.packbits order), the query code all zeros. The hand decoder
# reads bit 0 as direction (1, 0) and bit 1 as (0, 1) and ignores bits 2..7, which only set the
# Hamming distance:
#   pos  bits       decoded        Hamming  cos to query (1, 0.5)
#   0    11 101000  (1,1)/sqrt2     4        0.9487
#   1    10 111000  (1,0)           4        0.8944
#   2    10 000000  (1,0)           1        0.8944
#   3    01 000000  (0,1)           1        0.4472
#   4    10 000001  (1,0)           2        0.8944
#   5    10 000010  (1,0)           2        0.8944
HAND_BITS = np.array(
    [
        [1, 1, 1, 0, 1, 0, 0, 0],
        [1, 0, 1, 1, 1, 0, 0, 0],
        [1, 0, 0, 0, 0, 0, 0, 0],
        [0, 1, 0, 0, 0, 0, 0, 0],
        [1, 0, 0, 0, 0, 0, 0, 1],
        [1, 0, 0, 0, 0, 0, 1, 0],
    ],
    dtype=np.uint8,
)
HAND_CODES = np.packbits(HAND_BITS, axis=1)
HAND_QUERY_CODE = np.zeros((1, 1), dtype=np.uint8)
HAND_QUERY_FEATURES = np.array([[1.0, 0.5]], dtype=np.float32)
HAND_HAMMING = [4, 4, 1, 1, 2, 2]
# By cosine, then Hamming, then position.
HAND_ORDER = [0, 2, 4, 5, 1, 3]


def hand_decoder():
    decoder = FeatureDecoder(8, 2, hidden=8)
    with torch.no_grad():
        decoder.layers[0].weight.copy_(torch.eye(8))  # relu(+-1) -> the {0, 1} bits
        decoder.layers[0].bias.zero_()
        w2 = torch.zeros(2, 8)
        w2[0, 0] = 1.0
        w2[1, 1] = 1.0
        decoder.layers[2].weight.copy_(w2)
        decoder.layers[2].bias.zero_()
    return decoder


def hand_cosines():
    q = HAND_QUERY_FEATURES[0].astype(np.float64)
    q = q / np.linalg.norm(q)
    out = []
    for bits in HAND_BITS:
        v = np.array([bits[0], bits[1]], dtype=np.float64)
        out.append(float(v @ q / np.linalg.norm(v)))
    return np.array(out)


@pytest.fixture
def hand_index():
    index = build_index(HAND_CODES, kind="flat", bits=8, ids=np.arange(100, 106))
    index.attach_decoder(hand_decoder())
    return index


def test_hand_decoder_decodes_as_designed():
    decoded = hand_decoder().decode_packed(HAND_CODES)
    s = 1 / np.sqrt(2)
    assert np.allclose(decoded, [[s, s], [1, 0], [1, 0], [0, 1], [1, 0], [1, 0]], atol=1e-6)
    # The hand order really is (cosine desc, Hamming, position) of the table.
    cos = hand_cosines()
    assert sorted(range(6), key=lambda p: (-round(cos[p], 9), HAND_HAMMING[p], p)) == HAND_ORDER


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_search_decoded_order_by_hand(kind):
    index = build_index(HAND_CODES, kind=kind, bits=8, ids=np.arange(100, 106))
    index.attach_decoder(hand_decoder())
    # Hamming alone ranks differently (2, 3 first), so the re-ranking is what is checked.
    _, plain = index.search_positions(HAND_QUERY_CODE, 6)
    assert plain[0].tolist() == [2, 3, 4, 5, 0, 1]

    result = index.search_decoded(HAND_QUERY_CODE, HAND_QUERY_FEATURES, 3, depth=6)
    assert set(result) == {"cosine", "distances", "ids", "positions"}
    assert result["positions"].tolist() == [[0, 2, 4]]
    assert result["ids"].tolist() == [[100, 102, 104]]
    assert result["distances"].tolist() == [[4, 1, 2]]
    assert result["cosine"].dtype == np.float32
    assert np.allclose(result["cosine"][0], hand_cosines()[[0, 2, 4]], atol=1e-6)

    full = index.search_decoded(HAND_QUERY_CODE, HAND_QUERY_FEATURES, 6, depth=6)
    assert full["positions"][0].tolist() == HAND_ORDER
    assert full["distances"][0].tolist() == [HAND_HAMMING[p] for p in HAND_ORDER]
    assert np.allclose(full["cosine"][0], hand_cosines()[HAND_ORDER], atol=1e-6)


def test_search_decoded_depth_limits_the_candidates(hand_index):
    # depth 2: only the two nearest by Hamming (2 and 3) are re-ranked; 0, the best by cosine, is not among them.
    result = hand_index.search_decoded(HAND_QUERY_CODE, HAND_QUERY_FEATURES, 2, depth=2)
    assert result["positions"].tolist() == [[2, 3]]
    # depth below k is raised to k.
    assert hand_index.search_decoded(HAND_QUERY_CODE, HAND_QUERY_FEATURES, 2, depth=1)["positions"].tolist() == [[2, 3]]
    # depth 4 (Hamming 1, 1, 2, 2): 2, 4, 5 share the cosine of (1, 0) and go by Hamming, then position.
    result = hand_index.search_decoded(HAND_QUERY_CODE, HAND_QUERY_FEATURES, 4, depth=4)
    assert result["positions"].tolist() == [[2, 4, 5, 3]]
    # A depth past the index is the whole index.
    assert hand_index.search_decoded(HAND_QUERY_CODE, HAND_QUERY_FEATURES, 3, depth=1000)["positions"].tolist() == [
        [0, 2, 4]
    ]


def test_search_decoded_several_queries_and_feature_scale(hand_index):
    codes = np.concatenate([HAND_QUERY_CODE, HAND_CODES[3:4]])
    # Query 2 points along (0, 1) (scaled by 10: only the direction counts) from code 3 itself.
    features = np.array([[1.0, 0.5], [0.0, 10.0]], dtype=np.float32)
    result = hand_index.search_decoded(codes, features, 3, depth=6)
    assert result["positions"][0].tolist() == [0, 2, 4]
    # Query 2: (0,1) cos 1 (pos 3), (1,1)/sqrt2 0.707 (pos 0), then the (1,0) group at cos 0:
    # Hamming from 01000000: pos 2 -> 2, pos 4 -> 3, pos 5 -> 3, pos 1 -> 5; pos 2 first.
    assert result["positions"][1].tolist() == [3, 0, 2]
    assert np.allclose(result["cosine"][1], [1.0, 1 / np.sqrt(2), 0.0], atol=1e-6)


def test_search_decoded_refusals(hand_index):
    bare = build_index(HAND_CODES, kind="flat", bits=8)
    with pytest.raises(DmuhError, match="no decoder"):
        bare.search_decoded(HAND_QUERY_CODE, HAND_QUERY_FEATURES, 3)
    for features in (
        np.ones((1, 3), np.float32),
        np.ones((2, 2), np.float32),
        np.ones(2, np.float32),
        np.array([[np.nan, 1.0]], np.float32),
        np.array([[np.inf, 1.0]], np.float32),
    ):
        with pytest.raises(DmuhError, match="query features"):
            hand_index.search_decoded(HAND_QUERY_CODE, features, 3)
    with pytest.raises(DmuhError, match="k=7"):
        hand_index.search_decoded(HAND_QUERY_CODE, HAND_QUERY_FEATURES, 7)
    with pytest.raises(DmuhError, match="k=0"):
        hand_index.search_decoded(HAND_QUERY_CODE, HAND_QUERY_FEATURES, 0)
    with pytest.raises(DmuhError, match="reads 16-bit codes"):
        bare.attach_decoder(FeatureDecoder(16, 2, 4))
    assert bare.decoder is None


def test_save_load_keeps_the_decoder(hand_index, tmp_path):
    path = tmp_path / "hand.dmuhidx"
    hand_index.save(path)
    loaded = open_index(path)
    assert loaded.info()["decoder"] == {"bits": 8, "dim": 2, "hidden": 8}
    assert hand_index.info()["decoder"] == loaded.info()["decoder"]
    assert np.array_equal(loaded.decoder.decode_packed(ALL_8BIT), hand_decoder().decode_packed(ALL_8BIT))
    before = hand_index.search_decoded(HAND_QUERY_CODE, HAND_QUERY_FEATURES, 6, depth=6)
    after = loaded.search_decoded(HAND_QUERY_CODE, HAND_QUERY_FEATURES, 6, depth=6)
    for key in before:
        assert np.array_equal(before[key], after[key]), key
    # Without a decoder, none comes back.
    build_index(HAND_CODES, kind="flat", bits=8).save(tmp_path / "bare.dmuhidx")
    bare = open_index(tmp_path / "bare.dmuhidx")
    assert bare.info()["decoder"] is None and bare.decoder is None
    header, sections = read_index_file(tmp_path / "bare.dmuhidx", ("flat",))
    assert "decoder" not in sections


def _rewrite(path, out, header_change=None, sections_change=None):
    """Re-write an index file through write_index_file (so its checksums hold) with changes."""
    header, sections = read_index_file(path, ("flat", "ivf", "hnsw"))
    header = {k: v for k, v in header.items() if k not in ("sections", "payload_size", "payload_sha256")}
    header.update(header_change or {})
    sections = dict(sections)
    for name, data in (sections_change or {}).items():
        if data is None:
            sections.pop(name, None)
        else:
            sections[name] = data
    write_index_file(out, header, list(sections.items()))
    return out


@pytest.fixture
def saved_hand_index(hand_index, tmp_path):
    path = tmp_path / "hand.dmuhidx"
    hand_index.save(path)
    return path


def test_rewrite_without_changes_still_loads(saved_hand_index, tmp_path):
    # The corruption tests below re-write files this way: unchanged, it reads back whole.
    copy = _rewrite(saved_hand_index, tmp_path / "copy.dmuhidx")
    loaded = open_index(copy)
    assert loaded.info()["decoder"] == {"bits": 8, "dim": 2, "hidden": 8}
    assert loaded.search_decoded(HAND_QUERY_CODE, HAND_QUERY_FEATURES, 3, depth=6)["positions"].tolist() == [[0, 2, 4]]


@pytest.mark.parametrize(
    "case, header_change, sections_change, message",
    [
        ("garbage decoder bytes", None, {"decoder": b"definitely not safetensors"}, "corrupted decoder"),
        ("decoder bytes cut short", None, "truncate", "corrupted decoder"),
        ("decoder of other sizes", None, {"decoder": FeatureDecoder(8, 3, 8).to_bytes()}, "corrupted decoder"),
        ("header names a decoder, no section", None, {"decoder": None}, "names a decoder, the payload holds none"),
        ("unreadable decoder description", {"decoder": {"bits": 8}}, None, "unreadable decoder description"),
        (
            "decoder description of other sizes",
            {"decoder": {"bits": 8, "dim": 2, "hidden": 9}},
            None,
            "corrupted decoder",
        ),
        (
            "a decoder of 16-bit codes",
            {"decoder": {"bits": 16, "dim": 2, "hidden": 8}},
            {"decoder": FeatureDecoder(16, 2, 8).to_bytes()},
            "a decoder of 16-bit codes for 8-bit codes",
        ),
    ],
)
def test_load_refuses_a_corrupted_decoder(
    saved_hand_index, tmp_path, capsys, case, header_change, sections_change, message
):
    if sections_change == "truncate":
        _, sections = read_index_file(saved_hand_index, ("flat",))
        sections_change = {"decoder": sections["decoder"][:-7]}
    bad = _rewrite(saved_hand_index, tmp_path / "bad.dmuhidx", header_change, sections_change)
    with pytest.raises(DmuhError, match=message) as caught:
        open_index(bad)
    assert str(bad) in str(caught.value)
    # The CLI says so in one line, exit 2 (no internal error).
    assert main(["index", "info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "internal error" not in err and message.split(",")[0] in err


def test_load_refuses_an_absurd_decoder_description(saved_hand_index, tmp_path):
    bad = _rewrite(saved_hand_index, tmp_path / "bad.dmuhidx", {"decoder": {"bits": 8, "dim": 2, "hidden": 2**62}})
    with pytest.raises(DmuhError):
        open_index(bad)


# -- end to end through the CLI --------------------------------------------------------------------

TRAIN = [
    "--data",
    None,
    "--protocol",
    "unsupervised",
    "--protocol-param",
    "query=10",
    "--model",
    "mlp",
    "--model-param",
    "hidden=[]",
    "--bits",
    "8",
    "--batch-size",
    "32",
    "--device",
    "cpu",
    "--quiet",
]


def _cli(*args):
    """main() with its stdout and stderr captured: (code, out, err)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """An rph run on unlabeled 12-dim features, its codes and an hnsw index with the decoder; then
    the database features, the training data and the run are deleted."""
    root = tmp_path_factory.mktemp("rph")
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 12)) * 3
    features = (centres[np.arange(150) % 3] + rng.normal(size=(150, 12)) * 0.5).astype(np.float32)
    data = root / "train.npz"
    np.savez(data, features=features)
    train = [a if a is not None else data for a in TRAIN]
    run, itq = root / "RUN", root / "ITQ"
    code, _, err = _cli("train", "--method", "rph", *train, "--epochs", "2", "--out", run)
    assert code == 0, err
    code, _, err = _cli("train", "--method", "itq", *train, "--epochs", "1", "--out", itq)
    assert code == 0, err

    db, q = root / "db.npz", root / "q.npz"
    np.savez(db, features=features[10:])
    np.savez(q, features=features[:10])
    dbcodes, qcodes = root / "dbcodes.npz", root / "qcodes.npz"
    code, out, err = _cli("encode", "--run", run, "--images", db, "--out", dbcodes)
    assert code == 0, err
    assert "features" not in out
    code, out, err = _cli("encode", "--run", run, "--images", q, "--features", "--out", qcodes)
    assert code == 0, err
    assert "features" in out
    index = root / "db.dmuhidx"
    code, build_out, err = _cli("index", "build", "--codes", dbcodes, "--kind", "hnsw", "--out", index)
    assert code == 0, err

    # The run's own decoder, decoded here while the run still exists, to check the index's against.
    from dmuh.retrieval.encoder import load_encoder

    run_decoded = load_encoder(run).method.decoder.decode_packed(Codes.load(dbcodes).packed)

    db.unlink()
    data.unlink()
    shutil.rmtree(run)
    return {
        "root": root,
        "index": index,
        "dbcodes": dbcodes,
        "qcodes": qcodes,
        "itq": itq,
        "run": run,
        "build_out": build_out,
        "run_decoded": run_decoded,
        "db": db,
        "data": data,
        "query_features": features[:10],
    }


def test_build_reports_the_decoder(pipeline):
    assert "decoder to 12 features" in pipeline["build_out"]
    assert "hnsw" in pipeline["build_out"]
    index = open_index(pipeline["index"])
    assert index.kind == "hnsw" and len(index) == 140 and index.bits == 8
    assert index.info()["decoder"] == {"bits": 8, "dim": 12, "hidden": 1024}
    # The stored decoder is the run's.
    assert np.allclose(index.decoder.decode_packed(index.codes_at(np.arange(140))), pipeline["run_decoded"], atol=1e-6)
    # The query codes carry their own features, the database codes none.
    assert Codes.load(pipeline["dbcodes"]).features is None
    assert np.allclose(Codes.load(pipeline["qcodes"]).features, pipeline["query_features"], atol=1e-6)


def test_search_rerank_decoder_needs_no_run_and_no_database_features(pipeline):
    assert not pipeline["run"].exists() and not pipeline["db"].exists() and not pipeline["data"].exists()
    code, out, err = _cli(
        "search",
        "--index",
        pipeline["index"],
        "--queries",
        pipeline["qcodes"],
        "--k",
        5,
        "--rerank",
        "decoder",
        "--depth",
        50,
        "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["rerank"] == "decoder" and report["depth"] == 50 and report["k"] == 5
    assert len(report["queries"]) == 10

    index = open_index(pipeline["index"])
    qcodes = Codes.load(pipeline["qcodes"])
    queries = qcodes.features / np.linalg.norm(qcodes.features, axis=1, keepdims=True)
    direct = index.search_decoded(qcodes.packed, qcodes.features, 5, depth=50)
    _, candidates = index.search_positions(qcodes.packed, 50)
    for q, entry in enumerate(report["queries"]):
        results = entry["results"]
        assert len(results) == 5
        assert [r["rank"] for r in results] == [1, 2, 3, 4, 5]
        scores = [r["decoded_cosine"] for r in results]
        assert all(a >= b for a, b in zip(scores, scores[1:])), scores
        assert [r["id"] for r in results] == direct["ids"][q].tolist()
        # Each cosine is the query's features against the run's decoding of that code.
        ids = [r["id"] for r in results]
        recomputed = pipeline["run_decoded"][ids] @ queries[q]
        assert np.allclose(scores, recomputed, atol=2e-4)
        # And nothing left among the 50 Hamming candidates decodes closer than the 5th.
        rest = [p for p in candidates[q] if p >= 0 and p not in ids]
        assert (pipeline["run_decoded"][rest] @ queries[q]).max() <= min(scores) + 2e-4
        assert all(
            r["distance"] == int(np.unpackbits(qcodes.packed[q] ^ index.codes_at([r["id"]])[0]).sum()) for r in results
        )

    # Plain Hamming search carries no decoded cosine.
    code, out, err = _cli("search", "--index", pipeline["index"], "--queries", pipeline["qcodes"], "--k", 5, "--json")
    assert code == 0, err
    assert all("decoded_cosine" not in r for entry in json.loads(out)["queries"] for r in entry["results"])


@pytest.mark.parametrize(
    "extra, queries, message",
    [
        (["--rerank", "decoder"], "dbcodes", "--features"),
        (["--rerank", "bogus"], "qcodes", "--rerank"),
        (["--depth", "5"], "qcodes", "--depth applies to --rerank"),
        (["--rerank", "0"], "qcodes", "--rerank"),
        (["--rerank", "decoder", "--depth", "0"], "qcodes", "--depth"),
        (["--rerank", "decoder", "--tau", "1"], "qcodes", "--tau applies to --rerank uncertainty"),
    ],
)
def test_search_refusals(pipeline, extra, queries, message):
    code, out, err = _cli("search", "--index", pipeline["index"], "--queries", pipeline[queries], "--k", 5, *extra)
    assert code == 2, (out, err)
    assert err.startswith("dmuh search: error:") and message in err
    assert "internal error" not in err and out == ""


def test_index_build_decoder_of_a_run_without_one(pipeline):
    out_path = pipeline["root"] / "itq.dmuhidx"
    code, out, err = _cli(
        "index", "build", "--codes", pipeline["dbcodes"], "--decoder", pipeline["itq"], "--out", out_path
    )
    assert code == 2
    assert "trains no decoder" in err and "itq" in err
    assert not out_path.exists()


def test_index_without_decoder_refuses_rerank_decoder(pipeline):
    # The codes' run is gone: the build finds no decoder, and search --rerank decoder says so.
    bare = pipeline["root"] / "bare.dmuhidx"
    code, out, err = _cli("index", "build", "--codes", pipeline["dbcodes"], "--kind", "flat", "--out", bare)
    assert code == 0, err
    assert "decoder" not in out
    assert open_index(bare).info()["decoder"] is None
    code, out, err = _cli("search", "--index", bare, "--queries", pipeline["qcodes"], "--k", 5, "--rerank", "decoder")
    assert code == 2
    assert "no decoder" in err and "internal error" not in err


def test_index_info_prints_the_decoder(pipeline):
    code, out, err = _cli("index", "info", pipeline["index"])
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith("decoder:")]
    assert lines == ["decoder: 8 bits -> 1024 -> 12 features (search --rerank decoder)"]
    code, out, err = _cli("index", "info", pipeline["index"], "--json")
    assert code == 0, err
    assert json.loads(out)["decoder"] == {"bits": 8, "dim": 12, "hidden": 1024}
