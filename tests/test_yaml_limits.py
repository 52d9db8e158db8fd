"""Hostile YAML, wherever the gateway reads YAML: alias bombs and deep nesting in persona bodies, in
tenant files, in the tokens and settings files. Each is refused with a positioned message at once
(422 from the admin API, a problem of that tenant only for a file), never a 500 or a traceback, while
the event loop keeps answering and the other tenants keep reloading; a persona body whose line ends
YAML reads differently from the splice cannot write tenant-level keys."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

from agent_runtime.config import SettingsError, load_worker_settings
from gateway.admin.tokens import TokensUnavailable, parse_tokens
from gateway.config import load_gateway_settings
from gateway.tenants import loader
from gateway.tenants.loader import ClipCache, load_tenant
from gateway.tenants.registry import TenantRegistry
from personagate_common.bounded_yaml import YamlLimitError, YamlLimits, describe, load_yaml
from tests.helpers.admin_api import ACME, ADMIN
from tests.helpers.hostile_yaml import (
    OTHER_LINE_BREAKS,
    alias_bomb_body,
    alias_bomb_lines,
    deep_body,
    deep_value,
    line_break_injection,
)
from tests.helpers.loop_watch import LoopWatch
from tests.helpers.tenant_files import TEMPLATE, routed_persona, write_tenant, write_tenant_file
from tests.helpers.wait import until_async

DEPTH = "refused: nested more than 32 levels deep; expected settings a few levels deep"
NODES = "refused: more than 200000 values once aliases are expanded; expected fewer (or fewer aliases)"


def _limit(text: str, limits: YamlLimits | None = None) -> YamlLimitError:
    with pytest.raises(YamlLimitError) as err:
        load_yaml(text, *([limits] if limits else []))
    return err.value


# ------------------------------------------------------------------------------------- the loader


def test_an_alias_bomb_is_refused_where_its_expansion_passes_the_limit():
    """9-wide aliases 8 levels deep (43 million values) stop at the alias that passes 200 000 values,
    before anything downstream sees them; a few aliases in a configuration file still read."""
    error = _limit("\n".join(alias_bomb_lines()) + "\n")
    assert error.limit == "nodes"
    assert describe(error) == (7, 10, NODES)  # line 7: b6, the first level past 200 000 (9**6 = 531 441)
    assert load_yaml("base: &base {preset: NATF0}\nvoice: *base\nother:\n  <<: *base\n  extra: 1\n") == {
        "base": {"preset": "NATF0"}, "voice": {"preset": "NATF0"}, "other": {"preset": "NATF0", "extra": 1}}


@pytest.mark.parametrize("text, where", [
    pytest.param("prompt: " + deep_value(2000), (1, 40), id="flow-2000"),
    pytest.param("a: " + deep_value(100_000), (1, 35), id="flow-100k"),
    pytest.param("- " * 100_000 + "x", (1, 65), id="block-list-100k"),
    pytest.param("".join(" " * i + f"k{i}:\n" for i in range(40)), (32, 32), id="block-mapping-40"),
    pytest.param("{a: " * 50_000, (1, 129), id="flow-mapping-50k"),
])
def test_deep_nesting_is_refused_at_its_position(text, where):
    """Nesting past 32 levels is refused where it passes the limit, by the scanner before its cost
    grows (100 000 open brackets used to take it over 30 s) and before the composer's recursion
    overflows (a RecursionError, a 500, at 2000 levels)."""
    error = _limit(text)
    assert error.limit == "depth"
    assert describe(error) == (*where, DEPTH)


def test_an_alias_inside_its_own_anchor_and_aliases_where_none_are_allowed_are_refused():
    """A value containing itself would loop every walk over it; a persona body may use no anchors."""
    assert describe(_limit("a: &a [1, *a]\n")) == (
        1, 11, "refused: alias *a is inside its own anchor; expected a value that does not contain itself")
    no_aliases = YamlLimits(allow_aliases=False)
    assert describe(_limit("a: &x 1\n", no_aliases)) == (
        1, 4, "refused: anchor &x: anchors and aliases are not allowed here; write the value out")
    assert _limit("a: 1\nb: *x\n", no_aliases).limit == "aliases"


def test_size_and_cpu_budgets_are_enforced():
    """A text over the size limit is refused before parsing; the CPU budget stops the reading thread."""
    assert describe(_limit("a: 1\n" * 30, YamlLimits(max_bytes=100))) == (
        1, 1, "refused: the text is 150 bytes; expected at most 100")
    error = _limit("\n".join(f"k{i}: [1, 2, 3]" for i in range(5000)), YamlLimits(max_cpu_seconds=0.0))
    assert error.limit == "cpu"


def test_syntax_errors_are_positioned_with_a_hint():
    """The usual hand-edit mistakes say how to fix them: tabs, keys out of line, a ': ' in a value."""
    cases = {
        "personas:\n\tclaims: {}\n": (2, 1, "YAML indents with spaces, never tabs"),
        "personas:\n  claims: x\n billing: y\n": (3, 2, "keys of one mapping start in the same column"),
        "prompt: Note: be brief\n": (1, 13, "a value holding ': ' must be quoted"),
    }
    for text, (line, column, hint) in cases.items():
        with pytest.raises(yaml.YAMLError) as err:
            load_yaml(text)
        found = describe(err.value)
        assert found[:2] == (line, column) and found[2].startswith("not valid YAML: ") and hint in found[2], found


# ------------------------------------------------------------------------------------- tenant files


def _valid(tenant: str, number: str, extra: str = "") -> str:
    return TEMPLATE.format(tenant=tenant, number=number, prompt="You are the agent.") + extra


BOMB_TENANT = _valid("bomb", "+14155550177", "    sampling:\n" + "".join(
    f"      {line}\n" for line in alias_bomb_lines()))
DEEP_TENANT = _valid("deep", "+14155550188", f"limits: {deep_value(100_000)}\n")
TAB_TENANT = _valid("tabs", "+14155550199").replace("    voice:", "\tvoice:")


def test_a_pathological_tenant_file_is_a_positioned_problem():
    """An alias bomb or 100 000 levels of nesting in tenant.yaml is one positioned problem."""
    for text, expected in ((BOMB_TENANT, f"bomb/tenant.yaml:16:16: (yaml): {NODES}"),
                           (DEEP_TENANT, f"deep/tenant.yaml:9:40: (yaml): {DEPTH}")):
        tenant_id = text.split()[1]
        tenant, problems = load_tenant(Path(f"/nonexistent/{tenant_id}"), ClipCache(), text=text,
                                       label=f"{tenant_id}/tenant.yaml")
        assert tenant is None and [str(p) for p in problems] == [expected]


@pytest.mark.e2e  # starts a process
def test_validate_prints_positioned_problems_never_a_traceback(tmp_path):
    """`personagate tenants validate` on a folder with an alias bomb, 100 000 levels of nesting and a
    tab prints one positioned line each (the tab with its hint), checks the good tenant, and exits 1."""
    for tenant, text in (("bomb", BOMB_TENANT), ("deep", DEEP_TENANT), ("tabs", TAB_TENANT),
                         ("good", _valid("good", "+14155550100"))):
        write_tenant_file(tmp_path, tenant, text)
    command = [sys.executable, "-m", "personagate", "tenants", "validate", str(tmp_path)]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    assert done.stdout.splitlines() == [
        f"{tmp_path}/bomb/tenant.yaml:16:16: (yaml): {NODES}",
        f"{tmp_path}/deep/tenant.yaml:9:40: (yaml): {DEPTH}",
        (f"{tmp_path}/tabs/tenant.yaml:8:1: (yaml): not valid YAML: while scanning for the next token found "
         "character '\\t' that cannot start any token (YAML indents with spaces, never tabs: replace the tab here "
         "with spaces)"),
    ]
    assert "3 problem(s)" in done.stderr


async def test_other_tenants_keep_reloading_while_one_file_is_pathological(tmp_path):
    """A tenant.yaml nested 100 000 levels (then an alias bomb) is reported as that tenant's problem,
    positioned; the tenant keeps its last good configuration and another tenant's edit still applies."""
    write_tenant(tmp_path, "acme", number="+14155550100", prompt="Acme one.")
    write_tenant(tmp_path, "zenith", number="+14155550199", prompt="Zenith one.")
    registry = TenantRegistry(tmp_path, poll_seconds=0.1)
    registry.reload()
    assert registry.status.ok
    watcher = asyncio.create_task(registry.watch())
    try:
        for text, problem in ((f"{deep_value(100_000)}\n", f"acme/tenant.yaml:1:33: (yaml): {DEPTH}"),
                              ("\n".join(alias_bomb_lines()) + "\n", f"acme/tenant.yaml:7:10: (yaml): {NODES}")):
            (tmp_path / "acme" / "tenant.yaml").write_text(text)
            await until_async(lambda expected=problem: [str(x) for x in registry.status.tenants["acme"].problems]
                              == [expected], "the problem is reported", timeout=30)
            status = registry.status.tenants["acme"]
            assert status.state == "serving_previous"
            assert [str(p) for p in status.problems] == [problem]
            assert routed_persona(registry, "+14155550100").prompt == "Acme one."
            prompt = f"Zenith after {problem[:20]}"
            write_tenant(tmp_path, "zenith", number="+14155550199", prompt=prompt)
            await until_async(lambda p=prompt: routed_persona(registry, "+14155550199").prompt == p,
                              "the other tenant's change is applied", timeout=30)
            assert registry.status.tenants["zenith"].state == "serving"
    finally:
        watcher.cancel()


