"""Training's bridge between object storage and the local files torch, transformers and lighteval use.

Those libraries read and write local folders only (`save_pretrained`, `from_pretrained`, a
lighteval model name), while a run's folder may live in object storage. Every training and
evaluation path therefore works in a local folder (`staging`) and moves whole files in and out
through fsspec: a file lands with one upload, so a reader never sees half of one, and what must
appear together (a resume state) is written as one file. fsspec loads inside the functions, so
the CPU trainer imports this module where only torch and transformers are installed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import fsspec


def is_remote(uri: str | Path) -> bool:
    """True for object-storage URIs (s3://, gs://, memory://, ...); local paths and file:// are not."""
    text = str(uri)
    return "://" in text and not text.startswith("file://")


def filesystem(uri: str | Path) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and path of a URI or local path (made absolute)."""
    from fsspec.core import url_to_fs

    text = str(uri)
    return url_to_fs(text if "://" in text else os.path.abspath(text))


def join(uri: str | Path, *parts: str) -> str:
    return "/".join((str(uri).rstrip("/"), *parts))


def exists(uri: str | Path) -> bool:
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)
    return bool(fs.exists(path))


def is_file(uri: str | Path) -> bool:
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)
    return bool(fs.isfile(path))


def read_bytes(uri: str | Path) -> bytes | None:
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)
    return bytes(fs.cat_file(path)) if fs.isfile(path) else None


def write_text(uri: str | Path, text: str) -> None:
    """One PUT on object stores; write-then-rename on local disks."""
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    if is_remote(uri):
        fs.pipe_file(path, text.encode("utf-8"))
        return
    temporary = f"{parent}/.{uuid.uuid4().hex}.tmp"
    Path(temporary).write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def upload_file(local: str | Path, uri: str | Path) -> None:
    fs, path = filesystem(uri)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.put_file(str(local), path)


def upload_folder(local: str | Path, remote: str | Path) -> int:
    """Copy every file under `local` to `remote`, keeping relative paths; returns the count."""
    count = 0
    for root, _, files in os.walk(local):
        for name in sorted(files):
            source = os.path.join(root, name)
            relative = os.path.relpath(source, local).replace(os.sep, "/")
            upload_file(source, join(remote, relative))
            count += 1
    return count


def download_folder(remote: str | Path, local: str | Path, skip: tuple[str, ...] = ()) -> int:
    """Copy every file under `remote` into `local` (relative paths kept); returns the count.

    `skip` names top-level entries left behind (a resume state next to a checkpoint)."""
    fs, base = filesystem(remote)
    fs.invalidate_cache(base)
    base = base.rstrip("/")
    count = 0
    for path in sorted(fs.find(base)):
        relative = path[len(base) :].lstrip("/")
        if not relative or relative.split("/", 1)[0] in skip:
            continue
        target = Path(local) / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(path, str(target))
        count += 1
    return count


def remove(uri: str | Path) -> None:
    fs, path = filesystem(uri)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)


@contextlib.contextmanager
def staging(uri: str | Path, prefix: str = "cosmo-") -> Iterator[Path]:
    """The local folder to work in for `uri`: the folder itself when it is local, else a
    temporary one (removed on exit) whose files the caller uploads."""
    if not is_remote(uri):
        folder = Path(str(uri).removeprefix("file://"))
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    scratch = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def local_copy(uri: str | Path, prefix: str = "cosmo-", skip: tuple[str, ...] = ()) -> Iterator[Path]:
    """A local folder holding what `uri` holds: the folder itself when local, else a download."""
    if not is_remote(uri):
        yield Path(str(uri).removeprefix("file://"))
        return
    scratch = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        download_folder(uri, scratch, skip=skip)
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
