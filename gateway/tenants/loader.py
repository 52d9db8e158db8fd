"""Reading tenant folders: YAML with positions, the schema, voice clips, references between fields and
between tenants. Every problem of a run is collected, each as ``file:line:column: field.path: message``.

A folder is ``<root>/<tenant-id>/`` holding ``tenant.yaml`` and the clips it names. Names starting
with a dot are not tenant content: Kubernetes keeps its ConfigMap versions there (``..data``), and the
admin API its history (``.history``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import difflib
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from personagate_common.bounded_yaml import BoundedSafeLoader, YamlLimits, describe
from personagate_common.voices import PreparedClip, VoiceClipError, prepare_clip

from .schema import PERSONA_NAME, TENANT_ID, TenantFile, clip_path
from .tenant import PersonaConfig, Tenant

log = logging.getLogger(__name__)

TENANT_FILE = "tenant.yaml"
MAX_TENANT_FILE_BYTES = 1_000_000
# A tenant.yaml is a few levels deep (personas.<name>.voice.preset); these bound what reading any file
# may cost (personagate_common/bounded_yaml.py): the nesting, and the values once aliases are expanded.
TENANT_FILE_LIMITS = YamlLimits(max_bytes=MAX_TENANT_FILE_BYTES, max_depth=32, max_nodes=200_000)
MAX_CLIP_BYTES = 10_000_000
VOICE_SECONDS = (2.0, 10.0)
ANNOUNCEMENT_SECONDS = (1.0, 30.0)

# What a missing field should hold, for the message an admin sees.
EXPECTED = {
    "tenant": "the tenant id (the folder's name)",
    "name": "the tenant's display name",
    "personas": "at least one persona",
    "prompt": "the role prompt: who the agent is and how it should behave",
    "voice": "a voice: {preset: NATF0} or {clip: voices/agent.wav}",
    "timezone": "an IANA time zone such as 'Europe/London'",
    "weekly": "opening hours per day, e.g. {mon: '08:00-18:00'}",
    "transfer_to": "the SIP URI of the human queue, e.g. 'sip:queue@pbx.example.com'",
}
KINDS = {
    "string_type": "text", "int_type": "a whole number", "int_parsing": "a whole number",
    "int_from_float": "a whole number", "float_type": "a number", "float_parsing": "a number",
    "bool_type": "true or false", "bool_parsing": "true or false", "dict_type": "a mapping (key: value lines)",
    "list_type": "a list", "date_type": "a date like 2026-12-25", "date_parsing": "a date like 2026-12-25",
    "date_from_datetime_parsing": "a date like 2026-12-25", "model_type": "a mapping (key: value lines)",
    "model_attributes_type": "a mapping (key: value lines)",
}


@dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong in a tenant folder, positioned for the admin's editor (1-based)."""

    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.path}: {self.message}"


