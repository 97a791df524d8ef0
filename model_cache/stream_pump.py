"""Many ranged GET bodies → one file, moved by a few reader threads over non-blocking sockets.

Why not a thread per stream: each pays a GIL hand-off on every ``recv`` and every
``pwrite`` (tens of thousands per GiB). On a busy 2-core VM those wake-ups cost more than the
copies themselves (perf: ``finish_task_switch`` and ``_raw_spin_unlock_irqrestore`` on top; a
2 GiB download took 3.5–6 s against s5cmd's 2.7 s). A reader that ``select``s over its
sockets and drains each ready one hands the GIL over rarely: the same download takes 1.9–2.3 s
(measured side by side, ``bench/s3_fetch``). Requests are still sent by threads (botocore
signs and waits for headers there); only the body bytes go through the pump.

The body is read straight from the connection's socket, past urllib3 and ``http.client``:
botocore never asks for decoding, ranged GETs have a Content-Length, and bytes that
``http.client`` had already buffered behind the headers are taken first. Once a range is
complete the connection goes back to botocore's pool; a stream that fails is closed.
TLS sockets work the same way (``SSLWantRead`` is "no data yet"; decrypted bytes still held
by the TLS layer are read before the socket is polled again).
"""

from __future__ import annotations

import io
import os
import queue
import selectors
import socket
import ssl
import threading
import time
from dataclasses import dataclass

# One read buffer for every stream. 128 KiB: the bytes recv just wrote are still in the core's
# L2 (512 KiB here) when pwrite copies them into the page cache; 256 KiB and 1 MiB buffers
# measured 1.6–1.8× slower, 64 KiB slightly slower (more calls).
BUFFER_SIZE = 128 * 1024
# Reads from one socket before the others get a turn (8 MiB): draining beats re-polling.
_DRAIN = 64
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


@dataclass
class Part:
    """One range of the object: ``[start, end]`` inclusive; ``pos`` is the next byte to write."""

    index: int
    start: int
    end: int
    pos: int
    attempt: int = 0

    @property
    def left(self) -> int:
        return self.end + 1 - self.pos


class SocketBody:
    """A GetObject body read from its socket directly; :meth:`of` says whether that is possible."""

    def __init__(self, body, http, fp, sock: socket.socket):
        self.body, self._http, self._fp, self.sock = body, http, fp, sock
        self._timeout = sock.gettimeout()

    @classmethod
    def of(cls, body, response: dict) -> SocketBody | None:
        """The direct reader for a botocore body, or ``None`` for anything unexpected (another HTTP
        stack, a wrapped body in tests, an encoded or chunked body): then the caller reads it normally."""
        encoding = (response.get("ContentEncoding") or "identity").lower()
        http = getattr(getattr(body, "_raw_stream", None), "_fp", None)  # http.client.HTTPResponse
        fp = getattr(http, "fp", None)
        sock = getattr(getattr(fp, "raw", None), "_sock", None)
        if encoding not in ("", "identity") or not isinstance(fp, io.BufferedReader) or not isinstance(sock, socket.socket):
            return None
        if getattr(http, "chunked", True) or not isinstance(getattr(http, "length", None), int):
            return None
        return cls(body, http, fp, sock)

    @property
    def timeout(self) -> float:
        """How long the stream may go without a byte before it counts as dropped (the client's read timeout)."""
        return self._timeout if self._timeout else 60.0

    def buffered(self, limit: int) -> bytes:
        """The body bytes ``http.client`` read along with the headers (waits for the first bytes if none).

        Called before the socket goes non-blocking, so that every later byte comes from the socket."""
        return self._fp.read(min(len(self._fp.peek(1)), limit))

    def start(self) -> None:
        self.sock.setblocking(False)

    def holds_decrypted(self) -> bool:
        """TLS only: bytes already decrypted and buffered, which ``select`` cannot see."""
        pending = getattr(self.sock, "pending", None)
        return bool(pending and pending())

    def finish(self) -> None:
        """Every byte of the range was read: give the connection back to the pool for the next request."""
        try:
            self.sock.settimeout(self._timeout)
            self._http.length = 0
            self._http.read()  # http.client now sees a complete response and drops its file object
            release = getattr(self.body._raw_stream, "release_conn", None)
            if self._http.isclosed() and callable(release):
                release()
                return
        except Exception:  # noqa: BLE001 — any doubt about the connection's state: do not reuse it
            pass
        self.discard()

    def discard(self) -> None:
        """Close the connection (half-read or failed): it cannot carry another request."""
        try:
            self.body.close()
        except Exception:  # noqa: BLE001 — closing a broken connection may itself fail
            pass


