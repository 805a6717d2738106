"""The model server on a loopback port in a background thread, for tests and benchmarks.

The same app and the same uvicorn as `cosmo serve-model`, started and stopped from code, so a
test talks HTTP to the real server without a child process.
"""

from __future__ import annotations

import threading
import time
from typing import Self

import uvicorn

from cosmoforge.services.modelserver.app import create_app
from cosmoforge.services.modelserver.engine import Engine


class BackgroundServer:
    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 0):
        self.engine = engine
        self.host = host
        self.port = port
        config = uvicorn.Config(
            create_app(engine), host=host, port=port, log_level="warning", access_log=False
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> Self:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the model server did not start on {self.host}:{self.port}")
            time.sleep(0.01)
        self.port = int(self._server.servers[0].sockets[0].getsockname()[1])
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
