"""The gateway's Prometheus metrics. One registry per gateway so that tests can run several."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()

# start(): a claim (sub-millisecond), a WebSocket to the worker and its priming (a few ms cached, more if not).
CALL_START_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# A re-home: it should take under 1 s (a longer gap is a dropped call to the caller); buckets straddle 1 s.
REHOME_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.0, 5.0)
# A worker step's round trip: the model's tick is budgeted at 80 ms, so most of a healthy call sits well below.
AGENT_STEP_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5)
CALL_START_RESULTS = ("live", "no_capacity", "tenant_limit", "unavailable", "draining", "persona_rejected", "error")


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.tenant_reloads = Counter(
            "personagate_gateway_tenant_reloads_total",
            "Changes to the tenants folder checked, by result: applied (all valid), partial (some tenants kept "
            "their last good configuration), rejected (nothing applied).",
            ["result"], registry=r,
        )
        self.tenant_config_errors = Gauge(
            "personagate_gateway_tenant_config_errors",
            "Problems in a tenant's files at the last check (0 when valid); the tenant serves its last good "
            "configuration meanwhile.",
            ["tenant"], registry=r,
        )
        self.tenants_serving = Gauge(
            "personagate_gateway_tenants_serving", "Tenants whose configuration is serving calls.", registry=r
        )
        self.tenant_last_reload_success = Gauge(
            "personagate_gateway_tenant_last_reload_success_timestamp_seconds",
            "When a change to the tenants folder was last applied in full (Unix time).", registry=r,
        )
        self.http_requests = Counter(
            "personagate_gateway_http_requests_total",
            "HTTP requests answered (admin API, probes), by method, route template and status code.",
            ["method", "route", "status"], registry=r,
        )
        self.tenant_edit_refusals = Counter(
            "personagate_gateway_tenant_edit_refusals_total",
            "Persona edits through the admin API refused by the YAML checks before anything was written, by "
            "reason: invalid (not YAML, not a mapping), limit_size, limit_depth, limit_nodes, limit_aliases, "
            "limit_cpu (a YAML limit), line_break (NEL, U+2028, U+2029), document_marker, outside_persona (the "
            "edit would change tenant.yaml outside its persona).",
            ["reason"], registry=r,
        )
        # Calls (gateway/calls.py): a front end's call with its agent session on a worker.
        self.calls_active = Gauge(
            "personagate_gateway_calls_active",
            "Calls with an agent session (being started, live or moving to another worker).", registry=r,
        )
        self.routing_store_reachable = Gauge(
            "personagate_gateway_routing_store_reachable",
            "1 while this gateway's last exchange with the routing store (Redis) succeeded, 0 while it cannot be "
            "reached: new calls are then refused (SIP 503, browser 503, with Retry-After; counted in "
            "personagate_gateway_call_starts_total{result=\"unavailable\"}) and calls in progress go on. With "
            "ready_without_routing_store (the default) /readyz stays 200 meanwhile: alert on this gauge instead.",
            registry=r,
        )
        self.routing_store_reachable.set(1)
        self.call_starts = Counter(
            "personagate_gateway_call_starts_total",
            "Agent sessions asked for by front ends, by result: live, or why not (no_capacity, tenant_limit, "
            "unavailable, draining, persona_rejected, error).",
            ["result"], registry=r,
        )
        for result in CALL_START_RESULTS:
            self.call_starts.labels(result=result)
        self.call_start_seconds = Histogram(
            "personagate_gateway_call_start_seconds",
            "From a front end asking for an agent session to the worker's ready (claim, connect, priming).",
            buckets=CALL_START_BUCKETS, registry=r,
        )
        self.calls_ended = Counter(
            "personagate_gateway_calls_ended_total",
            "Calls that were live and ended, by reason (hangup, no_worker, shutdown, worker_ended, ...).",
            ["reason"], registry=r,
        )
        self.call_rehome_seconds = Histogram(
            "personagate_gateway_call_rehome_seconds",
            "From losing a call's worker to the new worker's ready (the caller hears comfort noise meanwhile).",
            buckets=REHOME_BUCKETS, registry=r,
        )
        self.agent_step_seconds = Histogram(
            "personagate_gateway_agent_step_round_trip_seconds",
            "From sending a caller frame to a worker to receiving the agent frame of the same step: what the "
            "worker (its queue, its tick, the model) and the connection to it add to every call's latency.",
            buckets=AGENT_STEP_BUCKETS, registry=r,
        )
        self.call_frames_dropped = Counter(
            "personagate_gateway_call_frames_dropped_total",
            "80 ms frames dropped by a call's bounded queues: caller (not yet sent to a worker: the worker was "
            "slow or being replaced) and agent (the front end did not read them in time).",
            ["direction"], registry=r,
        )
        self.call_filler_frames = Counter(
            "personagate_gateway_call_filler_frames_total",
            "80 ms comfort-noise frames played while calls moved to another worker.", registry=r,
        )
        self.restarts = Counter(
            "personagate_gateway_restarts_total",
            "Times `personagate up` restarted the gateway after a crash, counted up to this process's start "
            "(0 when not run by `up`): one higher in each restarted process, so increase() counts the restarts.",
            registry=r,
        )
