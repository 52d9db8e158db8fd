"""What a tenant file may say: `tenants/<tenant-id>/tenant.yaml`, field by field.

Every field is documented for admins in docs/tenants.md. Checks that need the file system (voice
clips) or other tenants (duplicate numbers) are in loader.py; everything a file can get wrong on its
own is here. Messages say what is wrong and what is expected: they are shown to tenant admins.
"""

from __future__ import annotations

import datetime as dt
import itertools
import re
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from personagate_common.voices import PRESET_VOICES

TENANT_ID = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
PERSONA_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9_-]{0,62}[a-z0-9])?$")
E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
SIP_URI = re.compile(r"^sips?:(?:[^@\s<>\"]+@)?[A-Za-z0-9.\-\[\]:]+(?::[0-9]{1,5})?(?:;[^\s<>\"]*)?$")
CLOCK_RANGE = re.compile(r"^([0-2][0-9]):([0-5][0-9])-([0-2][0-9]):([0-5][0-9])$")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DTMF_DIGITS = "0123456789*#"
MAX_PROMPT_CHARS = 4000
CLIP_SUFFIXES = (".wav", ".flac")
# Final SIP answers a tenant may give after hours (RFC 3261 §21): busy, unavailable, declined.
AFTER_HOURS_STATUSES = (403, 404, 480, 486, 503, 603)


class Strict(BaseModel):
    # A misspelt key must be an error, not a silently ignored line that leaves a default in place.
    # `dtmf_digit: 0` or `name: 1984` are text to the admin, though YAML reads them as numbers.
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True, coerce_numbers_to_str=True)


def _tenant_id(value: str) -> str:
    if not TENANT_ID.match(value):
        raise ValueError(f"{value!r} is not a tenant id; expected lower-case letters, digits and '-'")
    return value


def _persona_name(value: str) -> str:
    if not PERSONA_NAME.match(value):
        raise ValueError(f"{value!r} is not a persona name; expected lower-case letters, digits, '-' or '_'")
    return value


def _phone_number(value: str) -> str:
    if not E164.match(value):
        raise ValueError(f"{value!r} is not an E.164 number; expected '+' then 7 to 15 digits, e.g. '+14155550100'")
    return value


def clip_path(value: str) -> str:
    if not value.isprintable():  # a NUL or a line break: no file system takes it, and logs would be forged with it
        raise ValueError(f"{value!r} has a control character; expected a relative path like 'voices/agent.wav'")
    if value.startswith("/") or "\\" in value or any(part in ("", ".", "..") for part in value.split("/")):
        raise ValueError(f"{value!r} is not a file in the tenant folder; expected a relative path like 'voices/agent.wav'")
    if not value.lower().endswith(CLIP_SUFFIXES):
        raise ValueError(f"{value!r} is not a wav or flac file; expected a name ending in .wav or .flac")
    return value


def _preset(value: str) -> str:
    if value not in PRESET_VOICES:
        raise ValueError(f"unknown voice preset {value!r}; expected one of {', '.join(PRESET_VOICES)}")
    return value


def _time_zone(value: str) -> str:
    # Abbreviations such as EST are fixed offsets in the IANA database: a New York line written as
    # EST would open an hour late all summer. Only Region/City names follow daylight saving.
    if "/" not in value and value != "UTC":
        raise ValueError(f"{value!r} is not a Region/City time zone; expected e.g. 'America/New_York' or 'UTC'")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {value!r}; expected an IANA name like 'Europe/London'") from exc
    return value


def _sip_uri(value: str) -> str:
    if not SIP_URI.match(value):
        raise ValueError(f"{value!r} is not a SIP URI; expected e.g. 'sip:queue@pbx.example.com'")
    return value


def _dtmf_digit(value: str) -> str:
    if len(value) != 1 or value not in DTMF_DIGITS:
        raise ValueError(f"{value!r} is not one DTMF key; expected one of 0-9, * or # (quoted: '#')")
    return value


def _after_hours_status(value: int) -> int:
    if value not in AFTER_HOURS_STATUSES:
        allowed = ", ".join(map(str, AFTER_HOURS_STATUSES))
        raise ValueError(f"{value} is not an after-hours answer; expected one of {allowed}")
    return value


def _one_line(value: str) -> str:
    if not all(ch.isprintable() for ch in value):
        raise ValueError("must be one line of printable text")
    return value


PersonaName = Annotated[str, AfterValidator(_persona_name)]
PhoneNumber = Annotated[str, AfterValidator(_phone_number)]
ClipPath = Annotated[str, AfterValidator(clip_path)]


class Voice(Strict):
    """Exactly one of: a clip in the tenant folder, or a preset voice of the model."""

    clip: ClipPath | None = None
    preset: Annotated[str, AfterValidator(_preset)] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Voice:
        if (self.clip is None) == (self.preset is None):
            raise ValueError("give exactly one of 'clip' (a wav/flac file in the tenant folder) or 'preset'")
        return self


