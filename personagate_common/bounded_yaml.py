"""YAML read within limits: every YAML the gateway and the worker parse (tenant files, persona bodies
from the admin API, the tokens file, settings files) goes through ``BoundedSafeLoader``.

PyYAML's own safe loader accepts inputs that cost far more than their size: aliases that expand
exponentially (a 460-byte body of 9-wide aliases 8 levels deep), nesting that overflows the Python
stack in the composer (RecursionError) or that its scanner handles in quadratic time (100 000 open
``[`` take it over half a minute). The limits here stop each of these while the text is read:

- ``max_bytes``: the size of the text, checked before parsing;
- ``max_depth``: collections nested in collections, checked in the scanner (before its cost grows) and
  in the composer (before the stack does);
- ``max_nodes``: nodes composed, each alias counted as the whole node it stands for, so that everything
  downstream (constructor, schema validation, walks over the node tree) does bounded work;
- ``allow_aliases``: whether anchors and aliases may be used at all (a persona body may not: its
  anchors could also change what aliases elsewhere in the tenant file stand for);
- ``max_cpu_seconds``: the CPU time of the reading thread, a backstop for everything else.

A limit passed raises ``YamlLimitError``, a ``yaml.MarkedYAMLError`` positioned where the limit was
reached, so every caller that reports YAML errors with their position reports it the same way.
``describe`` turns any YAML error into (line, column, message) with a hint for the usual mistakes.

Parsing is CPU work: callers on an event loop run it in a thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.events import AliasEvent

__all__ = ["BoundedSafeLoader", "YamlLimitError", "YamlLimits", "describe", "load_yaml"]


@dataclass(frozen=True)
class YamlLimits:
    """What one YAML text may cost to read. The defaults fit configuration files (a tenant.yaml is at
    most 1 MB, a few levels deep)."""

    max_bytes: int = 1_000_000
    max_depth: int = 32
    max_nodes: int = 200_000
    allow_aliases: bool = True
    max_cpu_seconds: float = 10.0


FILE_LIMITS = YamlLimits()


class YamlLimitError(yaml.MarkedYAMLError):
    """The text passes one of its ``YamlLimits``; ``limit`` names which (size, depth, nodes, aliases, cpu)."""

    def __init__(self, limit: str, problem: str, mark: yaml.Mark | None) -> None:
        super().__init__(problem=problem, problem_mark=mark)
        self.limit = limit


# How often (in nodes) the composer looks at the CPU clock: often enough to stop within a few ms of
# the budget, rarely enough to cost nothing.
_CLOCK_EVERY = 512


class BoundedSafeLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader with ``YamlLimits`` enforced while scanning and composing."""

    def __init__(self, stream: str, limits: YamlLimits = FILE_LIMITS) -> None:
        self.limits = limits
        size = len(stream.encode("utf-8", "surrogatepass")) if isinstance(stream, str) else len(stream)
        if size > limits.max_bytes:
            raise YamlLimitError("size", f"the text is {size} bytes; expected at most {limits.max_bytes}", None)
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0
        self._anchor_sizes: dict[str, int] = {}
        self._cpu_deadline = time.thread_time() + limits.max_cpu_seconds

    # ---------------------------------------------------------------- the scanner: nesting

    def _too_deep(self) -> YamlLimitError:
        return YamlLimitError("depth", f"nested more than {self.limits.max_depth} levels deep; expected "
                                       "settings a few levels deep", self.get_mark())

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:
        # One '[' or '{' more. Checked here, not only in the composer: the scanner's own cost grows with
        # the depth of open flow collections (quadratic), long before the composer sees them. Open
        # flow collections and block indentation levels are each a collection node, so their count
        # never exceeds the nesting the composer will find.
        if self.flow_level + len(self.indents) >= self.limits.max_depth:
            raise self._too_deep()
        super().fetch_flow_collection_start(TokenClass)

    def add_indent(self, column: int) -> bool:
        added = super().add_indent(column)
        if added and self.flow_level + len(self.indents) > self.limits.max_depth:
            raise self._too_deep()
        return added

    # ---------------------------------------------------------------- the composer: depth, nodes, aliases

    def compose_document(self) -> Any:
        self._anchor_sizes = {}
        return super().compose_document()

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(AliasEvent):
            event = self.peek_event()
            if not self.limits.allow_aliases:
                raise YamlLimitError("aliases", f"alias *{event.anchor}: anchors and aliases are not allowed "
                                                "here; write the value out", event.start_mark)
            node = super().compose_node(parent, index)  # raises on an undefined alias
            size = self._anchor_sizes.get(event.anchor)
            if size is None:  # its anchor is still being composed: the value would contain itself
                raise YamlLimitError("aliases", f"alias *{event.anchor} is inside its own anchor; expected a "
                                                "value that does not contain itself", event.start_mark)
            self._count(size, event.start_mark)
            return node
        event = self.peek_event()
        anchor = getattr(event, "anchor", None)
        if anchor is not None and not self.limits.allow_aliases:
            raise YamlLimitError("aliases", f"anchor &{anchor}: anchors and aliases are not allowed here; "
                                            "write the value out", event.start_mark)
        if self._depth >= self.limits.max_depth:
            raise YamlLimitError("depth", f"nested more than {self.limits.max_depth} levels deep; expected "
                                          "settings a few levels deep", event.start_mark)
        before = self._nodes
        self._count(1, event.start_mark)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if anchor is not None:
            self._anchor_sizes[anchor] = self._nodes - before
        return node

    def _count(self, nodes: int, mark: yaml.Mark) -> None:
        previous = self._nodes
        self._nodes += nodes
        if self._nodes > self.limits.max_nodes:
            raise YamlLimitError("nodes", f"more than {self.limits.max_nodes} values once aliases are expanded; "
                                          "expected fewer (or fewer aliases)", mark)
        if self._nodes // _CLOCK_EVERY != previous // _CLOCK_EVERY and time.thread_time() > self._cpu_deadline:
            raise YamlLimitError("cpu", f"took more than {self.limits.max_cpu_seconds:g} s of CPU to read; "
                                        "expected a simpler file", mark)


