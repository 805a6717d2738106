"""Everything that decides whether a spec can run, beyond its schema: one entry point for the
CLI, the dispatcher and the operator, so a spec accepted by `cosmo validate` is accepted by the
cluster too (under the same storage policy).

Checking template overrides starts a child process with a time limit (see
`cosmoforge.spec.template_check`); async callers use `validate_document_async`, which runs the
whole check in a worker thread so the event loop keeps serving other runs meanwhile.
"""

from __future__ import annotations

import asyncio
import os
from importlib import resources
from pathlib import Path
from typing import Any

from cosmoforge.spec.confinement import StoragePolicy, uri_problems
from cosmoforge.spec.model import GenerationRun, SpecError, load_run, parse_run

PACKAGE_SCHEME = "cosmoforge://"


def _longest_seed_text(run: GenerationRun) -> int:
    """The longest seed text a template may receive: what the check renders it with."""
    limits = [run.spec.prompts.max_seed_chars]
    limits += [chars for seed in run.spec.seeds if (chars := getattr(seed, "max_chars", None))]
    return max(limits)


def semantic_problems(run: GenerationRun, policy: StoragePolicy | None = None) -> list[tuple[str, str]]:
    """(field path, reason) for what the schema cannot say: where the run reads and writes
    (under `policy`, by default the one this process's environment configures) and whether its
    template overrides render."""
    problems = uri_problems(run, policy if policy is not None else StoragePolicy.from_env())
    templates = run.spec.prompts.templates
    if templates:
        # The prompt builder brings pyarrow along: a second of start-up `cosmo validate` spares
        # for every spec without overrides.
        from cosmoforge.prompts.builder import template_problems

        for template_id, reason in template_problems(templates, _longest_seed_text(run)):
            problems.append((f"spec.prompts.templates.{template_id}", reason))
    return problems


def validate_document(
    document: Any, source: str = "<spec>", policy: StoragePolicy | None = None
) -> GenerationRun:
    run = parse_run(document, source)
    problems = semantic_problems(run, policy)
    if problems:
        raise SpecError(source, problems)
    return run


async def validate_document_async(
    document: Any, source: str = "<spec>", policy: StoragePolicy | None = None
) -> GenerationRun:
    """`validate_document` off the event loop: a template check may take seconds."""
    return await asyncio.to_thread(validate_document, document, source, policy)


def resolve_uri(uri: str, base_dir: str | Path | None = None) -> str:
    """`cosmoforge://samples/x` -> the file shipped in the package; relative paths -> base_dir."""
    if uri.startswith(PACKAGE_SCHEME):
        return _package_file(uri)
    if "://" in uri or os.path.isabs(uri) or base_dir is None:
        return uri
    return str(Path(base_dir) / uri)


def _package_file(uri: str) -> str:
    """The shipped file a `cosmoforge://` URI names; never a path outside the package's data."""
    data = Path(str(resources.files("cosmoforge.data"))).resolve()
    target = (data / uri.removeprefix(PACKAGE_SCHEME).lstrip("/")).resolve()
    if not target.is_relative_to(data):
        raise SpecError(uri, [("(uri)", "names a file outside the package's samples")])
    return str(target)


def load_file(path: str | Path, policy: StoragePolicy | None = None) -> GenerationRun:
    """Read, validate and resolve a spec file: seed paths become absolute or package paths."""
    run = load_run(path)
    problems = semantic_problems(run, policy)
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