class ClipCache:
    """Prepared clips by content hash: a reload re-reads files but decodes only clips that changed.

    It holds at least ``size`` clips, and always every clip the last whole load used (``loaded()`` marks the end
    of one): a checkout swapped to a new commit (git-sync) gives every file a new inode, so every tenant is read
    again, and a cache smaller than the tenants' clips would decode most of them again on each commit."""

    def __init__(self, size: int = 64) -> None:
        self._size = size
        self._entries: OrderedDict[tuple[str, float, float], PreparedClip | VoiceClipError] = OrderedDict()
        self._lock = threading.Lock()
        self._used: set[tuple[str, float, float]] = set()  # by the load in progress
        self._last_load = 0  # clips the last whole load used

    def prepare(self, data: bytes, seconds: tuple[float, float]) -> PreparedClip:
        key = (hashlib.sha256(data).hexdigest(), *seconds)
        with self._lock:
            self._used.add(key)
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
        if found is None:
            try:
                found = prepare_clip(data, min_seconds=seconds[0], max_seconds=seconds[1])
            except VoiceClipError as exc:
                found = exc
            with self._lock:
                self._entries[key] = found
                bound = max(self._size, self._last_load + self._size // 4, len(self._used))
                while len(self._entries) > bound:
                    self._entries.popitem(last=False)
        if isinstance(found, VoiceClipError):
            raise found
        return found

    def loaded(self) -> None:
        """A whole load (every tenant) is over: the cache keeps room for as many clips as it used."""
        with self._lock:
            self._last_load = len(self._used)
            self._used.clear()


@dataclass
class LoadResult:
    tenants: dict[str, Tenant]
    problems: list[Problem]


# ---------------------------------------------------------------------------------------------- YAML


class _Document:
    """A YAML document and its node tree, to point a field path back at a line and column."""

    def __init__(self, file: str, root: yaml.Node) -> None:
        self.file = file
        self.root = root
        # Keys of each mapping node looked up so far (by node id): a lookup per number of a tenant
        # with thousands of numbers stays linear.
        self._keys: dict[int, dict[str, tuple[yaml.Node, yaml.Node]]] = {}

    def _pair(self, node: yaml.MappingNode, key: str) -> tuple[yaml.Node, yaml.Node] | None:
        keys = self._keys.get(id(node))
        if keys is None:
            keys = {}
            for k, v in node.value:
                keys.setdefault(str(k.value), (k, v))  # the first of duplicate keys, as a scan would find
            self._keys[id(node)] = keys
        return keys.get(key)

    def mark(self, path: Iterable[Any], *, key: bool = False) -> tuple[int, int]:
        """Line and column of the value at ``path`` (of its key with ``key``); where the path runs
        past what the file holds (a missing field), the deepest node that exists."""
        node: yaml.Node = self.root
        steps = list(path)
        for index, step in enumerate(steps):
            last = index == len(steps) - 1
            if isinstance(node, yaml.MappingNode):
                pair = self._pair(node, str(step))
                if pair is None:
                    break
                node = pair[0] if last and key else pair[1]
            elif isinstance(node, yaml.SequenceNode) and isinstance(step, int) and step < len(node.value):
                node = node.value[step]
            else:
                break
        return node.start_mark.line + 1, node.start_mark.column + 1

    def problem(self, path: Iterable[Any], message: str, *, key: bool = False) -> Problem:
        steps = list(path)
        line, column = self.mark(steps, key=key)
        return Problem(self.file, line, column, ".".join(map(str, steps)) or "(file)", message)


class _KeysAsWritten(BoundedSafeLoader):
    """Mapping keys are kept as the text the admin wrote: `+14155550100:` stays a phone number
    (YAML would make it an int) and `on:` stays a word (YAML 1.1 would make it true). Read within
    ``TENANT_FILE_LIMITS`` unless told otherwise."""

    def __init__(self, stream: str, limits: YamlLimits = TENANT_FILE_LIMITS) -> None:
        super().__init__(stream, limits)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:  # type: ignore[override]
        self.flatten_mapping(node)
        return {
            (key.value if isinstance(key, yaml.ScalarNode) else self.construct_object(key, deep=deep)):
            self.construct_object(value, deep=deep)
            for key, value in node.value
        }

    def construct_yaml_timestamp(self, node: yaml.ScalarNode) -> Any:  # type: ignore[override]
        # A date that does not exist (2026-02-29) stays text, for the schema to report in place.
        try:
            return super().construct_yaml_timestamp(node)
        except ValueError:
            return self.construct_scalar(node)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:  # e.g. `!!int abc`
            raise yaml.constructor.ConstructorError(None, None, f"cannot read this value ({exc})",
                                                    node.start_mark) from exc


_KeysAsWritten.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _KeysAsWritten.construct_mapping)
_KeysAsWritten.add_constructor("tag:yaml.org,2002:timestamp", _KeysAsWritten.construct_yaml_timestamp)


def _parse_yaml(file: str, text: str) -> tuple[_Document | None, Any, list[Problem]]:
    loader = None
    try:
        loader = _KeysAsWritten(text)
        root = loader.get_single_node()
        if root is None:
            return None, None, [Problem(file, 1, 1, "(file)", "the file is empty; expected the tenant's settings")]
        problems = list(_duplicate_keys(_Document(file, root), root, []))
        data = loader.construct_document(root)
    except yaml.YAMLError as exc:
        line, column, message = describe(exc)
        return None, None, [Problem(file, line, column, "(yaml)", message)]
    finally:
        if loader is not None:
            loader.dispose()
    return _Document(file, root), data, problems


