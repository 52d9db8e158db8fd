"""Tenant files as admins write them: every mistake reported at once, each as
`file:line:column: field.path: what is wrong and what is expected`, so an admin can fix the file from
the message alone and run `personagate tenants validate` in their own CI."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile

from gateway.tenants.loader import ClipCache, load_tenant, load_tenants
from gateway.tenants.tenant import PersonaConfig, Rejection

GOOD = """\
tenant: acme
name: Acme Claims
numbers:
  +14155550100: claims
  "+14155550101": after-hours
personas:
  claims:
    prompt: You are a claims agent at Acme. Be brief and kind.
    voice: {preset: NATF0}
  after-hours:
    prompt: You take messages for Acme's claims team after hours.
    voice:
      preset: NATM1
    sampling:
      temperature: 0.6
      top_k: 100
    speaks_first: false
limits:
  max_concurrent_calls: 4
  max_call_seconds: 600
hours:
  timezone: America/New_York
  weekly:
    mon: "08:00-18:00"
    tue: ["08:00-12:00", "13:00-18:00"]
    sat: closed
  closed_dates: [2026-12-25]
  after_hours:
    persona: after-hours
escalation:
  transfer_to: sip:claims-queue@pbx.acme.example
  dtmf_digit: 0
"""


def _tenant_dir(tmp_path: Path, text: str, name: str = "acme") -> Path:
    folder = tmp_path / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tenant.yaml").write_text(text)
    return folder


def _problems(tmp_path: Path, text: str) -> list[str]:
    folder = _tenant_dir(tmp_path, text)
    tenant, problems = load_tenant(folder, ClipCache(), label="acme/tenant.yaml")
    assert tenant is None
    return [str(p) for p in problems]


def _speech(seconds: float, rate: int = 16_000, level: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    voiced = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2
    return (level * voiced * envelope / 2.3).astype(np.float32)


def test_a_valid_file_loads_with_every_setting(tmp_path):
    tenant, problems = load_tenant(_tenant_dir(tmp_path, GOOD), ClipCache())
    assert problems == []
    assert tenant is not None and tenant.id == "acme"
    assert set(tenant.spec.numbers) == {"+14155550100", "+14155550101"}  # an unquoted +number stays a number
    assert tenant.spec.escalation is not None and tenant.spec.escalation.dtmf_digit == "0"
    quiet = tenant.personas["after-hours"]
    assert quiet.speaks_first is False and quiet.sampling.temperature == 0.6
    assert quiet.worker_persona == {
        "prompt": "You take messages for Acme's claims team after hours.", "voice": "NATM1",
        "sampling": {"temperature": 0.6, "top_k": 100, "text_temperature": 0.7, "text_top_k": 25},
    }


def test_each_kind_of_mistake_is_reported_at_its_line_and_column(tmp_path):
    broken = """\
tenant: acme
name: Acme Claims
numbers:
  +14155550100: claims
  4155550101: claims
  +14155550102: nobody
personas:
  claims:
    prompt: You are a claims agent.
    voice: {preset: NATF9}
    sampling:
      temprature: 0.5
      top_k: 5000
    speaks_first: maybe
  other:
    voice: {clip: a.mp3}
limits:
  max_concurrent_calls: many
hours:
  timezone: Mars/Olympus
  weekly:
    mon: "22:00-06:00"
    monday: "08:00-10:00"
  after_hours:
    persona: ghost
escalation:
  transfer_to: tel:123
  dtmf_digit: 12
