"""deploy/k8s/components/monitoring: what an operator's Prometheus and Grafana get from the monitoring component.

What these tests protect, as an operator sees it:
- the alerts fire on what they promise and stay quiet otherwise: ``promtool test rules`` runs the unit tests in
  ``tests/alerts.test.yaml`` against the PrometheusRule's own ``spec`` (the only copy of the rules);
- no alert that can never fire and no empty panel: every metric name in the rules and in the dashboard is one the
  gateway or the worker really registers (read from the metric classes on a fresh registry), every histogram
  bucket an expression names exists, every recording rule a query uses is recorded, every query parses;
- the custom resources are what prometheus-operator and KEDA accept: they render with ``kubectl kustomize`` and
  validate against the component's hand-written strict schemas (a typo fails here instead of being dropped
  silently by the API server), the core objects against ``kubernetes-validate --strict``;
- the ServiceMonitor and PodMonitor find the pods and ports the base declares (checked on every overlay that takes
  the component, once the overlays exist);
- each alert carries a severity, a summary, a description and a runbook link that leads to a section of the
  component's README; the dashboard loads with any Prometheus data source.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from prometheus_client import CollectorRegistry

from agent_runtime.metrics import WorkerMetrics
from gateway.call.metrics import call_metrics
from gateway.metrics import GatewayMetrics
from gateway.sip.metrics import SipMetrics
from gateway.webrtc.metrics import WebRtcMetrics
from personagate_common.routing.metrics import RoutingMetrics
from tests.helpers.programs import needs, path_of, require

ROOT = Path(__file__).resolve().parents[1]
COMPONENT = ROOT / "deploy" / "k8s" / "components" / "monitoring"
OVERLAYS = ROOT / "deploy" / "k8s" / "overlays"
SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): COMPONENT / "schemas" / "servicemonitor_v1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): COMPONENT / "schemas" / "podmonitor_v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): COMPONENT / "schemas" / "prometheusrule_v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): COMPONENT / "schemas" / "scaledobject_v1alpha1.json",
}
CUSTOM_GROUPS = ("monitoring.coreos.com/", "keda.sh/")
KUBECTL = path_of("kubectl")
PROMTOOL = path_of("promtool")
RUNBOOK = "https://github.com/personagate/personagate/blob/main/deploy/k8s/components/monitoring/README.md#"
# Series from outside personagate that rules or panels may use, and who exports them.
EXTERNAL_METRICS = {"up": "Prometheus", "kube_pod_container_status_restarts_total": "kube-state-metrics",
                    "kube_pod_deletion_timestamp": "kube-state-metrics",
                    "kube_deployment_status_replicas_available": "kube-state-metrics",
                    "kube_horizontalpodautoscaler_spec_max_replicas": "kube-state-metrics",
                    "kube_horizontalpodautoscaler_status_current_replicas": "kube-state-metrics",
                    "kube_horizontalpodautoscaler_status_desired_replicas": "kube-state-metrics",
                    "kube_horizontalpodautoscaler_status_condition": "kube-state-metrics"}
POD_LABELS = {
    "gateway": {"app.kubernetes.io/name": "personagate", "app.kubernetes.io/component": "gateway"},
    "worker": {"app.kubernetes.io/name": "personagate", "app.kubernetes.io/component": "worker"},
}
# A ScaledObject as an overlay would write one (workers on slot utilisation), for the schema's own checks.
SCALED_OBJECT = {
    "apiVersion": "keda.sh/v1alpha1",
    "kind": "ScaledObject",
    "metadata": {"name": "personagate-worker", "labels": {"app.kubernetes.io/name": "personagate"}},
    "spec": {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "personagate-worker"},
        "pollingInterval": 15,
        "cooldownPeriod": 1800,
        "minReplicaCount": 1,
        "maxReplicaCount": 8,
        "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {
            "scaleDown": {"stabilizationWindowSeconds": 1800,
                          "policies": [{"type": "Pods", "value": 1, "periodSeconds": 600}]}}}},
        "triggers": [{
            "type": "prometheus",
            "metadata": {
                "serverAddress": "http://prometheus-operated.monitoring:9090",
                "query": "namespace:personagate_worker_slots_utilisation:ratio",
                "threshold": "0.6",
            },
        }],
    },
}

# Metrics with neither an alert nor a dashboard panel, and why. This list only shrinks: a new metric gets a panel
# or an alert (or a reason here), so nothing is exported that no one looks at.
UNWATCHED = {
    "personagate_gateway_restarts_total": "`personagate up`'s own restarts; Kubernetes restarts alert through ksm",
    "personagate_worker_restarts_total": "`personagate up`'s own restarts; Kubernetes restarts alert through ksm",
    "personagate_gateway_front_end_dtmf_total": "usage, not health",
    "personagate_gateway_front_end_recordings_total": "recordings are off in the manifests (recordings_dir unset)",
    "personagate_gateway_sip_held_seconds": "caller behaviour, not health (holds are on a panel)",
    "personagate_gateway_sip_provisionals_repeated_total": "a normal part of priming a session",
    "personagate_gateway_tenant_last_reload_success_timestamp_seconds": "PersonagateTenantConfigErrors covers it",
    "personagate_worker_session_restore_seconds": "part of session start, which is on a panel",
}
KEDA = ROOT / "deploy" / "k8s" / "components" / "keda"

METRIC_NAME = re.compile(r"(?<![A-Za-z0-9_:])personagate_[a-z0-9_]+(?![A-Za-z0-9_:])")
KUBE_NAME = re.compile(r"(?<![A-Za-z0-9_:])kube_[a-z0-9_]+(?![A-Za-z0-9_:])")
RECORDED_NAME = re.compile(r"(?<![A-Za-z0-9_:])[a-zA-Z_][a-zA-Z0-9_]*:[a-zA-Z0-9_:]*[a-zA-Z0-9_](?![A-Za-z0-9_:])")
BUCKET_MATCHER = re.compile(r"(personagate_[a-z0-9_]+)_bucket\{([^}]*)\}")
LE_MATCHER = re.compile(r'\ble="([^"]+)"')


# --- what the code registers ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def registered() -> dict[str, dict[str, Any]]:
    """Every metric the gateway (with its SIP, WebRTC and routing parts) and the worker register, by the name a
    query uses (counters with ``_total``), with its type and, for histograms, the bucket bounds."""
    gateway_registry = CollectorRegistry()
    GatewayMetrics(gateway_registry)
    SipMetrics(gateway_registry)
    RoutingMetrics(gateway_registry)
    WebRtcMetrics(gateway_registry)
    call_metrics(gateway_registry, "sip")
    worker = WorkerMetrics(CollectorRegistry())
    names: dict[str, dict[str, Any]] = {}
    for registry in (gateway_registry, worker.registry):
        for family in registry.collect():
            name = family.name + "_total" if family.type == "counter" else family.name
            buckets = {float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")}
            names[name] = {"type": family.type, "buckets": buckets}
    return names


def resolve(name: str, registered: dict[str, dict[str, Any]]) -> str | None:
    """The registered metric a series name belongs to (``x_bucket``/``_sum``/``_count`` of a histogram x)."""
    if name in registered:
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and registered.get(base, {}).get("type") == "histogram":
            return base
    return None


def unknown_names(where: str, expr: str, registered: dict[str, dict[str, Any]], recorded: set[str]) -> list[str]:
    problems = [f"{where}: {name} is not a registered metric" for name in METRIC_NAME.findall(expr)
                if resolve(name, registered) is None]
    problems += [f"{where}: {name} is not exported by {EXTERNAL_METRICS}" for name in KUBE_NAME.findall(expr)
                 if name not in EXTERNAL_METRICS]
    problems += [f"{where}: {name} is not a recording rule of prometheusrule.yaml"
                 for name in RECORDED_NAME.findall(expr) if name not in recorded]
    for base, matchers in BUCKET_MATCHER.findall(expr):
        for le in LE_MATCHER.findall(matchers):
            buckets = registered.get(base, {}).get("buckets", set())
            if float(le) not in buckets:
                problems.append(f"{where}: {base} has no bucket le={le} (buckets: {sorted(buckets)})")
    return problems


# --- the component's files -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rule_spec() -> dict[str, Any]:
    rule = yaml.safe_load((COMPONENT / "prometheusrule.yaml").read_text())
    return rule["spec"]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads((COMPONENT / "dashboards" / "personagate.json").read_text())


def rules(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [rule for group in spec["groups"] for rule in group["rules"]]


def alerts(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [rule for rule in rules(spec) if "alert" in rule]


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in dash["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # a collapsed row keeps its panels inside
    return [p for p in found if p["type"] != "row"]


def dashboard_queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    return [(f"panel {p['title']!r} {t['refId']}", t["expr"]) for p in panels(dash) for t in p["targets"]]


def kustomize(directory: Path) -> list[dict[str, Any]]:
    result = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, f"kubectl kustomize {directory}:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The component as an overlay gets it: kubectl cannot render a Component alone, so a throwaway
    kustomization (with a namespace, as the overlays set one) includes it."""
    require("kubectl")
    overlay = tmp_path_factory.mktemp("overlay")
    relative = Path(*[".."] * len(overlay.parts[1:])) / COMPONENT.relative_to("/")
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "namespace": "personagate", "components": [str(relative)],
    }))
    return kustomize(overlay)


