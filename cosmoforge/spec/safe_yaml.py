"""YAML for specs that may come from someone else: no anchors or aliases, a size and depth cap.

A spec reaches the dispatcher over the network and the operator from any user who may create a
GenerationRun, so its text is hostile input. A few hundred bytes of nested aliases expand to
gigabytes once the document is built or dumped again; deep nesting exhausts the parser's
recursion; and some scalars (a 5,000-digit integer, the date 2001-13-45) make PyYAML's
constructors raise errors that are not `yaml.YAMLError`. A spec never needs aliases, so this
loader refuses them outright, and it turns every other failure into a `yaml.YAMLError` whose
`problem` is one short line, so the callers' single `except yaml.YAMLError` reports them all.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.events import AliasEvent, CollectionStartEvent, ScalarEvent
from yaml.nodes import Node

MAX_SPEC_BYTES = 1024 * 1024  # room for `kubectl get -o yaml` output with its applied copy
MAX_DEPTH = 32  # a GenerationRun nests about 6 levels; Kubernetes' managedFields a few more


class SpecYAMLError(yaml.YAMLError):
    """A refused document; `problem` and `problem_mark` read like PyYAML's own errors."""

    def __init__(self, problem: str, problem_mark: Any = None):
        self.problem, self.problem_mark = problem, problem_mark
        super().__init__(problem)


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases and nesting deeper than MAX_DEPTH."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            raise SpecYAMLError(f"YAML aliases (*{event.anchor}) are not allowed in a spec", event.start_mark)
        if isinstance(event, ScalarEvent | CollectionStartEvent) and event.anchor is not None:
            raise SpecYAMLError(f"YAML anchors (&{event.anchor}) are not allowed in a spec", event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise SpecYAMLError(f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
            return Composer.compose_node(self, parent, index)
        finally:
            self._depth -= 1


def load_documents(text: str) -> Iterator[Any]:
    """The documents in `text`, built by `_SpecLoader`; every failure is a `yaml.YAMLError`."""
    size = len(text.encode("utf-8", errors="replace"))
    if size > MAX_SPEC_BYTES:
        raise SpecYAMLError(f"the spec is {size} bytes, more than the limit of {MAX_SPEC_BYTES}")
    loader = _SpecLoader(text)
    try:
        while loader.check_data():
            yield loader.get_data()
    except yaml.YAMLError:
        raise
    except RecursionError:
        raise SpecYAMLError("nested too deeply") from None
    except (ValueError, TypeError, OverflowError) as error:
        # Constructors of timestamps and numbers: their messages are short and name no value.
        raise SpecYAMLError(f"a value cannot be read: {str(error)[:120]}") from None
    finally:
        loader.dispose()
