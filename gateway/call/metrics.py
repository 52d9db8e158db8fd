"""The call core's Prometheus metrics, one family each for both front ends, labelled ``front_end`` (sip, webrtc).

``call_metrics(registry, "sip")`` gives a front end its children; the families are registered once per registry.
What only one front end has stays in its own metrics (``gateway/sip/metrics.py``, ``gateway/webrtc/metrics.py``).
"""

from __future__ import annotations

import weakref
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

FrontEnd = Literal["sip", "webrtc"]
FRONT_ENDS: tuple[FrontEnd, ...] = ("sip", "webrtc")
# The call's arrival (INVITE, offer) to its answer: routing, the claim and the persona's priming (a few ms cached;
# seconds if not), and for a browser its media connecting.
SETUP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0)
# The answer to the agent's first audio queued for the caller.
FIRST_AUDIO_BUCKETS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0)
END_REASONS = ("hangup", "max_duration", "media_timeout", "setup_timeout", "connection_failed", "no_worker",
               "worker_ended", "transfer", "session_timer", "shutdown", "refused", "persona_rejected", "error")
TRANSFER_RESULTS = ("success", "failed", "timeout", "busy", "no_answer", "abandoned", "unavailable")


class CallFamilies:
    """The families, registered on one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.calls_active = Gauge(
            "personagate_gateway_front_end_calls_active",
            "Calls in progress by front end: SIP calls being set up (ringing) or answered; browser calls answered "
            "and not yet ended.", ["front_end"], registry=r)
        self.calls_ended = Counter(
            "personagate_gateway_front_end_calls_ended_total",
            "Answered calls ended, by front end and reason (hangup, max_duration, media_timeout, setup_timeout, "
            "connection_failed, no_worker, worker_ended, transfer, session_timer, shutdown, refused, "
            "persona_rejected, error).", ["front_end", "reason"], registry=r)
        self.setup_seconds = Histogram(
            "personagate_gateway_front_end_setup_seconds",
            "From the call's arrival to its answer: SIP, the INVITE to 200 OK sent (the session primed); WebRTC, "
            "the offer to the call ready (the session primed and the browser's media connected).",
            ["front_end"], buckets=SETUP_BUCKETS, registry=r)
        self.first_agent_audio_seconds = Histogram(
            "personagate_gateway_front_end_first_agent_audio_seconds",
            "From the answer (SIP 200 OK, WebRTC ready) to the agent's first audio queued for the caller.",
            ["front_end"], buckets=FIRST_AUDIO_BUCKETS, registry=r)
        self.outbound_underruns = Counter(
            "personagate_gateway_front_end_outbound_underruns_total",
            "20 ms packets sent as silence because no agent audio was queued.", ["front_end"], registry=r)
        self.outbound_shed = Counter(
            "personagate_gateway_front_end_outbound_shed_total",
            "20 ms packets of agent audio dropped to keep the outbound buffer shallow.", ["front_end"], registry=r)
        self.caller_frames_dropped = Counter(
            "personagate_gateway_front_end_caller_frames_dropped_total",
            "20 ms frames of caller audio dropped because the event loop did not take them in time.",
            ["front_end"], registry=r)
        self.recordings = Counter(
            "personagate_gateway_front_end_recordings_total",
            "Calls to tenants that record calls, by result: written (the file is complete in recordings_dir), "
            "failed (it could not be written; the call went on).", ["front_end", "result"], registry=r)
        self.dtmf = Counter(
            "personagate_gateway_front_end_dtmf_total",
            "DTMF digits received from callers, by method: rfc4733 (telephone-event) or info (SIP INFO), page (the "
            "browser's keypad).", ["front_end", "method"], registry=r)
        self.transfers = Counter(
            "personagate_gateway_front_end_transfers_total",
            "Escalations to the tenant's human, by front end, method and result. method=refer (SIP blind "
            "transfer): success (2xx NOTIFY: the call ends), failed (REFER refused or a final failure NOTIFY: the "
            "gateway falls back to a bridged call if enabled, else the caller stays with the agent), timeout (no "
            "final result in time: the caller stays). method=bridge (the gateway's own call to the human, after a "
            "failed REFER or for a browser caller; one escalation may count once per method): success (answered: "
            "caller and human bridged, the agent released), busy, no_answer, failed, unavailable (no SIP on this "
            "gateway), abandoned (the caller hung up while the human's phone rang).",
            ["front_end", "method", "result"], registry=r)
        for front_end in FRONT_ENDS:
            for result in ("written", "failed"):
                self.recordings.labels(front_end=front_end, result=result)
            for reason in END_REASONS:
                self.calls_ended.labels(front_end=front_end, reason=reason)


class CallMetrics:
    """One front end's children of the shared families."""

    def __init__(self, families: CallFamilies, front_end: FrontEnd) -> None:
        self.front_end = front_end
        self._families = families
        self.calls_active = families.calls_active.labels(front_end=front_end)
        self.setup_seconds = families.setup_seconds.labels(front_end=front_end)
        self.first_agent_audio_seconds = families.first_agent_audio_seconds.labels(front_end=front_end)
        self.outbound_underruns = families.outbound_underruns.labels(front_end=front_end)
        self.outbound_shed = families.outbound_shed.labels(front_end=front_end)
        self.caller_frames_dropped = families.caller_frames_dropped.labels(front_end=front_end)

    def ended(self, reason: str) -> None:
        self._families.calls_ended.labels(front_end=self.front_end, reason=reason).inc()

    def recording(self, result: str) -> None:
        self._families.recordings.labels(front_end=self.front_end, result=result).inc()

    def dtmf(self, method: str) -> None:
        self._families.dtmf.labels(front_end=self.front_end, method=method).inc()

    def transfer(self, method: str, result: str) -> None:
        self._families.transfers.labels(front_end=self.front_end, method=method, result=result).inc()


_families: weakref.WeakKeyDictionary[CollectorRegistry, CallFamilies] = weakref.WeakKeyDictionary()


def call_metrics(registry: CollectorRegistry, front_end: FrontEnd) -> CallMetrics:
    """``front_end``'s call metrics on ``registry`` (the families registered there on first use)."""
    families = _families.get(registry)
    if families is None:
        families = _families[registry] = CallFamilies(registry)
    return CallMetrics(families, front_end)
