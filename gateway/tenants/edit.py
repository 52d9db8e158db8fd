"""One persona of a tenant.yaml, read and replaced as text, leaving the rest of the file byte for byte.

The persona's place is found from PyYAML's node marks (composed within the tenant file's limits). A
persona entry runs from its key's line to the line before the next persona's key (or the end of
``personas:``), less trailing blank lines and comments indented no deeper than the key: those belong
to what follows. Its text, as the admin API shows it, is the lines after the key line, de-indented.

A replacement is re-indented to the persona's indentation and put in place of those lines; the key
line stays (and any comment on it). A persona written in flow style (``claims: {prompt: ...}``) has
its entry rewritten in block style; a ``personas:`` that is itself in flow style, or missing, is
re-emitted in block style (its comments, if any, are lost: there is no other way to splice into it).
A new persona is added after the last one.

A body is YAML from a tenant admin, so it is held to more than the file: it is read within
``BODY_LIMITS`` (no anchors or aliases: an anchor in it could change what an alias elsewhere in the
file stands for), its line ends are made ``\n`` (a lone CR is one in YAML; NEL, U+2028 and U+2029,
which YAML also takes for line ends, are refused), and every edit is checked after the splice: the
new file is read again and must hold exactly what the old one held, with only ``personas.<name>``
changed, to exactly the body's settings. An edit that would change anything else is refused, however
the text came to do it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import yaml

from personagate_common.bounded_yaml import YamlLimitError, YamlLimits, describe

from .loader import MAX_TENANT_FILE_BYTES, TENANT_FILE_LIMITS, Problem, _KeysAsWritten

BODY = "request body"
MAX_BODY_BYTES = 64 * 1024
# A body sits two levels down in tenant.yaml (personas.<name>); it may use no anchors or aliases.
BODY_LIMITS = YamlLimits(max_bytes=MAX_BODY_BYTES, max_depth=TENANT_FILE_LIMITS.max_depth - 2, max_nodes=20_000,
                         allow_aliases=False, max_cpu_seconds=2.0)
# Reading a file after an edit: the size limit is the caller's to report (as "would be N bytes").
_EDITED_FILE_LIMITS = replace(TENANT_FILE_LIMITS, max_bytes=MAX_TENANT_FILE_BYTES + 4 * MAX_BODY_BYTES)
# Characters YAML takes for line ends that Python's str.split("\n") does not; a lone CR is made \n.
_OTHER_LINE_BREAKS = {"\x85": "NEL (U+0085)", "\u2028": "LINE SEPARATOR (U+2028)",
                      "\u2029": "PARAGRAPH SEPARATOR (U+2029)"}


class EditError(ValueError):
    """The edit cannot be made; ``problems`` say why, positioned in the text they are about. ``reason``
    names the kind of refusal for metrics: ``invalid`` (not YAML, not a mapping, ...), ``limit_<name>``
    (a YamlLimits limit: size, depth, nodes, aliases, cpu), ``line_break``, ``document_marker`` or
    ``outside_persona``."""

    def __init__(self, problems: list[Problem], reason: str = "invalid") -> None:
        super().__init__("; ".join(map(str, problems)))
        self.problems = problems
        self.reason = reason


def _reason(exc: yaml.YAMLError) -> str:
    return f"limit_{exc.limit}" if isinstance(exc, YamlLimitError) else "invalid"


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
    line, column, message = describe(exc)
    return Problem(file, line, column, "(yaml)", message)


def _compose(text: str, limits: YamlLimits) -> yaml.Node | None:
    """The node tree of ``text``, read within ``limits``; raises yaml.YAMLError."""
    loader = _KeysAsWritten(text, limits)
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()


def _layout(text: str, file: str) -> _Layout:
    try:
        root = _compose(text, TENANT_FILE_LIMITS)
    except yaml.YAMLError as exc:
        raise EditError([_yaml_problem(file, exc)], _reason(exc)) from exc
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


def _construct(node: yaml.Node) -> Any:
    """The value of a node tree, keys kept as written (as the tenant loader reads them)."""
    loader = _KeysAsWritten("")
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


def _normalized(body: str) -> str:
    """``body`` with \\n line ends (CRLF and a lone CR, both one line end in YAML, made \\n) and no
    byte-order mark; refused where it holds a character that YAML reads as a line end and the splice
    would not (NEL, U+2028, U+2029), positioned in the body."""
    body = body.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    if not any(char in body for char in _OTHER_LINE_BREAKS):
        return body
    problems = []
    for number, line in enumerate(body.split("\n"), 1):
        for column, char in enumerate(line, 1):
            if char in _OTHER_LINE_BREAKS:
                problems.append(Problem(BODY, number, column, "(body)", f"{_OTHER_LINE_BREAKS[char]} is a line end "
                                        f"in YAML; expected lines ending in \\n (inside double quotes, write it as "
                                        f"\\u{ord(char):04x})"))
    if problems:
        raise EditError(problems, "line_break")
    return body


@dataclass(frozen=True)
class PersonaBody:
    """A persona's settings as a tenant admin sent them, checked (``check_body``): what ``put_persona``
    splices into the file and what the file must then say inside the persona."""

    text: str  # normalized (``_normalized``) and de-indented to column 0
    value: dict[str, Any]  # what it says, read as the tenant loader reads it


def check_body(body: str) -> PersonaBody:
    """A persona's settings as sent (YAML text), read once: refused with EditError and positioned
    problems (positions in the body) unless it is one YAML mapping within BODY_LIMITS, with no
    document marker and line ends YAML and the splice agree on. Its text comes back with \\n line
    ends, de-indented to column 0, with the value it holds. CPU work: call it off the event loop."""
    body = _normalized(body)
    problems = []
    for number, line in enumerate(body.split("\n"), 1):
        if line.startswith(("---", "...")):
            problems.append(Problem(BODY, number, 1, "(body)", "document markers (--- or ...) cannot be part of a "
                                                               "persona; expected the persona's settings only"))
    if problems:
        raise EditError(problems, "document_marker")
    try:
        root = _compose(body, BODY_LIMITS)
        value = _construct(root) if root is not None else None
    except yaml.YAMLError as exc:
        raise EditError([_yaml_problem(BODY, exc)], _reason(exc)) from exc
    if root is None:
        raise EditError([Problem(BODY, 1, 1, "(body)", "is empty; expected the persona's settings "
                                                       "(prompt:, voice:, ...)")])
    if not isinstance(root, yaml.MappingNode) or not isinstance(value, dict):
        kind = "a list" if isinstance(root, yaml.SequenceNode) else "text"
        raise EditError([Problem(BODY, root.start_mark.line + 1, root.start_mark.column + 1, "(body)",
                                 f"expected the persona's settings as 'key: value' lines (prompt:, voice:, ...), "
                                 f"got {kind}")])
    return PersonaBody(_dedent(_lines(body)[0], root.start_mark.column), value)


def _same(a: Any, b: Any) -> bool:
    """Whether two values read from YAML are the same (NaN equals NaN; 1, 1.0 and true differ)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _confined(before: Any, new_text: str, name: str, settings: Any) -> bool:
    """Whether ``new_text`` holds what ``before`` (the old file's value) held, with only persona
    ``name`` changed to ``settings`` (None: removed). A text that is not valid YAML counts as
    confined: the caller's validation refuses it, with positions in the file. One that passes a
    limit raises EditError."""
    try:
        root = _compose(new_text, _EDITED_FILE_LIMITS)
        after = _construct(root) if root is not None else None
    except YamlLimitError as exc:
        _, _, message = describe(exc)
        raise EditError([Problem(BODY, 1, 1, "(body)", f"with this persona, tenant.yaml would be {message}")],
                        _reason(exc)) from exc
    except yaml.YAMLError:
        return True
    if not isinstance(before, dict) or not isinstance(after, dict):
        return False
    expected = dict(before)
    personas = dict(before["personas"]) if isinstance(before.get("personas"), dict) else {}
    if settings is None:
        personas.pop(name, None)
    else:
        personas[name] = settings
    expected["personas"] = personas
    if not personas and after.get("personas") is None:  # the last persona removed: `personas:` is left empty
        after = {**after, "personas": {}}
    return _same(after, expected)