def test_a_failure_checking_one_tenant_is_that_tenants_problem(tmp_path, monkeypatch):
    """Whatever goes wrong while checking one tenant (here a RecursionError from inside the checks)
    becomes a problem of that tenant: the reload applies the others instead of stopping them all."""
    write_tenant(tmp_path, "acme", number="+14155550100")
    write_tenant(tmp_path, "zenith", number="+14155550199")
    checks = loader._reference_problems

    def failing(doc, data, folder_name):
        if folder_name == "acme":
            raise RecursionError("maximum recursion depth exceeded")
        return checks(doc, data, folder_name)

    monkeypatch.setattr(loader, "_reference_problems", failing)
    registry = TenantRegistry(tmp_path)
    registry.reload()
    assert [str(p) for p in registry.status.tenants["acme"].problems] == [
        "acme/tenant.yaml:1:1: (file): could not be checked (RecursionError); the gateway's log has the details"]
    assert registry.status.tenants["zenith"].state == "serving"
    assert registry.route("+14155550199") is not None


# ------------------------------------------------------------------------------------- settings and tokens


def test_settings_tokens_and_credentials_files_are_read_within_the_same_limits(tmp_path):
    """The worker's and the gateway's settings files, the trunk credentials file and the admin tokens
    file refuse deep nesting and alias bombs with the file's name and position, not a traceback."""
    deep = f"port: {deep_value(5000)}\n"
    bomb = "\n".join(alias_bomb_lines()) + "\n"
    worker = tmp_path / "worker.yaml"
    for text, message in ((deep, f"{worker}:1:38: {DEPTH}"), (bomb, f"{worker}:7:10: {NODES}")):
        worker.write_text(text)
        with pytest.raises(SettingsError) as err:
            load_worker_settings(worker)
        assert str(err.value) == message
    gateway = tmp_path / "gateway.yaml"
    gateway.write_text(deep)
    with pytest.raises(SettingsError, match=f"^{gateway}:1:38: refused: nested more than 32"):
        load_gateway_settings(gateway)
    credentials = tmp_path / "trunk-users.yaml"
    credentials.write_text(bomb)
    with pytest.raises(SettingsError) as err:
        load_gateway_settings(None, sip_auth_users_file=credentials)
    assert f"sip_auth_users_file {credentials}:7:10: {NODES}" in str(err.value)
    with pytest.raises(TokensUnavailable) as err:
        parse_tokens(f"operator: {deep_value(100_000)}\n", "tokens.yaml")
    assert str(err.value) == f"tokens.yaml:1:42: {DEPTH}"


