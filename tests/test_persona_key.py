"""The persona key: the gateway computes, without torch, the key a worker caches a primed persona under,
so that routing can prefer a worker that has it primed."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from gateway.tenants.loader import load_tenants
from gateway.worker_client import WorkerSession, persona_message
from personagate_common.persona import Persona, PersonaError, PersonaFormatError, persona_from_message, persona_key
from tests.helpers.worker import WORKER_AUTH, WORKER_AUTH_HEADERS

TENANTS = Path(__file__).resolve().parent.parent / "tenants"


def test_the_key_is_the_primed_cache_key_and_ignores_sampling():
    """A preset persona and a clip persona give the worker's ``content_hash``; sampling plays no part."""
    clip = b"RIFF....not-parsed-here"
    preset = persona_message("You are a claims agent.", voice="NATF2")
    assert persona_key(preset) == Persona("You are a claims agent.", voice="NATF2").content_hash()
    assert persona_key(persona_message("You are a claims agent.", voice="NATF2", sampling={"temperature": 0.3})) \
        == persona_key(preset)
    inline = persona_message("You are a claims agent.", voice_audio=clip)
    assert persona_key(inline) == Persona("You are a claims agent.", voice_audio=clip).content_hash()
    assert len({persona_key(preset), persona_key(inline), persona_key(persona_message("Other.", voice="NATF2"))}) == 3


@pytest.mark.parametrize("spec, error, message", [
    ({"prompt": "x", "voice": "NATF0", "mood": "calm"}, PersonaFormatError, "unknown fields"),
    ({"prompt": 3, "voice": "NATF0"}, PersonaFormatError, "prompt must be a string"),
    ({"prompt": "x", "voice_audio_base64": "not base64!"}, PersonaFormatError, "not base64"),
    ({"prompt": "x"}, PersonaError, "exactly one voice"),
    ({"prompt": "x", "voice": "NATF0", "voice_audio_base64": base64.b64encode(b"ab").decode()}, PersonaError,
     "exactly one voice"),
    ("NATF0", PersonaFormatError, "must be an object"),
])
def test_a_persona_object_a_worker_would_refuse_has_no_key(spec, error, message):
    """The gateway meets the worker's own refusals (the worker parses start messages with the same function)."""
    with pytest.raises(error, match=message):
        persona_key(spec)


def test_a_clip_over_the_workers_limit_is_refused_before_decoding():
    spec = persona_message("x", voice_audio=b"\0" * 3000)
    with pytest.raises(PersonaError, match="over 2000 bytes"):
        persona_from_message(spec, max_voice_bytes=2000)


@pytest.mark.e2e  # starts a process
def test_the_key_needs_no_torch():
    """The gateway computes keys for tenant personas without importing torch."""
    code = ("import sys; from pathlib import Path; from gateway.tenants.loader import load_tenants; "
            f"r = load_tenants(Path({str(TENANTS)!r})); "
            "[p.persona_key for t in r.tenants.values() for p in t.personas.values()]; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


async def test_a_tenant_personas_key_is_what_the_worker_reports_once_primed(worker):
    """Every shipped persona (prepared clips and a preset), started as calls start it, shows up in the worker's
    ``cached_personas`` under the key the gateway computes for it."""
    result = load_tenants(TENANTS)
    assert not result.problems
    personas = [p for t in result.tenants.values() for p in t.personas.values()]
    assert any(p.voice_clip is not None for p in personas) and any(p.voice_preset is not None for p in personas)
    async with httpx.AsyncClient(base_url=f"http://{worker}", timeout=10, headers=WORKER_AUTH_HEADERS) as http:
        for persona in personas:
            async with await WorkerSession.open(f"ws://{worker}/v1/sessions", persona.worker_persona,
                                                auth=WORKER_AUTH) as session:
                await session.end()
            cached = (await http.get("/v1/info")).json()["cached_personas"]
            assert persona.persona_key in cached, (persona.tenant, persona.name)
            assert persona.persona_key == persona_key(persona.worker_persona)
