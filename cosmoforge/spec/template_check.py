"""Template overrides are code from whoever wrote the spec: render them in a bounded sandbox.

Jinja's `SandboxedEnvironment` already blocks attribute probes (`''.__class__`) and unsafe
calls, but not work: `{{ 9 ** 29999999 }}` is one C-level multiplication that holds the
interpreter for minutes, `'x' * 10**9` a gigabyte, and `lipsum`, `center` or a `%` format can
build huge strings from a few characters. `BoundedSandbox` refuses those before they run, and
every prompt (checked or real) is rendered by it.

What a sandbox cannot bound is work in general (nested loops, doubling a string in a loop), so
`check_isolated` renders the templates in a child process with a memory limit and a time
limit, against a seed text as long as the spec allows. The child imports only Jinja, so a
check costs a fraction of a second, and a stuck or exploding template costs the caller only
the time limit, never the operator's or the dispatcher's memory.

Every failure is caught and becomes one short line naming the template's problem, never the
data that was rendered.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sized
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment

MAX_TEMPLATE_CHARS = 20_000
MAX_PROMPT_CHARS = 200_000  # a rendered prompt must fit a NATS message (1 MB) with its lineage
MAX_SEQUENCE = 1_000_000  # characters or items a single operation may build
MAX_INT_BITS = 4_096  # integers a template computes with; prompts need counters, not bignums
MAX_RANGE = 10_000
MAX_WIDTH = 10_000  # widths and precisions of formats, `center`, `indent`, `wordwrap`
CHECK_SECONDS = 5.0
CHECK_MEMORY_BYTES = 1024 * 1024 * 1024

# The names the prompt builder gives every template (cosmoforge.prompts.builder._context).
TEMPLATE_VARIABLES = ("text", "topic", "category", "fields", "audience", "style", "openings")


class _TooBig(SecurityError):
    """An operation that would build a value past the sandbox's bounds."""


def _bits(value: Any) -> int:
    return abs(value).bit_length() if isinstance(value, int) else 0


def _result_size(left: Any, right: Any) -> int:
    """Characters or items of `left * right` for a sequence times an integer, else 0."""
    for sequence, count in ((left, right), (right, left)):
        if isinstance(sequence, Sized) and not isinstance(sequence, Mapping) and isinstance(count, int):
            return len(sequence) * max(count, 0)
    return 0


def _check_power(base: Any, exponent: Any) -> None:
    if isinstance(base, int | float) and isinstance(exponent, int | float):
        magnitude = abs(base)
        if isinstance(exponent, int) and isinstance(base, int) and magnitude > 1:
            if _bits(exponent) > 16 or math.log2(magnitude) * exponent > MAX_INT_BITS:
                raise _TooBig(f"'**' would compute a number of more than {MAX_INT_BITS} bits")
        elif _bits(exponent) > MAX_INT_BITS:
            raise _TooBig(f"'**' exponent has more than {MAX_INT_BITS} bits")


def _check_product(left: Any, right: Any) -> None:
    if isinstance(left, int) and isinstance(right, int):
        if _bits(left) + _bits(right) > MAX_INT_BITS:
            raise _TooBig(f"'*' would compute a number of more than {MAX_INT_BITS} bits")
    elif _result_size(left, right) > MAX_SEQUENCE:
        raise _TooBig(f"'*' would build a value of more than {MAX_SEQUENCE} characters or items")


def _check_sum(left: Any, right: Any) -> None:
    if isinstance(left, Sized) and isinstance(right, Sized) and len(left) + len(right) > MAX_SEQUENCE:
        raise _TooBig(f"'+' would build a value of more than {MAX_SEQUENCE} characters or items")


_WIDE_FORMAT = re.compile(r"%[-+ #0]*(\*|\d{5,}|\d*\.(\*|\d{5,}))|\{[^{}]*:[^{}]*\d{5,}[^{}]*\}")


def _check_format(text: Any) -> None:
    if isinstance(text, str) and _WIDE_FORMAT.search(text):
        raise _TooBig(f"format widths and precisions above {MAX_WIDTH - 1} are not allowed")


def _check_modulo(left: Any, right: Any) -> None:
    if isinstance(left, str):
        _check_format(left)


_CHECKS: dict[str, Callable[[Any, Any], None]] = {
    "**": _check_power,
    "*": _check_product,
    "+": _check_sum,
    "%": _check_modulo,
}


def _bounded_range(*args: int) -> range:
    numbers = range(*args)
    if len(numbers) > MAX_RANGE:
        raise _TooBig(f"range() of more than {MAX_RANGE} numbers")
    return numbers


