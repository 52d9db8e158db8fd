"""A call's escalation to the tenant's human (``escalation.transfer_to``), for both front ends.

SIP callers are first sent a REFER (the front end's ``refer``); a refused or failed REFER, or a browser caller,
gets the gateway's own call to the human (``gateway.sip.bridge.HumanLeg``), bridged once answered. While it rings
the caller keeps talking to the agent, so a failure has nothing to undo. Each attempt is counted
(``personagate_gateway_front_end_transfers_total``), logged and kept for the call record.

``HumanLeg`` is imported when a human is dialled, never before: a gateway without SIP never loads pjsua2.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from .metrics import CallMetrics

if TYPE_CHECKING:
    from ..sip.bridge import HumanLeg
    from ..sip.ua import UserAgent

log = logging.getLogger(__name__)


class Escalation:
    """One call's escalation: at most one in progress; once a human (or the REFER's target) has the call,
    ``transferred`` is set and no other starts."""

    def __init__(self, metrics: CallMetrics, log_extra: dict[str, object]) -> None:
        self.metrics = metrics
        self.log_extra = log_extra
        self.attempts: list[dict[str, object]] = []
        self.method: str | None = None  # the last attempt's: refer or bridge
        self.result: str | None = None  # the last attempt's (see TRANSFER_RESULTS)
        self.human: HumanLeg | None = None  # the human who answered a bridged escalation
        self.bridge_ended_by: str | None = None  # caller, human, media_timeout or shutdown
        self.transferred = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.on_attempt: Callable[[str], None] | None = None  # each attempt's result, for the front end

    @property
    def idle(self) -> bool:
        """No escalation in progress, and none has succeeded."""
        return (self._task is None or self._task.done()) and not self.transferred.is_set()

    def start(self, run: Coroutine[Any, Any, None], name: str) -> None:
        self._task = asyncio.create_task(run, name=name)

    async def stop(self) -> None:
        """Cancel an escalation in progress (a REFER awaiting its NOTIFY, or the human's phone ringing: its INVITE
        is cancelled)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def done(self, method: str, result: str, target: str, status: int | None = None, why: str = "") -> None:
        """An attempt's result: counted, logged, kept."""
        self.method, self.result = method, result
        self.attempts.append({"method": method, "result": result, "status": status})
        self.metrics.transfer(method, result)
        extra = {**self.log_extra, "transfer_to": target, "method": method, "status": status, "result": result,
                 "why": why}
        if result == "success":
            log.info("call transferred to %s (%s)", target, method, extra=extra)
        else:
            log.warning("transfer to %s by %s did not complete (%s): the caller stays with the agent", target,
                        method, result, extra=extra)
        if self.on_attempt is not None:
            self.on_attempt(result)

    async def bridge(self, ua: UserAgent | None, target: str, *, caller_serial: int | None, ring_timeout: float,
                     call_id: str, abandoned: Callable[[], bool] = lambda: True) -> str:
        """Call ``target`` from the gateway and, once answered, join it with the caller (``caller_serial``'s SIP
        leg; None: the front end pumps the human's audio itself, ``human.buffers``). The result, as counted.
        Cancelled while the human's phone rings, the INVITE is cancelled and, if ``abandoned()``, counted so."""
        if ua is None:
            log.warning("escalation asked for, but SIP is off on this gateway: the caller stays with the agent",
                        extra=self.log_extra)
            self.done("bridge", "unavailable", target)
            return "unavailable"
        from ..sip.bridge import HumanLeg  # here: only a gateway that dials humans loads pjsua2 for it

        human = HumanLeg(ua=ua, caller_serial=caller_serial, target=target, ring_timeout=ring_timeout,
                         loop=asyncio.get_running_loop(), sip_call_id=call_id)
        log.info("calling %s to bridge the caller", target, extra=self.log_extra)
        try:
            result = await human.connect()
        except asyncio.CancelledError:
            if abandoned():
                self.done("bridge", "abandoned", target, human.status, "the caller hung up")
            raise
        self.done("bridge", result, target, human.status, human.reason)
        if result == "success":
            self.human = human
            self.transferred.set()
        return result

    def hang_up_human(self) -> None:
        """The human's leg hung up, if there is one still on (answered as the caller hung up, or bridged)."""
        if self.human is not None and not self.human.gone.is_set():
            self.human.hang_up()

    def record(self) -> dict[str, object]:
        """The call record's escalation fields."""
        record: dict[str, object] = {"transfer": self.result, "transfer_method": self.method,
                                     "transfer_attempts": self.attempts}
        human = self.human
        if human is not None:
            record.update({
                "human_leg_seconds": round(human.seconds, 2) if human.seconds is not None else None,
                "bridge_ended_by": self.bridge_ended_by, "human_sip_call_id": human.human_sip_call_id,
                "human_rtp_packets_received": human.rtp.get("rtp_packets_received")})
        return record