recording: {enabled: true, consent_announcement: missing.wav}
"""
    presets = "NATF0, NATF1, NATF2, NATF3, NATM0, NATM1, NATM2, NATM3, VARF0, VARF1, VARF2, VARF3, VARF4, " \
              "VARM0, VARM1, VARM2, VARM3, VARM4"
    assert _problems(tmp_path, broken) == [
        ("acme/tenant.yaml:5:3: numbers.4155550101: '4155550101' is not an E.164 number; expected '+' then 7 to 15 "
        "digits, e.g. '+14155550100'"),
        ("acme/tenant.yaml:6:17: numbers.+14155550102: routes to persona 'nobody', which is not defined; expected one "
        "of: claims, other"),
        f"acme/tenant.yaml:10:21: personas.claims.voice.preset: unknown voice preset 'NATF9'; expected one of {presets}",
        ("acme/tenant.yaml:12:7: personas.claims.sampling.temprature: unknown key 'temprature'; did you mean "
        "'temperature'?"),
        "acme/tenant.yaml:13:14: personas.claims.sampling.top_k: must be at most 500, got 5000",
        "acme/tenant.yaml:14:19: personas.claims.speaks_first: expected true or false, got 'maybe'",
        ("acme/tenant.yaml:16:5: personas.other.prompt: missing; expected the role prompt: who the agent is and how "
        "it should behave"),
        ("acme/tenant.yaml:16:19: personas.other.voice.clip: 'a.mp3' is not a wav or flac file; expected a name "
        "ending in .wav or .flac"),
        "acme/tenant.yaml:18:25: limits.max_concurrent_calls: expected a whole number, got 'many'",
        ("acme/tenant.yaml:20:13: hours.timezone: unknown time zone 'Mars/Olympus'; expected an IANA name like "
        "'Europe/London'"),
        ("acme/tenant.yaml:22:10: hours.weekly.mon: '22:00-06:00' ends before it starts; split a range past midnight "
        "over two days"),
        ("acme/tenant.yaml:23:5: hours.weekly.monday: 'monday' is not allowed; expected one of 'mon', 'tue', 'wed', "
        "'thu', 'fri', 'sat' or 'sun'"),
        ("acme/tenant.yaml:25:14: hours.after_hours.persona: persona 'ghost' is not defined; expected one of: claims, "
        "other"),
        ("acme/tenant.yaml:27:16: escalation.transfer_to: 'tel:123' is not a SIP URI; expected e.g. "
        "'sip:queue@pbx.example.com'"),
        ("acme/tenant.yaml:28:15: escalation.dtmf_digit: '12' is not one DTMF key; expected one of 0-9, * or # "
        "(quoted: '#')"),
        ("acme/tenant.yaml:29:50: recording.consent_announcement: file 'missing.wav' not found in the tenant folder; "
        "expected a wav or flac clip there"),
    ]


@pytest.mark.parametrize(("change", "expected"), [
    (("tenant: acme", "tenant: acme-corp"),
     "acme/tenant.yaml:1:9: tenant: is 'acme-corp' but the folder is 'acme'; expected the folder's name"),
    (("name: Acme Claims\n", "name: Acme Claims\nname: Acme Again\n"),
     "acme/tenant.yaml:3:1: name: duplicate key (first given on line 2); expected each key once"),
    (("    voice: {preset: NATF0}", "    voice: {}"),
     ("acme/tenant.yaml:9:12: personas.claims.voice: give exactly one of 'clip' (a wav/flac file in the tenant "
     "folder) or 'preset'")),
    (("  max_call_seconds: 600", "  max_call_seconds: 10"),
     "acme/tenant.yaml:20:21: limits.max_call_seconds: must be at least 30, got 10"),
    (("  closed_dates: [2026-12-25]", "  closed_dates: [Christmas]"),
     "acme/tenant.yaml:27:18: hours.closed_dates.0: expected a date like 2026-12-25, got 'Christmas'"),
    (("    tue: [\"08:00-12:00\", \"13:00-18:00\"]", "    tue: [\"08:00-12:00\", \"11:00-18:00\"]"),
     ("acme/tenant.yaml:25:10: hours.weekly.tue: opening ranges 08:00-12:00 and 11:00-18:00 overlap; expected "
      "separate ranges in one day")),
    (("  timezone: America/New_York", "  timezone: EST"),
     ("acme/tenant.yaml:22:13: hours.timezone: 'EST' is not a Region/City time zone; expected e.g. "
     "'America/New_York' or 'UTC'")),
    (("  closed_dates: [2026-12-25]", "  closed_dates: [2026-02-29]"),
     "acme/tenant.yaml:27:18: hours.closed_dates.0: expected a date like 2026-12-25, got '2026-02-29'"),
    (("  max_call_seconds: 600", "  max_call_seconds: !!int many"),
     ("acme/tenant.yaml:20:21: (yaml): not valid YAML: cannot read this value (invalid literal for int() with base "
     "10: 'many')")),
    (("  dtmf_digit: 0", "  dtmf_digit: #"),
     ("acme/tenant.yaml:32:14: escalation.dtmf_digit: expected text, got nothing (a '#' starts a comment in YAML: "
     "write '#' in quotes)")),
    (("tenant: acme", "tenant: Acme"),
     "acme/tenant.yaml:1:9: tenant: 'Acme' is not a tenant id; expected lower-case letters, digits and '-'"),
    (("    persona: after-hours", "    reject: {status: 200}"),
     ("acme/tenant.yaml:29:22: hours.after_hours.reject.status: 200 is not an after-hours answer; expected one of "
     "403, 404, 480, 486, 503, 603")),
    (("escalation:\n", "recording:\n  enabled: true\nescalation:\n"),
     ("acme/tenant.yaml:31:3: recording: recording is enabled without a consent_announcement; expected a wav/flac "
     "clip that tells the caller the call is recorded")),
    (("    speaks_first: false", "    speaks_first: false\n    greeting: Hello"),
     ("acme/tenant.yaml:18:5: personas.after-hours.greeting: unknown key 'greeting'; expected one of: description, "
     "prompt, public_link, sampling, speaks_first, voice")),
    (("  claims:\n    prompt: You are a claims agent at Acme. Be brief and kind.",
      "  claims:\n    prompt: \"\""),
     "acme/tenant.yaml:8:13: personas.claims.prompt: is empty; expected text"),
    (("name: Acme Claims", "name: [Acme"),
     ("acme/tenant.yaml:3:8: (yaml): not valid YAML: while parsing a flow sequence expected ',' or ']', but got "
     "':'")),
])
def test_one_mistake_gives_one_precise_message(tmp_path, change, expected):
    old, new = change
    assert old in GOOD
    assert _problems(tmp_path, GOOD.replace(old, new, 1)) == [expected]


def test_a_prompt_over_the_limit_says_how_long_it_is(tmp_path):
    text = GOOD.replace("Be brief and kind.", "x" * 4001)
    [problem] = _problems(tmp_path, text)
    assert problem.endswith("personas.claims.prompt: is 4033 characters long; expected at most 4000")


def test_a_renamed_persona_is_reported_with_every_number_left_pointing_at_the_old_name(tmp_path):
    assert _problems(tmp_path, GOOD.replace("personas:\n  claims:", "personas:\n  Claims Team:")) == [
        ("acme/tenant.yaml:4:17: numbers.+14155550100: routes to persona 'claims', which is not defined; expected "
        "one of: after-hours"),
        ("acme/tenant.yaml:7:3: personas.Claims Team: 'Claims Team' is not a persona name; expected lower-case "
        "letters, digits, '-' or '_'"),
    ]


def test_unreadable_files_are_reported_not_raised(tmp_path):
    folder = tmp_path / "acme"
    folder.mkdir()
    assert [str(p) for p in load_tenant(folder, ClipCache(), label="acme/tenant.yaml")[1]] == [
        "acme/tenant.yaml:1:1: (file): missing; expected tenant.yaml in the tenant folder"]
    (folder / "tenant.yaml").write_bytes(b"tenant: acme\nname: \xff\xfe\n")
    assert [str(p) for p in load_tenant(folder, ClipCache(), label="acme/tenant.yaml")[1]] == [
        "acme/tenant.yaml:2:1: (file): is not UTF-8 text; save it as UTF-8"]
    (folder / "tenant.yaml").write_text("")
    assert [str(p) for p in load_tenant(folder, ClipCache(), label="acme/tenant.yaml")[1]] == [
        "acme/tenant.yaml:1:1: (file): the file is empty; expected the tenant's settings"]
    (folder / "tenant.yaml").write_text("- just\n- a list\n")
    assert [str(p) for p in load_tenant(folder, ClipCache(), label="acme/tenant.yaml")[1]] == [
        "acme/tenant.yaml:1:1: (file): expected a mapping of tenant settings, got a list"]


def test_a_number_in_two_tenants_is_an_error_in_both(tmp_path):
    _tenant_dir(tmp_path, GOOD)
    other = GOOD.replace("tenant: acme", "tenant: zenith").replace("+14155550101", "+14155550199")
    _tenant_dir(tmp_path, other, "zenith")
    result = load_tenants(tmp_path)
    assert result.tenants == {}
    assert sorted(str(p) for p in result.problems) == [
        (f"{tmp_path}/acme/tenant.yaml:4:3: numbers.+14155550100: is also routed by tenant 'zenith' "
        f"({tmp_path}/zenith/tenant.yaml:4); expected each number in one tenant"),
        (f"{tmp_path}/zenith/tenant.yaml:4:3: numbers.+14155550100: is also routed by tenant 'acme' "
        f"({tmp_path}/acme/tenant.yaml:4); expected each number in one tenant"),
    ]


def test_voice_clips_are_checked_and_prepared(tmp_path):
    text = GOOD.replace("voice: {preset: NATF0}", "voice: {clip: voices/claims.wav}")
    folder = _tenant_dir(tmp_path, text)
    (folder / "voices").mkdir()
    soundfile.write(folder / "voices/claims.wav", np.stack([_speech(3.0), _speech(3.0)], axis=1), 16_000)
    tenant, problems = load_tenant(folder, ClipCache())
    assert problems == [] and tenant is not None
    clip = tenant.personas["claims"].voice_clip
    assert clip is not None and clip.source_rate == 16_000 and clip.source_channels == 2
    assert "voice_audio_base64" in tenant.personas["claims"].worker_persona

    soundfile.write(folder / "voices/claims.wav", _speech(1.5), 16_000)
    [problem] = [str(p) for p in load_tenant(folder, ClipCache(), label="acme/tenant.yaml")[1]]
    assert problem.startswith("acme/tenant.yaml:9:19: personas.claims.voice.clip: voices/claims.wav: ")
    assert "1.50 s" in problem and "2 to 10 s" in problem

    soundfile.write(folder / "voices/claims.wav", np.zeros(48_000, dtype=np.float32), 16_000)
    [problem] = [str(p) for p in load_tenant(folder, ClipCache(), label="acme/tenant.yaml")[1]]
    assert "silent" in problem

    soundfile.write(folder / "voices/claims.wav", np.clip(_speech(3.0) * 10, -1, 1), 16_000)
    [problem] = [str(p) for p in load_tenant(folder, ClipCache(), label="acme/tenant.yaml")[1]]
    assert "clipped" in problem

    (folder / "voices/claims.wav").write_bytes(b"RIFF....not a wave at all")
    [problem] = [str(p) for p in load_tenant(folder, ClipCache(), label="acme/tenant.yaml")[1]]
    assert "wav or flac" in problem


def test_business_hours_choose_the_persona_or_the_rejection(tmp_path):
    tenant, _ = load_tenant(_tenant_dir(tmp_path, GOOD), ClipCache())
    assert tenant is not None
    new_york = dt.timezone(dt.timedelta(hours=-5))  # EST, as America/New_York is in December

    def answer(day: int, hour: int, minute: int = 0) -> PersonaConfig | Rejection:
        return tenant.answer("+14155550100", dt.datetime(2026, 12, day, hour, minute, tzinfo=new_york))

    assert isinstance(answer(14, 9), PersonaConfig) and answer(14, 9).name == "claims"  # a Monday, open
    assert answer(14, 18).name == "after-hours"  # ranges end exclusive
    assert answer(15, 12, 30).name == "after-hours"  # Tuesday lunch break
    assert answer(15, 13).name == "claims"
    assert answer(19, 10).name == "after-hours"  # Saturday: closed
    assert answer(20, 10).name == "after-hours"  # Sunday: not listed, closed
    assert answer(25, 10).name == "after-hours"  # a Friday, but a closed date
    rejecting = GOOD.replace("    persona: after-hours", "    reject: {status: 486, reason: Closed for the day}")
    tenant, _ = load_tenant(_tenant_dir(tmp_path / "b", rejecting), ClipCache())
    assert tenant is not None
    when = dt.datetime(2026, 12, 19, 10, tzinfo=new_york)
    assert tenant.answer("+14155550100", when) == Rejection(486, "Closed for the day")


@pytest.mark.e2e  # starts a process
def test_the_validate_command_exits_non_zero_on_any_problem(tmp_path):
    _tenant_dir(tmp_path, GOOD)
    command = [sys.executable, "-m", "personagate", "tenants", "validate", str(tmp_path)]
    ok = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "1 tenants, 2 personas, 2 numbers: all valid" in ok.stdout
    _tenant_dir(tmp_path, GOOD.replace("top_k: 100", "top_k: 1"))
    bad = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert bad.stdout.splitlines() == [
        f"{tmp_path}/acme/tenant.yaml:16:14: personas.after-hours.sampling.top_k: must be at least 10, got 1"]
    assert "1 problem(s)" in bad.stderr


def test_every_problem_of_a_tree_is_listed_in_one_run(tmp_path):
    _tenant_dir(tmp_path, GOOD.replace("max_concurrent_calls: 4", "max_concurrent_calls: 0"))
    _tenant_dir(tmp_path, textwrap.dedent("""\
        tenant: zenith
        name: Zenith
        personas: {}
        """), "zenith")
    problems = [str(p) for p in load_tenants(tmp_path).problems]
    assert len(problems) == 2
    assert problems[0].endswith("limits.max_concurrent_calls: must be at least 1, got 0")
    assert problems[1].endswith("zenith/tenant.yaml:3:11: personas: is empty; expected at least one entry")


def test_a_reload_of_many_tenants_decodes_no_unchanged_clip_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tenants synced from git get new inodes on every commit, so every clip is read again: with more clips than
    the cache's base size (here 100 clips, size 8), the second load decodes none of them, and a changed clip is
    the only one decoded on the third."""
    from gateway.tenants import loader

    decoded: list[bytes] = []

    def prepare(data: bytes, **_: float) -> object:
        decoded.append(data)
        return object()

    monkeypatch.setattr(loader, "prepare_clip", prepare)
    cache = loader.ClipCache(size=8)
    clips = [f"clip {n}".encode() for n in range(100)]
    for data in clips:
        cache.prepare(data, (1.0, 30.0))
    cache.loaded()
    assert len(decoded) == 100
    for data in clips:
        cache.prepare(data, (1.0, 30.0))
    cache.loaded()
    assert len(decoded) == 100
    for data in [*clips[:50], b"clip 50, re-recorded", *clips[51:]]:
        cache.prepare(data, (1.0, 30.0))
    cache.loaded()
    assert decoded[100:] == [b"clip 50, re-recorded"]