def _duplicate_keys(doc: _Document, node: yaml.Node, path: list[Any]) -> Iterable[Problem]:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, yaml.Node] = {}
        for key, value in node.value:
            name = str(key.value)
            if name in seen:
                first = seen[name].start_mark.line + 1
                yield Problem(doc.file, key.start_mark.line + 1, key.start_mark.column + 1,
                              ".".join(map(str, [*path, name])), f"duplicate key (first given on line {first}); "
                              "expected each key once")
            seen[name] = key
            yield from _duplicate_keys(doc, value, [*path, name])
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield from _duplicate_keys(doc, item, [*path, index])


# -------------------------------------------------------------------------------------- schema errors


def _schema_problems(doc: _Document, exc: ValidationError) -> list[Problem]:
    problems = []
    for error in exc.errors(include_url=False):
        loc = list(error["loc"])
        on_key = bool(loc) and loc[-1] == "[key]"
        if on_key:
            loc.pop()
        # Pydantic names the branch of a union it tried (`str`, `list[str]`, `function-after[...]`).
        loc = [step for step in loc if not (isinstance(step, str) and ("[" in step or step in ("str", "list")))]
        kind = error["type"]
        if kind == "extra_forbidden":
            problems.append(doc.problem(loc, _unknown_key(loc, error, doc), key=True))
        elif kind == "missing":
            name = str(loc[-1]) if loc else "field"
            problems.append(doc.problem(loc, f"missing; expected {EXPECTED.get(name, 'a value')}"))
        else:
            problems.append(doc.problem(loc, _message(error), key=on_key))
    return _one_per_place(problems)


def _one_per_place(problems: list[Problem]) -> list[Problem]:
    # A value that fits no branch of a union is reported once per branch: keep the first.
    seen: set[tuple[int, int, str]] = set()
    kept = []
    for problem in problems:
        if (problem.line, problem.column, problem.path) not in seen:
            seen.add((problem.line, problem.column, problem.path))
            kept.append(problem)
    return kept


def _unknown_key(loc: list[Any], error: Any, doc: _Document) -> str:
    name = str(loc[-1]) if loc else "?"
    parent = _model_at(loc[:-1])
    known = sorted(parent.model_fields) if parent is not None else []
    hint = difflib.get_close_matches(name, known, n=1)
    expected = f"did you mean '{hint[0]}'?" if hint else f"expected one of: {', '.join(known)}" if known else ""
    return f"unknown key '{name}'; {expected}".rstrip("; ")


def _model_at(loc: list[Any]) -> Any:
    """The schema model a field path leads to (names of personas and numbers are skipped)."""
    model: Any = TenantFile
    for step in loc:
        field = model.model_fields.get(str(step)) if hasattr(model, "model_fields") else None
        if field is None:
            continue  # a dict key such as a persona name
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if hasattr(c, "model_fields")), model)
    return model


def _message(error: Any) -> str:
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    if kind in KINDS:
        return f"expected {KINDS[kind]}, got {_show(value)}"
    if kind in ("greater_than_equal", "greater_than"):
        return f"must be at least {ctx.get('ge', ctx.get('gt'))}, got {_show(value)}"
    if kind in ("less_than_equal", "less_than"):
        return f"must be at most {ctx.get('le', ctx.get('lt'))}, got {_show(value)}"
    if kind == "string_too_long":
        return f"is {len(value)} characters long; expected at most {ctx['max_length']}"
    if kind == "string_too_short":
        return "is empty; expected text"
    if kind == "too_short":
        return "is empty; expected at least one entry"
    if kind == "literal_error":
        return f"{_show(value)} is not allowed; expected one of {ctx.get('expected')}"
    return f"{error['msg']}, got {_show(value)}"


def _show(value: Any) -> str:
    if value is None:
        return "nothing (a '#' starts a comment in YAML: write '#' in quotes)"
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------------------------------- a tenant


