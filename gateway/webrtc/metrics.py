"""The WebRTC front end's Prometheus metrics, on the gateway's registry (``/metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..sip.metrics import FIRST_AUDIO_BUCKETS, SETUP_BUCKETS

OFFER_ANSWERS = ("201", "400", "401", "403", "404", "413", "415", "429", "500", "503")
REFUSAL_REASONS = ("rate_limited", "public_client_cap", "public_tenant_cap", "invalid_offer", "too_many_candidates",
                   "no_usable_candidate", "too_large", "not_sdp", "invalid_token", "not_found", "closed",
                   "tenant_limit", "no_capacity", "unavailable", "draining", "persona_rejected", "hangup_forbidden",
                   "no_such_call")


class WebRtcMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.offers = Counter(
            "personagate_gateway_webrtc_offers_total",
            "SDP offers posted, by the HTTP status answered: 201 (answered), 400 (malformed), 401/403 (token), 404 "
            "(no such persona), 413 (too large), 415 (not application/sdp), 429 (client rate limit or tenant limit), "
            "500 (persona refused), 503 (no agent free, store unavailable, draining, after hours).",
            ["answer"], registry=r)
        for answer in OFFER_ANSWERS:
            self.offers.labels(answer=answer)
        self.refusals = Counter(
            "personagate_gateway_webrtc_refusals_total",
            "Requests the browser front end refused, by reason: rate_limited (offers per minute), "
            "public_client_cap / public_tenant_cap (anonymous calls in progress), invalid_offer, too_many_candidates, "
            "no_usable_candidate, too_large, not_sdp, invalid_token, not_found, closed, tenant_limit, no_capacity, "
            "unavailable, draining, persona_rejected, hangup_forbidden (DELETE without the call's secret), "
            "no_such_call.", ["reason"], registry=r)
        for reason in REFUSAL_REASONS:
            self.refusals.labels(reason=reason)
        self.candidates_dropped = Counter(
            "personagate_gateway_webrtc_candidates_dropped_total",
            "ICE candidates taken out of accepted offers: at addresses the gateway does not send to (its own host, "
            "link-local, networks of interfaces not in webrtc_ice_interfaces).", registry=r)
        self.calls_active = Gauge(
            "personagate_gateway_webrtc_calls_active", "Browser calls answered and not yet ended.", registry=r)
        self.calls_ended = Counter(
            "personagate_gateway_webrtc_calls_ended_total",
            "Browser calls ended after their answer, by reason (hangup, max_duration, media_timeout, setup_timeout, "
            "connection_failed, no_worker, worker_ended, shutdown, refused, persona_rejected, error).",
            ["reason"], registry=r)
        self.setup_seconds = Histogram(
            "personagate_gateway_webrtc_setup_seconds",
            "From the offer to the call ready: the agent primed and the browser's media connected.",
            buckets=SETUP_BUCKETS, registry=r)
        self.first_agent_audio_seconds = Histogram(
            "personagate_gateway_webrtc_first_agent_audio_seconds",
            "From the offer to the agent's first audio queued for the browser.",
            buckets=FIRST_AUDIO_BUCKETS + (10.0,), registry=r)
        self.outbound_underruns = Counter(
            "personagate_gateway_webrtc_outbound_underruns_total",
            "20 ms packets sent as silence because no agent audio was queued (after the agent's first audio).",
            registry=r)
        self.outbound_shed = Counter(
            "personagate_gateway_webrtc_outbound_shed_total",
            "20 ms packets of agent audio dropped to keep the outbound buffer shallow.", registry=r)
        self.outbound_stalls = Counter(
            "personagate_gateway_webrtc_outbound_stalls_total",
            "Times the outbound clock fell behind by more than 100 ms (the event loop stalled): the clock is rebased "
            "and the RTP timestamps skip the gap, instead of a burst.", registry=r)
        self.caller_frames_dropped = Counter(
            "personagate_gateway_webrtc_caller_frames_dropped_total",
            "20 ms frames of browser audio dropped because they waited too long to be read (the event loop was "
            "behind).", registry=r)
        self.recordings = Counter(
            "personagate_gateway_webrtc_recordings_total",
            "Browser calls to tenants that record calls, by result: written (a complete FLAC), failed (see the log).",
            ["result"], registry=r)
        self.events_dropped = Counter(
            "personagate_gateway_webrtc_events_dropped_total",
            "Data channel messages (agent text) not sent because the browser was not reading them.", registry=r)