class Sampling(Strict):
    """Generation settings, bounded to what keeps the agent coherent on a phone line."""

    temperature: float = Field(0.8, ge=0.2, le=1.2)
    top_k: int = Field(250, ge=10, le=500)
    text_temperature: float = Field(0.7, ge=0.2, le=1.2)
    text_top_k: int = Field(25, ge=1, le=100)


class Persona(Strict):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    voice: Voice
    sampling: Sampling = Sampling()
    speaks_first: bool = True
    description: str = Field("", max_length=200)
    # Anyone may call this persona from a browser (the page at /call?tenant=…&persona=…: a "call us" button on
    # the tenant's site); otherwise only the tenant's admins can, with their token.
    public_link: bool = False


class Limits(Strict):
    max_concurrent_calls: int = Field(10, ge=1, le=10_000)
    max_call_seconds: int = Field(1800, ge=30, le=4 * 3600)


class Reject(Strict):
    status: Annotated[int, AfterValidator(_after_hours_status)] = 480
    reason: Annotated[str, Field(min_length=1, max_length=80), AfterValidator(_one_line)] = "Temporarily Unavailable"


class AfterHours(Strict):
    """Exactly one of: reject the call with a SIP answer, or route it to another persona."""

    reject: Reject | None = None
    persona: PersonaName | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> AfterHours:
        if (self.reject is None) == (self.persona is None):
            raise ValueError("give exactly one of 'reject' (a SIP status and reason) or 'persona'")
        return self


def _day_ranges(value: str | list[str]) -> tuple[tuple[dt.time, dt.time], ...]:
    texts = [value] if isinstance(value, str) else value
    if texts == ["closed"]:
        return ()
    ranges = []
    for text in texts:
        match = CLOCK_RANGE.match(text.strip())
        if not match:
            raise ValueError(f"{text!r} is not an opening range; expected 'HH:MM-HH:MM' (24-hour) or 'closed'")
        h1, m1, h2, m2 = map(int, match.groups())
        if h1 > 23 or h2 > 24 or (h2 == 24 and m2 != 0):
            raise ValueError(f"{text!r} has an hour out of range; expected 00:00 to 24:00")
        start, end = h1 * 60 + m1, h2 * 60 + m2
        if end <= start:
            raise ValueError(f"{text!r} ends before it starts; split a range past midnight over two days")
        ranges.append((start, end))
    ranges.sort()
    for (s1, e1), (s2, e2) in itertools.pairwise(ranges):
        if s2 < e1:
            raise ValueError(f"opening ranges {_hhmm(s1)}-{_hhmm(e1)} and {_hhmm(s2)}-{_hhmm(e2)} overlap; "
                             "expected separate ranges in one day")
    return tuple((_clock(s), _clock(e)) for s, e in ranges)


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _clock(minutes: int) -> dt.time:
    return dt.time.max if minutes == 24 * 60 else dt.time(minutes // 60, minutes % 60)


DayRanges = Annotated[str | list[str], AfterValidator(_day_ranges)]


class Hours(Strict):
    timezone: Annotated[str, AfterValidator(_time_zone)]
    weekly: dict[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"], DayRanges]
    closed_dates: list[dt.date] = []
    after_hours: AfterHours = AfterHours(reject=Reject())

    def is_open(self, when: dt.datetime) -> bool:
        """Whether the line is open at ``when`` (an aware datetime), in the tenant's time zone."""
        local = when.astimezone(ZoneInfo(self.timezone))
        if local.date() in self.closed_dates:
            return False
        ranges = self.weekly.get(WEEKDAYS[local.weekday()], ())
        now = local.time().replace(tzinfo=None)
        return any(start <= now < end for start, end in ranges)  # type: ignore[operator]


class Escalation(Strict):
    """A caller pressing ``dtmf_digit`` is transferred to ``transfer_to`` (a human queue)."""

    transfer_to: Annotated[str, AfterValidator(_sip_uri)]
    dtmf_digit: Annotated[str, AfterValidator(_dtmf_digit)] = "0"


class Recording(Strict):
    enabled: bool = False
    consent_announcement: ClipPath | None = None

    @model_validator(mode="after")
    def _consent(self) -> Recording:
        if self.enabled and self.consent_announcement is None:
            raise ValueError("recording is enabled without a consent_announcement; expected a wav/flac clip that "
                             "tells the caller the call is recorded")
        return self


class TenantFile(Strict):
    """The whole of `tenants/<tenant-id>/tenant.yaml`."""

    tenant: Annotated[str, AfterValidator(_tenant_id)]
    name: str = Field(min_length=1, max_length=120)
    numbers: dict[PhoneNumber, PersonaName] = {}
    personas: dict[PersonaName, Persona] = Field(min_length=1)
    limits: Limits = Limits()
    hours: Hours | None = None
    escalation: Escalation | None = None
    recording: Recording = Recording()
