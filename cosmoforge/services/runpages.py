"""Run pages over HTTP: the report page of each run a RunManager drives, refreshed while it runs.

A thin shell: the page is `report.page.render_page(report.data.collect(...))`, the same
document `cosmo report` writes, with the manager's live counts laid over what storage says. The
dispatcher serves it beside its gRPC port (`--ui-port`), and `cosmo run --ui` for an embedded run.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from cosmoforge.report.data import collect
from cosmoforge.report.page import POLICY, render_page
from cosmoforge.runs.manager import RunManager
from cosmoforge.runs.status import RunStatus
from cosmoforge.storage import RunStore

REFRESH_SECONDS = 10
HEADERS = {"Content-Security-Policy": POLICY, "Cache-Control": "no-store"}


@dataclass(frozen=True)
class RunPages:
    """What the pages need of a run driver: the runs it knows, and a run's live status."""

    statuses: Callable[[], list[RunStatus]]
    samples: int = 300
    gpu_hour_price: float | None = None

    @classmethod
    def of(cls, manager: RunManager, **options: Any) -> RunPages:
        return cls(manager.list_runs, **options)


def live_counts(status: RunStatus) -> dict[str, int]:
    """The dispatcher's counts, which are ahead of storage while workers hold unflushed shards."""
    remaining = max(0, status.prompts - status.generated - status.failed)
    return {
        "prompts": status.prompts,
        "generated": status.generated,
        "failed": status.failed,
        "remaining": remaining,
    }


def create_app(pages: RunPages) -> Starlette:
    async def index(request: Request) -> Response:
        rows = "".join(
            f'<li><a href="/runs/{html.escape(s.run)}">{html.escape(s.run)}</a> '
            f"{html.escape(s.phase)}: {s.generated} of {s.prompts} generated</li>"
            for s in pages.statuses()
        )
        body = f"<!doctype html><title>cosmoforge runs</title><h1>Runs</h1><ul>{rows or '<li>none</li>'}</ul>"
        return HTMLResponse(body, headers=HEADERS)

    async def run_page(request: Request) -> Response:
        name = request.path_params["name"]
        status = next((s for s in pages.statuses() if s.run == name), None)
        if status is None or not status.output_uri:
            return HTMLResponse(f"no run named {html.escape(name)}", status_code=404, headers=HEADERS)
        parent, _, run = status.output_uri.rstrip("/").rpartition("/")
        store = RunStore.open(parent, run)
        live = live_counts(status) if not status.final else None
        data = await asyncio.to_thread(collect, store, pages.samples, live, pages.gpu_hour_price)
        data["phase"] = status.phase
        refresh = None if status.final else REFRESH_SECONDS
        return HTMLResponse(render_page(data, refresh_seconds=refresh), headers=HEADERS)

    return Starlette(routes=[Route("/", index), Route("/runs/{name:path}", run_page)])


@contextlib.asynccontextmanager
async def serving(pages: RunPages, host: str, port: int) -> AsyncIterator[int]:
    """Serve the pages on host:port (0: a free port) in this event loop; yields the bound port."""
    import uvicorn

    config = uvicorn.Config(create_app(pages), host=host, port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(), name="run-pages")
    while not server.started:
        if task.done():
            task.result()  # raises the reason it could not start (e.g. the port is taken)
        await asyncio.sleep(0.05)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield int(bound)
    finally:
        server.should_exit = True
        await task
