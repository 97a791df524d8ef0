"""A real `serve` process over the tiny model store, shared by the end-to-end tests of a module."""

import pytest

from tests.support.server import running_server


@pytest.fixture(scope="module")
def server(tiny_model_store, tmp_path_factory):
    with running_server(tiny_model_store, tmp_path_factory.mktemp("server"), QUEUE_SIZE="2") as proc:
        yield proc