def _file_value(lay: _Layout, file: str) -> Any:
    try:
        return _construct(lay.root)
    except yaml.YAMLError as exc:
        raise EditError([_yaml_problem(file, exc)]) from exc


def _outside_persona(name: str) -> EditError:
    return EditError([Problem(BODY, 1, 1, "(body)", f"would change tenant.yaml outside persona {name!r}; expected "
                                                    "the persona's settings only")], "outside_persona")


def put_persona(text: str, name: str, body: PersonaBody | str, *, file: str = "tenant.yaml") -> str:
    """``text`` with persona ``name`` set to ``body``; everything else unchanged, which is verified by
    reading the result: an edit that would change anything but ``personas.<name>`` raises EditError.
    ``body`` is what ``check_body`` returned, or the text as sent, checked here with it (its problems
    raised before the file's). A new persona goes after the last one. CPU work: call it off the event
    loop."""
    # A caller that has checked the body already (the admin API answers body problems before it reads
    # the file) passes what check_body returned, so the body is parsed once.
    settings = body if isinstance(body, PersonaBody) else check_body(body)
    lay = _layout(text, file)
    new_text = _spliced(lay, name, settings.text, _newline(text))
    # The file's value is read after the splice, which works on the layout's nodes: constructing
    # merges `<<` keys into them in place.
    if not _confined(_file_value(lay, file), new_text, name, settings.value):
        raise _outside_persona(name)
    return new_text


def _spliced(lay: _Layout, name: str, settings: str, nl: str) -> str:
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
        new_text = lay.splice(first, end, "")
    else:
        personas = _construct(lay.personas)
        if not isinstance(personas, dict) or name not in personas:
            return None
        new_text = _reemit(lay, {name: None}, nl)
    if not _confined(_file_value(lay, file), new_text, name, None):
        raise EditError([Problem(file, 1, 1, "(file)", f"removing persona {name!r} would change more than it; "
                                                       "edit the file by hand")], "outside_persona")
    return new_text


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
