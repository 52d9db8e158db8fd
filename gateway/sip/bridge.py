"""Escalation by bridging: the gateway's own call to the human, for a caller whose side will not take a REFER.

Many trunks refuse REFER (a 603, livekit/sip#234), so a blind transfer cannot be the only way to a human. A
``HumanLeg`` is an outgoing INVITE to the tenant's ``escalation.transfer_to``; while it rings the caller keeps
talking to the agent, so a failure has nothing to undo. Once answered the two calls are joined back to back in
pjsua's conference bridge (``Leg.join``), the agent session ends (``transfer``) and the gateway stays in the
middle until either side hangs up. A browser caller uses a ``HumanLeg`` with ``caller_serial=None`` and its own
16 kHz media tap (``buffers``).

Contract: the result is one of ``success``, ``busy``, ``no_answer``, ``failed``, ``abandoned``
(``personagate_gateway_front_end_transfers_total{method="bridge"}``). The loop side keeps no pjsua object: dialling,
joining and hanging up run on the pjsua thread and find the legs by serial (``UserAgent.kept``).

Details: docs/sip.md#the-bridged-call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import pjsua2 as pj

from .leg import Leg, LegEvent
from .media import MediaBuffers

if TYPE_CHECKING:
    from .ua import UserAgent

log = logging.getLogger(__name__)

BUSY_STATUSES = frozenset({486, 600})
NO_ANSWER_STATUSES = frozenset({408, 480, 487})


def dial_result(status: int) -> str:
    """The transfer result of a final failure answer to the gateway's INVITE."""
    if status in BUSY_STATUSES:
        return "busy"
    if status in NO_ANSWER_STATUSES:
        return "no_answer"
    return "failed"


class DialError(Exception):
    """The INVITE could not be sent (pjsua's reason)."""


class HumanLeg:
    """The gateway's call to the escalation target, from the loop's side; ``connect()`` once."""

    def __init__(self, *, ua: UserAgent, caller_serial: int | None, target: str, ring_timeout: float,
                 loop: asyncio.AbstractEventLoop, sip_call_id: str) -> None:
        self.ua = ua
        self.caller_serial = caller_serial  # None: no caller leg; the human's audio is tapped into ``buffers``
        # The human's leg's media tap: only used without a caller leg (a leg joined to another has no tap).
        self.buffers = MediaBuffers(inbound_frames=1) if caller_serial is not None else MediaBuffers()
        self.target = target
        self.ring_timeout = ring_timeout
        self.loop = loop
        self.sip_call_id = sip_call_id  # the caller's, for logs
        self.human_sip_call_id: str | None = None  # our INVITE's Call-ID, to find the call in the PBX's logs
        self.status: int | None = None  # the final answer to our INVITE
        self.reason = ""
        self.rang = False  # a 1xx came
        self.answered_at: float | None = None
        self.ended_at: float | None = None
        self.rtp: dict[str, object] = {}  # receive statistics of the human's audio, when the leg ended
        self.gone = asyncio.Event()  # the human's leg is over
        self._outcome: asyncio.Future[LegEvent] = loop.create_future()
        self._dialed_serial: int | None = None  # set and read on the pjsua thread only

    @property
    def seconds(self) -> float | None:
        """How long the human was on the call (until now if still on)."""
        if self.answered_at is None:
            return None
        return (self.ended_at or time.monotonic()) - self.answered_at

    async def connect(self) -> str:
        """Call the target; if it answers, join it with the caller's leg. The result: success, busy,
        no_answer or failed. Cancelled (the caller hung up), or on any failure, the INVITE is cancelled."""
        joined = False
        try:
            try:
                self.human_sip_call_id = await asyncio.wrap_future(self.ua.submit(self._dial))
            except DialError as exc:
                self.reason = str(exc)
                return "failed"
            try:
                async with asyncio.timeout(self.ring_timeout):
                    event = await self._outcome
            except TimeoutError:
                self.reason = f"no answer within {self.ring_timeout:g} s"
                return "no_answer"
            if event.kind != "confirmed":
                self.status = self.status or event.status
                self.reason = self.reason or event.reason
                return dial_result(self.status or 500)
            if self.caller_serial is None:
                joined = True  # nothing to join: the owner pumps ``buffers``
                return "success"
            joined = await asyncio.wrap_future(self.ua.submit(self._join))
            if not joined:
                self.reason = "the caller's leg ended first"
                return "failed"
            return "success"
        finally:
            if not joined:
                self.hang_up()

    def hang_up(self) -> None:
        """CANCEL or BYE the human's leg (a no-op once it is over, or if it was never dialed)."""

        def run() -> None:
            leg = self.ua.kept(self._dialed_serial) if self._dialed_serial is not None else None
            if isinstance(leg, Leg):
                leg.bye()

        self.ua.post(run)

    def send_dtmf(self, digit: str) -> None:
        """Pass a caller's key press on to the human's side (RFC 4733), once bridged."""

        def run() -> None:
            leg = self.ua.kept(self._dialed_serial) if self._dialed_serial is not None else None
            if not isinstance(leg, Leg):
                return
            try:
                leg.dial_dtmf(digit)
            except pj.Error as exc:  # e.g. the human's side took no telephone-event
                log.warning("key press not passed to the human: %s", exc.reason,
                            extra={"sip_call_id": self.sip_call_id, "digit": digit})

        self.ua.post(run)

    # ------------------------------------------------------------------ pjsua thread

    def _dial(self) -> str:
        assert self.ua.account is not None
        leg = Leg(self.ua, self.ua.account, buffers=self.buffers)
        leg.tap = self.caller_serial is None  # else its audio only ever goes to the caller's, once joined
        leg.events = lambda event: self.loop.call_soon_threadsafe(self._on_event, event)
        self.ua.keep(leg.serial, leg)
        # Who is calling, for the human's phone: RFC 3325's asserted identity, which a PBX that trusts the
        # gateway shows (the From is the gateway's own address, as the call is the gateway's).
        caller = self.ua.kept(self.caller_serial) if self.caller_serial is not None else None
        identity = caller.getInfo().remoteUri if isinstance(caller, Leg) and not caller.over else ""
        try:
            leg.dial(self.target, {"P-Asserted-Identity": identity} if identity else None)
        except pj.Error as exc:
            self.ua.drop(leg.serial)
            raise DialError(exc.reason) from None
        self._dialed_serial = leg.serial
        return leg.getInfo().callIdString

    def _join(self) -> bool:
        assert self.caller_serial is not None
        caller = self.ua.kept(self.caller_serial)
        human = self.ua.kept(self._dialed_serial) if self._dialed_serial is not None else None
        if not isinstance(caller, Leg) or not isinstance(human, Leg) or caller.over or human.over:
            return False
        caller.join(human)
        return True

    # ------------------------------------------------------------------ loop

    def _on_event(self, event: LegEvent) -> None:
        if event.kind == "provisional" and not self.rang:
            self.rang = True
            log.info("escalation target ringing: %d %s", event.status, event.reason,
                     extra={"sip_call_id": self.sip_call_id, "transfer_to": self.target})
        elif event.kind == "response":
            self.status, self.reason = event.status, event.reason
            if event.status >= 300 and not self._outcome.done():
                self._outcome.set_result(event)
        elif event.kind == "confirmed":
            self.answered_at = time.monotonic()
            if not self._outcome.done():
                self._outcome.set_result(event)
        elif event.kind == "disconnected":
            self.rtp = event.stats
            self.ended_at = time.monotonic()
            self.gone.set()
            if not self._outcome.done():
                self._outcome.set_result(event)