def load_yaml(text: str, limits: YamlLimits = FILE_LIMITS) -> Any:
    """One YAML document read with ``BoundedSafeLoader`` (None for an empty text). Raises
    ``yaml.YAMLError`` (``YamlLimitError`` for a limit passed)."""
    loader = BoundedSafeLoader(text, limits)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


# ------------------------------------------------------------------------------------- messages

_INDENTATION = "check the indentation: keys of one mapping start in the same column"
_HINTS = (
    ("'\\t'", "YAML indents with spaces, never tabs: replace the tab here with spaces"),
    ("mapping values are not allowed here",
     "a value holding ': ' must be quoted; otherwise this line is indented differently from the keys around it"),
    ("expected <block end>", _INDENTATION),
    ("did not find expected key", _INDENTATION),
    ("could not find expected ':'",
     "a key needs ': ' after it, or a value continuing on the next line is indented too little"),
    ("did not find expected '-' indicator", "check the indentation: items of one list start in the same column"),
    ("found unknown escape character",
     "in double quotes a backslash starts an escape: write '\\\\' or use single quotes"),
)


def describe(exc: yaml.YAMLError) -> tuple[int, int, str]:
    """(line, column, message), 1-based, for a YAML error: ``not valid YAML: ...`` with a hint for tabs
    and indentation, or what a limit refused."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line, column = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
    if isinstance(exc, YamlLimitError):
        return line, column, f"refused: {exc.problem}"
    what = " ".join(filter(None, [getattr(exc, "context", None), getattr(exc, "problem", None)])) or str(exc)
    hint = next((hint for needle, hint in _HINTS if needle in what), None)
    return line, column, f"not valid YAML: {what}" + (f" ({hint})" if hint else "")
