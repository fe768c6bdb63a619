"""`dmuh serve`: every endpoint, every bad request, the thumbnail root rule, the CLI, and the page
in a real headless Chromium (small digits runs on the CPU)."""

import json
import os
import shutil
import struct
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dmuh.cli import main
from dmuh.data import DigitsSource
from dmuh.engine.trainer import train
from dmuh.errors import DmuhError
from dmuh.retrieval.index import build_index, open_index
from dmuh.runs.config import TrainConfig

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from dmuh.retrieval.service import SearchService, ServiceLimits, parse_codes  # noqa: E402
from dmuh.serve.app import create_app  # noqa: E402

BITS = 16
ITEMS = 80
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("DMUH_TEST_ARTIFACTS", REPO / "test-artifacts"))


def train_run(path, method):
    config = TrainConfig(
        data="digits",
        protocol="digits",
        model="smallcnn",
        model_params={"input_size": 8},
        method=method,
        bits=BITS,
        epochs=1,
        batch_size=64,
        device="cpu",
        out=str(path),
        eval_every=-1,
        trace_items=0,
    )
    train(config, progress=False, echo=lambda line: None)
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A DMUH run, a folder of 80 digit images in class folders, their codes and flat index."""
    root = tmp_path_factory.mktemp("serve")
    run = train_run(root / "run", "dmuh")
    digits = DigitsSource()
    images, labels = digits.decode(range(ITEMS)), digits.labels[:ITEMS].argmax(1)
    db = root / "db"
    for i, (array, label) in enumerate(zip(images, labels)):
        path = db / f"digit{label}" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array[:, :, 0]).resize((32, 32), Image.NEAREST).save(path)
    assert main(["encode", "--run", str(run), "--images", str(db), "--out", str(root / "codes.npz"), "--quiet"]) == 0
    assert main(["index", "build", "--codes", str(root / "codes.npz"), "--out", str(root / "db.dmuhidx")]) == 0
    return {"root": root, "run": run, "db": db, "index": root / "db.dmuhidx"}


@pytest.fixture(scope="module")
def service(served):
    return SearchService.open(served["index"], images=str(served["db"]))


@pytest.fixture(scope="module")
def client(service):
    return TestClient(create_app(service))


def query_image(served, i=0):
    path = sorted(served["db"].rglob("*.png"))[i]
    return path, path.read_bytes()


def one_line_error(response, status):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"] and "\n" not in body["error"], body
    return body["error"]


# -- endpoints ----------------------------------------------------------------------------------


def test_healthz_and_info(client, service, served):
    assert client.get("/healthz").json() == {"status": "ok", "count": ITEMS}
    info = client.get("/info").json()
    assert info["bits"] == BITS and info["count"] == ITEMS and info["kind"] == "flat"
    assert (
        info["model"]["method"] == "dmuh"
        and info["model"]["checkpoint_sha256"] == service.encoder.identity["checkpoint_sha256"]
    )
    assert info["queries"] == {"image": True, "text": False, "codes": True}
    assert info["uncertainty"] is True and info["thumbnails"] is True and info["rerank"] == ["uncertainty"]
    assert info["max_k"] == ITEMS  # k is bounded by the index
    assert info["limits"]["max_k"] == info["max_k"]  # one max_k, the one requests are held to


def test_image_search_equals_the_cli(client, served, capsys):
    path, data = query_image(served, 3)
    response = client.post("/search", files={"image": (path.name, data, "image/png")}, data={"k": "7"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert main(["search", "--index", str(served["index"]), "--image", str(path), "--k", "7", "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)["queries"][0]["results"]
    assert body["results"] == expected
    assert body["results"][0]["distance"] == 0 and body["results"][0]["path"] is not None
    # The raw body form gives the same answer.
    raw = client.post("/search", content=data, headers={"content-type": "image/png"}, params={"k": 7}).json()
    assert raw["results"] == expected


def test_image_query_reports_its_uncertainty_as_encode_does(client, served, tmp_path):
    path, data = query_image(served, 5)
    query = client.post("/search", files={"image": (path.name, data, "image/png")}).json()["query"]
    out = tmp_path / "q.npz"
    assert (
        main(
            [
                "encode",
                "--run",
                str(served["run"]),
                "--images",
                str(path),
                "--out",
                str(out),
                "--uncertainty",
                "--quiet",
            ]
        )
        == 0
    )
    stored = np.load(out)
    bit_u = stored["bit_uncertainty"][0].astype(np.float64)
    assert query["uncertainty"] == pytest.approx(float(stored["uncertainty"][0]), rel=1e-3)
    assert [b["bit"] for b in query["uncertain_bits"]] == list(np.argsort(-bit_u, kind="stable")[:8])
    assert len(query["code"]) == BITS and set(query["code"]) <= {"0", "1"}


def test_code_queries_hex_bits_and_lists(client, served):
    codes = np.load(served["root"] / "codes.npz")["codes"]
    hex_code = codes[4].tobytes().hex()
    by_hex = client.post("/search", json={"codes": hex_code, "k": 5}).json()
    bits = by_hex["query"]["code"]
    by_bits = client.post("/search", json={"codes": bits, "k": 5}).json()
    by_list = client.post("/search", json={"codes": [int(c) for c in bits], "k": 5}).json()
    by_form = client.post("/search", data={"codes": hex_code, "k": "5"}).json()
    assert by_hex["results"] == by_bits["results"] == by_list["results"] == by_form["results"]
    assert by_hex["results"][0]["distance"] == 0 and by_hex["query"]["uncertainty"] is None
    distances = [row["distance"] for row in by_hex["results"]]
    assert distances == sorted(distances)
    # Uncertainty re-ranking of a code query takes its bit uncertainty.
    reranked = client.post(
        "/search", json={"codes": hex_code, "k": 5, "rerank": "uncertainty", "bit_uncertainty": [0.1] * BITS}
    ).json()
    assert reranked["rerank"] == "uncertainty" and all("weighted_distance" in row for row in reranked["results"])


def test_parse_codes_by_hand():
    assert parse_codes("8001", 16).tolist() == [[0x80, 0x01]]
    assert parse_codes("1000000000000001", 16).tolist() == [[0x80, 0x01]]
    assert parse_codes([1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 1], 16).tolist() == [[0x80, 0x01]]
    assert parse_codes("ff", 5).tolist() == [[0xF8]]  # padding bits are ignored


def test_page_and_its_script(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="file"' in page.text and 'id="results"' in page.text and "/page.js" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/page.js").headers["content-type"].startswith("text/javascript")


def test_thumbnails(client, service):
    response = client.get("/thumbnail/0")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    from io import BytesIO

    thumb = Image.open(BytesIO(response.content))
    assert thumb.format == "JPEG" and max(thumb.size) <= service.limits.thumbnail_px
    assert "not in the index" in one_line_error(client.get("/thumbnail/123456"), 404)
    one_line_error(client.get("/thumbnail/abc"), 400)


# -- bad requests -------------------------------------------------------------------------------


def png_header(width, height):
    """A PNG that declares width x height pixels in a few dozen bytes (a decompression bomb's header)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


BAD_REQUESTS = {
    "no query": (dict(json={"k": 3}), 400, "give one query"),
    "two queries": (dict(json={"codes": "0000", "text": "x"}), 400, "not codes and text"),
    "bad hex": (dict(json={"codes": "zzzz"}), 400, "not a hex string"),
    "short code": (dict(json={"codes": "00"}), 400, "expected 4 hex digits"),
    "k too large": (dict(json={"codes": "0000", "k": 10**9}), 400, "from 1 to 80"),
    "k zero": (dict(json={"codes": "0000", "k": 0}), 400, "from 1 to 80"),
    "k not a number": (dict(data={"codes": "0000", "k": "ten"}), 400, "expected an integer"),
    "k float": (dict(json={"codes": "0000", "k": 2.5}), 400, "expected an integer"),
    "bad rerank": (dict(json={"codes": "0000", "rerank": "magic"}), 400, "choose uncertainty or decoder"),
    "rerank without uncertainty": (
        dict(json={"codes": "0000", "rerank": "uncertainty"}),
        400,
        "needs its bit_uncertainty",
    ),
    "decoder without decoder": (
        dict(json={"codes": "0000", "rerank": "decoder"}),
        400,
        "needs an index with a decoder",
    ),
    "bad bit uncertainty": (
        dict(json={"codes": "0000", "rerank": "uncertainty", "bit_uncertainty": [1, 2]}),
        400,
        "16 finite",
    ),
    "negative tau": (
        dict(json={"codes": "0000", "rerank": "uncertainty", "bit_uncertainty": [1] * 16, "tau": -1}),
        400,
        "tau",
    ),
    "unknown field": (dict(json={"codes": "0000", "kk": 3}), 400, "unknown field 'kk'"),
    "text without a text network": (dict(json={"text": "a dog"}), 400, "no text network"),
    "json not an object": (dict(json=[1, 2]), 400, "expected a JSON object"),
    "broken json": (dict(content=b"{", headers={"content-type": "application/json"}), 400, "not valid JSON"),
    "garbage image": (dict(content=os.urandom(2000), headers={"content-type": "image/jpeg"}), 400, "cannot read image"),
    "empty body": (dict(content=b"", headers={"content-type": "image/png"}), 400, "empty"),
    "huge dimensions": (
        dict(content=png_header(8000, 8000), headers={"content-type": "image/png"}),
        400,
        "8000 x 8000 pixels, more than the 40,000,000 allowed",
    ),
    "decompression bomb": (
        dict(content=png_header(100_000, 100_000), headers={"content-type": "image/png"}),
        400,
        "decompression bomb",
    ),
    "image as text field": (dict(data={"image": "abc"}), 400, "expected a file upload"),
    "wrong content type": (
        dict(content=b"abc", headers={"content-type": "text/plain"}),
        415,
        "Content-Type text/plain",
    ),
    "malformed multipart": (
        dict(content=b"--x\r\nnonsense", headers={"content-type": "multipart/form-data; boundary=x"}),
        400,
        "",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_bad_requests_get_a_one_line_4xx(client, name):
    request, status, message = BAD_REQUESTS[name]
    assert message in one_line_error(client.post("/search", **request), status)


def test_truncated_jpeg_and_wrong_methods(client, served):
    path, _ = query_image(served)
    jpeg = served["root"] / "q.jpg"
    Image.open(path).convert("RGB").resize((64, 64)).save(jpeg, quality=90)
    truncated = jpeg.read_bytes()[: jpeg.stat().st_size // 2]
    assert "truncated" in one_line_error(
        client.post("/search", files={"image": ("q.jpg", truncated, "image/jpeg")}), 400
    )
    one_line_error(client.get("/search"), 405)
    one_line_error(client.get("/no/such/page"), 404)
    assert client.get("/healthz").status_code == 200  # still up


def test_upload_limit_counts_the_bytes_that_arrive(service):
    small = SearchService(service.index, service.encoder, service.thumbnails, ServiceLimits(max_upload_bytes=4096))
    client = TestClient(create_app(small))
    assert "4,096 bytes" in one_line_error(
        client.post("/search", content=b"\0" * 5000, headers={"content-type": "image/png"}), 413
    )

    def chunks():  # no Content-Length: the body is counted as it arrives
        for _ in range(10):
            yield b"\0" * 1000

    assert "4,096 bytes" in one_line_error(
        client.post("/search", content=chunks(), headers={"content-type": "image/png"}), 413
    )
    assert client.post("/search", json={"codes": "0000", "k": 2}).status_code == 200


def test_timeout_and_internal_errors_leave_the_server_up(service, monkeypatch):
    slow = SearchService(service.index, service.encoder, service.thumbnails, ServiceLimits(timeout_s=0.2))
    client = TestClient(create_app(slow))
    monkeypatch.setattr(slow, "search_codes", lambda *args: time.sleep(2))
    started = time.perf_counter()
    assert "longer than 0.2 s" in one_line_error(client.post("/search", json={"codes": "0000"}), 503)
    assert time.perf_counter() - started < 1.5  # answered at the deadline, not after the work

    def broken(*args):
        raise RuntimeError("a bug\nwith a second line")

    monkeypatch.setattr(slow, "search_codes", broken)
    assert one_line_error(client.post("/search", json={"codes": "0000"}), 500) == "internal error: RuntimeError"
    assert client.get("/healthz").json()["status"] == "ok"


def test_a_run_without_momentum_reports_no_uncertainty(served, tmp_path):
    regu = train_run(tmp_path / "regu", "regu")
    service = SearchService.open(served["index"], run=str(regu), allow_other_model=True)
    client = TestClient(create_app(service))
    _, data = query_image(served)
    body = client.post("/search", content=data, headers={"content-type": "image/png"}).json()
    assert body["query"]["uncertainty"] is None and body["query"]["uncertain_bits"] == []
    assert client.get("/info").json()["rerank"] == []
    assert "DMUH run" in one_line_error(
        client.post("/search", content=data, headers={"content-type": "image/png"}, params={"rerank": "uncertainty"}),
        400,
    )
    with pytest.raises(DmuhError, match="another model"):
        SearchService.open(served["index"], run=str(regu))


def test_codes_only_service(served):
    index = open_index(served["index"])
    index.meta = {}  # no recorded run
    client = TestClient(create_app(SearchService(index)))
    assert client.get("/info").json()["queries"] == {"image": False, "text": False, "codes": True}
    _, data = query_image(served)
    assert "--run RUN" in one_line_error(
        client.post("/search", content=data, headers={"content-type": "image/png"}), 400
    )
    assert "serves no images" in one_line_error(client.get("/thumbnail/0"), 404)


# -- the thumbnail root ---------------------------------------------------------------------------


def test_no_thumbnail_path_escapes_the_root(served, tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    secret = tmp_path / "secret.png"
    Image.new("L", (8, 8), 255).save(secret)
    Image.new("L", (8, 8), 0).save(root / "sub" / "ok.png")
    (root / "link.png").symlink_to(secret)  # a link inside the root to a file outside it
    (root / "notes.txt").write_text("not an image")
    names = [
        "sub/ok.png",
        "../secret.png",
        str(secret),
        "sub/../../secret.png",
        "link.png",
        "notes.txt",
        "sub/missing.png",
        "sub",
    ]
    index = build_index(np.zeros((len(names), BITS), dtype=np.uint8) + 1, names=names, meta={})
    client = TestClient(create_app(SearchService(index, thumbnails=_store(root))))
    assert client.get("/thumbnail/0").status_code == 200
    for i in range(1, len(names)):
        one_line_error(client.get(f"/thumbnail/{i}"), 404)
    # A zip root serves its own entries only.
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(root / "sub" / "ok.png", "sub/ok.png")
    client = TestClient(create_app(SearchService(index, thumbnails=_store(archive))))
    assert client.get("/thumbnail/0").status_code == 200
    for i in range(1, len(names)):
        one_line_error(client.get(f"/thumbnail/{i}"), 404)


def _store(root):
    from dmuh.retrieval.service import ThumbnailStore

    return ThumbnailStore(root, 64, 10_000_000)


# -- the command line -----------------------------------------------------------------------------


def start_server(*args):
    """`dmuh serve ... --port 0` in a subprocess -> (process, base URL), once it answers /healthz."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen(
        [sys.executable, "-m", "dmuh", "serve", "--port", "0", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    line = process.stdout.readline()
    if " at http://" not in line:
        process.kill()
        raise AssertionError(f"dmuh serve did not start: {line}{process.stderr.read()}")
    url = line.rsplit(" at ", 1)[1].strip().rstrip("/")
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as response:
                if json.load(response)["status"] == "ok":
                    return process, url
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError("dmuh serve did not answer /healthz")


@pytest.fixture(scope="module")
def server(served):
    process, url = start_server("--index", served["index"], "--images", served["db"])
    yield url
    process.terminate()
    process.wait(10)


def test_cli_serves_on_loopback(server):
    assert server.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(server + "/info", timeout=5) as response:
        assert json.load(response)["count"] == ITEMS


def test_cli_refuses_bad_flags(served, capsys):
    def fails(message, *args):
        assert main(["serve", *map(str, args)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err

    fails("--port 70000: expected 0 to 65535", "--index", served["index"], "--port", "70000")
    fails("--threads: expected a positive integer", "--index", served["index"], "--threads", "0")
    fails("--timeout 0: expected a positive number", "--index", served["index"], "--timeout", "0")
    fails("missing.dmuhidx: index file not found", "--index", served["root"] / "missing.dmuhidx")
    fails("not a folder or a .zip", "--index", served["index"], "--images", served["root"] / "nowhere")
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        fails("address already in use", "--index", served["index"], "--port", taken.getsockname()[1])
    finally:
        taken.close()


# -- the page in a real browser ---------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (.ci/run installs Debian's chromium)")
def test_the_page_in_headless_chromium(server, served):
    sync_api = pytest.importorskip("playwright.sync_api")
    path, _ = query_image(served, 2)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 800})
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(server + "/")
            # Selectors only: the page's Content-Security-Policy forbids evaluating strings as script.
            page.wait_for_selector("#info:has-text('codes of')")
            page.fill("#k", "6")
            page.set_input_files("#file", str(path))  # the upload, as a user picking a file
            page.wait_for_selector("#status:has-text('6 results')", timeout=20_000)
            page.wait_for_load_state("networkidle")  # the thumbnails
            figures = page.locator("#results figure.hit")
            hits = [
                [figures.nth(i).get_attribute("data-id"), figures.nth(i).get_attribute("data-distance")]
                for i in range(figures.count())
            ]
            loaded = page.locator("#results img").count()
            dom = page.content()
            page.screenshot(path=str(ARTIFACTS / "serve_page.png"), full_page=True)
        finally:
            browser.close()
    assert errors == []
    expected = json.loads(
        urllib.request.urlopen(
            urllib.request.Request(
                server + "/search?k=6", data=path.read_bytes(), headers={"content-type": "image/png"}
            ),
            timeout=10,
        ).read()
    )
    assert hits == [[str(row["id"]), str(row["distance"])] for row in expected["results"]]
    assert hits[0][1] == "0"
    assert "image-level uncertainty" in dom and f"{expected['query']['uncertainty']:.3e}"[:4] in dom
    assert dom.count("<li>bit ") == 8 and loaded == 6
    assert (ARTIFACTS / "serve_page.png").stat().st_size > 1000


def test_the_service_works_unchanged_over_milvus(served, client, tmp_path):
    pytest.importorskip("pymilvus")
    out = tmp_path / "milvus.dmuhidx"
    assert (
        main(
            [
                "index",
                "build",
                "--codes",
                str(served["root"] / "codes.npz"),
                "--backend",
                "milvus",
                "--uri",
                str(tmp_path / "codes.db"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    service = SearchService.open(out, images=str(served["db"]))
    try:
        milvus = TestClient(create_app(service))
        path, data = query_image(served, 3)
        for request in (
            dict(content=data, headers={"content-type": "image/png"}, params={"k": 9}),
            dict(json={"codes": "00ff", "k": 9}),
        ):
            assert milvus.post("/search", **request).json() == client.post("/search", **request).json()
        assert milvus.get("/info").json()["backend"] == "milvus"
        assert milvus.get("/thumbnail/5").content == client.get("/thumbnail/5").content
    finally:
        service.index.close()


# -- hardening II (issue 31, class 5): one strict parser, 4xx for every malformed request, timeouts --


@pytest.mark.parametrize(
    "k",
    ["²", "٣", "9" * 5000, "--5", "1e3", " ", "0x10", "5\x00", "-" + "9" * 30, "+5"],
)
def test_request_integers_are_ascii_digits_of_bounded_length(client, k):
    codes = "0" * (BITS // 4)
    for response in (
        client.post("/search", data={"codes": codes, "k": k}),
        client.post(f"/search?k={urllib.parse.quote(k)}", json={"codes": codes}),
    ):
        message = one_line_error(response, 400)
        assert len(message) < 200 and "internal error" not in message


@pytest.mark.parametrize(
    "body",
    [
        {"codes": ["00"]},
        {"codes": [[1, 0]]},
        {"codes": {"a": 1}},
        {"codes": "0000", "k": "5"},
        {"codes": "0000", "k": 2.5},
        {"codes": "0000", "k": True},
        {"codes": "0000", "rerank": ["uncertainty"]},
        {"codes": "0000", "tau": "inf"},
        {"codes": "0000", "depth": [1]},
        {"codes": "0000", "bit_uncertainty": "x"},
        {"text": 5},
    ],
)
def test_json_fields_of_the_wrong_type_are_a_400(client, body):
    one_line_error(client.post("/search", json=body), 400)


def test_deeply_nested_json_and_many_headers_are_4xx(client):
    deep = "[" * 100_000 + "]" * 100_000
    response = client.post("/search", content=deep.encode(), headers={"content-type": "application/json"})
    one_line_error(response, 400)
    headers = {f"x-flood-{i}": "y" * 50 for i in range(500)}
    response = client.post("/search", json={"codes": "0" * (BITS // 4)}, headers=headers)
    assert response.status_code == 200, response.text
    for length in ("²".encode(), b"9" * 5000, b"-1", b"1 2"):
        response = client.post(
            "/search", content=b"{}", headers={"content-type": "application/json", "content-length": length}
        )
        assert 400 <= response.status_code < 500, (length, response.text)


def test_thumbnail_errors_never_show_a_server_path(served, tmp_path):
    codes = SearchService.open(served["index"]).index
    names = [str(served["db"] / "digit0" / "000.png"), "/etc/passwd", str(served["root"]) + "/x\x00.png", "../../x.png"]
    index = build_index(np.zeros((len(names), BITS // 8), np.uint8), bits=BITS, names=names, meta=codes.meta)
    client = TestClient(create_app(SearchService(index, thumbnails=_store(served["db"]))))
    for i in range(len(names)):
        response = client.get(f"/thumbnail/{i}")
        if response.status_code == 200:
            continue
        message = one_line_error(response, 404)
        assert str(served["root"]) not in message and "/etc" not in message, message
    for item in ("²", "9" * 5000, "-1", "1.5"):
        one_line_error(client.get(f"/thumbnail/{urllib.parse.quote(item)}"), 400)


def test_a_body_over_the_limit_is_answered_413_not_reset(served):
    import http.client

    process, url = start_server("--index", served["index"], "--max-upload-mb", "1")
    try:
        host, port = url.split("//")[1].split(":")
        for declared in (True, False):  # Content-Length past the limit, and a chunked body that grows past it
            connection = http.client.HTTPConnection(host, int(port), timeout=30)
            body = json.dumps({"codes": "0" * (3 << 20)}).encode()
            if declared:
                connection.request("POST", "/search", body=body, headers={"content-type": "application/json"})
            else:
                chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))
                connection.request("POST", "/search", body=chunks, headers={"content-type": "application/json"},
                                   encode_chunked=True)  # fmt: skip
            response = connection.getresponse()
            assert response.status == 413, response.read()
            assert "larger than" in json.loads(response.read())["error"]
            connection.close()
    finally:
        process.terminate()
        process.wait(10)


def test_idle_half_open_connections_do_not_starve_real_queries(served, monkeypatch):
    import socket

    process, url = start_server("--index", served["index"])
    host, port = url.split("//")[1].split(":")
    idle = []
    try:
        for _ in range(80):  # a slowloris: half a request line each, then silence
            sock = socket.create_connection((host, int(port)), timeout=5)
            sock.sendall(b"GET /heal")
            idle.append(sock)
        started = time.monotonic()
        with urllib.request.urlopen(url + "/healthz", timeout=10) as response:
            assert response.status == 200
        request = urllib.request.Request(
            url + "/search", data=json.dumps({"codes": "0" * (BITS // 4), "k": 3}).encode(),
            headers={"content-type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as response:
            assert len(json.load(response)["results"]) == 3
        assert time.monotonic() - started < 5
        # and the idle connections are closed by the server after the head timeout
        idle[0].settimeout(30)
        assert idle[0].recv(1024) == b""
    finally:
        for sock in idle:
            sock.close()
        process.terminate()
        process.wait(10)


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--max-upload-mb", "inf", "--max-upload-mb inf: expected at most 4096"),
        ("--max-upload-mb", "nan", "--max-upload-mb nan: expected a positive number"),
        ("--timeout", "inf", "--timeout inf: expected at most 86400"),
        ("--threads", "100000", "--threads 100000: expected at most 1024"),
        ("--max-k", "99999999999", "--max-k 1e+11: expected at most 1e+06"),
        ("--max-pixels", "99999999999", "--max-pixels 1e+11: expected at most"),
    ],
)
def test_every_serve_flag_has_a_range(served, capsys, flag, value, message):
    assert main(["serve", "--index", str(served["index"]), flag, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
