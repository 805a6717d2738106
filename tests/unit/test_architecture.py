"""The dependency rule holds, and the check that enforces it (`lint-imports`) would catch a break.

The contracts live in pyproject.toml; `make test` runs `lint-imports` before pytest. These tests
run the same checker on the real tree and on a copy with one forbidden import planted in it, so
a contract that silently stopped matching anything would fail here.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def copy_of_tree(target: Path) -> Path:
    shutil.copy(REPO / "pyproject.toml", target / "pyproject.toml")
    shutil.copytree(
        REPO / "cosmoforge",
        target / "cosmoforge",
        ignore=shutil.ignore_patterns("__pycache__", "_proto", "data", "*.so"),
    )
    return target


pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed")


def test_the_tree_keeps_every_contract() -> None:
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "forbidden", "contract"),
    [
        ("spec/model.py", "cosmoforge.cli.main", "The core never imports a shell"),
        ("generation/worker.py", "kopf", "The core never imports a shell"),
        ("runs/manager.py", "cosmoforge.services.dispatcher.server", "The core never imports a shell"),
        ("services/grpcbase.py", "cosmoforge.cli.main", "Services never import the command line"),
    ],
)
def test_a_forbidden_import_breaks_its_contract(
    tmp_path: Path, module: str, forbidden: str, contract: str
) -> None:
    root = copy_of_tree(tmp_path)
    path = root / "cosmoforge" / module
    path.write_text(path.read_text() + f"\nimport {forbidden}  # planted by the test\n")
    result = lint_imports(root)
    assert result.returncode != 0
    assert f"{contract}" in result.stdout
    assert "BROKEN" in result.stdout
    assert forbidden in result.stdout
