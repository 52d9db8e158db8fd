"""The WebRTC front end's own Prometheus metrics, on the gateway's registry (``/metrics``); what every call has
(setup, first audio, recordings, transfers …) is the call core's (``gateway/call/metrics.py``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

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
        self.outbound_stalls = Counter(
            "personagate_gateway_webrtc_outbound_stalls_total",
            "Times the outbound clock fell behind by more than 100 ms (the event loop stalled): the clock is rebased "
            "and the RTP timestamps skip the gap, instead of a burst.", registry=r)
        self.events_dropped = Counter(
            "personagate_gateway_webrtc_events_dropped_total",
            "Data channel messages (agent text) not sent because the browser was not reading them.", registry=r)