def _width_bounded(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """A built-in filter whose numeric arguments (widths, counts) are capped at MAX_WIDTH."""

    def bounded(*args: Any, **kwargs: Any) -> Any:
        for value in (*args, *kwargs.values()):
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_WIDTH:
                raise _TooBig(f"'{name}' with a width above {MAX_WIDTH}")
        return function(*args, **kwargs)

    _pass_same_arguments(bounded, function)
    return bounded


def _pass_same_arguments(wrapper: Callable[..., Any], function: Callable[..., Any]) -> None:
    """Jinja passes the environment or context to filters marked for it; keep the mark."""
    mark = getattr(function, "jinja_pass_arg", None)
    if mark is not None:
        wrapper.jinja_pass_arg = mark  # type: ignore[attr-defined]


class BoundedSandbox(SandboxedEnvironment):
    """Jinja's sandbox with bounded arithmetic, sequences, ranges and widths, and no `lipsum`.

    Intercepting an operator also stops Jinja from folding constant expressions at compile
    time, so `{{ 9 ** 29999999 }}` is refused when it would run rather than computed while the
    template compiles."""

    intercepted_binops = frozenset(_CHECKS)

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.globals.pop("lipsum", None)
        self.globals["range"] = _bounded_range
        for name in ("center", "indent", "wordwrap", "truncate", "batch", "slice"):
            self.filters[name] = _width_bounded(name, self.filters[name])
        self.filters["format"] = self._checked_format(self.filters["format"])
        self.filters["replace"] = _replace_filter(self.filters["replace"])

    @staticmethod
    def _checked_format(function: Callable[..., Any]) -> Callable[..., Any]:
        def bounded(value: Any, *args: Any, **kwargs: Any) -> Any:
            _check_format(value)
            return function(value, *args, **kwargs)

        _pass_same_arguments(bounded, function)
        return bounded

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _CHECKS[operator](left, right)
        return super().call_binop(context, operator, left, right)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_format(value.__self__)  # `str.format` is resolved here, not through `call`
        return wrapped

    def call(self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        # String methods: the sandbox checks which may be called, not how much they build.
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            _check_str_method(owner, getattr(__obj, "__name__", ""), args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)


_WIDTH_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})


