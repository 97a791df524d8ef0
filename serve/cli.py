"""The ``serve`` command: what ``docker run IMAGE serve`` and ``make serve`` start.

The listening socket is opened first, with the standard library only, before
fastapi/pydantic are imported (~0.4 s): SageMaker expects the port to accept
connections within 250 ms of start. Requests wait in the kernel's backlog until
uvicorn serves them a few hundred milliseconds later.

SIGTERM (SageMaker's stop) is handled at once: the worker stops taking jobs and
gets ``SHUTDOWN_GRACE`` seconds to finish the running one, which is failed and
recorded otherwise; then uvicorn closes the remaining connections and exits.
"""

from __future__ import annotations

import os
import signal
import socket
import sys


def listen_early(environ=os.environ) -> socket.socket:
    """Bind and listen on the port the settings will name (same variables, same defaults)."""
    host = environ.get("HOST", "0.0.0.0")
    port = int(environ.get("SAGEMAKER_BIND_TO_PORT") or environ.get("PORT") or 8080)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def main(argv: list[str] | None = None) -> int:
    """Start the server with the settings from the environment."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] != "serve":
        print(f"usage: serve [serve]  (got {' '.join(args)!r})", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    sock = listen_early()
    return _serve(sock)


def _serve(sock: socket.socket) -> int:
    import logging

    import uvicorn

    from serve.app import create_app
    from serve.logs import configure_logging
    from serve.settings import Settings

    settings = Settings()
    configure_logging(settings.log_level)
    log = logging.getLogger("serve")
    bound = sock.getsockname()[1]
    if bound != settings.port:
        log.error("bound port %d but the settings say %d", bound, settings.port)
        return 2
    app = create_app(settings)
    worker = app.state.worker

    class Server(uvicorn.Server):
        """uvicorn, plus: tell the worker to drain the moment a stop signal arrives."""

        def handle_exit(self, sig, frame) -> None:
            worker.begin_shutdown(settings.shutdown_grace)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_grace) + 4,
        access_log=False,
    )
    log.info("serving on %s:%d (model store %s, output %s)", settings.host, settings.port, settings.model_store, settings.output)
    # uvicorn re-raises the stop signal once it has shut down; with the default
    # handler that kills the process before finalizers run (leaking the worker
    # queues' semaphores). This handler turns it into a normal exit instead.
    signal.signal(signal.SIGTERM, _exit_after_shutdown)
    Server(config).run(sockets=[sock])
    return 0


def _exit_after_shutdown(signum, frame) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    raise SystemExit(main())