def load_tenant(folder: Path, clips: ClipCache, *, text: str | None = None, label: str | None = None
                ) -> tuple[Tenant | None, list[Problem]]:
    """Validate one tenant folder (``text`` instead of its tenant.yaml, to check a proposed edit).
    Returns the tenant, or None with every problem found. ``label`` is how the file is named in
    messages (default: its path). Never raises: whatever goes wrong checking one tenant is a problem
    of that tenant, so that a reload still applies the others and ``validate`` prints no traceback."""
    file = label or str(folder / TENANT_FILE)
    try:
        return _load_tenant(folder, clips, text, file)
    except Exception as exc:  # a bug, not the file: the log has the traceback, the admin a position
        log.exception("tenant check failed", extra={"tenant": folder.name, "file": file})
        return None, [Problem(file, 1, 1, "(file)", f"could not be checked ({type(exc).__name__}); the gateway's "
                                                    "log has the details")]


def _load_tenant(folder: Path, clips: ClipCache, text: str | None, file: str) -> tuple[Tenant | None, list[Problem]]:
    path = folder / TENANT_FILE
    if text is None:
        try:
            with path.open("rb") as handle:  # never more than the limit read: the file could be endless
                raw = handle.read(MAX_TENANT_FILE_BYTES + 1)
                size = os.fstat(handle.fileno()).st_size
        except FileNotFoundError:
            return None, [Problem(file, 1, 1, "(file)", f"missing; expected {TENANT_FILE} in the tenant folder")]
        except OSError as exc:
            return None, [Problem(file, 1, 1, "(file)", f"cannot be read ({exc.strerror})")]
        if len(raw) > MAX_TENANT_FILE_BYTES:
            told = f"{size} bytes" if size > MAX_TENANT_FILE_BYTES else f"more than {MAX_TENANT_FILE_BYTES} bytes"
            return None, [Problem(file, 1, 1, "(file)", f"is {told}; expected at most {MAX_TENANT_FILE_BYTES}")]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            return None, [Problem(file, line, 1, "(file)", "is not UTF-8 text; save it as UTF-8")]
    doc, data, problems = _parse_yaml(file, text)
    if doc is None:
        return None, problems
    if not isinstance(data, dict):
        return None, [doc.problem([], f"expected a mapping of tenant settings, got {_show(data)}")]
    spec = None
    try:
        spec = TenantFile.model_validate(data)
    except ValidationError as exc:
        problems += _schema_problems(doc, exc)
    # References and clips are checked on what the file says even when the schema found problems,
    # so that one run reports everything.
    problems += _reference_problems(doc, data, folder.name)
    voices, announcement = _prepare_clips(doc, _clip_fields(data), folder, clips, problems)
    if problems or spec is None:
        return None, sorted(problems, key=lambda p: (p.line, p.column))
    tenant = Tenant(
        id=spec.tenant,
        spec=spec,
        folder=folder,
        personas={name: PersonaConfig.from_spec(spec.tenant, name, p, voices.get(name))
                  for name, p in spec.personas.items()},
        consent_announcement=announcement,
        number_marks={number: doc.mark(["numbers", number], key=True) for number in spec.numbers},
        file=file,
    )
    return tenant, []


def _get(data: Any, *path: str) -> Any:
    for step in path:
        if not isinstance(data, dict):
            return None
        data = data.get(step)
    return data


def _reference_problems(doc: _Document, data: dict[str, Any], folder_name: str) -> list[Problem]:
    problems = []
    tenant = data.get("tenant")
    if isinstance(tenant, str) and TENANT_ID.match(tenant) and tenant != folder_name:
        problems.append(doc.problem(["tenant"], f"is {tenant!r} but the folder is {folder_name!r}; "
                                               "expected the folder's name"))
    personas = data.get("personas")
    if not isinstance(personas, dict):
        return problems
    known = ", ".join(sorted(str(p) for p in personas if PERSONA_NAME.match(str(p)))) or "none defined"
    numbers = data.get("numbers")
    for number, persona in (numbers.items() if isinstance(numbers, dict) else ()):
        if isinstance(persona, str) and persona not in personas:
            problems.append(doc.problem(["numbers", number], f"routes to persona {persona!r}, which is not defined; "
                                                             f"expected one of: {known}"))
    after = _get(data, "hours", "after_hours", "persona")
    if isinstance(after, str) and after not in personas:
        problems.append(doc.problem(["hours", "after_hours", "persona"],
                                    f"persona {after!r} is not defined; expected one of: {known}"))
    return problems


