"""Shared test settings."""

import os

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
