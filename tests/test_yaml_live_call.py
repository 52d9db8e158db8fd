"""YAML attacks (tests/helpers/hostile_yaml.py) against a real `personagate gateway` while a call is live on it: alias bombs,
deep nesting and line-end injection in persona bodies, and a tenant.yaml nested 100 000 levels by
hand. Every body is answered 422 at once, the live call's audio keeps flowing both ways, another
tenant's edit still applies, and the gateway's log shows no traceback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.admin.tokens import new_token
from tests.helpers.hostile_yaml import OTHER_LINE_BREAKS, alias_bomb_body, deep_body, deep_value, line_break_injection
from tests.helpers.live_call import LiveCall
from tests.helpers.logs import assert_alive_and_clean, log_size
from tests.helpers.sip import private_rtp_ports
from tests.helpers.stack import echo_stack
from tests.helpers.wait import until

pytest.importorskip("pjsua2")

LIVE = "harbor-mutual"  # the live call's tenant (tests.helpers.sip.OPEN_NUMBER)
OTHER = "northwind-bank"
DEPTH = "refused: nested more than 32 levels deep; expected settings a few levels deep"


@pytest.fixture(scope="module")
def stack(tenants: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The echo stack with its admin API on, tokens for harbor-mutual's admin and the operator, and
    tenants polled often."""
    (token, line), (operator, operator_line) = new_token(), new_token()
    tokens = tmp_path_factory.mktemp("admin") / "tokens.yaml"
    tokens.write_text(f"operator:\n  - {operator_line}\ntenants:\n  {LIVE}:\n    - {line}\n")
    env = {"PERSONAGATE_GATEWAY_ADMIN_TOKENS_FILE": str(tokens),
           "PERSONAGATE_GATEWAY_TENANTS_POLL_SECONDS": "0.2"} | private_rtp_ports()
    with echo_stack(tenants, env, slots=1) as (addresses, _, gateway_proc):
        yield addresses | {"proc": gateway_proc, "gateway": ("127.0.0.1", int(addresses["port"])),
                           "auth": {"Authorization": f"Bearer {token}"},
                           "operator": {"Authorization": f"Bearer {operator}"}}


def test_a_live_call_keeps_its_audio_while_hostile_yaml_is_refused(stack: dict, tenants: Path) -> None:
    """While a call talks: 3 rounds of the issue's bodies (a 460-byte alias bomb, 4 KB nested 2000
    levels, 60 KB nested 30 000 levels, CR/NEL/U+2028/U+2029 injection) are each 422, and a hand edit
    nesting another tenant's file 100 000 levels is that tenant's positioned problem; meanwhile a
    valid persona edit of the live call's tenant applies, and the call's audio never stops."""
    since = log_size(stack["proc"])
    url = f"/v1/admin/tenants/{LIVE}/personas/claims"
    with LiveCall(stack["gateway"], seconds=120) as call, \
            httpx.Client(base_url=stack["http"], headers=stack["auth"], timeout=30) as admin:
        mark = call.mark()
        (tenants / OTHER / "tenant.yaml").write_text(f"tenant: {OTHER}\nname: Broken\nlimits: {deep_value(100_000)}\n")
        bodies = [alias_bomb_body(), deep_body(2000), deep_body(30_000), *map(line_break_injection, OTHER_LINE_BREAKS)]
        for body in bodies * 3:
            r = admin.put(url, content=body)
            assert r.status_code == 422, r.text
        claims = admin.get(url)
        assert claims.status_code == 200
        edited = claims.text.replace("Daytime claims intake", "Claims intake, day and night")
        assert edited != claims.text
        r = admin.put(url, content=edited, headers={"If-Match": claims.headers["etag"]})
        assert r.status_code == 200 and r.json()["status"]["state"] == "serving", r.text
        window = call.window(mark)
    assert window.flowing(), window
    def reload_status() -> dict:
        return httpx.get(f"{stack['http']}/v1/admin/reload", headers=stack["operator"], timeout=30).json()["tenants"]

    until(lambda: reload_status()[OTHER]["state"] == "serving_previous", "the broken tenant file is reported")
    tenants_now = reload_status()
    assert tenants_now[OTHER]["problems"] == [f"{OTHER}/tenant.yaml:3:40: (yaml): {DEPTH}"]
    assert tenants_now[LIVE]["state"] == "serving"
    assert_alive_and_clean(stack["proc"], "after the YAML attacks", since)