# ------------------------------------------------------------------------------------- the admin API


# Before the limits, one such body cost the loop about a second (2000 levels) or half a minute of CPU
# (the alias bomb): many together stall it for far longer than this, however busy the machine.
LOOP_STALL_LIMIT_S = 3.0


async def test_hostile_persona_bodies_are_422_positioned_and_the_loop_keeps_answering(gw):
    """The issue's bodies (a 460-byte alias bomb, 4 KB nested 2000 levels, 60 KB nested 30 000 levels),
    sent together several times, are each answered 422 with a problem positioned in the body; the
    file is unchanged and the event loop never stalls."""
    url, auth = f"{ADMIN}/tenants/acme/personas/claims", gw.as_("acme")
    bodies = {
        alias_bomb_body(): "request body:3:5: (yaml): refused: anchor &b0: anchors and aliases are not allowed "
                           "here; write the value out",
        deep_body(2000): "request body:1:38: (yaml): refused: nested more than 30 levels deep; expected settings "
                         "a few levels deep",
        deep_body(30_000): "request body:1:38: (yaml): refused: nested more than 30 levels deep; expected "
                           "settings a few levels deep",
    }
    async with LoopWatch() as watch:
        answers = await asyncio.gather(*(gw.client.put(url, content=body, headers=auth)
                                         for body in list(bodies) * 5))
    for body, answer in zip(list(bodies) * 5, answers, strict=True):
        assert answer.status_code == 422, answer.text
        assert answer.json() == {"detail": "persona invalid (positions are in the request body)",
                                 "problems": [bodies[body]]}
    assert watch.longest < LOOP_STALL_LIMIT_S, watch.longest
    assert gw.acme_file.read_text() == ACME
    metrics = generate_latest(gw.app.state.registry.metrics.registry).decode()
    assert 'personagate_gateway_tenant_edit_refusals_total{reason="limit_aliases"} 5.0' in metrics
    assert 'personagate_gateway_tenant_edit_refusals_total{reason="limit_depth"} 10.0' in metrics


