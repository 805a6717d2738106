"""Python code for the gRPC contracts in `protos/`, generated on first use instead of committed.

Committed generated code drifts from its `.proto` and ties the repository to one protoc; a
build hook would need grpcio-tools inside pip's isolated build environment, unpinned. So the
code is generated here, with the grpcio-tools of the running environment, into the git-ignored
package `cosmoforge._proto`, the first time a service or client imports it and again whenever
a `.proto` changes (a digest of the sources is kept beside the code). That works the same for a
fresh clone, `pip install -e .` and the test suite. Images and wheels generate it at build time
(`python -m cosmoforge.services.protogen`) so that they never need protoc at run time.

Files are staged under `cosmoforge/_proto/` before protoc runs, so the generated modules
import each other as `cosmoforge._proto.v1...`, never as a top-level `cosmoforge.v1` that would
collide with this package. Concurrent first imports are safe: every process writes the same
bytes and each file lands with an atomic rename, the digest last.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# This module lives in cosmoforge/services/; the generated package sits at the package root.
PACKAGE_DIR = Path(__file__).resolve().parent.parent
SOURCE_DIR = PACKAGE_DIR.parent / "protos" / "cosmoforge"
TARGET_DIR = PACKAGE_DIR / "_proto"
STAMP = TARGET_DIR / "__init__.py"
_DIGEST = re.compile(r'^SOURCE_DIGEST = "([0-9a-f]{64})"$', re.MULTILINE)


class ProtoError(RuntimeError):
    """The generated code is missing or stale and cannot be (re)generated here."""


def proto_files(source_dir: Path = SOURCE_DIR) -> list[Path]:
    return sorted(source_dir.rglob("*.proto")) if source_dir.is_dir() else []


def source_digest(files: list[Path], source_dir: Path = SOURCE_DIR) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(source_dir).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def generated_digest(stamp: Path = STAMP) -> str | None:
    try:
        match = _DIGEST.search(stamp.read_text())
    except OSError:
        return None
    return match.group(1) if match else None


def ensure_generated() -> None:
    """Make `cosmoforge._proto` importable and current; cheap when it already is."""
    files = proto_files()
    if not files:
        # An installed wheel carries its generated code and not the sources: use what is there.
        if generated_digest() is None:
            raise ProtoError(
                f"generated gRPC code is missing from {TARGET_DIR} and no .proto sources were found; "
                "generate it where the sources are: python -m cosmoforge.services.protogen"
            )
        return
    digest = source_digest(files)
    if generated_digest() == digest:
        return
    try:
        generate(files, digest)
    except OSError as error:
        if generated_digest() is None:
            raise ProtoError(f"cannot write generated gRPC code to {TARGET_DIR}: {error}") from error
        # A read-only install with older generated code: serve it rather than not start.
        print(f"warning: gRPC code in {TARGET_DIR} is older than protos/ ({error})", file=sys.stderr)
    importlib.invalidate_caches()


def generate(files: list[Path], digest: str) -> None:
    try:
        import grpc_tools
    except ImportError as error:
        raise ProtoError(
            "generating gRPC code needs grpcio-tools: pip install 'cosmoforge[operator]'"
        ) from error
    include = Path(grpc_tools.__file__).parent / "_proto"
    TARGET_DIR.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".proto-", dir=PACKAGE_DIR) as scratch:
        stage, out = Path(scratch) / "in", Path(scratch) / "out"
        staged = []
        for path in files:
            target = stage / "cosmoforge" / "_proto" / path.relative_to(SOURCE_DIR)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            staged.append(str(target.relative_to(stage)))
        out.mkdir()
        command = [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{stage}", f"-I{include}",
            f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *staged,
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ProtoError(f"protoc failed:\n{result.stderr.strip()}")
        produced = out / "cosmoforge" / "_proto"
        _install(produced, digest)


def _install(produced: Path, digest: str) -> None:
    """Move generated files into place, each with an atomic rename, the digest stamp last."""
    for folder in [produced, *(p for p in produced.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()
    (produced / "__init__.py").write_text(
        '"""Generated by cosmoforge.services.protogen from protos/: do not edit, do not commit."""\n\n'
        f'SOURCE_DIGEST = "{digest}"\n'
    )
    files = sorted(p for p in produced.rglob("*") if p.is_file())
    files.sort(key=lambda p: p == produced / "__init__.py")
    for path in files:
        target = TARGET_DIR / path.relative_to(produced)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)


def main() -> int:
    try:
        ensure_generated()
    except ProtoError as error:
        print(error, file=sys.stderr)
        return 1
    print(f"gRPC code for {len(proto_files())} .proto file(s) in {TARGET_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
