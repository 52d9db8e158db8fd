"""The SIP front end's own Prometheus metrics, on the gateway's registry (``/metrics``); what every call has
(setup, first audio, recordings, transfers, DTMF …) is the call core's (``gateway/call/metrics.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

HOLD_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
JITTER_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1)


class SipMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.invites = Counter(
            "personagate_gateway_sip_invites_total",
            "INVITEs by the gateway's final answer: 200, 401 (digest challenge), 403 (source not allowed, or digest "
            "refused), 404 (unknown number), the "
            "tenant's after-hours status, 486 (tenant limit), 488 (sip_srtp mandatory and the INVITE not over TLS), 503 "
            "(no slot, store unavailable, draining, priming timeout), 500, or cancelled (CANCEL or hang-up before "
            "the answer).",
            ["answer"], registry=r,
        )
        self.invites_shed = Counter(
            "personagate_gateway_sip_invites_shed_total",
            "INVITEs beyond the flood rate (sip_max_invites_per_second), held a moment, then refused 503 with "
            "Retry-After (also counted in invites_total{answer=\"503\"}).", registry=r)
        self.calls = Counter(
            "personagate_gateway_sip_calls_total",
            "Answered SIP calls, counted as they end, by the transport their INVITE came over (udp, tcp, tls) and "
            "whether their audio was SRTP (srtp: true or false).", ["transport", "srtp"], registry=r)
        self.rtp_packets_received = Counter(
            "personagate_gateway_sip_rtp_packets_received_total", "RTP packets received from callers.", registry=r)
        self.rtp_packets_lost = Counter(
            "personagate_gateway_sip_rtp_packets_lost_total", "RTP packets from callers that never arrived.",
            registry=r)
        self.rtp_jitter_seconds = Histogram(
            "personagate_gateway_sip_rtp_jitter_seconds",
            "Each call's mean RTP inter-arrival jitter from the caller (pjmedia's RFC 3550 estimate).",
            buckets=JITTER_BUCKETS, registry=r)
        self.holds = Counter(
            "personagate_gateway_sip_holds_total",
            "Times a caller put an answered call on hold (a re-INVITE or UPDATE offering sendonly, inactive or "
            "c=0.0.0.0).", registry=r)
        self.calls_held = Gauge(
            "personagate_gateway_sip_calls_held", "Answered calls on hold by the caller now.", registry=r)
        self.held_seconds = Histogram(
            "personagate_gateway_sip_held_seconds", "How long each hold lasted (resumed, or the call ended).",
            buckets=HOLD_BUCKETS, registry=r)
        self.provisionals_repeated = Counter(
            "personagate_gateway_sip_provisionals_repeated_total",
            "183 Session Progress sent again while a session was being primed (every sip_ringing_interval_seconds) "
            "so that proxies keep the INVITE transaction and a lost 183 is repaired.", registry=r)
        self.auth = Counter(
            "personagate_gateway_sip_auth_total",
            "INVITEs that had to pass digest authentication, by result: ok (admitted), challenged (401), stale "
            "(right password, expired nonce: 401 stale=true), rejected (wrong password or unknown user: 403), "
            "invalid (malformed or foreign credentials: 403), throttled (too many failures from the source: 403).",
            ["result"], registry=r)
        self.registered = Gauge(
            "personagate_gateway_sip_registered",
            "Each REGISTER binding (sip_registrations, labelled user@registrar): 1 while registered, 0 otherwise.",
            ["registration"], registry=r)
        registry.register(GuardCounts())
        self.registrations = Counter(
            "personagate_gateway_sip_registrations_total",
            "REGISTER outcomes per binding: ok (2xx), failed (any other final answer or no answer), unregistered.",
            ["registration", "result"], registry=r)

    def observe_rtp(self, stats: dict[str, Any]) -> None:
        """A call's receive statistics (``Leg.stream_stats``) when it ended."""
        if not stats:
            return
        self.rtp_packets_received.inc(stats["rtp_packets_received"])
        self.rtp_packets_lost.inc(stats["rtp_packets_lost"])
        self.rtp_jitter_seconds.observe(stats["rx_jitter_ms"]["mean"] / 1000)


class GuardCounts(Collector):
    """The SIP guard's counters (kept in C++ on the pjsua thread, read at each scrape): every final response the
    endpoint sent, pjsua's own included (486 from a full call table, 481, 422 …), and requests dropped unanswered."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        import pjsua2 as pj  # only where SIP runs

        responses = CounterMetricFamily(
            "personagate_gateway_sip_responses",
            "Final SIP responses sent, by the request's method (known methods, else 'other') and status: the "
            "gateway's answers, pjsua's own (486 when its call table is full, 481, 422, 488 …) and the SIP guard's "
            "to malformed or unsupported requests (400, 405, 416, 481, 489, 501, 505, 513). Retransmissions are "
            "counted once.", labels=["method", "status"])
        dropped = CounterMetricFamily(
            "personagate_gateway_sip_requests_dropped",
            "Received SIP messages that could not be answered, by why: no_via (no Via header to answer to), "
            "bad_response (a malformed response), bad_ack (a malformed ACK), unreadable (no start line), "
            "send_failed (the answer could not be sent).", labels=["reason"])
        for line in pj.sipGuardCounts():
            kind, *labels, count = line.split(" ")
            if kind == "response":
                responses.add_metric(labels, float(count))
            elif kind == "dropped":
                dropped.add_metric(labels, float(count))
        yield responses
        yield dropped
