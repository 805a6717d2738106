"""A local stand-in for the Hugging Face Hub, for tests: the real Hub cannot be reached from here.

It speaks the HTTP calls `huggingface_hub` (the real client, unpatched) makes to publish a
dataset, with the Hub's paths, payloads and error headers: create a repo (`/api/repos/create`,
409 when it exists), repo info at a revision, the recursive tree listing (paginated with a Link
header, as the Hub pages it) and paths-info, README metadata validation, preupload (LFS or
regular, from the repo's .gitattributes), the git-LFS batch API with basic transfer (PUT to an
upload URL, then verify), and commits as ndjson (header, file, lfsFile, deletedFile,
deletedFolder; 412 when the parent commit is not the head). Files are stored on disk by
content hash, and commits as whole trees, so a test can compare what a repo holds.

For fault tests it counts every LFS upload and commit request, and answers 500 to the commit
requests whose numbers are in `fail_commits`.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
import yaml
from fastapi import FastAPI, Request, Response

from cosmoforge.queue import free_port

LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"
GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in ("*.parquet", "*.arrow", "*.bin", "*.safetensors", "*.zst", "*.gz")
)
REGULAR_LIMIT = 10 * 1024 * 1024  # larger files go to LFS whatever their name


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


@dataclass(frozen=True)
class Entry:
    path: str
    size: int
    blob_id: str
    sha256: str | None = None  # LFS files

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"type": "file", "oid": self.blob_id, "size": self.size, "path": self.path}
        if self.sha256 is not None:
            pointer = LFS_POINTER.format(oid=self.sha256, size=self.size)
            data["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": len(pointer)}
        return data


@dataclass
class Commit:
    oid: str
    message: str
    tree: dict[str, Entry]


@dataclass
class Repo:
    id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)

    @property
    def head(self) -> Commit:
        return self.commits[-1]


def _error(status: int, message: str, code: str | None = None) -> Response:
    headers = {"X-Error-Code": code, "X-Error-Message": message} if code else {"X-Error-Message": message}
    return Response(json.dumps({"error": message}), status, headers=headers, media_type="application/json")


class HubServer:
    """The stand-in Hub on a loopback port; `token` is the one token it accepts for writes."""

    def __init__(self, root: Path, token: str, user: str = "cosmo-tester", page_size: int = 1000):
        self.root, self.token, self.user, self.page_size = root, token, user, page_size
        self.repos: dict[str, Repo] = {}
        self.uploads: list[str] = []  # sha256 of every LFS object PUT
        self.commit_requests = 0
        self.fail_commits: set[int] = set()
        self.authorizations: set[str] = set()  # every Authorization header seen
        self.port = free_port()
        (root / "lfs").mkdir(parents=True, exist_ok=True)
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        self.server = uvicorn.Server(
            uvicorn.Config(self._app(), host="127.0.0.1", port=self.port, log_level="error")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> HubServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the stand-in Hub did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    # --- what a test reads ----------------------------------------------------------------

    def files(self, repo: str) -> dict[str, bytes]:
        """The repo's files at its head, with their content."""
        return {path: self.content(entry) for path, entry in self.repos[repo].head.tree.items()}

    def content(self, entry: Entry) -> bytes:
        if entry.sha256 is not None:
            return (self.root / "lfs" / entry.sha256).read_bytes()
        return (self.root / "blobs" / entry.blob_id).read_bytes()

    # --- the Hub's side ---------------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        if header:
            self.authorizations.add(header)
        return header == f"Bearer {self.token}"

    def _commit(self, repo: Repo, message: str, tree: dict[str, Entry]) -> Commit:
        parent = repo.commits[-1].oid if repo.commits else ""
        listing = json.dumps({p: e.as_json() for p, e in sorted(tree.items())})
        oid = hashlib.sha1(f"{parent}\n{message}\n{listing}".encode()).hexdigest()
        commit = Commit(oid, message, tree)
        repo.commits.append(commit)
        return commit

    def _store_blob(self, data: bytes) -> Entry:
        blob_id = git_blob_id(data)
        (self.root / "blobs" / blob_id).write_bytes(data)
        return Entry("", len(data), blob_id)

    def _revision(self, repo: Repo, revision: str) -> Commit | None:
        if revision == "main":
            return repo.head
        return next((c for c in repo.commits if c.oid == revision), None)

    def _lfs_patterns(self, repo: Repo) -> list[str]:
        entry = repo.head.tree.get(".gitattributes")
        text = self.content(entry).decode() if entry else ""
        return [line.split()[0] for line in text.splitlines() if "filter=lfs" in line]

    def _lookup(self, request: Request, ns: str, name: str, write: bool) -> Repo | Response:
        authorized = self._authorized(request)
        if write and not authorized:
            return _error(401, "Invalid credentials in Authorization header")
        repo = self.repos.get(f"{ns}/{name}")
        if repo is None or (repo.private and not authorized):
            return _error(404, "Repository not found", "RepoNotFound")
        return repo

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/api/repos/create")
        async def create_repo(request: Request) -> Response:
            if not self._authorized(request):
                return _error(401, "Invalid credentials in Authorization header")
            body = await request.json()
            repo_id = f"{body.get('organization') or self.user}/{body['name']}"
            url = f"{self.url}/datasets/{repo_id}"
            if body.get("type") != "dataset":
                return _error(400, "this stand-in Hub keeps dataset repos only")
            if repo_id in self.repos:
                return Response(
                    json.dumps({"error": "You already created this dataset repo", "url": url}), 409
                )
            repo = Repo(repo_id, bool(body.get("private")))
            entry = self._store_blob(GITATTRIBUTES.encode())
            self._commit(
                repo, "initial commit", {".gitattributes": Entry(".gitattributes", entry.size, entry.blob_id)}
            )
            self.repos[repo_id] = repo
            return Response(
                json.dumps({"url": url, "name": repo_id, "id": repo_id}), media_type="application/json"
            )

        async def info(request: Request, ns: str, name: str, revision: str) -> Response:
            repo = self._lookup(request, ns, name, write=False)
            if isinstance(repo, Response):
                return repo
            commit = self._revision(repo, revision)
            if commit is None:
                return _error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            body = {
                "id": repo.id,
                "private": repo.private,
                "sha": commit.oid,
                "siblings": [{"rfilename": path} for path in sorted(commit.tree)],
            }
            return Response(json.dumps(body), media_type="application/json")

        @app.get("/api/datasets/{ns}/{name}")
        async def dataset_info(request: Request, ns: str, name: str) -> Response:
            return await info(request, ns, name, "main")

        @app.get("/api/datasets/{ns}/{name}/revision/{revision}")
        async def dataset_info_at(request: Request, ns: str, name: str, revision: str) -> Response:
            return await info(request, ns, name, revision)

        async def tree(request: Request, ns: str, name: str, revision: str, path: str) -> Response:
            repo = self._lookup(request, ns, name, write=False)
            if isinstance(repo, Response):
                return repo
            commit = self._revision(repo, revision)
            if commit is None:
                return _error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            recursive = request.query_params.get("recursive", "false").lower() == "true"
            prefix = f"{path.strip('/')}/" if path else ""
            entries: dict[str, dict[str, Any]] = {}
            for file_path, entry in sorted(commit.tree.items()):
                if not file_path.startswith(prefix):
                    continue
                parts = file_path[len(prefix) :].split("/")
                for depth in range(1, len(parts)):  # the folders on the way
                    folder = prefix + "/".join(parts[:depth])
                    if recursive or depth == 1:
                        oid = hashlib.sha1(folder.encode()).hexdigest()
                        entries.setdefault(
                            folder, {"type": "directory", "oid": oid, "size": 0, "path": folder}
                        )
                if recursive or len(parts) == 1:
                    entries[file_path] = entry.as_json()
            listing = [entries[key] for key in sorted(entries)]
            start = int(request.query_params.get("cursor", "0"))
            page = listing[start : start + self.page_size]
            headers = {}
            if start + self.page_size < len(listing):
                query = f"recursive={str(recursive).lower()}&cursor={start + self.page_size}"
                headers["Link"] = f'<{str(request.url).split("?")[0]}?{query}>; rel="next"'
            return Response(json.dumps(page), headers=headers, media_type="application/json")

        @app.get("/api/datasets/{ns}/{name}/tree/{revision}")
        async def tree_root(request: Request, ns: str, name: str, revision: str) -> Response:
            return await tree(request, ns, name, revision, "")

        @app.get("/api/datasets/{ns}/{name}/tree/{revision}/{path:path}")
        async def tree_path(request: Request, ns: str, name: str, revision: str, path: str) -> Response:
            return await tree(request, ns, name, revision, path)

        @app.post("/api/datasets/{ns}/{name}/paths-info/{revision}")
        async def paths_info(request: Request, ns: str, name: str, revision: str) -> Response:
            repo = self._lookup(request, ns, name, write=False)
            if isinstance(repo, Response):
                return repo
            commit = self._revision(repo, revision)
            if commit is None:
                return _error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            form = await request.form()
            paths = [str(p) for p in form.getlist("paths")]
            found = [commit.tree[p].as_json() for p in paths if p in commit.tree]
            return Response(json.dumps(found), media_type="application/json")

        @app.post("/api/validate-yaml")
        async def validate_yaml(request: Request) -> Response:
            content = (await request.json())["content"]
            errors = []
            if content.startswith("---\n"):
                try:
                    metadata = yaml.safe_load(content[4:].split("\n---\n", 1)[0]) or {}
                    for config in metadata.get("configs", []):
                        if not config.get("config_name") or not isinstance(config.get("data_files"), list):
                            errors.append(
                                {"message": f'"configs" entry {config} needs config_name and data_files'}
                            )
                except yaml.YAMLError as error:
                    errors.append({"message": f"invalid YAML: {error}"})
            body = json.dumps({"errors": errors, "warnings": []})
            return Response(body, 400 if errors else 200, media_type="application/json")

        @app.post("/api/datasets/{ns}/{name}/preupload/{revision}")
        async def preupload(request: Request, ns: str, name: str, revision: str) -> Response:
            repo = self._lookup(request, ns, name, write=True)
            if isinstance(repo, Response):
                return repo
            patterns = self._lfs_patterns(repo)
            files = []
            for file in (await request.json())["files"]:
                base = file["path"].rsplit("/", 1)[-1]
                lfs = file["size"] > REGULAR_LIMIT or any(fnmatch.fnmatch(base, p) for p in patterns)
                existing = repo.head.tree.get(file["path"])
                oid = None
                if existing is not None:
                    oid = existing.sha256 if lfs and existing.sha256 else existing.blob_id
                files.append(
                    {
                        "path": file["path"],
                        "uploadMode": "lfs" if lfs else "regular",
                        "shouldIgnore": False,
                        "oid": oid,
                    }
                )
            return Response(
                json.dumps({"files": files, "commitOid": repo.head.oid}), media_type="application/json"
            )

        @app.post("/datasets/{ns}/{name}.git/info/lfs/objects/batch")
        async def lfs_batch(request: Request, ns: str, name: str) -> Response:
            repo = self._lookup(request, ns, name, write=True)
            if isinstance(repo, Response):
                return repo
            body = await request.json()
            if body.get("operation") != "upload" or "basic" not in body.get("transfers", ["basic"]):
                return _error(400, "this stand-in Hub only takes basic LFS uploads")
            objects = []
            for obj in body["objects"]:
                answer: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                if not (self.root / "lfs" / obj["oid"]).exists():  # known objects need no upload
                    href = f"{self.url}/lfs-storage/{obj['oid']}"
                    answer["actions"] = {
                        "upload": {"href": href},
                        "verify": {"href": f"{self.url}/lfs-verify/{ns}/{name}"},
                    }
                objects.append(answer)
            return Response(
                json.dumps({"transfer": "basic", "objects": objects}),
                media_type="application/vnd.git-lfs+json",
            )

        @app.put("/lfs-storage/{oid}")
        async def lfs_upload(request: Request, oid: str) -> Response:
            # Object storage's side: the real Hub hands out a presigned URL, no Hub token needed.
            data = await request.body()
            if hashlib.sha256(data).hexdigest() != oid:
                return _error(400, "content does not match its sha256")
            (self.root / "lfs" / oid).write_bytes(data)
            self.uploads.append(oid)
            return Response(status_code=200)

        @app.post("/lfs-verify/{ns}/{name}")
        async def lfs_verify(request: Request, ns: str, name: str) -> Response:
            body = await request.json()
            stored = self.root / "lfs" / body["oid"]
            if not stored.exists() or stored.stat().st_size != body["size"]:
                return _error(404, "object not found")
            return Response(json.dumps({"ok": True}), media_type="application/json")

        @app.post("/api/datasets/{ns}/{name}/commit/{revision}")
        async def commit(request: Request, ns: str, name: str, revision: str) -> Response:
            repo = self._lookup(request, ns, name, write=True)
            if isinstance(repo, Response):
                return repo
            self.commit_requests += 1
            if self.commit_requests in self.fail_commits:
                return _error(500, "Internal Error - injected by the test")
            if revision != "main":
                return _error(400, "this stand-in Hub commits to main only")
            lines = [
                json.loads(line) for line in (await request.body()).decode().splitlines() if line.strip()
            ]
            if not lines or lines[0]["key"] != "header":
                return _error(400, "the first line must be the header")
            header = lines[0]["value"]
            parent = header.get("parentCommit")
            if parent and parent != repo.head.oid:
                return _error(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(repo.head.tree)
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                path = value["path"]
                if key == "file":
                    entry = self._store_blob(base64.b64decode(value["content"]))
                    tree[path] = Entry(path, entry.size, entry.blob_id)
                elif key == "lfsFile":
                    stored = self.root / "lfs" / value["oid"]
                    if not stored.exists():
                        return _error(400, f"LFS object {value['oid']} of {path} was never uploaded")
                    size = stored.stat().st_size
                    pointer = LFS_POINTER.format(oid=value["oid"], size=size).encode()
                    tree[path] = Entry(path, size, git_blob_id(pointer), value["oid"])
                elif key == "deletedFile":
                    if path not in tree:
                        return _error(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del tree[path]
                elif key == "deletedFolder":
                    tree = {p: e for p, e in tree.items() if not p.startswith(path.rstrip("/") + "/")}
                else:
                    return _error(400, f"unknown commit operation {key!r}")
            done = self._commit(repo, header["summary"], tree)
            body = {
                "success": True,
                "commitOid": done.oid,
                "commitUrl": f"{self.url}/datasets/{repo.id}/commit/{done.oid}",
                "pullRequestUrl": None,
            }
            return Response(json.dumps(body), media_type="application/json")

        return app
