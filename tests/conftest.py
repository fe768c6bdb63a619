"""Shared test settings."""

import os
import shutil

import pytest


@pytest.fixture(scope="session", autouse=True)
def dmuh_cache_dir(tmp_path_factory):
    """The decoded-data cache ("default": $DMUH_CACHE_DIR, see dmuh.engine.runtime.resolve_cache_dir) in a
    temporary folder for the whole session, subprocesses included: tests never write into the
    home folder."""
    saved = os.environ.get("DMUH_CACHE_DIR")
    folder = tmp_path_factory.mktemp("dmuh-cache")
    os.environ["DMUH_CACHE_DIR"] = str(folder)
    yield folder
    if saved is None:
        os.environ.pop("DMUH_CACHE_DIR", None)
    else:
        os.environ["DMUH_CACHE_DIR"] = saved


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """A real standalone Milvus server (the `milvus` package's embedded Milvus 2.3.5, a child
    process; `dmuh.retrieval.index.milvus_server.EmbeddedMilvus`) for the whole session, on ports the
    kernel hands out, in a temporary folder; skipped where the package is not installed. Started
    on the first test that asks for it (~12 s), stopped at the end."""
    pytest.importorskip("pymilvus", reason="the milvus backend needs pymilvus (pip install -e '.[milvus]')")
    pytest.importorskip(
        "milvus", reason="the embedded Milvus server needs the milvus package (pip install -e '.[test]')"
    )
    from dmuh.retrieval.index.milvus_server import EmbeddedMilvus

    server = EmbeddedMilvus(tmp_path_factory.mktemp("milvus-server"))
    server.start()
    yield server
    from dmuh.retrieval.index.milvus import close_connections

    close_connections()
    server.stop()
    shutil.rmtree(server.folder / "bin", ignore_errors=True)  # the server's binaries, unpacked: 250 MB