class Pump:
    """The reading thread's loop. Other threads :meth:`post` events (a stream opened, a part done
    or failed by a fallback reader); :meth:`step` reads whatever is ready and returns the events."""

    def __init__(self, fd: int, buffer_size: int = BUFFER_SIZE):
        self._fd = fd
        self._view = memoryview(bytearray(buffer_size))
        self._selector = selectors.DefaultSelector()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._streams: dict[int, tuple[Part, SocketBody, list[float]]] = {}
        self._hot: set[int] = set()  # TLS streams with decrypted bytes waiting
        self._lock = threading.Lock()
        self._closed = False

    def post(self, kind: str, part: Part, payload=None) -> None:
        """From any thread: ``("open", part, SocketBody)``, ``("done", part)`` or ``("error", part, exc)``."""
        with self._lock:
            if self._closed:  # the transfer is over: a late stream is just closed
                if kind == "open":
                    payload.discard()
                return
            self._inbox.put((kind, part, payload))
        self.wake()

    def wake(self) -> None:
        """Make a waiting :meth:`step` return now (any thread)."""
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:  # the pipe is full: the pump is awake anyway
            pass

    def step(self, max_wait: float = 1.0) -> list[tuple[str, Part, object]]:
        """Wait for work (≤ ``max_wait`` s), move the bytes that are ready, return the events."""
        events: list[tuple[str, Part, object]] = []
        for key, _mask in self._selector.select(0 if self._hot else max_wait):
            if key.data is None:
                self._take_inbox(events)
            else:
                self._hot.discard(key.fd)
                self._drain(key.fd, events)
        for fd in list(self._hot):
            self._hot.discard(fd)
            if fd in self._streams:
                self._drain(fd, events)
        self._check_stalls(events)
        return events

    def _take_inbox(self, events: list) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                kind, part, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind != "open":
                events.append((kind, part, payload))
                continue
            body: SocketBody = payload
            try:
                body.start()
                fd = body.sock.fileno()
                self._selector.register(fd, selectors.EVENT_READ, part)
            except (OSError, ValueError) as exc:  # the socket died in between
                body.discard()
                events.append(("error", part, ConnectionError(f"connection lost before reading: {exc}")))
                continue
            self._streams[fd] = (part, body, [time.monotonic()])

    def _drain(self, fd: int, events: list) -> None:
        """Read ``fd`` until it has nothing more (or ``_DRAIN`` reads), writing each chunk at its offset.

        The hot loop of every download (tens of thousands of rounds per GiB): locals only."""
        part, body, seen = self._streams[fd]
        view, out, recv_into = self._view, self._fd, body.sock.recv_into
        size, pos, stop = len(view), part.pos, part.end + 1
        began = pos
        try:
            for _ in range(_DRAIN):
                try:
                    count = recv_into(view if stop - pos >= size else view[: stop - pos])
                except _WOULD_BLOCK:
                    break
                except OSError as exc:  # reset, TLS failure: the caller decides whether to retry
                    self._drop(fd)
                    events.append(("error", part, exc))
                    return
                if not count:
                    self._drop(fd)
                    events.append(("error", part, ConnectionError(f"connection closed {stop - pos} bytes before the end of the range")))
                    return
                written = os.pwrite(out, view[:count] if count < size else view, pos)
                while written < count:  # pwrite may write less than asked (signals, quotas)
                    written += os.pwrite(out, view[written:count], pos + written)
                pos += count
                if pos >= stop:
                    part.pos = pos
                    self._drop(fd, finished=True)
                    events.append(("done", part, None))
                    return
        finally:
            part.pos = pos
        if pos != began:
            seen[0] = time.monotonic()
        if body.holds_decrypted():
            self._hot.add(fd)

    def _check_stalls(self, events: list) -> None:
        now = time.monotonic()
        for fd, (part, body, seen) in list(self._streams.items()):
            if now - seen[0] > body.timeout:
                self._drop(fd)
                events.append(("error", part, TimeoutError(f"no data for {body.timeout:.0f} s")))

    def _drop(self, fd: int, *, finished: bool = False) -> None:
        part, body, _seen = self._streams.pop(fd)
        self._hot.discard(fd)
        self._selector.unregister(fd)
        if finished:
            body.finish()
        else:
            body.discard()

    def close(self) -> None:
        """Close every open stream (a failed or finished transfer); later posts are discarded."""
        with self._lock:
            self._closed = True
        for fd in list(self._streams):
            self._drop(fd)
        while True:
            try:
                kind, _part, payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "open":
                payload.discard()
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


class Readers:
    """``count`` pump threads over one file: a stream goes to the least loaded one, and all their
    events come back to the caller's thread through one queue (a handful per part, not per chunk).

    One reader moves ~1.5 GB/s of plain HTTP on one of this VM's cores; several let a big
    instance use more cores for the copies (and TLS decryption), at the price of a GIL
    hand-off now and then between readers (on 2 cores, 2 readers measured ~10 % slower than 1).
    """

    def __init__(self, fd: int, count: int):
        self._pumps = [Pump(fd) for _ in range(max(1, count))]
        self._load = [0] * len(self._pumps)
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"s3-read-{i}", daemon=True) for i in range(len(self._pumps))
        ]
        for thread in self._threads:
            thread.start()

    def pick(self) -> Pump:
        """The pump for one more stream (the caller's thread only)."""
        index = self._load.index(min(self._load))
        self._load[index] += 1
        return self._pumps[index]

    def next_event(self, timeout: float) -> tuple[str, Part, object] | None:
        """The next ``("done" | "error", part, payload)``; ``None`` after ``timeout`` s; a reader's crash is raised."""
        try:
            index, kind, part, payload = self._events.get(timeout=timeout)
        except queue.Empty:
            return None
        if kind == "fatal":
            raise payload
        self._load[index] -= 1
        return kind, part, payload

    def _run(self, index: int) -> None:
        pump = self._pumps[index]
        try:
            while not self._stop.is_set():
                for event in pump.step():
                    self._events.put((index, *event))
        except BaseException as exc:  # noqa: BLE001 — e.g. the disk is full: the caller raises it
            self._events.put((index, "fatal", None, exc))

    def close(self) -> None:
        """Stop the readers and close every stream still open."""
        self._stop.set()
        for pump in self._pumps:
            pump.wake()
        for thread in self._threads:
            thread.join()
        for pump in self._pumps:
            pump.close()
