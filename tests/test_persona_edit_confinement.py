"""A persona edit stays inside its persona, whatever the body holds: property-based tests over line
ends (every one YAML knows), indentation, anchors and aliases, comments, document markers and
Unicode, against tenant files in block and flow style, with CRLF line ends, anchors and line
separators of their own. Whatever the body, the edit is refused, or the file it makes cannot be read
(so the gateway refuses it whole), or the new file says exactly what the old one said outside
``personas.<name>`` and exactly what the body says inside it. Nothing else is ever raised (a 500)."""

from __future__ import annotations

from typing import Any

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.tenants.edit import EditError, delete_persona, put_persona
from gateway.tenants.loader import _KeysAsWritten
from tests.helpers.admin_api import ACME
from tests.helpers.hostile_yaml import OTHER_LINE_BREAKS, alias_bomb_body, deep_body, line_break_injection

FLOW = """\
tenant: acme
name: Acme
numbers: {"+14155550100": claims}
personas: {claims: {prompt: "Hello.", voice: {preset: NATF0}}, billing: {prompt: Bills., voice: {preset: NATM1}}}
limits: {max_concurrent_calls: 5}
"""
ANCHORS = """\
tenant: acme
name: &name Acme
numbers:
  "+14155550100": claims
personas:
  claims:
    prompt: "Hello from \u2028 the \x85 claims line."   # separators YAML folds inside quotes
    voice: &voice {preset: NATF0}
  billing:
    prompt: Bills.
    voice: *voice
escalation:
  transfer_to: sip:queue@pbx.example
limits: {max_concurrent_calls: 5}
label: *name
"""
NO_PERSONAS = "tenant: acme\nname: Acme\nlimits:\n  max_concurrent_calls: 5\n"
FILES = [ACME, ACME.replace("\n", "\r\n"), FLOW, ANCHORS, NO_PERSONAS]
NAMES = ["claims", "billing", "newbie"]

# Every line end YAML knows; a body uses one of the usual ones throughout, or any mix.
LINE_ENDS = ["\n", "\r\n", *OTHER_LINE_BREAKS]
# Persona keys, and the tenant-level keys an attacker would like to reach.
KEYS = ["prompt", "voice", "preset", "sampling", "temperature", "speaks_first", "limits", "max_concurrent_calls",
        "escalation", "transfer_to", "dtmf_digit", "personas", "claims", "tenant", "numbers", "name", "<<"]
WORDS = st.text(st.characters(codec="utf-8", categories=("L", "N", "Zs", "M", "So", "Sm")), min_size=1, max_size=12)
ANY_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
SCALARS = st.one_of(
    WORDS.map(lambda w: w.strip() or "x"),
    WORDS.map(lambda w: '"' + w.replace("\\", "\\\\").replace('"', '\\"') + '"'),
    st.sampled_from(["NATF0", "0.7", "5", "500", "true", "~", "'it''s'", '"a\\u2028b\\x85c"', "{preset: NATM1}",
                     "[a, b]", "&a x", "*a", "!!str 5", "!!python/none", "sip:+19005550100@premium.example",
                     '"\u2028"', "'\x85'", "x # comment", "\u00a0x", "{", "]", "*nope"]),
    ANY_TEXT,
)
SHAPES = ["scalar"] * 8 + ["nested"] * 3 + ["list", "literal"] * 2 + ["comment"] * 2 + ["stray", "marker"]
MARKERS = ["---", "...", "--- x", "... # end", "%YAML 1.1", "%TAG ! tag:x,2026:", "\ufeff"]


@st.composite
def blocks(draw: st.DrawFn, indent: int = 0, depth: int = 0) -> list[str]:
    """Lines of a block mapping at ``indent``, mostly well formed: nested mappings, lists, block
    scalars, comments anywhere, and now and then a line indented wrongly or a document marker."""
    out: list[str] = []
    step = draw(st.sampled_from([1, 2, 2, 4]))
    for _ in range(draw(st.integers(1, 4))):
        pad = " " * indent
        key = draw(st.sampled_from(KEYS))
        shape = draw(st.sampled_from(SHAPES))
        if shape == "nested" and depth < 3:
            out.append(f"{pad}{key}:" + draw(st.sampled_from(["", " &m", " # note"])))
            out += draw(blocks(indent + step, depth + 1))
        elif shape == "list":
            out.append(f"{pad}{key}:")
            out += [f"{pad}{' ' * draw(st.sampled_from([0, step]))}- {draw(SCALARS)}"
                    for _ in range(draw(st.integers(1, 3)))]
        elif shape == "literal":
            out.append(f"{pad}{key}: {draw(st.sampled_from(['|', '>-', '|+', '|2', '>']))}")
            out += [f"{pad}{' ' * step}{draw(ANY_TEXT)}" for _ in range(draw(st.integers(0, 3)))]
        elif shape == "comment":
            out.append(" " * draw(st.sampled_from([0, indent, indent + 3])) + "# " + draw(ANY_TEXT))
        elif shape == "stray":  # a line at another indentation: the splice must not let it escape
            out.append(" " * draw(st.sampled_from([0, max(indent - 1, 0), indent + 1])) + f"{key}: {draw(SCALARS)}")
        elif shape == "marker":
            out.append(draw(st.sampled_from(MARKERS)))
        else:
            out.append(f"{pad}{key}: {draw(SCALARS)}")
    return out


