"""Where a spec may read and write: outputs under the storage root, inputs by a scheme allow-list.

Runs on a shared cluster read and write with the deployment's storage credentials, so a spec
must not choose where those credentials point. Outputs stay under the storage root the chart
configures (`storage.uri`), or under a prefix the chart's `storage.allowedOutputs` lists;
inputs are read only through the schemes in `INPUT_SCHEMES`, never from the pod's own files
(a seed of `/proc/self/environ` would copy the storage keys into prompts), never over HTTP to
link-local or cloud metadata addresses, never with `..` out of a folder or the package samples.

On a laptop (no storage root, local paths allowed) the same rules refuse the same hostile
forms, and a user's own folders stay usable.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from cosmoforge.spec.model import KNOWN_BENCHMARKS, GenerationRun

# Object stores; `file`/`local` are refused so a local folder is always written as a path.
OUTPUT_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})
INPUT_SCHEMES = OUTPUT_SCHEMES | {"hf", "cosmoforge", "http", "https"}
METADATA_HOSTS = frozenset(
    {"metadata", "metadata.google.internal", "metadata.goog", "instance-data", "instance-data.ec2.internal"}
)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

OUTPUT_BASE_ENV = "COSMO_OUTPUT_BASE"
OUTPUT_ALLOW_ENV = "COSMO_OUTPUT_ALLOW"
LOCAL_PATHS_ENV = "COSMO_LOCAL_PATHS"


@dataclass(frozen=True)
class StoragePolicy:
    """`root`: the storage root outputs must stay under (None: no root, object stores anywhere);
    `allowed`: further prefixes outputs may use; `local_paths`: whether inputs and outputs may
    name this machine's files (a laptop: yes; a pod: no, its files are the deployment's)."""

    root: str | None = None
    allowed: tuple[str, ...] = ()
    local_paths: bool = True

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> StoragePolicy:
        env = os.environ if environ is None else environ
        root = env.get(OUTPUT_BASE_ENV, "").strip() or None
        allowed = tuple(p.strip() for p in env.get(OUTPUT_ALLOW_ENV, "").split(",") if p.strip())
        local = env.get(LOCAL_PATHS_ENV, "").strip()
        return cls(root=root, allowed=allowed, local_paths=local != "0")


def _scheme(uri: str) -> str | None:
    match = _SCHEME.match(uri)
    return match.group(1).lower() if match else None


def _parent_step(uri: str) -> bool:
    """Whether any path segment is `..`, also when percent-encoded or written with backslashes."""
    decoded = unquote(unquote(uri)).replace("\\", "/")
    return ".." in decoded.split("/")


def _form_problem(uri: str, parent_steps: bool = False) -> str | None:
    """Problems every URI shares, input or output; `parent_steps`: whether `..` may appear."""
    if any(ord(c) < 32 or ord(c) == 127 for c in uri):
        return "must not contain control characters"
    if "::" in uri:
        return "chained fsspec URLs (a::b) are not allowed"
    if uri.startswith("data:"):
        return "data: URLs are not allowed"
    if not parent_steps and _parent_step(uri):
        return "must not contain '..'"
    return None


def _segments(uri: str) -> tuple[str | None, list[str]]:
    """Scheme and non-empty path segments of a URI or path: the unit of "under"."""
    scheme = _scheme(uri)
    rest = uri.split("://", 1)[1] if scheme else uri
    return scheme, [part for part in rest.split("/") if part not in ("", ".")]


def _under(uri: str, prefix: str) -> bool:
    scheme, parts = _segments(uri)
    prefix_scheme, prefix_parts = _segments(prefix)
    return scheme == prefix_scheme and parts[: len(prefix_parts)] == prefix_parts


def output_problem(uri: str, policy: StoragePolicy) -> str | None:
    """Why `spec.output.uri` may not be used under `policy`, or None."""
    problem = _form_problem(uri)
    if problem:
        return problem
    scheme = _scheme(uri)
    if scheme is not None and scheme not in OUTPUT_SCHEMES:
        if scheme in ("file", "local"):
            return f"{scheme}:// is not allowed: write a local folder as a plain path"
        return f"scheme {scheme!r} is not allowed for outputs; use a path or {_listed(OUTPUT_SCHEMES)}"
    relative = scheme is None and not uri.startswith("/")
    if relative:
        return None  # joined under the root (or the working folder), and '..' was refused above
    if scheme is None and not policy.local_paths:
        return "an absolute path is this pod's own disk: use a relative path (under the storage root)"
    places = tuple(p for p in (policy.root, *policy.allowed) if p)
    if policy.root is not None and not any(_under(uri, place) for place in places):
        return f"is outside the storage root {policy.root} (the chart's storage.allowedOutputs adds places)"
    return None


def input_problem(uri: str, policy: StoragePolicy) -> str | None:
    """Why an input URI (seed, topics, benchmark, evaluation data) may not be read, or None.
    A local path may step up (`../seeds.jsonl` next to the spec) where local paths are allowed."""
    scheme = _scheme(uri)
    problem = _form_problem(uri, parent_steps=scheme is None and policy.local_paths)
    if problem:
        return problem
    if scheme is None:
        return None if policy.local_paths else "local paths are not readable here: use object storage"
    if scheme == "file":
        return None if policy.local_paths else "file:// is not readable here: use object storage"
    if scheme not in INPUT_SCHEMES:
        return f"scheme {scheme!r} is not allowed for inputs; use {_listed(INPUT_SCHEMES)}"
    if scheme == "cosmoforge" and not uri.removeprefix("cosmoforge://").strip("/"):
        return "names no file shipped in the package"
    if scheme in ("http", "https"):
        return host_problem(uri, policy)
    return None


def host_problem(url: str, policy: StoragePolicy) -> str | None:
    """Why an HTTP URL's host may not be reached: cloud metadata and link-local addresses always,
    loopback and unspecified addresses where local paths are off (in a pod they are the pod)."""
    if any(ord(c) < 32 or ord(c) == 127 for c in url):
        return "must not contain control characters"
    try:
        host = (urlsplit(url).hostname or "").rstrip(".").lower()
    except ValueError:
        return "is not a valid URL"
    if not host:
        return "names no host"
    if host in METADATA_HOSTS:
        return "cloud metadata endpoints are not allowed"
    address = _address(host)
    if address is None:
        return None if policy.local_paths or host != "localhost" else "localhost is this pod itself"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_link_local or str(address) in ("100.100.100.200", "fd00:ec2::254"):
        return "link-local and cloud metadata addresses are not allowed"
    if not policy.local_paths and (address.is_loopback or address.is_unspecified):
        return "loopback addresses are this pod itself"
    return None


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address a host names without DNS, in every form a resolver accepts (decimal
    `2852039166`, hex `0xa9fea9fe`, octal and short dotted forms), or None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):  # not an address; ValueError: a NUL in the name
        return None


def _listed(schemes: frozenset[str]) -> str:
    return ", ".join(f"{s}://" for s in sorted(schemes))


def _looks_like_path(value: str) -> bool:
    """A tokenizer is a Hub id (`owner/name`) unless it reads as a path or a URI."""
    return value.startswith((".", "/")) or _scheme(value) is not None


def input_uris(run: GenerationRun) -> Iterator[tuple[str, str]]:
    """(field path, URI) of everything a run reads by URI."""
    for index, seed in enumerate(run.spec.seeds):
        yield f"spec.seeds[{index}].uri", seed.uri
        topics = getattr(seed, "topics_uri", None)
        if topics is not None:
            yield f"spec.seeds[{index}].topicsUri", topics
    for index, benchmark in enumerate(run.spec.postprocess.decontaminate.benchmarks):
        if benchmark not in KNOWN_BENCHMARKS:
            yield f"spec.postprocess.decontaminate.benchmarks[{index}]", benchmark
    training = run.spec.training
    if training is not None:
        if training.eval_data is not None:
            yield "spec.training.evalData", training.eval_data
        if _looks_like_path(training.tokenizer):
            yield "spec.training.tokenizer", training.tokenizer


def uri_problems(run: GenerationRun, policy: StoragePolicy) -> list[tuple[str, str]]:
    """(field path, reason) for every URI of the run that `policy` does not allow."""
    problems: list[tuple[str, str]] = []
    output = output_problem(run.spec.output.uri, policy)
    if output:
        problems.append(("spec.output.uri", output))
    for field, uri in input_uris(run):
        problem = input_problem(uri, policy)
        if problem:
            problems.append((field, problem))
    endpoint = run.spec.generation.endpoint
    if endpoint is not None:
        problem = host_problem(endpoint, policy)
        if problem:
            problems.append(("spec.generation.endpoint", problem))
    return problems
