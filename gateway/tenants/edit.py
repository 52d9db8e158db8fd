"""One persona of a tenant.yaml, read and replaced as text, leaving the rest of the file byte for byte.

The persona's place is found from PyYAML's node marks (``yaml.compose``). A persona entry runs from
its key's line to the line before the next persona's key (or the end of ``personas:``), less trailing
blank lines and comments indented no deeper than the key: those belong to what follows. Its text, as
the admin API shows it, is the lines after the key line, de-indented.

A replacement is re-indented to the persona's indentation and put in place of those lines; the key
line stays (and any comment on it). A persona written in flow style (``claims: {prompt: ...}``) has
its entry rewritten in block style; a ``personas:`` that is itself in flow style, or missing, is
re-emitted in block style (its comments, if any, are lost: there is no other way to splice into it).
A new persona is added after the last one.
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from .loader import Problem

BODY = "request body"


class EditError(ValueError):
    """The edit cannot be made; ``problems`` say why, positioned in the text they are about."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(map(str, problems)))
        self.problems = problems


@dataclass
class _Layout:
    text: str
    lines: list[str]  # with their line ends
    offsets: list[int]  # where each line starts, and len(text) at the end
    root: yaml.MappingNode
    personas_key: yaml.ScalarNode | None
    personas: yaml.Node | None

    @property
    def block(self) -> bool:
        """Whether ``personas:`` is a block mapping of plain persona names, which can be spliced."""
        node = self.personas
        return (isinstance(node, yaml.MappingNode) and not node.flow_style and bool(node.value)
                and all(isinstance(k, yaml.ScalarNode) for k, _ in node.value))

    def entries(self) -> list[tuple[yaml.ScalarNode, yaml.Node]]:
        assert isinstance(self.personas, yaml.MappingNode)
        return self.personas.value  # type: ignore[return-value]

    def end_line(self, node: yaml.Node) -> int:
        """The first line after ``node`` (a block collection ends where the next token starts)."""
        mark = node.end_mark
        if mark.line >= len(self.lines):
            return len(self.lines)
        before = self.text[self.offsets[mark.line]:mark.index]
        return mark.line if not before.strip() else mark.line + 1

    def span(self, i: int) -> tuple[int, int]:
        """Lines [first, end) of persona entry ``i``: its key line to its last line of content."""
        entries = self.entries()
        key = entries[i][0]
        first = key.start_mark.line
        end = entries[i + 1][0].start_mark.line if i + 1 < len(entries) else self.end_line(self.personas)
        while end > first + 1 and _outside(self.lines[end - 1], key.start_mark.column):
            end -= 1
        return first, end

    def find(self, name: str) -> int | None:
        return next((i for i, (k, _) in enumerate(self.entries()) if k.value == name), None)

    def splice(self, first: int, end: int, new: str) -> str:
        start, stop = self.offsets[first], self.offsets[end]
        old = self.text[start:stop]
        if start == len(self.text) and self.text and not self.text.endswith("\n"):
            new = _newline(self.text) + new  # appending after a last line without a line end
        elif old and not old.endswith("\n") and stop == len(self.text):
            new = new.rstrip("\r\n")  # the file had no line end at the end: keep it so
        return self.text[:start] + new + self.text[stop:]


def _outside(line: str, key_column: int) -> bool:
    stripped = line.strip()
    return not stripped or (stripped.startswith("#") and _indent(line) <= key_column)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _newline(text: str) -> str:
    return "\r\n" if "\r\n" in text else "\n"


def _lines(text: str) -> tuple[list[str], list[int]]:
    lines = text.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    return lines, offsets


def _yaml_problem(file: str, exc: yaml.YAMLError) -> Problem:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
    what = " ".join(filter(None, [getattr(exc, "context", None), getattr(exc, "problem", None)])) or str(exc)
    return Problem(file, line, column, "(yaml)", f"not valid YAML: {what}")


def _layout(text: str, file: str) -> _Layout:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise EditError([_yaml_problem(file, exc)]) from exc
    if not isinstance(root, yaml.MappingNode):
        raise EditError([Problem(file, 1, 1, "(file)", "expected a mapping of tenant settings")])
    lines, offsets = _lines(text)
    pair = next(((k, v) for k, v in root.value if isinstance(k, yaml.ScalarNode) and k.value == "personas"),
                (None, None))
    return _Layout(text, lines, offsets, root, pair[0], pair[1])


def _dedent(lines: list[str], columns: int) -> str:
    out = []
    for line in lines:
        body = line.rstrip("\r\n")
        end = line[len(body):]
        out.append(body[min(columns, _indent(body)):] + end)
    return "".join(out)


def _reindent(text: str, columns: int, newline: str) -> str:
    pad = " " * columns
    lines = text.replace("\r\n", "\n").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    return "".join((pad + line if line else "") + newline for line in lines)


def _dump(value: object) -> str:
    return yaml.safe_dump(value, sort_keys=False, allow_unicode=True, default_flow_style=False, width=100)


def _construct(node: yaml.Node) -> object:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _entry_text(lay: _Layout, i: int) -> str:
    _key, value = lay.entries()[i]
    first, end = lay.span(i)
    if isinstance(value, yaml.MappingNode) and not value.flow_style and value.start_mark.line > first:
        return _dedent(lay.lines[first + 1:end], value.start_mark.column)
    return _dump(_construct(value))