@st.composite
def bodies(draw: st.DrawFn) -> str:
    indent = draw(st.sampled_from([0, 0, 2, 3]))
    ends = draw(st.sampled_from(["\n", "\n", "\r\n", "\r", "mixed"]))
    text = "".join(line + (draw(st.sampled_from(LINE_ENDS)) if ends == "mixed" else ends)
                   for line in draw(blocks(indent)))
    return draw(st.sampled_from(["", "", "\ufeff"])) + text


def _read(text: str) -> Any:
    """The file as the gateway reads it (keys as written); raises yaml.YAMLError where it cannot."""
    loader = _KeysAsWritten(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _outside(value: Any, name: str) -> Any:
    """A file's value less persona ``name``."""
    if not isinstance(value, dict):
        return value
    personas = value.get("personas")
    rest = {k: v for k, v in personas.items() if k != name} if isinstance(personas, dict) else personas
    return {**value, "personas": rest or None}


def _assert_confined(old: str, new: str, name: str, body: str | None) -> None:
    try:
        after = _read(new)
    except yaml.YAMLError:
        return  # the gateway cannot read it: load_tenant refuses it whole, nothing is written or applied
    before = _read(old)
    assert _outside(after, name) == _outside(before, name), new
    # As read with no type resolution at all, too: nothing outside changed its text either.
    raw_after, raw_before = yaml.load(new, yaml.BaseLoader), yaml.load(old, yaml.BaseLoader)
    assert _outside(raw_after, name) == _outside(raw_before, name), new
    if body is not None:
        assert after["personas"][name] == _read(body.removeprefix("\ufeff")), new


CONFINEMENT = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@CONFINEMENT
@given(old=st.sampled_from(FILES), name=st.sampled_from(NAMES), body=bodies())
@example(old=ACME, name="claims", body=line_break_injection("\r"))
@example(old=ACME, name="claims", body=line_break_injection("\x85"))
@example(old=ACME, name="claims", body=line_break_injection("\u2028"))
@example(old=ACME, name="claims", body=line_break_injection("\u2029"))
@example(old=ACME, name="newbie", body="prompt: x\n---\nlimits: {max_concurrent_calls: 500}\n")
@example(old=ANCHORS, name="billing", body="prompt: x\nvoice: &voice {preset: VARF1}\n")
@example(old=ACME, name="claims", body=alias_bomb_body())
@example(old=ACME, name="claims", body=deep_body(2000))
def test_no_body_changes_anything_outside_its_persona(old: str, name: str, body: str) -> None:
    """Whatever a tenant admin PUTs as a persona, tenant.yaml changes in personas.<name> only, to
    exactly what the body says, or the edit is refused."""
    try:
        new = put_persona(old, name, body)
    except EditError:
        return
    _assert_confined(old, new, name, body)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(NAMES),
       prompt=st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1,
                      max_size=40),
       line_end=st.sampled_from(["\n", "\r\n", "\r"]), indent=st.sampled_from([0, 2, 3]),
       old=st.sampled_from([f for f in FILES if f is not ANCHORS]))  # replacing its claims drops an anchor in use
def test_a_well_formed_persona_is_accepted_with_any_usual_line_end(name: str, prompt: str, line_end: str,
                                                                     indent: int, old: str) -> None:
    """The checks refuse attacks, not admins: a persona with a prompt of any printable Unicode (quoted),
    sent with \\n, CRLF or lone CR line ends and indented as a whole, is written and reads back as sent."""
    quoted = '"' + prompt.replace("\\", "\\\\").replace('"', '\\"') + '"'
    pad = " " * indent
    body = line_end.join([f"{pad}prompt: {quoted}", f"{pad}voice:", f"{pad}  preset: NATF0", ""])
    new = put_persona(old, name, body)
    _assert_confined(old, new, name, body.replace("\r\n", "\n").replace("\r", "\n"))
    assert _read(new)["personas"][name] == {"prompt": _read(f"p: {quoted}")["p"], "voice": {"preset": "NATF0"}}


@settings(max_examples=50, deadline=None)
@given(old=st.sampled_from([ACME, ACME.replace("\n", "\r\n"), FLOW]), name=st.sampled_from(["claims", "billing"]))
def test_deleting_a_persona_removes_only_it(old: str, name: str) -> None:
    """A persona's removal takes its lines (and the comment above it) and nothing else."""
    new = delete_persona(old, name)
    assert new is not None
    after, before = _read(new), _read(old)
    assert name not in after["personas"] and _outside(after, name) == _outside(before, name)
