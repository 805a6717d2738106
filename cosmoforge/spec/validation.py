"""Everything that decides whether a spec can run, beyond its schema: one entry point for the
CLI and the operator, so a spec accepted by `cosmo validate` is accepted by the cluster too.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

from cosmoforge.prompts.builder import check_template
from cosmoforge.spec.model import GenerationRun, SpecError, load_run, parse_run

PACKAGE_SCHEME = "cosmoforge://"


def semantic_problems(run: GenerationRun) -> list[tuple[str, str]]:
    problems = []
    for template_id, text in run.spec.prompts.templates.items():
        reason = check_template(template_id, text)
        if reason:
            problems.append((f"spec.prompts.templates.{template_id}", reason))
    return problems


def validate_document(document: Any, source: str = "<spec>") -> GenerationRun:
    run = parse_run(document, source)
    problems = semantic_problems(run)
    if problems:
        raise SpecError(source, problems)
    return run


def resolve_uri(uri: str, base_dir: str | Path | None = None) -> str:
    """`cosmoforge://samples/x` -> the file shipped in the package; relative paths -> base_dir."""
    if uri.startswith(PACKAGE_SCHEME):
        return str(resources.files("cosmoforge.data").joinpath(uri.removeprefix(PACKAGE_SCHEME)))
    if "://" in uri or os.path.isabs(uri) or base_dir is None:
        return uri
    return str(Path(base_dir) / uri)


def load_file(path: str | Path) -> GenerationRun:
    """Read, validate and resolve a spec file: seed paths become absolute or package paths."""
    run = load_run(path)
    problems = semantic_problems(run)
    if problems:
        raise SpecError(str(path), problems)
    base = Path(path).resolve().parent
    for seed in run.spec.seeds:
        seed.uri = resolve_uri(seed.uri, base)
        if seed.topics_uri is not None:
            seed.topics_uri = resolve_uri(seed.topics_uri, base)
    training = run.spec.training
    if training is not None:
        if training.tokenizer.startswith(PACKAGE_SCHEME) or training.tokenizer.startswith("."):
            training.tokenizer = resolve_uri(training.tokenizer, base)
        if training.eval_data is not None:
            training.eval_data = resolve_uri(training.eval_data, base)
    return run