def schema_for(obj: dict[str, Any]) -> dict[str, Any]:
    path = SCHEMAS.get((obj["apiVersion"], obj["kind"]))
    assert path is not None, f"no schema for {obj['apiVersion']} {obj['kind']} in {COMPONENT / 'schemas'}"
    return json.loads(path.read_text())


def schema_errors(obj: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema_for(obj))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


# --- rendering and schemas -----------------------------------------------------------------------------------

def test_component_renders_what_an_overlay_gets(rendered: list[dict[str, Any]]) -> None:
    """An overlay that lists the component gets the monitors, the rules and the dashboard, in its namespace, and
    the dashboard ConfigMap is the one Grafana's sidecar loads: fixed name, grafana_dashboard label, the JSON."""
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in rendered)
    assert kinds == [("ConfigMap", "personagate-dashboard"), ("PodMonitor", "personagate-worker"),
                     ("PrometheusRule", "personagate"), ("Service", "personagate-gateway-metrics"),
                     ("ServiceMonitor", "personagate-gateway")]
    assert {o["metadata"].get("namespace") for o in rendered} == {"personagate"}
    config_map = next(o for o in rendered if o["kind"] == "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["personagate.json"]) == json.loads(
        (COMPONENT / "dashboards" / "personagate.json").read_text())


