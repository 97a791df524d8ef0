"""App factory: FastAPI app whose lifespan starts and stops the worker process."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from serve.errors import handle_any
from serve.routes import router
from serve.settings import Settings
from serve.worker import WorkerHandle


def create_app(settings: Settings | None = None, worker: WorkerHandle | None = None) -> FastAPI:
    """Build the app. The worker starts with the app and is stopped when the app shuts down."""
    settings = settings or Settings()
    worker = worker or WorkerHandle(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            worker.begin_shutdown(settings.shutdown_grace)
            worker.join(settings.shutdown_grace + 5)

    app = FastAPI(title="sd-endpoint", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.worker = worker
    app.include_router(router)
    app.add_exception_handler(Exception, handle_any)
    return app
