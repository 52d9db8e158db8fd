"""The gateway's Prometheus metrics. One registry per gateway so that tests can run several."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics

disable_created_metrics()


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