def test_schemas_are_valid_json_schemas() -> None:
    for path in SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(json.loads(path.read_text()))


def test_custom_resources_match_their_schemas(rendered: list[dict[str, Any]]) -> None:
    """Every custom resource validates against its schema; the core objects (Service, ConfigMap) against
    Kubernetes' own, strictly (unknown fields are errors)."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for obj in rendered:
        if obj["apiVersion"].startswith(CUSTOM_GROUPS):
            assert schema_errors(obj) == [], obj["kind"]
        else:
            kubernetes_validate.validate(obj, "1.30", strict=True)
    assert schema_errors(SCALED_OBJECT) == []


def typo(obj: dict[str, Any], path: list[Any], new_key: str | None = None, value: Any = None) -> dict[str, Any]:
    """A copy of ``obj`` with the key at ``path`` renamed to ``new_key`` (or its value replaced)."""
    obj = copy.deepcopy(obj)
    parent = obj
    for step in path[:-1]:
        parent = parent[step]
    if new_key is not None:
        parent[new_key] = parent.pop(path[-1])
    else:
        parent[path[-1]] = value
    return obj


@pytest.mark.parametrize("kind, path, new_key, value", [
    ("ServiceMonitor", ["spec", "endpoints"], "endpoint", None),
    ("ServiceMonitor", ["spec", "endpoints", 0, "interval"], "intervall", None),
    ("ServiceMonitor", ["spec", "endpoints", 0, "interval"], None, "15"),
    ("ServiceMonitor", ["spec", "selector", "matchLabels"], "matchLabel", None),
    ("PodMonitor", ["spec", "podMetricsEndpoints"], "podMetricEndpoints", None),
    ("PodMonitor", ["spec", "podMetricsEndpoints", 0, "relabelings", 0, "targetLabel"], "target_label", None),
    ("PrometheusRule", ["spec", "groups", 1, "rules", 0, "annotations"], "annotation", None),
    ("PrometheusRule", ["spec", "groups", 1, "rules", 0, "for"], None, "10 minutes"),
    ("PrometheusRule", ["spec", "groups", 0, "rules", 0, "record"], "alert", None),
    ("PrometheusRule", ["spec", "groups", 1, "rules", 0, "alert"], "record", None),
    ("ScaledObject", ["spec", "triggers", 0, "metadata", "threshold"], "treshold", None),
    ("ScaledObject", ["spec", "triggers", 0, "metadata", "threshold"], None, 0.6),
    ("ScaledObject", ["spec", "advanced", "horizontalPodAutoscalerConfig", "behavior", "scaleDown"],
     "scaledown", None),
])
def test_schemas_reject_typos(rendered: list[dict[str, Any]], kind: str, path: list[Any], new_key: str | None,
                              value: Any) -> None:
    """A misspelt or mistyped field is an error, not a field the API server drops without a word (``endpoint:``
    for ``endpoints:`` would leave a ServiceMonitor that scrapes nothing)."""
    good = SCALED_OBJECT if kind == "ScaledObject" else next(o for o in rendered if o["kind"] == kind)
    assert schema_errors(good) == []
    assert schema_errors(typo(good, path, new_key, value)) != []


def test_monitors_select_the_gateway_and_worker_pods(rendered: list[dict[str, Any]]) -> None:
    """The ServiceMonitor selects the component's gateway metrics Service (and only it), which selects the gateway
    pods and their port ``http``; the PodMonitor selects the worker pods' port ``http``."""
    by_kind = {o["kind"]: o for o in rendered}
    service, service_monitor, pod_monitor = by_kind["Service"], by_kind["ServiceMonitor"], by_kind["PodMonitor"]
    wanted = service_monitor["spec"]["selector"]["matchLabels"]
    assert wanted.items() <= service["metadata"]["labels"].items()
    assert wanted.items() > POD_LABELS["gateway"].items()  # a Service of the base with the pods' labels: not it
    assert service["spec"]["selector"] == POD_LABELS["gateway"]
    assert service["spec"]["clusterIP"] == "None"
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert [e["port"] for e in service_monitor["spec"]["endpoints"]] == ["http"]
    assert ports["http"]["targetPort"] == "http" and ports["http"]["port"] == 8080
    assert pod_monitor["spec"]["selector"]["matchLabels"] == POD_LABELS["worker"]
    assert [e["port"] for e in pod_monitor["spec"]["podMetricsEndpoints"]] == ["http"]
    for monitor, job in ((service_monitor, "personagate-gateway"), (pod_monitor, "personagate-worker")):
        endpoint = (monitor["spec"].get("endpoints") or monitor["spec"]["podMetricsEndpoints"])[0]
        assert endpoint["path"] == "/metrics"
        assert {"targetLabel": "job", "replacement": job} in endpoint["relabelings"]