def _step(lay: _Layout) -> int:
    """How far a persona's settings are indented beyond its name, as the file does it (else 2)."""
    for key, value in lay.entries():
        if isinstance(value, yaml.MappingNode) and not value.flow_style and value.start_mark.line > key.start_mark.line:
            return value.start_mark.column - key.start_mark.column
    return 2


# ---------------------------------------------------------------------------------------- public


def read_persona(text: str, name: str, *, file: str = "tenant.yaml") -> str | None:
    """The persona's settings as written in the file (de-indented); None if there is no such persona.
    A persona in flow style is shown in block style."""
    lay = _layout(text, file)
    if lay.personas is None:
        return None
    if lay.block:
        i = lay.find(name)
        return None if i is None else _entry_text(lay, i)
    personas = _construct(lay.personas)
    if not isinstance(personas, dict) or name not in personas:
        return None
    return _dump(personas[name])


def check_body(body: str) -> str:
    """A persona's settings as sent (YAML text): refused with positioned problems (positions in the
    body) unless it is one YAML mapping; returned de-indented to column 0."""
    problems = []
    for number, line in enumerate(body.splitlines(), 1):
        if line.startswith(("---", "...")):
            problems.append(Problem(BODY, number, 1, "(body)", "document markers (--- or ...) cannot be part of a "
                                                               "persona; expected the persona's settings only"))
    if problems:
        raise EditError(problems)
    try:
        root = yaml.compose(body, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise EditError([_yaml_problem(BODY, exc)]) from exc
    if root is None:
        raise EditError([Problem(BODY, 1, 1, "(body)", "is empty; expected the persona's settings "
                                                       "(prompt:, voice:, ...)")])
    if not isinstance(root, yaml.MappingNode):
        kind = "a list" if isinstance(root, yaml.SequenceNode) else "text"
        raise EditError([Problem(BODY, root.start_mark.line + 1, root.start_mark.column + 1, "(body)",
                                 f"expected the persona's settings as 'key: value' lines (prompt:, voice:, ...), "
                                 f"got {kind}")])
    lines, _ = _lines(body.replace("\r\n", "\n"))
    return _dedent(lines, root.start_mark.column)


def put_persona(text: str, name: str, body: str, *, file: str = "tenant.yaml") -> str:
    """``text`` with persona ``name`` set to ``body`` (checked with ``check_body`` first); everything
    else unchanged. A new persona goes after the last one."""
    settings = check_body(body)
    lay = _layout(text, file)
    nl = _newline(text)
    if lay.block:
        entries = lay.entries()
        key_column = entries[0][0].start_mark.column
        i = lay.find(name)
        if i is not None:
            key, value = entries[i]
            first, end = lay.span(i)
            if isinstance(value, yaml.MappingNode) and not value.flow_style and value.start_mark.line > first:
                return lay.splice(first + 1, end, _reindent(settings, value.start_mark.column, nl))
            return lay.splice(first, end, f"{' ' * key.start_mark.column}{name}:{nl}"
                                          + _reindent(settings, key.start_mark.column + _step(lay), nl))
        _, end = lay.span(len(entries) - 1)
        return lay.splice(end, end, f"{' ' * key_column}{name}:{nl}" + _reindent(settings, key_column + _step(lay), nl))
    return _reemit(lay, {name: settings}, nl)


def delete_persona(text: str, name: str, *, file: str = "tenant.yaml") -> str | None:
    """``text`` without persona ``name`` (and the comment lines just above its key); None if there is
    no such persona."""
    lay = _layout(text, file)
    if lay.personas is None:
        return None
    nl = _newline(text)
    if lay.block:
        i = lay.find(name)
        if i is None:
            return None
        first, end = lay.span(i)
        column = lay.entries()[i][0].start_mark.column
        while first > 0 and lay.lines[first - 1].strip().startswith("#") and _indent(lay.lines[first - 1]) == column:
            first -= 1
        return lay.splice(first, end, "")
    personas = _construct(lay.personas)
    if not isinstance(personas, dict) or name not in personas:
        return None
    return _reemit(lay, {name: None}, nl)


def _reemit(lay: _Layout, changes: dict[str, str | None], nl: str) -> str:
    """Write ``personas:`` again in block style, with ``changes`` (persona -> settings text, or None
    to remove it); the rest of the file is untouched."""
    personas = _construct(lay.personas) if lay.personas is not None else None
    current = personas if isinstance(personas, dict) else {}
    texts = {str(k): _dump(v) for k, v in current.items()}
    for persona, settings in changes.items():
        if settings is None:
            texts.pop(persona, None)
        else:
            texts[persona] = settings
    root_column = lay.root.start_mark.column
    block = f"{' ' * root_column}personas:{nl}" + "".join(
        f"{' ' * (root_column + 2)}{persona}:{nl}" + _reindent(settings, root_column + 4, nl)
        for persona, settings in texts.items())
    if lay.personas_key is None:
        end = lay.end_line(lay.root)
        while end > 0 and _outside(lay.lines[end - 1], -1):
            end -= 1
        return lay.splice(end, end, block)
    first = lay.personas_key.start_mark.line
    return lay.splice(first, lay.end_line(lay.personas), block)
