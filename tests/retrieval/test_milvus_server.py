"""The milvus backend on a real Milvus server (tests/conftest.py's `milvus_server`, embedded Milvus
2.3.5) as it is deployed: two `dmuh serve` processes over one collection while `dmuh index add` and
`dmuh index remove` change it, and the faults: a `dmuh index add` killed midway, the server killed
during an add and restarted on its folder, and a server that is down (one line from the CLI, a 503
from `dmuh serve` until it is back). The server is restarted once here."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
pytest.importorskip("pymilvus", reason="the milvus backend needs pymilvus (pip install -e '.[milvus]')")

from dmuh.cli import main  # noqa: E402
from dmuh.codes.file import Codes  # noqa: E402
from dmuh.retrieval.index import open_index  # noqa: E402
from dmuh.retrieval.index.milvus import close_connections  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MODEL = {"checkpoint_sha256": "c" * 64, "method": "dmuh", "run": "/nowhere"}
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


def codes_file(path, packed, start):
    """A codes file of 64-bit codes whose ids (the index's paths) are item{start}, item{start + 1}, ..."""
    Codes(packed, 64, [f"item{i}" for i in range(start, start + len(packed))], model=MODEL).save(path)
    return path


def dmuh(*args, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "dmuh", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        **kwargs,
    )


def start_serves(index, count=1):
    """`count` processes of `dmuh serve --index INDEX --port 0`, started together -> [(process, base URL)]."""
    processes = [dmuh("serve", "--index", index, "--port", "0", "--threads", "2") for _ in range(count)]
    started = []
    for process in processes:
        line = process.stdout.readline()
        if " at http://" not in line:
            for other in processes:
                other.kill()
            raise AssertionError(f"dmuh serve did not start: {line}{process.stderr.read()}")
        started.append((process, line.rsplit(" at ", 1)[1].strip().rstrip("/")))
    return started


def search(url, code, k=5):
    """(status, answer) of a code query to a `dmuh serve`."""
    request = urllib.request.Request(
        url + "/search",
        data=json.dumps({"codes": code.tobytes().hex(), "k": k}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def hamming(a, b):
    return int(np.unpackbits(np.bitwise_xor(a, b)).sum())


def committed_rows(uri, collection):
    """{name: count} of every row of the collection below its commit, read straight from Milvus."""
    from pymilvus import MilvusClient

    client = MilvusClient(uri, alias="dmuh-test")  # its own connection: closing it leaves dmuh's open
    try:
        bound = int(client.describe_collection(collection)["properties"]["dmuh.next_position"])
        names = {}
        iterator = client.query_iterator(
            collection, batch_size=10000, filter=f"pos < {bound}", output_fields=["name"], consistency_level="Strong"
        )
        while rows := iterator.next():
            for row in rows:
                names[row["name"]] = names.get(row["name"], 0) + 1
        iterator.close()
        return names
    finally:
        client.close()


def test_two_services_over_one_collection_see_adds_and_removes_never_half_an_add(milvus_server, tmp_path, capsys):
    rng = np.random.default_rng(11)
    database = rng.integers(0, 256, size=(2000, 8), dtype=np.uint8)
    extra = rng.integers(0, 256, size=(5000, 8), dtype=np.uint8)
    every = {f"item{i}": code for i, code in enumerate(np.concatenate([database, extra]))}
    index = tmp_path / "shared.dmuhidx"
    build = ["index", "build", "--codes", codes_file(tmp_path / "db.npz", database, 0), "--backend", "milvus"]
    assert main([*map(str, build), "--uri", milvus_server.uri, "--out", str(index), "--force"]) == 0
    capsys.readouterr()
    replicas = start_serves(index, 2)
    try:
        urls = [url for _, url in replicas]
        # While `dmuh index add` inserts 5,000 codes, both services answer every query, and every
        # result is a whole item: its path names a code at the distance reported.
        answers, stop = [], threading.Event()

        def query_all_the_time(url, seed):
            local = np.random.default_rng(seed)
            while not stop.is_set():
                code = extra[local.integers(len(extra))] if local.random() < 0.5 else database[local.integers(2000)]
                answers.append((code, *search(url, code)))

        threads = [threading.Thread(target=query_all_the_time, args=(url, n)) for n, url in enumerate(urls)]
        for thread in threads:
            thread.start()
        added = codes_file(tmp_path / "new.npz", extra, 2000)
        assert main(["index", "add", "--index", str(index), "--codes", str(added)]) == 0
        stop.set()
        for thread in threads:
            thread.join()
        assert "added 5000 codes, 7000 codes now" in capsys.readouterr().out
        assert len(answers) > 4 and {status for _, status, _ in answers} == {200}, answers[:3]
        for code, _, answer in answers:
            for row in answer["results"]:
                assert row["path"] == f"item{row['id']}" and row["distance"] == hamming(every[row["path"]], code)
        # Once the add has returned, both find the new codes; once a remove has, neither returns them.
        for url in urls:
            status, answer = search(url, extra[123], k=1)
            assert status == 200 and answer["results"][0]["id"] == 2123 and answer["results"][0]["distance"] == 0
        (tmp_path / "gone.txt").write_text("2123\n5\n")
        assert main(["index", "remove", "--index", str(index), "--ids", str(tmp_path / "gone.txt")]) == 0
        for url in urls:
            for code in (extra[123], database[5]):
                status, answer = search(url, code, k=50)
                assert status == 200 and not {2123, 5} & {row["id"] for row in answer["results"]}
            assert json.load(urllib.request.urlopen(url + "/info", timeout=10))["backend"] == "milvus"
    finally:
        for process, _ in replicas:
            process.terminate()
            process.wait(10)


def wait_for(condition, seconds, what):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {seconds} s")


def inserted_past(uri, collection, bound):
    """How many rows past the commit `bound` the server holds (an add under way)."""
    from pymilvus import MilvusClient

    client = MilvusClient(uri, alias="dmuh-test")
    try:
        rows = client.query(
            collection, filter=f"pos >= {bound}", output_fields=["count(*)"], consistency_level="Strong"
        )
        return int(rows[0]["count(*)"])
    finally:
        client.close()


def test_killed_adds_a_killed_server_and_a_server_that_is_down(milvus_server, tmp_path, capsys):
    rng = np.random.default_rng(12)
    database = rng.integers(0, 256, size=(1000, 8), dtype=np.uint8)
    many = rng.integers(0, 256, size=(100_000, 8), dtype=np.uint8)
    index = tmp_path / "faults.dmuhidx"
    build = ["index", "build", "--codes", codes_file(tmp_path / "db.npz", database, 0), "--backend", "milvus"]
    assert main([*map(str, build), "--uri", milvus_server.uri, "--out", str(index), "--force"]) == 0
    added = codes_file(tmp_path / "many.npz", many, 1000)
    capsys.readouterr()
    uri, collection = milvus_server.uri, "faults"
    [(serve, url)] = start_serves(index)
    try:
        # 1. `dmuh index add` killed (SIGKILL) midway through its inserts: nothing of it is searched.
        add = dmuh("index", "add", "--index", index, "--codes", added)
        wait_for(lambda: inserted_past(uri, collection, 1000) > 0, 60, "the add's first inserts")
        add.send_signal(signal.SIGKILL)
        assert add.wait(10) == -signal.SIGKILL  # killed, not finished
        assert committed_rows(uri, collection) == {f"item{i}": 1 for i in range(1000)}
        assert search(url, many[7])[1]["results"][0]["distance"] > 0

        # 2. The server killed (SIGKILL) while the rerun inserts: the add fails with one line naming
        # the uri, and while the server is down `dmuh search` says so and `dmuh serve` answers 503.
        add = dmuh("index", "add", "--index", index, "--codes", added)
        wait_for(lambda: inserted_past(uri, collection, 1000) > 0, 60, "the rerun's first inserts")
        milvus_server.kill()
        _, err = add.communicate(timeout=120)
        assert add.returncode == 2 and err.count("\n") == 1 and uri in err, err
        for command in (["search", "--index", index, "--queries", added, "--k", 1], ["serve", "--index", index]):
            assert main([str(part) for part in command]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and uri in err and ("cannot reach" in err or "does not answer" in err), err
        status, answer = search(url, many[7])
        assert status == 503 and ("does not answer now" in answer["error"] or "cannot reach" in answer["error"])

        # 3. Restarted on its folder: the collection loads with every committed code, the service
        # answers again without a restart, and the add, run again, ends with each code exactly once.
        milvus_server.start()
        wait_for(lambda: search(url, database[3], k=1)[0] == 200, 90, "dmuh serve answering after the restart")
        assert search(url, database[3], k=1)[1]["results"][0]["id"] == 3
        with open_index(index) as reopened:
            assert len(reopened) == 1000
        assert main(["index", "add", "--index", str(index), "--codes", str(added)]) == 0
        assert "added 100000 codes, 101000 codes now" in capsys.readouterr().out
        assert committed_rows(uri, collection) == {f"item{i}": 1 for i in range(101_000)}
        wait_for(lambda: search(url, many[7], k=1)[1]["results"][0]["id"] == 1007, 10, "the add seen by dmuh serve")
    finally:
        serve.terminate()
        serve.wait(10)
        close_connections()  # this process's clients of the killed server
        if not milvus_server.running:
            milvus_server.start()