def overlays_with_monitoring() -> list[Path]:
    if not OVERLAYS.is_dir():
        return []
    return sorted(p.parent for p in OVERLAYS.glob("*/kustomization.yaml")
                  if "components/monitoring" in p.read_text())


def pod_specs(objects: list[dict[str, Any]], labels: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for obj in objects:
        template = obj.get("spec", {}).get("template")
        workload = obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet") and template
        if workload and labels.items() <= template["metadata"].get("labels", {}).items():
            found.append((obj["metadata"]["name"], template["spec"]))
    return found


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if not {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
                "Exists": key in labels, "DoesNotExist": key not in labels}[operator]:
            return False
    return True


def scrapable_from_outside(objects: list[dict[str, Any]], labels: dict[str, str], port: int) -> bool:
    """Whether the NetworkPolicies that select pods with ``labels`` let another namespace (Prometheus') or an
    address range reach ``port`` (by number or as the port named http)."""
    policies = [o["spec"] for o in objects if o["kind"] == "NetworkPolicy"
                and "Ingress" in o["spec"].get("policyTypes", ["Ingress"]) and selects(o["spec"]["podSelector"], labels)]
    if not policies:
        return True
    for rule in (rule for policy in policies for rule in policy.get("ingress") or []):
        port_ok = not rule.get("ports") or any(p.get("port") in (port, "http") for p in rule["ports"])
        sources = rule.get("from")
        if port_ok and (not sources or any("namespaceSelector" in s or "ipBlock" in s for s in sources)):
            return True
    return False


@pytest.mark.e2e  # starts a process
@needs("kubectl")
def test_overlays_have_the_pods_and_ports_the_monitors_expect() -> None:
    """On every overlay that takes the component: its custom resources (monitors, rules, autoscaler) validate,
    the gateway and worker workloads carry the labels, container names and port names the monitors and the
    restart alert rely on, and no NetworkPolicy keeps Prometheus (another namespace) from their metrics port. A
    base that renames a port would otherwise leave Prometheus with no target."""
    overlays = overlays_with_monitoring()
    if not overlays:
        pytest.skip(f"no overlay under {OVERLAYS} takes components/monitoring yet")
    for overlay in overlays:
        objects = kustomize(overlay)
        for obj in objects:
            if obj["apiVersion"].startswith(CUSTOM_GROUPS):
                assert schema_errors(obj) == [], f"{overlay.name}: {obj['kind']} {obj['metadata']['name']}"
        for role in ("gateway", "worker"):
            workloads = pod_specs(objects, POD_LABELS[role])
            assert workloads, f"{overlay.name}: no workload with pod labels {POD_LABELS[role]}"
            for name, spec in workloads:
                assert "personagate" in name, f"{overlay.name}: {name}: the restart alert matches pod=~.*personagate.*"
                containers = {c["name"]: c for c in spec["containers"]}
                assert role in containers, f"{overlay.name}: {name} has no container named {role!r}"
                ports = {p.get("name"): p["containerPort"] for p in containers[role].get("ports", [])}
                assert "http" in ports, f"{overlay.name}: {name}/{role} has no port named 'http'"
                assert scrapable_from_outside(objects, POD_LABELS[role], ports["http"]), \
                    f"{overlay.name}: NetworkPolicies keep Prometheus from {name}'s port {ports['http']}"


# --- metric names --------------------------------------------------------------------------------------------

def test_rules_name_only_registered_metrics(rule_spec: dict[str, Any], registered: dict[str, Any]) -> None:
    """Each metric an alert or recording rule reads is one the code registers (a renamed metric would leave an
    alert that can never fire); a bucket bound such as le="0.08" exists; a recorded series is recorded here."""
    recorded = {rule["record"] for rule in rules(rule_spec) if "record" in rule}
    problems = []
    for rule in rules(rule_spec):
        where = rule.get("alert") or rule.get("record")
        problems += unknown_names(where, rule["expr"], registered, recorded)
    assert problems == []
    assert any(METRIC_NAME.search(rule["expr"]) for rule in rules(rule_spec))


def test_dashboard_names_only_registered_metrics(dashboard: dict[str, Any], rule_spec: dict[str, Any],
                                                 registered: dict[str, Any]) -> None:
    """Every panel's query, and the namespace variable's, reads metrics the code registers: no empty panel."""
    recorded = {rule["record"] for rule in rules(rule_spec) if "record" in rule}
    queries = dashboard_queries(dashboard)
    queries += [(f"variable {v['name']}", v["definition"]) for v in dashboard["templating"]["list"]
                if v["type"] == "query"]
    problems = [p for where, expr in queries for p in unknown_names(where, expr, registered, recorded)]
    assert problems == []


def test_every_metric_has_an_alert_or_a_panel(rule_spec: dict[str, Any], dashboard: dict[str, Any],
                                             registered: dict[str, Any]) -> None:
    """Every metric the code registers is read by an alert, a recording rule or a panel, unless UNWATCHED says why
    not (and UNWATCHED names only metrics that exist and are really unwatched): a metric nobody looks at is noise
    in every scrape."""
    text = " ".join(r["expr"] for r in rules(rule_spec)) + " " + " ".join(e for _, e in dashboard_queries(dashboard))
    watched = {resolve(name, registered) for name in METRIC_NAME.findall(text)} - {None}
    unwatched = set(registered) - watched
    assert unwatched == set(UNWATCHED), (f"no alert or panel: {sorted(unwatched - set(UNWATCHED))}; "
                                         f"watched now, drop from UNWATCHED: {sorted(set(UNWATCHED) - unwatched)}")


@pytest.mark.e2e  # starts a process
@needs("kubectl")
def test_keda_component_replaces_the_hpa_and_scales_on_refusals_and_slot_use(
        registered: dict[str, Any], rule_spec: dict[str, Any], tmp_path: Path) -> None:
    """components/keda on gpu-prod: the overlay's HPA is gone (two autoscalers on one Deployment fight), the
    ScaledObject validates against the schema, targets the worker Deployment with the HPA's bounds and behaviour,
    and its Prometheus queries read registered metrics or recording rules in the overlay's namespace; one counts
    the calls refused for capacity (through the slot-demand rule)."""
    gpu_prod = OVERLAYS / "gpu-prod"
    relative = Path(*[".."] * len(tmp_path.parts[1:]))
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "personagate",
        "resources": [str(relative / gpu_prod.relative_to("/"))], "components": [str(relative / KEDA.relative_to("/"))],
    }))
    objects = kustomize(tmp_path)
    assert not [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"]
    (scaled,) = [o for o in objects if o["kind"] == "ScaledObject"]
    assert schema_errors(scaled) == []
    hpa = next(o for o in kustomize(gpu_prod) if o["kind"] == "HorizontalPodAutoscaler")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == hpa["spec"]["scaleTargetRef"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"])
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == hpa["spec"]["behavior"]
    recorded = {rule["record"]: rule["expr"] for rule in rules(rule_spec) if "record" in rule}
    reads: set[str] = set()
    for trigger in spec["triggers"]:
        query = trigger["metadata"]["query"]
        assert unknown_names(trigger.get("name", "trigger"), query, registered, set(recorded)) == []
        assert re.findall(r'namespace="([^"]+)"', query) and set(re.findall(r'namespace="([^"]+)"', query)) == {
            scaled["metadata"]["namespace"]}, query
        assert 0 < float(trigger["metadata"]["threshold"]) < 1
        reads |= set(METRIC_NAME.findall(query))
        for rule in RECORDED_NAME.findall(query):
            reads |= set(METRIC_NAME.findall(recorded[rule]))
            for inner in RECORDED_NAME.findall(recorded[rule]):
                reads |= set(METRIC_NAME.findall(recorded[inner]))
    assert "personagate_gateway_call_starts_total" in reads and "personagate_worker_slots_active" in reads, reads


def test_the_name_check_catches_a_renamed_metric(registered: dict[str, Any]) -> None:
    """The check above is not vacuous: a wrong name, a non-histogram's _bucket, a missing bucket, an unknown
    recording rule and an unknown kube-state-metrics series are each reported."""
    assert unknown_names("x", "rate(personagate_worker_tick_steps_total[5m])", registered, set())
    assert unknown_names("x", "personagate_worker_slots_active_bucket", registered, set())
    assert unknown_names("x", 'personagate_worker_tick_step_seconds_bucket{le="0.075"}', registered, set())
    assert unknown_names("x", "instance:personagate_nothing:ratio", registered, set())
    assert unknown_names("x", "kube_pod_status_ready", registered, set())
    assert not unknown_names("x", 'rate(personagate_worker_tick_step_seconds_bucket{le="0.08"}[5m])',
                             registered, set())


# --- alerts: metadata, runbook, promtool ---------------------------------------------------------------------

def readme_anchors() -> set[str]:
    """GitHub's anchors for the README's headings."""
    headings = re.findall(r"^#+ (.+)$", (COMPONENT / "README.md").read_text(), re.MULTILINE)
    return {re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_alert_says_how_bad_what_and_where_to_look(rule_spec: dict[str, Any]) -> None:
    """Every alert has a severity Alertmanager can route on, a summary, a description and a runbook link to its
    own section of the README; a recording rule's name follows level:metric:operations."""
    anchors = readme_anchors()
    readme = (COMPONENT / "README.md").read_text()
    for rule in alerts(rule_spec):
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert {"summary", "description", "runbook_url"} <= rule["annotations"].keys(), name
        assert rule["annotations"]["runbook_url"] == RUNBOOK + name.lower(), name
        assert name.lower() in anchors, f"README.md has no section {name}"
        assert f"| {name} |" in readme, f"README.md's alert table lacks {name}"
    for rule in rules(rule_spec):
        if "record" in rule:
            assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", rule["record"]), rule["record"]


def test_every_alert_has_unit_tests_that_fire_and_stay_quiet(rule_spec: dict[str, Any]) -> None:
    """tests/alerts.test.yaml has, for each alert, a case where it fires and one where it must not."""
    unit = yaml.safe_load((COMPONENT / "tests" / "alerts.test.yaml").read_text())
    cases = [case for test in unit["tests"] for case in test.get("alert_rule_test", [])]
    for name in {rule["alert"] for rule in alerts(rule_spec)}:
        assert any(c["alertname"] == name and c.get("exp_alerts") for c in cases), f"{name} never fires"
        assert any(c["alertname"] == name and not c.get("exp_alerts") for c in cases), f"{name} never quiet"
    severities = {(r["alert"], r["labels"]["severity"]) for r in alerts(rule_spec)}
    fired = {(c["alertname"], a["exp_labels"]["severity"]) for c in cases for a in c.get("exp_alerts") or []}
    assert severities <= fired, f"no unit test fires {sorted(severities - fired)}"


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.e2e  # starts a process
@needs("promtool")
def test_promtool_checks_the_rules_and_runs_the_alert_unit_tests(rule_spec: dict[str, Any], tmp_path: Path
                                                                 ) -> None:
    """The PrometheusRule's spec is a valid Prometheus rules file (promtool's parser and linter), and the alert
    unit tests pass against it: each alert fires at the time and with the labels and texts expected."""
    (tmp_path / "personagate-rules.yaml").write_text(yaml.safe_dump(rule_spec, sort_keys=False))
    shutil.copy(COMPONENT / "tests" / "alerts.test.yaml", tmp_path / "alerts.test.yaml")
    check = promtool("check", "rules", "personagate-rules.yaml", cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = promtool("test", "rules", "alerts.test.yaml", cwd=tmp_path)
    assert unit.returncode == 0, unit.stdout + unit.stderr


@pytest.mark.e2e  # starts a process
@needs("promtool")
def test_promtool_parses_every_dashboard_query(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """Every panel's PromQL parses (Grafana's variables replaced by values), checked by Prometheus' own parser:
    as recording rules of a throwaway rules file."""
    substitutions = {"$__rate_interval": "5m", "$namespace": ".*"}
    records = []
    for i, (_, expr) in enumerate(dashboard_queries(dashboard)):
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"an unknown variable in {expr}"
        records.append({"record": f"dashboard:query_{i}:check", "expr": expr})
    (tmp_path / "dashboard.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    check = promtool("check", "rules", "--lint=none", "dashboard.yaml", cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr


# --- dashboard -----------------------------------------------------------------------------------------------

def test_dashboard_loads_with_any_prometheus_and_shows_what_operators_need(dashboard: dict[str, Any]) -> None:
    """The data source is a variable (any Prometheus the operator has), every panel and query uses it, panel ids
    are unique and panels fit Grafana's 24-column grid; the panels operators need (checked below) are there, and the tick
    step panel draws the 80 ms budget as a line."""
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    everything = panels(dashboard)
    for panel in everything:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    titles = {p["title"]: p for p in everything}
    for wanted in ("Active calls", "Agent sessions asked for, by result", "SIP INVITEs, by answer",
                   "WebRTC offers, by answer", "Slots in use vs capacity", "Model tick step time vs the 80 ms budget",
                   "Time to first agent audio", "Call setup time", "RTP jitter from callers (SIP)",
                   "Outbound underruns and sheds", "Tenant config errors"):
        assert wanted in titles, wanted
    tick = titles["Model tick step time vs the 80 ms budget"]["fieldConfig"]["defaults"]
    assert tick["unit"] == "s"
    assert tick["custom"]["thresholdsStyle"]["mode"] == "line"
    assert 0.08 in [step["value"] for step in tick["thresholds"]["steps"]]
    first_audio = " ".join(t["expr"] for t in titles["Time to first agent audio"]["targets"])
    assert "front_end_first_agent_audio" in first_audio
    assert 'front_end="sip"' in first_audio and 'front_end="webrtc"' in first_audio


# --- yaml ----------------------------------------------------------------------------------------------------

def test_yaml_is_lint_clean() -> None:
    """yamllint (the component's .yamllint: the repository's rules, line length 120) finds nothing in the
    component's YAML, not even a warning."""
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(file=str(COMPONENT / ".yamllint"))
    problems = []
    files = sorted([*COMPONENT.rglob("*.yaml"), COMPONENT / ".yamllint"])
    assert len(files) >= 6
    for path in files:
        for problem in linter.run(path.read_text(), config, str(path)):
            problems.append(f"{path.relative_to(ROOT)}:{problem.line}:{problem.column}: {problem.desc}")
    assert problems == []
