"""A TCP proxy in front of the test S3 server that misbehaves on purpose.

* ``cut_after``: after that many response bytes (all connections together) the proxy resets
  every connection and stops listening: from then on the S3 endpoint refuses connections,
  as a crashed server would.
* ``faults``: per connection (numbered in accept order from 0), ``("reset", n)`` resets it
  after ``n`` response bytes; ``("freeze", n)`` stops forwarding after ``n`` bytes and keeps
  the connection open (a stalled peer). The server stays up for the other connections.
* ``tls``: an ``ssl.SSLContext`` — clients then speak HTTPS to the proxy (plain HTTP upstream).

It counts connections and requests and records each request's ``Range`` header, so a test can
assert how many GETs a retry policy made, where they resumed, and whether connections were reused.
"""

from __future__ import annotations

import re
import select
import socket
import ssl
import struct
import threading
from typing import Self

from tests.support.tls import self_signed

_RANGE = re.compile(rb"\r\nrange: *bytes=(\d+)-(\d+)", re.IGNORECASE)


class DyingProxy:
    """``with DyingProxy(upstream_port, cut_after=..., faults=..., tls=...) as proxy: proxy.endpoint_url``."""

    def __init__(
        self,
        upstream_port: int,
        *,
        cut_after: int | None = None,
        faults: dict[int, tuple[str, int]] | None = None,
        tls: ssl.SSLContext | None = None,
    ):
        self.upstream = ("127.0.0.1", upstream_port)
        self.cut_after, self.faults, self.tls = cut_after, dict(faults or {}), tls
        self.sent = 0
        self.requests = 0
        self.connections = 0
        self.ranges: list[tuple[int, int]] = []
        self.dead = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def endpoint_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.kill()

    def kill(self) -> None:
        """Reset every connection (RST, like a crashed peer) and stop listening."""
        self.dead.set()
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            _reset(conn)

    def _accept(self) -> None:
        while not self.dead.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.tls is not None:
                try:
                    client = self.tls.wrap_socket(client, server_side=True)
                except (OSError, ssl.SSLError):
                    client.close()
                    continue
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
                number = self.connections
                self.connections += 1
            threading.Thread(target=self._relay, args=(client, upstream, self.faults.get(number)), daemon=True).start()

    def _relay(self, client: socket.socket, upstream: socket.socket, fault: tuple[str, int] | None) -> None:
        """Both directions of one connection in one thread: an SSL socket must not be read and written
        by two threads at once (OpenSSL objects are not thread-safe; requests came out garbled)."""
        kind, after = fault or ("", -1)
        passed = 0
        try:
            while not self.dead.is_set():
                pending = getattr(client, "pending", lambda: 0)()
                readable = [client] if pending else select.select([client, upstream], [], [], 0.2)[0]
                if client in readable:
                    data = client.recv(65536)
                    if not data:
                        return
                    self._saw_request(data)
                    upstream.sendall(data)
                if upstream not in readable:
                    continue
                data = upstream.recv(65536)
                if not data:
                    return
                if kind and passed + len(data) >= after:
                    client.sendall(data[: after - passed])
                    if kind == "reset":
                        _reset(client)
                    else:
                        self.dead.wait()  # "freeze": the peer stays connected and silent
                    return
                passed += len(data)
                if self.cut_after is not None:
                    with self._lock:
                        room = self.cut_after - self.sent
                        self.sent += len(data)
                    if room <= len(data):
                        client.sendall(data[: max(room, 0)])
                        self.kill()
                        return
                client.sendall(data)
        except (OSError, ValueError):
            pass
        finally:
            for sock in (client, upstream):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except (OSError, ValueError):
                    pass

    def _saw_request(self, data: bytes) -> None:
        if data[:4] not in (b"GET ", b"HEAD", b"PUT "):
            return
        with self._lock:
            self.requests += 1
            found = _RANGE.search(data)
            if found:
                self.ranges.append((int(found.group(1)), int(found.group(2))))


def _reset(conn: socket.socket) -> None:
    """Close with RST, like a crashed peer; wakes a reader blocked in recv()."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        conn.close()
    except OSError:
        pass


def self_signed_tls(folder) -> tuple[ssl.SSLContext, str]:
    """A server context with a fresh self-signed certificate for 127.0.0.1, and the CA file clients verify it with."""
    cert_file, key_file = self_signed(folder)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context, str(cert_file)
