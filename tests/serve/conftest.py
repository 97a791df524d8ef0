"""A real `serve` process over the tiny model store, shared by the end-to-end tests of a module."""

import pytest

from tests.support.server import ServerProcess


@pytest.fixture(scope="module")
def server(tiny_model_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs")
    proc = ServerProcess(
        {
            "MODEL_STORE": str(tiny_model_store),
            "OUTPUT": str(out),
            "CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
            "DEFAULT_CHECKPOINT": "tiny-sd1",
            "QUEUE_SIZE": "2",
        },
        log_path=out / "server.log",
    ).start()
    proc.output = out
    try:
        yield proc
    finally:
        proc.stop()