def _clip_fields(data: dict[str, Any]) -> dict[tuple[str, ...], str]:
    """Every clip the file names (where the name itself is valid), by the field path naming it."""
    named: dict[tuple[str, ...], Any] = {}
    personas = data.get("personas")
    for name, persona in (personas.items() if isinstance(personas, dict) else ()):
        named[("personas", str(name), "voice", "clip")] = _get(persona, "voice", "clip")
    named[("recording", "consent_announcement")] = _get(data, "recording", "consent_announcement")
    found = {}
    for path, clip in named.items():
        if isinstance(clip, str):
            with contextlib.suppress(ValueError):  # an invalid name is the schema's problem to report
                found[path] = clip_path(clip)
    return found


def _prepare_clips(doc: _Document, named: dict[tuple[str, ...], str], folder: Path, clips: ClipCache,
                   problems: list[Problem]) -> tuple[dict[str, PreparedClip], PreparedClip | None]:
    voices: dict[str, PreparedClip] = {}
    announcement = None
    for path, name in named.items():
        seconds = ANNOUNCEMENT_SECONDS if path[0] == "recording" else VOICE_SECONDS
        file = folder / name
        try:
            size = file.stat().st_size
            if size > MAX_CLIP_BYTES:
                problems.append(doc.problem(path, f"{name} is {size} bytes; expected at most {MAX_CLIP_BYTES}"))
                continue
            prepared = clips.prepare(file.read_bytes(), seconds)
        except FileNotFoundError:
            problems.append(doc.problem(path, f"file {name!r} not found in the tenant folder; expected a wav or flac "
                                              "clip there"))
            continue
        except OSError as exc:
            problems.append(doc.problem(path, f"{name} cannot be read ({exc.strerror})"))
            continue
        except VoiceClipError as exc:
            problems.append(doc.problem(path, f"{name}: {exc}"))
            continue
        if path[0] == "recording":
            announcement = prepared
        else:
            voices[path[1]] = prepared
    return voices, announcement


# ---------------------------------------------------------------------------------------- all tenants


def tenant_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_tenants(root: Path, clips: ClipCache | None = None) -> LoadResult:
    """Every tenant under ``root`` with every problem, including numbers claimed by two tenants."""
    clips = clips or ClipCache()
    if not root.is_dir():
        return LoadResult({}, [Problem(str(root), 1, 1, "(folder)", "not found; expected a folder of tenant folders")])
    tenants: dict[str, Tenant] = {}
    problems: list[Problem] = []
    for folder in tenant_folders(root):
        tenant, found = load_tenant(folder, clips)
        problems += found
        if tenant is not None:
            tenants[tenant.id] = tenant
    clashes = number_clashes(tenants.values())
    for tenant_id in {t for t, _ in clashes}:
        tenants.pop(tenant_id, None)
    problems += [problem for _, problem in clashes]
    clips.loaded()
    return LoadResult(tenants, problems)


def number_clashes(tenants: Iterable[Tenant], fixed: Mapping[str, Tenant] | None = None
                   ) -> list[tuple[str, Problem]]:
    """(tenant id, problem) for every number routed by more than one tenant. Numbers of ``fixed``
    tenants (already serving) are checked against but never reported."""
    owners: dict[str, list[Tenant]] = {}
    for tenant in [*(fixed or {}).values(), *tenants]:
        for number in tenant.spec.numbers:
            owners.setdefault(number, []).append(tenant)
    fixed_ids = set(fixed or {})
    clashes = []
    for number, claimants in owners.items():
        if len({t.id for t in claimants}) < 2:
            continue
        for tenant in claimants:
            if tenant.id in fixed_ids and tenant is (fixed or {}).get(tenant.id):
                continue
            others = "; ".join(f"tenant {o.id!r} ({o.file}:{o.number_marks[number][0]})"
                               for o in claimants if o.id != tenant.id)
            line, column = tenant.number_marks[number]
            clashes.append((tenant.id, Problem(tenant.file, line, column, f"numbers.{number}",
                                               f"is also routed by {others}; expected each number in one tenant")))
    return clashes