def _check_str_method(text: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    if name in _WIDTH_METHODS:
        if any(isinstance(v, int) and v > MAX_WIDTH for v in (*args, *kwargs.values())):
            raise _TooBig(f"str.{name} with a width above {MAX_WIDTH}")
    elif name == "replace" and len(args) >= 2:
        _check_replace(text, args[0], args[1])


def _check_replace(text: Any, old: Any, new: Any) -> None:
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
        places = text.count(old) if old else len(text) + 1
        if len(text) + places * max(len(new) - len(old), 0) > MAX_SEQUENCE:
            raise _TooBig(f"replace would build more than {MAX_SEQUENCE} characters")


def _replace_filter(function: Callable[..., Any]) -> Callable[..., Any]:
    def bounded(eval_ctx: Any, value: Any, old: Any, new: Any, *args: Any, **kwargs: Any) -> Any:
        _check_replace(str(value), old, new)
        return function(eval_ctx, value, old, new, *args, **kwargs)

    _pass_same_arguments(bounded, function)
    return bounded


def bounded_environment() -> BoundedSandbox:
    return BoundedSandbox(undefined=StrictUndefined, keep_trailing_newline=False, autoescape=False)


_ENV = bounded_environment()


class _SampleFields(dict[str, Any]):
    """Like the builder's seed columns: a missing optional column reads as empty."""

    def __getattr__(self, name: str) -> Any:
        return self.get(name, "")


def sample_context(sample_chars: int) -> dict[str, Any]:
    """Values for every template variable, with a seed text as long as the spec allows."""
    words = "sample " * (sample_chars // 7 + 1)
    voice = {"label": "sample", "instructions": "sample"}
    return {
        "text": words[:sample_chars],
        "topic": "sample topic",
        "category": "sample",
        "fields": _SampleFields(),
        "audience": voice,
        "style": voice,
        "openings": "sample",
    }


def check_text(text: str, sample_chars: int = 2000) -> str | None:
    """The reason a template cannot be used, or None: it must compile and render the sample."""
    if len(text) > MAX_TEMPLATE_CHARS:
        return f"template is {len(text)} characters, more than the limit of {MAX_TEMPLATE_CHARS}"
    try:
        rendered = _ENV.from_string(text).render(**sample_context(sample_chars))
    except TemplateSyntaxError as error:
        return f"template syntax error on line {error.lineno}: {_short(error.message)}"
    except UndefinedError as error:
        return f"template uses an unknown field or attribute: {_short(error.message)}"
    except SecurityError as error:
        return f"template does something the sandbox refuses: {_short(str(error))}"
    except RecursionError:
        return "template recurses too deeply"
    except MemoryError:
        return "template needs too much memory"
    except Exception as error:  # any other failure is the template's problem, never a crash
        return f"template fails when rendered: {type(error).__name__}: {_short(str(error))}"
    if len(rendered) > MAX_PROMPT_CHARS:
        return f"template renders more than {MAX_PROMPT_CHARS} characters"
    return None


def _short(message: str | None) -> str:
    line = (message or "").strip().splitlines()[0] if (message or "").strip() else "no detail"
    return line if len(line) <= 160 else line[:157] + "..."


def check_isolated(
    templates: Mapping[str, str], sample_chars: int = 2000, timeout: float = CHECK_SECONDS
) -> dict[str, str]:
    """Problems of each template (id -> reason; absent when fine), checked in a child process
    with `timeout` seconds and CHECK_MEMORY_BYTES of memory. Blocks: async callers run it in a
    thread so the event loop keeps serving while a template is checked.

    The operator validates a run on every pass, so answers are remembered by text and sample
    length: an unchanged spec costs no child process. A timeout or a crash is not remembered
    (it may be the machine's load, not the template)."""
    known = {tid: _ANSWERS.get((text, sample_chars), _UNKNOWN) for tid, text in templates.items()}
    pending = {tid: templates[tid] for tid, answer in known.items() if answer is _UNKNOWN}
    answered = {tid: answer for tid, answer in known.items() if answer is not _UNKNOWN}
    if not pending:
        return _problems(templates, answered, "")
    request = json.dumps({"templates": pending, "sampleChars": sample_chars})
    command = [sys.executable, "-m", __name__]
    output: str | bytes | None
    try:
        done = subprocess.run(command, input=request, capture_output=True, text=True, timeout=timeout)
        output, cause = done.stdout, "checking the template failed: it needs too much memory or crashed"
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout
        cause = f"checking the template took longer than {timeout:g} s (a loop or a huge value?)"
    fresh = _answers(output)
    for tid, answer in fresh.items():
        if tid in pending:
            _ANSWERS.put((pending[tid], sample_chars), answer)
    return _problems(templates, {**answered, **fresh}, cause)


class _Answers:
    """A small thread-safe LRU of (template text, sample length) -> problem or None."""

    def __init__(self, size: int):
        self.size, self.items, self.lock = size, OrderedDict[tuple[str, int], Any](), threading.Lock()

    def get(self, key: tuple[str, int], default: Any) -> Any:
        with self.lock:
            if key not in self.items:
                return default
            self.items.move_to_end(key)
            return self.items[key]

    def put(self, key: tuple[str, int], value: str | None) -> None:
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)


_UNKNOWN = object()
_ANSWERS = _Answers(512)


def _problems(templates: Mapping[str, str], answered: dict[str, str | None], cause: str) -> dict[str, str]:
    """The child checks in order: the first template without an answer is the one that ran out
    of time or memory, and those after it were never checked."""
    problems = {}
    blamed = False
    for tid in templates:
        if tid in answered:
            problem = answered[tid]
        else:
            problem = "not checked: another template override failed its check" if blamed else cause
            blamed = True
        if problem is not None:
            problems[tid] = problem
    return problems


def _answers(output: str | bytes | None) -> dict[str, str | None]:
    """The child's answers: one JSON line [id, problem-or-null] per template it finished."""
    if isinstance(output, bytes):
        output = output.decode("utf-8", errors="replace")
    answers: dict[str, str | None] = {}
    for line in (output or "").splitlines():
        try:
            tid, problem = json.loads(line)
        except (ValueError, TypeError):
            continue
        answers[str(tid)] = problem if problem is None else str(problem)
    return answers


def _child() -> None:
    try:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = CHECK_MEMORY_BYTES if hard == resource.RLIM_INFINITY else min(CHECK_MEMORY_BYTES, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, ValueError, OSError):
        pass  # no address-space limit on this platform: the time limit still holds
    request = json.loads(sys.stdin.read())
    sample_chars = int(request["sampleChars"])
    for tid, text in request["templates"].items():
        print(json.dumps([tid, check_text(text, sample_chars)]), flush=True)


if __name__ == "__main__":
    _child()
