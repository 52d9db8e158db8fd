"""The example tenants shipped in `tenants/` and the examples in docs/tenants.md: they validate, through
the loader and through `personagate tenants validate`, their clips and numbers follow the rules, and a
broken copy gives the exact error lines (and exit status) that the documentation shows."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile
import yaml

from gateway.tenants.loader import load_tenants
from gateway.tenants.schema import PRESET_VOICES

REPO = Path(__file__).resolve().parent.parent
TENANTS = REPO / "tenants"
DOCS = REPO / "docs" / "tenants.md"
SHIPPED = ("harbor-mutual", "northwind-bank")
E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
# Numbers reserved for fiction: NANP 555-0100 to 555-0199 in any area code; Ofcom's drama ranges
# 020 7946 0000-0999 and 0808 157 0000-0999.
FICTIONAL = re.compile(r"^(?:\+1[2-9][0-9]{2}55501[0-9]{2}|\+4420794600?[0-9]{3}|\+448081570[0-9]{3})$")


def _validate(folder: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "personagate", "tenants", "validate", folder],
                          cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def shipped():
    return load_tenants(TENANTS)


def test_shipped_tenants_load_without_problems(shipped):
    assert [str(p) for p in shipped.problems] == []
    assert set(SHIPPED) <= set(shipped.tenants)


@pytest.mark.e2e  # starts a process
def test_validate_command_passes_on_shipped_tenants():
    result = _validate("tenants", REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("all valid"), result.stdout


def test_every_shipped_clip_is_2_to_10_seconds_and_small():
    clips = sorted(p for p in TENANTS.rglob("*") if p.suffix.lower() in (".wav", ".flac"))
    assert len(clips) >= 4
    for clip in clips:
        seconds = soundfile.info(str(clip)).duration
        assert 2.0 <= seconds <= 10.0, f"{clip.relative_to(REPO)} is {seconds:.2f} s"
        assert clip.stat().st_size < 150_000, f"{clip.relative_to(REPO)} is {clip.stat().st_size} bytes"


def test_every_shipped_clip_is_used_and_prepared(shipped):
    used = set()
    for tenant in shipped.tenants.values():
        for persona in tenant.personas.values():
            if persona.voice_clip is not None:
                assert 2.0 <= persona.voice_clip.seconds <= 10.0
        spec = tenant.spec
        names = [p.voice.clip for p in spec.personas.values()] + [spec.recording.consent_announcement]
        used |= {tenant.folder / name for name in names if name}
    assert used == {p for p in TENANTS.rglob("*") if p.suffix.lower() in (".wav", ".flac")}


def test_every_shipped_persona_names_a_voice(shipped):
    for tenant in shipped.tenants.values():
        for name, persona in tenant.personas.items():
            assert (persona.voice_preset is None) != (persona.voice_clip is None), f"{tenant.id}.{name}"
            assert persona.voice_preset is None or persona.voice_preset in PRESET_VOICES


def test_every_shipped_number_is_e164_fictional_and_in_one_tenant(shipped):
    owners: dict[str, str] = {}
    for tenant in shipped.tenants.values():
        assert tenant.spec.numbers, tenant.id
        for number in tenant.spec.numbers:
            assert E164.match(number), number
            assert FICTIONAL.match(number), f"{number} is not in a range reserved for fiction"
            assert owners.setdefault(number, tenant.id) == tenant.id, number


def test_shipped_tenants_show_what_the_issue_asks_for(shipped):
    harbor, northwind = shipped.tenants["harbor-mutual"].spec, shipped.tenants["northwind-bank"].spec
    assert harbor.hours and harbor.hours.after_hours.persona in harbor.personas
    assert harbor.escalation and harbor.escalation.dtmf_digit == "0"
    assert harbor.recording.enabled and harbor.recording.consent_announcement
    assert northwind.hours and northwind.hours.after_hours.reject and northwind.hours.after_hours.reject.status == 480
    assert northwind.hours.closed_dates
    assert not northwind.recording.enabled
    assert any(p.voice.preset for p in northwind.personas.values())
    assert northwind.limits.max_concurrent_calls < harbor.limits.max_concurrent_calls


# ------------------------------------------------------------------------------ broken copies


def _copy(tmp_path: Path) -> Path:
    shutil.copytree(TENANTS, tmp_path / "tenants")
    return tmp_path / "tenants"


def _break(root: Path, tenant: str, old: str, new: str) -> tuple[int, int]:
    """Replace ``old`` (found once) with ``new`` in a tenant file; the 1-based line and column of
    ``old`` there."""
    path = root / tenant / "tenant.yaml"
    text = path.read_text()
    assert text.count(old) == 1, old
    before = text[: text.index(old)]
    path.write_text(text.replace(old, new))
    return before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1


def _presets() -> str:
    return ", ".join(PRESET_VOICES)


@pytest.mark.e2e  # starts a process
@pytest.mark.parametrize(("tenant", "old", "new", "offset", "expected"), [
    ("northwind-bank", "preset: NATF2", "preset: NATF7", len("preset: "),
     "personas.lost-stolen.voice.preset: unknown voice preset 'NATF7'; expected one of {presets}"),
    ("northwind-bank", "max_call_seconds: 600", "max_call_secs: 600", 0,
     "limits.max_call_secs: unknown key 'max_call_secs'; did you mean 'max_call_seconds'?"),
    ("harbor-mutual", "persona: after-hours", "persona: overnight", len("persona: "),
     "hours.after_hours.persona: persona 'overnight' is not defined; expected one of: after-hours, claims"),
    ("harbor-mutual", 'dtmf_digit: "0"', 'dtmf_digit: "00"', len("dtmf_digit: "),
     "escalation.dtmf_digit: '00' is not one DTMF key; expected one of 0-9, * or # (quoted: '#')"),
])
def test_a_broken_copy_gives_the_exact_error_line_and_exit_1(tmp_path, tenant, old, new, offset, expected):
    root = _copy(tmp_path)
    line, column = _break(root, tenant, old, new)
    result = _validate("tenants", tmp_path)
    assert result.returncode == 1
    expected = expected.format(presets=_presets())
    assert result.stdout.splitlines() == [f"tenants/{tenant}/tenant.yaml:{line}:{column + offset}: {expected}"]
    assert result.stderr.strip() == "1 problem(s) in tenants"


@pytest.mark.e2e  # starts a process
def test_a_number_in_two_tenants_is_reported_in_both(tmp_path):
    root = _copy(tmp_path)
    harbor_line, _ = _break(root, "harbor-mutual", "+14155550142:", "+14155550142:")  # unchanged: its position
    line, column = _break(root, "northwind-bank", "+442079460742:", "+14155550142:")
    result = _validate("tenants", tmp_path)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        (f"tenants/harbor-mutual/tenant.yaml:{harbor_line}:3: numbers.+14155550142: is also routed by tenant "
         f"'northwind-bank' (tenants/northwind-bank/tenant.yaml:{line}); expected each number in one tenant"),
        (f"tenants/northwind-bank/tenant.yaml:{line}:{column}: numbers.+14155550142: is also routed by tenant "
         f"'harbor-mutual' (tenants/harbor-mutual/tenant.yaml:{harbor_line}); expected each number in one tenant"),
    ]


# ------------------------------------------------------------------------------ docs/tenants.md


def _doc_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", DOCS.read_text(), flags=re.DOTALL | re.MULTILINE)


def test_the_doc_examples_of_a_whole_file_validate(tmp_path):
    examples = [b for b in _doc_blocks("yaml") if b.startswith("tenant:")]
    assert len(examples) >= 2  # the first tenant, and every field at once
    for text in examples:
        data = yaml.safe_load(text)
        folder = tmp_path / "tenants" / data["tenant"]
        folder.mkdir(parents=True)
        (folder / "tenant.yaml").write_text(text)
        clips = [p["voice"]["clip"] for p in data["personas"].values() if "clip" in p["voice"]]
        for name in clips:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(TENANTS / "harbor-mutual" / "voices" / "claims.flac", folder / name)
        if data.get("recording", {}).get("consent_announcement"):
            name = data["recording"]["consent_announcement"]
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(TENANTS / "harbor-mutual" / "voices" / "recording-notice.flac", folder / name)
    result = load_tenants(tmp_path / "tenants")
    assert [str(p) for p in result.problems] == []
    assert len(result.tenants) == len(examples)


@pytest.mark.e2e  # starts a process
def test_the_doc_shows_what_the_validator_really_prints(tmp_path):
    """docs/tenants.md shows the validator's output on a copy of the shipped tenants with four
    mistakes; if this fails after an edit of the shipped files, paste the new output into the doc."""
    root = _copy(tmp_path)
    clip = root / "harbor-mutual" / "voices" / "after-hours.flac"
    audio, rate = soundfile.read(str(clip))
    soundfile.write(str(clip), audio[: int(1.5 * rate)], rate, format="FLAC")
    _break(root, "harbor-mutual", '["08:00-12:00", "13:00-17:00"]', '["08:00-12:00", "13:00-5:00"]')
    _break(root, "northwind-bank", "preset: NATF2", "preset: NATF7")
    _break(root, "northwind-bank", "max_call_seconds: 600", "max_call_secs: 600")
    result = _validate("tenants/", tmp_path)
    assert result.returncode == 1
    console = next(b for b in _doc_blocks("console") if "4 problem(s)" in b)
    shown = [line for line in console.splitlines() if line.startswith("tenants/")]
    assert result.stdout.splitlines() == shown
    assert result.stderr.strip() in console
