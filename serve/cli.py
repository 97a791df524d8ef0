"""The ``serve`` command: what ``docker run IMAGE serve`` and ``make serve`` start.

SIGTERM (SageMaker's stop) is handled at once: the worker stops taking jobs and
gets ``SHUTDOWN_GRACE`` seconds to finish the running one, which is failed and
recorded otherwise; then uvicorn closes the remaining connections and exits.
"""

from __future__ import annotations

import logging
import os
import sys

import uvicorn

from serve.app import create_app
from serve.logs import configure_logging
from serve.settings import Settings

log = logging.getLogger("serve")


class _Server(uvicorn.Server):
    """uvicorn, plus: tell the worker to drain the moment a stop signal arrives."""

    def __init__(self, config: uvicorn.Config, on_exit):
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)


def main(argv: list[str] | None = None) -> int:
    """Start the server with the settings from the environment."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] != "serve":
        print(f"usage: serve [serve]  (got {' '.join(args)!r})", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    settings = Settings()
    configure_logging(settings.log_level)
    app = create_app(settings)
    worker = app.state.worker
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_grace) + 4,
        access_log=False,
    )
    server = _Server(config, on_exit=lambda: worker.begin_shutdown(settings.shutdown_grace))
    log.info("serving on %s:%d (model store %s, output %s)", settings.host, settings.port, settings.model_store, settings.output)
    server.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