@pytest.mark.parametrize("line_break", OTHER_LINE_BREAKS, ids=["CR", "NEL", "LS", "PS"])
async def test_a_body_with_other_line_ends_cannot_write_tenant_level_keys(gw, line_break):
    """A body separated by a lone CR, NEL, U+2028 or U+2029 that would, spliced, write top-level
    `limits` and `escalation` into tenant.yaml is refused: NEL and the separators with positions in the
    body; a lone CR is a line end like any other, so the keys land in the persona, where the schema
    refuses them. The file and the tenant's limits are unchanged."""
    r = await gw.client.put(f"{ADMIN}/tenants/acme/personas/claims", content=line_break_injection(line_break),
                            headers=gw.as_("acme"))
    assert r.status_code == 422, r.text
    problems = r.json()["problems"]
    if line_break == "\r":
        assert any(p.startswith("acme/tenant.yaml:") and "personas.claims.limits: unknown key 'limits'" in p
                   for p in problems), problems
    else:
        assert problems[0].startswith("request body:1:21: (body): ")
        assert "is a line end in YAML; expected lines ending in \\n" in problems[0]
        metrics = generate_latest(gw.app.state.registry.metrics.registry).decode()
        assert 'personagate_gateway_tenant_edit_refusals_total{reason="line_break"} 1.0' in metrics
    assert gw.acme_file.read_text() == ACME
    assert gw.app.state.registry.tenants["acme"].spec.limits.max_concurrent_calls == 5


async def test_a_body_with_old_mac_line_ends_is_stored_with_the_files_line_ends(gw):
    """A persona sent with lone CR line ends is a valid edit: it is stored with \\n line ends, inside
    the persona, and served."""
    body = "prompt: You answer billing questions, briefly.\rvoice:\r  preset: NATM1\r"
    r = await gw.client.put(f"{ADMIN}/tenants/acme/personas/billing", content=body, headers=gw.as_("acme"))
    assert r.status_code == 200, r.text
    assert gw.acme_file.read_text() == ACME.replace(
        "prompt: You answer billing questions for Acme Insurance.", "prompt: You answer billing questions, briefly.")
    assert gw.app.state.registry.tenants["acme"].personas["billing"].prompt == "You answer billing questions, briefly."


def test_the_docs_show_what_the_validator_prints_for_a_tab_and_deep_nesting():
    """docs/tenants.md's examples of a tab and of nesting past the limit are the loader's real lines."""
    docs = (Path(__file__).parent.parent / "docs" / "tenants.md").read_text()
    label = "tenants/acme/tenant.yaml"
    tab = _valid("acme", "+14155550100").replace("    voice:", "\tvoice:")
    deep = _valid("acme", "+14155550100", f"limits: {deep_value(100)}\n")
    [tab_problem] = load_tenant(Path("/nonexistent/acme"), ClipCache(), text=tab, label=label)[1]
    [deep_problem] = load_tenant(Path("/nonexistent/acme"), ClipCache(), text=deep, label=label)[1]
    assert f"\n{tab_problem}\n" in docs
    prose = " ".join(docs.split())  # the deep example sits in a wrapped paragraph
    assert f"`{str(deep_problem).split('; ')[0]}; ...`" in prose


def test_an_endless_tenant_file_is_read_no_further_than_the_limit(tmp_path):
    """A tenant.yaml that never ends (a link to /dev/zero) is a problem of that tenant, read only up to
    the size limit."""
    (tmp_path / "endless").mkdir()
    (tmp_path / "endless" / "tenant.yaml").symlink_to("/dev/zero")
    _, problems = load_tenant(tmp_path / "endless", ClipCache(), label="endless/tenant.yaml")
    assert [str(p) for p in problems] == [
        "endless/tenant.yaml:1:1: (file): is more than 1000000 bytes; expected at most 1000000"]
