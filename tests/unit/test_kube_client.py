"""The operator's Kubernetes client against an HTTP API that answers like an API server would.

An API server that rotates tokens and refuses a kind by RBAC cannot run here; kmock grants
everything, so this one is a few aiohttp routes speaking the same JSON and status codes:
401 for a stale bearer token, 403 for ScaledObjects (a Role without KEDA), 404 for what is gone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import kopf
import pytest
from aiohttp import web

from cosmoforge.operator.kube import DEPLOYMENT, JOB, SCALED_OBJECT, Kube, KubeError, TokenSource

NS = "gen"


class Api:
    def __init__(self) -> None:
        self.valid_token = "token-1"
        self.seen: list[str] = []

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.authenticate])
        app.router.add_get("/apis/apps/v1/namespaces/{ns}/deployments", self.deployments)
        app.router.add_route(
            "*", "/apis/keda.sh/v1alpha1/namespaces/{ns}/scaledobjects{rest:.*}", self.forbidden
        )
        app.router.add_route("*", "/apis/batch/v1/namespaces/{ns}/jobs{rest:.*}", self.forbidden)
        return app

    @web.middleware
    async def authenticate(self, request: web.Request, handler: web.RequestHandler) -> web.StreamResponse:
        given = request.headers.get("Authorization", "")
        self.seen.append(given)
        if given != f"Bearer {self.valid_token}":
            return web.json_response({"kind": "Status", "code": 401, "reason": "Unauthorized"}, status=401)
        return await handler(request)

    async def deployments(self, request: web.Request) -> web.Response:
        item = {"metadata": {"name": "d", "labels": {"run": "r"}}}
        return web.json_response({"kind": "DeploymentList", "items": [item]})

    async def forbidden(self, request: web.Request) -> web.Response:
        return web.json_response({"kind": "Status", "code": 403, "reason": "Forbidden"}, status=403)


@pytest.fixture
async def api() -> AsyncIterator[tuple[Api, str]]:
    state = Api()
    runner = web.AppRunner(state.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield state, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def client(url: str, token_file: Path) -> Kube:
    info = kopf.ConnectionInfo(server=url, token="login-token")
    return Kube(lambda: info, TokenSource(token_file, max_age=3600))


async def test_a_rotated_token_is_read_again_after_a_401(api: tuple[Api, str], tmp_path: Path) -> None:
    state, url = api
    token_file = tmp_path / "token"
    token_file.write_text("token-1\n")
    kube = client(url, token_file)
    try:
        assert len(await kube.list(DEPLOYMENT, NS, {"run": "r"})) == 1
        # The kubelet rotates the file; the server stops accepting the old token.
        token_file.write_text("token-2\n")
        state.valid_token = "token-2"
        assert len(await kube.list(DEPLOYMENT, NS, {"run": "r"})) == 1
        assert state.seen[-2:] == ["Bearer token-1", "Bearer token-2"]
        state.valid_token = "token-3"  # a token nobody has: the error surfaces
        with pytest.raises(KubeError) as refused:
            await kube.list(DEPLOYMENT, NS, {"run": "r"})
        assert refused.value.status == 401
    finally:
        await kube.close()


async def test_forbidden_optional_kinds_read_as_absent(api: tuple[Api, str], tmp_path: Path) -> None:
    _, url = api
    token_file = tmp_path / "token"
    token_file.write_text("token-1")
    kube = client(url, token_file)
    try:
        assert await kube.list(SCALED_OBJECT, NS, {"run": "r"}) == []
        assert await kube.delete(SCALED_OBJECT, NS, "r-scaler") is False
        # A kind the operator must manage stays an error: a 403 there is a broken Role.
        with pytest.raises(KubeError) as refused:
            await kube.list(JOB, NS, {"run": "r"})
        assert refused.value.status == 403
    finally:
        await kube.close()


async def test_without_a_token_file_the_login_token_is_used(api: tuple[Api, str], tmp_path: Path) -> None:
    state, url = api
    state.valid_token = "login-token"
    kube = client(url, tmp_path / "absent")
    try:
        assert len(await kube.list(DEPLOYMENT, NS, {"run": "r"})) == 1
    finally:
        await kube.close()
