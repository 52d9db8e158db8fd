"""The worker's Prometheus metrics. One registry per worker so that tests can run several."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# The *_created series double every counter's output for no use on our dashboards.
disable_created_metrics()

# Buckets around the 80 ms frame budget.
STEP_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.12, 0.16, 0.25, 0.5, 1.0)
START_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.tick_step_seconds = Histogram(
            "personagate_worker_tick_step_seconds",
            "Time to step all slots of the pool by one 80 ms frame.",
            buckets=STEP_BUCKETS, registry=r,
        )
        self.tick_deadline_misses = Counter(
            "personagate_worker_tick_deadline_misses_total",
            "Ticks that finished after their 80 ms deadline.", registry=r,
        )
        self.tick_resyncs = Counter(
            "personagate_worker_tick_resyncs_total",
            "Times the pool fell more than a frame behind and dropped ticks to catch up.", registry=r,
        )
        self.slots_active = Gauge("personagate_worker_slots_active", "Slots with a live session.", registry=r)
        self.slots_capacity = Gauge("personagate_worker_slots_capacity", "Slots in the pool.", registry=r)
        self.persona_prime_seconds = Histogram(
            "personagate_worker_persona_prime_seconds",
            "Time to prime a persona not in the cache (prefill and snapshot).",
            buckets=START_BUCKETS, registry=r,
        )
        self.session_restore_seconds = Histogram(
            "personagate_worker_session_restore_seconds",
            "Time to copy a primed persona state into a slot.",
            buckets=START_BUCKETS, registry=r,
        )
        self.session_start_seconds = Histogram(
            "personagate_worker_session_start_seconds",
            "From session request to session ready, by whether the persona was already primed.",
            ["persona_cache"], buckets=START_BUCKETS, registry=r,
        )
        self.sessions_started = Counter(
            "personagate_worker_sessions_started_total", "Sessions that became ready.", registry=r
        )
        self.sessions_ended = Counter(
            "personagate_worker_sessions_ended_total", "Sessions ended, by reason.", ["reason"], registry=r
        )
        self.sessions_refused = Counter(
            "personagate_worker_sessions_refused_total", "Session requests refused, by reason.", ["reason"],
            registry=r,
        )
        self.unauthorized = Counter(
            "personagate_worker_unauthorized_requests_total",
            "Requests refused for their credential (no shared secret, or a wrong one), by endpoint "
            "(sessions, info) and reason (missing, wrong).", ["endpoint", "reason"], registry=r,
        )
        self.input_frames_shed = Counter(
            "personagate_worker_input_frames_shed_total",
            "Caller frames dropped because they were stale (the session's backlog was full).", registry=r,
        )
        self.output_frames_shed = Counter(
            "personagate_worker_output_frames_shed_total",
            "Agent frames dropped because the client did not read them in time.", registry=r,
        )
        self.draining = Gauge(
            "personagate_worker_draining",
            "1 while the worker drains (SIGTERM): it refuses new sessions and lets calls in progress end.",
            registry=r,
        )
        self.frames_missing = Counter(
            "personagate_worker_input_frames_missing_total",
            "Ticks at which a live session had no caller frame and was not stepped.", registry=r,
        )
        self.restarts = Counter(
            "personagate_worker_restarts_total",
            "Times `personagate up` restarted the worker after a crash, counted up to this process's start "
            "(0 when not run by `up`): one higher in each restarted process, so increase() counts the restarts.",
            registry=r,
        )
