"""A TCP proxy in front of the test S3 server that "dies" after N response bytes.

After ``cut_after`` bytes have flowed back to clients (all connections together), the
proxy resets every connection and stops listening: from then on the S3 endpoint refuses
connections, as a crashed server would. It also counts the requests it saw, so a test can
assert how many GETs a retry policy made.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Self


class DyingProxy:
    """``with DyingProxy(upstream_port, cut_after=...) as proxy: proxy.endpoint_url``."""

    def __init__(self, upstream_port: int, *, cut_after: int | None = None):
        self.upstream = ("127.0.0.1", upstream_port)
        self.cut_after = cut_after
        self.sent = 0
        self.requests = 0
        self.connections = 0
        self.dead = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

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
            try:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked in recv(); close() alone would not
            except OSError:
                pass
            conn.close()

    def _accept(self) -> None:
        while not self.dead.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        try:
            while not self.dead.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if not downstream and data[:4] in (b"GET ", b"HEAD", b"PUT "):
                    with self._lock:
                        self.requests += 1
                if downstream and self.cut_after is not None:
                    with self._lock:
                        room = self.cut_after - self.sent
                        self.sent += len(data)
                    if room <= len(data):
                        dst.sendall(data[: max(room, 0)])
                        self.kill()
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
