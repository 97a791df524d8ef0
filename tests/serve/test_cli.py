"""The `serve` command: early listening socket agrees with the settings; bad commands are refused."""

import socket

from serve.cli import listen_early, main
from serve.settings import Settings
from tests.support.server import free_port


def test_listen_early_uses_the_settings_port(monkeypatch):
    port = free_port()
    env = {"SAGEMAKER_BIND_TO_PORT": str(port), "HOST": "127.0.0.1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    sock = listen_early()
    try:
        assert sock.getsockname() == ("127.0.0.1", port) == (Settings().host, Settings().port)
        # the kernel completes the handshake before the app exists
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            pass
    finally:
        sock.close()


def test_port_fallbacks_agree_with_settings(monkeypatch):
    monkeypatch.delenv("SAGEMAKER_BIND_TO_PORT", raising=False)
    monkeypatch.setenv("PORT", str(free_port()))
    monkeypatch.setenv("HOST", "127.0.0.1")
    sock = listen_early()
    try:
        assert sock.getsockname()[1] == Settings().port
    finally:
        sock.close()


def test_unknown_command_is_refused(capsys):
    assert main(["train"]) == 2
    assert "usage" in capsys.readouterr().err
