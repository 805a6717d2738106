"""Make a Hub dataset repo hold exactly a set of local files, in chunked commits that resume.

A push lists the repo's files with their hashes (the LFS sha256 of large files, the git blob
id of small ones), compares them with the local files and commits only the ones that differ,
a chunk of files per commit. A push cut short leaves whole commits behind, so the next push
finds those files equal and goes on with the rest; an LFS upload whose commit never landed is
found on the Hub's side by its sha256 and not sent again either. The card goes in the last
commit, with the deletion of data files the new layout no longer has: a repo whose card
describes this push holds all of its data.

Planning (what to upload, what to delete, in which commits) is pure; only `push` talks HTTP.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.hf_api import RepoFile

log = logging.getLogger(__name__)

REPO_TYPE = "dataset"
CARD = "README.md"
FILES_PER_COMMIT = 50
BYTES_PER_COMMIT = 2 << 30  # an interrupted push loses at most this much upload
READ_CHUNK = 8 << 20


@dataclass(frozen=True)
class LocalFile:
    path: str  # in the repo
    source: Path
    size: int
    sha256: str
    blob_id: str  # git's blob hash, what the Hub reports for files not stored in LFS


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    blob_id: str
    sha256: str | None  # set for LFS files


@dataclass(frozen=True)
class Plan:
    """Commits in order (files to add, repo paths to delete), and the files already there."""

    commits: list[tuple[list[LocalFile], list[str]]]
    unchanged: list[str]

    @property
    def uploads(self) -> list[LocalFile]:
        return [file for added, _ in self.commits for file in added]


def describe(path: str, source: Path) -> LocalFile:
    """A local file with the hashes the Hub lists, read once in chunks."""
    size = source.stat().st_size
    sha256 = hashlib.sha256()
    blob = hashlib.sha1(f"blob {size}\0".encode())  # git's object id: not used for security
    with source.open("rb") as handle:
        while chunk := handle.read(READ_CHUNK):
            sha256.update(chunk)
            blob.update(chunk)
    return LocalFile(path, source, size, sha256.hexdigest(), blob.hexdigest())


def same(local: LocalFile, remote: RemoteFile | None) -> bool:
    if remote is None or remote.size != local.size:
        return False
    return remote.sha256 == local.sha256 if remote.sha256 else remote.blob_id == local.blob_id


def plan_push(
    local: Sequence[LocalFile],
    remote: dict[str, RemoteFile],
    owned: str,
    files_per_commit: int = FILES_PER_COMMIT,
    bytes_per_commit: int = BYTES_PER_COMMIT,
) -> Plan:
    """The commits that make the repo hold `local`: changed files in chunks of at most
    `files_per_commit` files and about `bytes_per_commit` bytes, the card last with the deletion
    of remote files under `owned` (the data folder) that are not local. No commit when nothing
    differs. Files of the repo outside `owned` (.gitattributes, a user's own files) stay."""
    if files_per_commit < 1:
        raise ValueError("files per commit must be at least 1")
    changed = [f for f in local if not same(f, remote.get(f.path))]
    unchanged = [f.path for f in local if same(f, remote.get(f.path))]
    paths = {f.path for f in local}
    stale = sorted(p for p in remote if p.startswith(f"{owned.rstrip('/')}/") and p not in paths)
    data = [f for f in changed if f.path != CARD]
    card = [f for f in changed if f.path == CARD]
    commits: list[tuple[list[LocalFile], list[str]]] = []
    chunk: list[LocalFile] = []
    size = 0
    for file in data:
        if chunk and (len(chunk) == files_per_commit or size + file.size > bytes_per_commit):
            commits.append((chunk, []))
            chunk, size = [], 0
        chunk.append(file)
        size += file.size
    if chunk:
        commits.append((chunk, []))
    if card or stale:
        commits.append((card, stale))
    return Plan(commits, unchanged)


def remote_files(api: HfApi, repo: str, revision: str) -> dict[str, RemoteFile]:
    found: dict[str, RemoteFile] = {}
    for entry in api.list_repo_tree(repo, recursive=True, revision=revision, repo_type=REPO_TYPE):
        if isinstance(entry, RepoFile):
            sha256 = entry.lfs.sha256 if entry.lfs is not None else None
            found[entry.path] = RemoteFile(entry.path, entry.size, entry.blob_id, sha256)
    return found


@dataclass(frozen=True)
class Pushed:
    repo: str
    commit: str
    commits: int
    uploaded: list[str]
    unchanged: list[str]
    deleted: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "repo": self.repo,
            "commit": self.commit,
            "commits": self.commits,
            "uploaded": self.uploaded,
            "unchanged": self.unchanged,
            "deleted": self.deleted,
        }


def _operations(added: list[LocalFile], deleted: list[str]) -> Iterator[Any]:
    for file in added:
        yield CommitOperationAdd(path_in_repo=file.path, path_or_fileobj=str(file.source))
    for path in deleted:
        yield CommitOperationDelete(path_in_repo=path)


def push(
    api: HfApi,
    repo: str,
    local: Sequence[LocalFile],
    *,
    private: bool,
    owned: str,
    title: str,
    files_per_commit: int = FILES_PER_COMMIT,
    bytes_per_commit: int = BYTES_PER_COMMIT,
) -> Pushed:
    """Create the dataset repo if needed and commit what differs from `local` (see `plan_push`).

    Each commit names the previous one as its parent, so a push that races another one fails
    instead of interleaving with it."""
    api.create_repo(repo, repo_type=REPO_TYPE, private=private, exist_ok=True)
    head = api.repo_info(repo, repo_type=REPO_TYPE).sha
    if head is None:
        raise RuntimeError(f"the Hub did not say which commit {repo} is at")
    remote = remote_files(api, repo, head)
    plan = plan_push(local, remote, owned, files_per_commit, bytes_per_commit)
    log.info(
        "%s: %d files to upload in %d commits, %d unchanged",
        repo, len(plan.uploads), len(plan.commits), len(plan.unchanged),
    )  # fmt: skip
    deleted: list[str] = []
    for number, (added, removed) in enumerate(plan.commits, start=1):
        info = api.create_commit(
            repo,
            list(_operations(added, removed)),
            commit_message=f"{title} ({number}/{len(plan.commits)})",
            repo_type=REPO_TYPE,
            parent_commit=head,
        )
        head = info.oid
        deleted += removed
        log.info("%s: commit %d/%d: %d files added, %d deleted", repo, number, len(plan.commits),
                 len(added), len(removed))  # fmt: skip
    return Pushed(repo, head, len(plan.commits), [f.path for f in plan.uploads], plan.unchanged, deleted)
