"""The Kubernetes manifests (deploy/k8s) and images (deploy/docker), checked offline: every overlay renders with
`kubectl kustomize`, its core objects pass `kubernetes-validate --strict` for Kubernetes 1.30, the YAML passes
yamllint, and the rendered objects keep the promises docs/deploy.md makes to an operator — calls survive
rollouts, scale-in and node maintenance (drain within the grace period, probes that do not kill draining pods,
PDBs and policies that select the real pods), SIP and RTP reach the gateway with the node's address in SDP,
workers get a GPU, containers run unprivileged with bounded resources, and every setting the manifests pass is
one the gateway and worker accept. No cluster is needed (none can run here); the monitoring component's own
checks are tests/test_k8s_monitoring.py's."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from agent_runtime.config import SettingsError, WorkerSettings, load_worker_settings
from agent_runtime.metrics import WorkerMetrics
from gateway.config import GatewaySettings, load_gateway_settings
from gateway.metrics import GatewayMetrics
from gateway.tenants.schema import Limits
from tests.helpers.programs import require

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu-demo", "gpu-prod")
# The longest call a tenant may allow (limits.max_call_seconds' upper bound): a drain must let it finish.
LONGEST_CALL = next(int(m.le) for m in Limits.model_fields["max_call_seconds"].metadata if hasattr(m, "le"))
CLOSE_MARGIN = 60  # seconds past the drain for the preStop pause, hanging up stragglers and exiting
# What gpu-prod reads but does not ship: the operator creates them (docs/deploy.md says how).
EXTERNAL = {"gpu-prod": {("Secret", "personagate-redis"), ("Secret", "personagate-sip-auth"),
                         ("Secret", "personagate-admin-tokens"), ("Secret", "personagate-turn"),
                         ("Secret", "personagate-sip-tls"), ("Secret", "personagate-plane"),
                         ("PersistentVolumeClaim", "personagate-weights"), ("Secret", "personagate-tenants-git")},
            "cpu-demo": {("Secret", "personagate-admin-tokens"), ("Secret", "personagate-turn"),
                         ("Secret", "personagate-sip-tls"), ("Secret", "personagate-plane"),
                         ("Secret", "personagate-tenants-git")}}
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet")
# Objects without a namespace (the namespace transformer leaves them alone).
CLUSTER_SCOPED = {"Namespace", "PriorityClass", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
# Containers with a real-time loop: the gateway sends RTP every 20 ms, the worker steps its pool every 80 ms. A CFS
# quota (a CPU limit) stalls them for the rest of a 100 ms period once it is spent: they get CPU requests only.
REAL_TIME = {("personagate-gateway", "gateway"), ("personagate-worker", "worker")}
RECOMMENDED_LABELS = ("name", "instance", "component", "part-of", "version", "managed-by")
# The host-network gateway's way into workers and Redis, one per CNI plugin (docs/deploy.md, "Network policy per
# plugin"); each overlay takes exactly one. The other network components are options.
NETPOL_PLUGINS = {"netpol-node-cidr": "node-cidr", "netpol-cilium": "cilium", "netpol-openshift": "openshift"}
NETWORK_COMPONENTS = (*NETPOL_PLUGINS, "network", "webrtc-turn-only", "ingress-nginx")
# The gateway's tenants: the `tenants/` folder of the repository tenants-sync (git-sync) checks out under the volume.
TENANTS_VOLUME = Path("/etc/personagate/tenants")
TENANTS_DIR = TENANTS_VOLUME / "repo" / "tenants"
# What the API server accepts: annotations of at most 256 KiB in all (kubectl's client-side apply puts the whole
# object in one), and objects of at most 1 MiB (a ConfigMap's or Secret's data; etcd's request limit is 1.5 MiB).
ANNOTATIONS_LIMIT = 262_144
OBJECT_LIMIT = 1_048_576
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Each overlay's objects, as `kubectl kustomize` renders them."""
    kubectl = require("kubectl")
    out = {}
    for overlay in OVERLAYS:
        done = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        out[overlay] = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    return out


def _all(rendered: dict[str, list[dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for overlay, docs in rendered.items():
        for doc in docs:
            yield overlay, doc


def _workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in WORKLOADS]


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _pod_labels(docs: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [w["spec"]["template"]["metadata"]["labels"] for w in _workloads(docs)]


# ------------------------------------------------------------------ rendering and validation


def test_every_overlay_renders_in_one_namespace(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay, docs in rendered.items():
        kinds = {d["kind"] for d in docs}
        assert {"Namespace", "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "ConfigMap"} <= kinds
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                assert doc["metadata"].get("namespace") == "personagate", (overlay, doc["kind"], doc["metadata"])


def test_core_objects_pass_kubernetes_validate_strict(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Schemas of Kubernetes 1.30 (the oldest we support: the preStop sleep action is on by default from it),
    unknown fields refused. Custom resources (monitoring.coreos.com) have no schema here: skipped."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    checked = 0
    for overlay, doc in _all(rendered):
        if "." in doc["apiVersion"].split("/")[0] and not doc["apiVersion"].split("/")[0].endswith("k8s.io"):
            continue  # a CRD's group (monitoring.coreos.com/v1)
        try:
            kubernetes_validate.validate(doc, "1.30", strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
        checked += 1
    assert checked >= 20


def test_strict_validation_catches_a_misspelt_field() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    typo = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
            "spec": {"ports": [{"port": 5060, "protocl": "UDP"}]}}
    with pytest.raises(kubernetes_validate.ValidationError, match="protocl"):
        kubernetes_validate.validate(typo, "1.30", strict=True)


@pytest.mark.e2e  # starts a process
def test_yamllint() -> None:
    pytest.importorskip("yamllint")
    paths = [K8S / "base", K8S / "overlays", K8S / "prometheus-adapter", K8S / "components" / "keda",
             K8S / "components" / "pod-deletion-cost",
             *(K8S / "components" / c for c in NETWORK_COMPONENTS), ROOT / ".yamllint"]
    done = subprocess.run([sys.executable, "-m", "yamllint", "--strict", "-c", str(ROOT / ".yamllint"),
                           *map(str, paths)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


# ------------------------------------------------------------------ calls survive stops


def test_grace_period_outlasts_the_drain_which_outlasts_the_longest_call(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    """SIGTERM drains: calls go on for drain_seconds. That must cover the longest call a tenant may allow
    (4 h), and the kubelet's SIGKILL (the grace period) must come after the drain has ended them."""
    for overlay, docs in rendered.items():
        for name, prefix in (("personagate-gateway", "PERSONAGATE_GATEWAY_"),
                             ("personagate-worker", "PERSONAGATE_WORKER_")):
            workload = _one(docs, "Deployment", name)
            grace = workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            container = workload["spec"]["template"]["spec"]["containers"][0]
            drain = float(_env(container)[f"{prefix}DRAIN_SECONDS"]["value"])
            assert drain >= LONGEST_CALL, (overlay, name, drain)
            assert grace >= drain + CLOSE_MARGIN, (overlay, name, grace, drain)


def _startup_budget(container: dict[str, Any]) -> int:
    probe = container.get("startupProbe", {})
    return probe.get("initialDelaySeconds", 0) + probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


def test_rollout_deadline_outlasts_the_drain(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """deadline ≥ drain: a rollout step can wait for an old pod's drain (its GPU, or the edge node's host ports, are
    held until its calls end) and then for the new pod's start, with no progress counted meanwhile. A
    progressDeadlineSeconds shorter than the grace period plus the startup probe's budget marks a healthy rollout
    failed (Argo CD: Degraded); docs/deploy.md states the values and what they cost."""
    deploy_md = (ROOT / "docs" / "deploy.md").read_text()
    for overlay, docs in rendered.items():
        for name in ("personagate-gateway", "personagate-worker"):
            workload = _one(docs, "Deployment", name)
            pod = workload["spec"]["template"]["spec"]
            grace = pod["terminationGracePeriodSeconds"]
            deadline = workload["spec"].get("progressDeadlineSeconds", 600)
            budget = grace + max(_startup_budget(c) for c in pod["containers"])
            assert deadline >= budget, (overlay, name, deadline, budget)
            assert f"`progressDeadlineSeconds: {deadline}`" in deploy_md, (name, deadline)


def test_probes_liveness_never_depends_on_load_or_drain(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Every container has liveness and readiness probes (workers a startup probe too, long enough for the
    model); ours probe /healthz for liveness and /readyz for readiness, so a draining pod is taken out of
    service without being killed (the gateway's tenants-sync sidecar probes git-sync's own endpoint)."""
    for overlay, docs in rendered.items():
        for workload in _workloads(docs):
            component = workload["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component")
            for c in _containers(workload):
                where = (overlay, workload["metadata"]["name"], c["name"])
                assert "livenessProbe" in c and "readinessProbe" in c, where
                if component in ("gateway", "worker") and c["name"] == component:  # not the tenants sidecar
                    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz", where
                    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz", where
                    assert "startupProbe" in c, where
                if component == "worker":
                    startup = c["startupProbe"]
                    budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
                    assert budget >= (600 if overlay == "gpu-prod" else 60), (where, budget)


def test_gateways_pause_before_draining_and_rollouts_never_remove_before_adding_in_production(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    gateway = _one(rendered["gpu-prod"], "Deployment", "personagate-gateway")
    assert gateway["spec"]["template"]["spec"]["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"] >= 1
    for name in ("personagate-gateway", "personagate-worker"):
        rolling = _one(rendered["gpu-prod"], "Deployment", name)["spec"]["strategy"]["rollingUpdate"]
        assert rolling["maxUnavailable"] == 0 and rolling["maxSurge"] >= 1, (name, rolling)


def test_pod_disruption_budgets_select_one_workload_each(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay, docs in rendered.items():
        pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
        assert {p["metadata"]["name"] for p in pdbs} >= {"personagate-gateway", "personagate-worker"}, overlay
        for pdb in pdbs:
            selector = pdb["spec"]["selector"]["matchLabels"]
            matched = [labels for labels in _pod_labels(docs) if _selects(selector, labels)]
            assert len(matched) == 1, (overlay, pdb["metadata"]["name"], matched)


# ------------------------------------------------------------------ SIP, RTP and the network


def test_gateways_on_the_host_network_with_a_bounded_rtp_range_and_the_node_address(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay, docs in rendered.items():
        for workload in _workloads(docs):
            spec = workload["spec"]["template"]["spec"]
            if spec.get("hostNetwork"):
                assert spec.get("dnsPolicy") == "ClusterFirstWithHostNet", (overlay, workload["metadata"]["name"])
        gateway = _one(docs, "Deployment", "personagate-gateway")
        assert gateway["spec"]["template"]["spec"]["hostNetwork"] is True
        env = _env(gateway["spec"]["template"]["spec"]["containers"][0])
        assert env["NODE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
        assert env["PERSONAGATE_GATEWAY_SIP_PUBLIC_ADDRESS"]["value"]
        first = int(env["PERSONAGATE_GATEWAY_SIP_RTP_PORT"]["value"])
        count = int(env["PERSONAGATE_GATEWAY_SIP_RTP_PORT_RANGE"]["value"])
        assert first > 0 and count > 0
        # The gateway's NetworkPolicy opens exactly that range (and the SIP port).
        policy = _one(docs, "NetworkPolicy", "personagate-gateway")
        ports = [p for rule in policy["spec"]["ingress"] for p in rule["ports"]]
        assert {"protocol": "UDP", "port": first, "endPort": first + count - 1} in ports, (overlay, ports)
        sip_port = int(env["PERSONAGATE_GATEWAY_SIP_PORT"]["value"])
        assert {"protocol": "UDP", "port": sip_port} in ports, overlay
        # SIP over TCP on the same port, and TLS on its own (listening once its certificate is configured): open
        # in the policy and declared by the container, which host-network pods reserve on the node.
        tls_port = int(env.get("PERSONAGATE_GATEWAY_SIP_TLS_PORT", {"value": "5061"})["value"])
        assert {"protocol": "TCP", "port": sip_port} in ports and {"protocol": "TCP", "port": tls_port} in ports
        declared = {(p["containerPort"], p["protocol"]) for p in gateway["spec"]["template"]["spec"]["containers"][0]
                    ["ports"]}
        assert {(sip_port, "UDP"), (sip_port, "TCP"), (tls_port, "TCP")} <= declared, (overlay, declared)


def test_services_and_network_policies_select_existing_pods(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """A selector that matches nothing fails silently in a cluster (an empty Service, a policy that protects
    nothing or admits no one): each must match a pod template, and a Service's target port a named port."""
    for overlay, docs in rendered.items():
        pods = _workloads(docs)
        for service in (d for d in docs if d["kind"] == "Service"):
            selected = [w for w in pods if _selects(service["spec"]["selector"], w["spec"]["template"]["metadata"]
                                                    ["labels"])]
            assert selected, (overlay, service["metadata"]["name"])
            names = {p["name"] for w in selected for c in _containers(w) for p in c.get("ports", [])}
            for port in service["spec"]["ports"]:
                assert isinstance(port["targetPort"], int) or port["targetPort"] in names, (overlay, port)
        for policy in (d for d in docs if d["kind"] == "NetworkPolicy"):
            selector = policy["spec"]["podSelector"].get("matchLabels", {})
            assert any(_selects(selector, labels) for labels in _pod_labels(docs)), policy["metadata"]["name"]
            for rule in policy["spec"].get("ingress", []):
                for peer in rule.get("from", []):
                    if "podSelector" in peer and "namespaceSelector" not in peer:
                        assert any(_selects(peer["podSelector"]["matchLabels"], labels)
                                   for labels in _pod_labels(docs)), (overlay, policy["metadata"]["name"], peer)
        default_deny = [p for p in docs if p["kind"] == "NetworkPolicy" and p["spec"]["podSelector"] == {}]
        assert default_deny and "ingress" not in default_deny[0]["spec"], overlay


def _peers(rule: dict[str, Any], key: str) -> list[dict[str, Any]]:
    return rule.get(key, [])


def _policies(docs: list[dict[str, Any]], component: str, direction: str) -> list[dict[str, Any]]:
    """The rules of every NetworkPolicy that selects the pods of this component, in this direction."""
    labels = next(labels for labels in _pod_labels(docs) if labels.get("app.kubernetes.io/component") == component)
    rules = []
    for policy in (d for d in docs if d["kind"] == "NetworkPolicy"):
        selector = policy["spec"]["podSelector"]
        selected = _selects(selector.get("matchLabels", {}), labels) and all(
            labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", []) if e["operator"] == "In")
        if selected and direction.capitalize() in policy["spec"].get("policyTypes", []):
            rules += policy["spec"].get(direction, [])
    return rules


def test_workers_admit_sessions_only_from_gateways_and_prometheus(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Peers that are pods are named by pod and namespace selectors: gateway pods, and Prometheus' pods in the
    overlay's prometheus-namespace (both, in one peer: not every pod of that namespace). The only address a worker
    admits is the host-network gateways' nodes, from the overlay's netpol-* component, never a whole private range
    (the old 10.0.0.0/8 held the pod network itself)."""
    gateway = {"app.kubernetes.io/name": "personagate", "app.kubernetes.io/component": "gateway"}
    for overlay, docs in rendered.items():
        worker = _one(docs, "NetworkPolicy", "personagate-worker")
        (rule,) = worker["spec"]["ingress"]
        assert rule["ports"] == [{"protocol": "TCP", "port": 8765}]
        assert rule["from"] == [{"podSelector": {"matchLabels": gateway}},
                                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                                 "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}], overlay
        for component in ("worker", "redis"):
            if not any(lbl.get("app.kubernetes.io/component") == component for lbl in _pod_labels(docs)):
                continue
            for ingress in _policies(docs, component, "ingress"):
                assert ingress.get("from"), (overlay, component, "a rule open to every source")
                for peer in ingress["from"]:
                    if "ipBlock" in peer:
                        net = ipaddress.ip_network(peer["ipBlock"]["cidr"])
                        assert net.prefixlen >= 12 and not net.overlaps(ipaddress.ip_network("10.0.0.0/8")), (
                            overlay, component, net)
        plugin = [d for d in docs if "personagate.io/netpol-plugin" in d["metadata"].get("labels", {})]
        assert len(plugin) == 1, (overlay, [d["metadata"]["name"] for d in plugin])


def test_no_placeholder_survives_and_the_settings_file_is_not_applied(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Every value of network-settings.yaml reached its place (a placeholder such as REDIS_NAMESPACE or TURN_CIDR
    would be an invalid CIDR or a namespace that selects nothing), and the settings ConfigMap itself, a local-config
    object, is not in what kubectl applies."""
    for overlay, docs in rendered.items():
        text = yaml.safe_dump_all(docs)
        assert not re.findall(r"\b[A-Z]+(?:_[A-Z]+)*_(?:NAMESPACE|CIDR|SERVERS)\b", text), overlay
        assert not any(d["metadata"]["name"] == "personagate-network-settings" for d in docs), overlay
        for policy in (d for d in docs if d["kind"] == "NetworkPolicy"):
            for rule in policy["spec"].get("ingress", []) + policy["spec"].get("egress", []):
                for peer in rule.get("from", []) + rule.get("to", []):
                    if "ipBlock" in peer:
                        ipaddress.ip_network(peer["ipBlock"]["cidr"])


def test_egress_is_denied_but_for_what_each_needs(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Default-deny egress for every pod; DNS to the cluster's DNS pods for all; workers reach Redis and nothing
    else; gateways reach workers, Redis, the SIP trunks (sip-peers-cidr, inside sip_allow), the TURN relay, the
    tenants' git server (tenants-git-cidr, https and ssh, for the tenants-sync sidecar) and, in direct mode,
    browsers' media."""
    for overlay, docs in rendered.items():
        deny = _one(docs, "NetworkPolicy", "personagate-default-deny")
        assert deny["spec"]["podSelector"] == {} and set(deny["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        assert "ingress" not in deny["spec"] and "egress" not in deny["spec"]
        dns = _one(docs, "NetworkPolicy", "personagate-dns")
        assert dns["spec"]["podSelector"] == {}
        (rule,) = dns["spec"]["egress"]
        assert {(p["protocol"], p["port"]) for p in rule["ports"]} >= {("UDP", 53), ("TCP", 53)}
        assert all("ipBlock" not in peer for peer in rule["to"]), overlay
        redis_ns = _one(docs, "NetworkPolicy", "personagate-worker")["spec"]["egress"][0]["to"][0]
        worker_egress = [r for r in _policies(docs, "worker", "egress") if r is not rule]
        assert worker_egress == [{"to": [redis_ns], "ports": [{"protocol": "TCP", "port": 6379},
                                                              {"protocol": "TCP", "port": 26379}]}], overlay
        gateway = _one(docs, "Deployment", "personagate-gateway")
        sip_allow = [ipaddress.ip_network(c) for c in json.loads(
            _env(gateway["spec"]["template"]["spec"]["containers"][0])["PERSONAGATE_GATEWAY_SIP_ALLOW"]["value"])]
        egress = _one(docs, "NetworkPolicy", "personagate-gateway")["spec"]["egress"]
        workers, redis, trunks, turn, tenants_git = egress
        ipaddress.ip_network(tenants_git["to"][0]["ipBlock"]["cidr"])
        assert tenants_git["ports"] == [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 22}]
        assert workers["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "worker"
        assert workers["ports"] == [{"protocol": "TCP", "port": 8765}]
        assert redis["to"] == [redis_ns]
        trunk_net = ipaddress.ip_network(trunks["to"][0]["ipBlock"]["cidr"])
        assert any(trunk_net.subnet_of(net) for net in sip_allow), (overlay, trunk_net, sip_allow)
        assert {"protocol": "UDP"} in trunks["ports"] and {"protocol": "TCP", "port": 5060} in trunks["ports"]
        assert {"protocol": "TCP", "port": 3478} in turn["ports"] and ipaddress.ip_network(turn["to"][0]["ipBlock"]
                                                                                            ["cidr"])
        media = _one(docs, "NetworkPolicy", "personagate-gateway-webrtc-media")["spec"]
        assert media["ingress"] == [{"ports": [{"protocol": "UDP", "port": 32768, "endPort": 60999}]}]


def _write_overlay(tmp_path: Path, components: list[str], settings: dict[str, str] | None = None,
                   resources: tuple[str, ...] = ("base",)) -> list[dict[str, Any]]:
    """The base (or another directory of deploy/k8s) with the gpu-prod network settings (changed by ``settings``)
    and these components of deploy/k8s/components, rendered."""
    relative = Path(*[".."] * len(tmp_path.parts[1:]))
    values = yaml.safe_load((K8S / "overlays" / "gpu-prod" / "network-settings.yaml").read_text())
    values["data"] |= settings or {}
    (tmp_path / "network-settings.yaml").write_text(yaml.safe_dump(values))
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "personagate",
        "resources": [str(relative / (K8S / r).relative_to("/")) for r in resources] + ["network-settings.yaml"],
        "components": [str(relative / (K8S / "components" / c).relative_to("/")) for c in components]}))
    return _kustomize(tmp_path)


@pytest.mark.e2e  # starts processes
@pytest.mark.parametrize("plugin", sorted(NETPOL_PLUGINS))
def test_each_plugins_component_admits_host_network_gateways_its_way(plugin: str, tmp_path: Path) -> None:
    """The three ways in for host-network gateways, each as its plugin's documentation says traffic from a node is
    identified: an ipBlock of nodes-cidr (plugins that see the node's address); Cilium's reserved entities host and
    remote-node (its ipBlock does not match nodes by default); OVN-Kubernetes' host-network namespace selector (and
    OpenShift's DNS namespace). Each admits only the session and Redis ports, on workers and Redis."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = _write_overlay(tmp_path, [plugin, "network"], {"nodes-cidr": "192.0.2.0/28"})
    (policy,) = [d for d in docs if d["metadata"].get("labels", {}).get("personagate.io/netpol-plugin")]
    assert policy["metadata"]["labels"]["personagate.io/netpol-plugin"] == NETPOL_PLUGINS[plugin]
    assert policy["metadata"]["name"] == "personagate-from-gateway-nodes"
    spec = policy["spec"]
    selector = spec.get("podSelector", spec.get("endpointSelector"))
    assert selector == {"matchExpressions": [{"key": "app.kubernetes.io/component", "operator": "In",
                                              "values": ["worker", "redis"]}]}
    (rule,) = spec["ingress"]
    if plugin == "netpol-cilium":
        assert policy["apiVersion"] == "cilium.io/v2" and policy["kind"] == "CiliumNetworkPolicy"
        assert rule["fromEntities"] == ["host", "remote-node"] and set(rule) == {"fromEntities", "toPorts"}
        assert [(p["port"], p["protocol"]) for p in rule["toPorts"][0]["ports"]] == [("8765", "TCP"), ("6379", "TCP")]
        return
    kubernetes_validate.validate(policy, "1.30", strict=True)
    assert [(p["protocol"], p["port"]) for p in rule["ports"]] == [("TCP", 8765), ("TCP", 6379)]
    if plugin == "netpol-node-cidr":
        assert rule["from"] == [{"ipBlock": {"cidr": "192.0.2.0/28"}}]
    else:
        assert rule["from"] == [{"namespaceSelector": {"matchLabels": {
            "policy-group.network.openshift.io/host-network": ""}}}]
        dns = _one(docs, "NetworkPolicy", "personagate-dns")["spec"]["egress"][0]
        assert dns["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "openshift-dns"}}}]
        assert {"protocol": "UDP", "port": 5353} in dns["ports"]


@pytest.mark.e2e  # starts a process
def test_prometheus_and_redis_namespaces_are_set_in_one_place(tmp_path: Path) -> None:
    """network-settings.yaml's prometheus-namespace is the only place that names Prometheus' namespace: changed
    there, the worker's scrape peer follows; redis-namespace likewise for both Redis egress rules."""
    docs = _write_overlay(tmp_path, ["netpol-node-cidr", "network"],
                          {"prometheus-namespace": "observability", "redis-namespace": "routing"})
    worker = _one(docs, "NetworkPolicy", "personagate-worker")["spec"]
    assert worker["ingress"][0]["from"][1]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "observability"}
    gateway = _one(docs, "NetworkPolicy", "personagate-gateway")["spec"]
    for rule in (worker["egress"][0], gateway["egress"][1]):
        assert rule["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "routing"}}}]
    policies = yaml.safe_dump_all([d for d in docs if d["kind"] == "NetworkPolicy"])
    assert "monitoring" not in policies
    hard_coded = [p for p in (K8S / "base").glob("*.yaml") if re.search(r"metadata\.name: monitoring", p.read_text())]
    assert not hard_coded


@pytest.mark.e2e  # starts a process
def test_turn_only_media_admits_only_the_relay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """components/webrtc-turn-only: the gateway's WebRTC ports (the node's ephemeral range: aioice binds port 0, so
    there is no narrower range) admit only the TURN relay, nothing lets the gateway send UDP to any address but the
    trunks and the relay, and the relay's URLs reach the gateway as a setting it accepts."""
    docs = _write_overlay(tmp_path, ["netpol-node-cidr", "network", "webrtc-turn-only"],
                          {"turn-cidr": "192.0.2.10/32"})
    assert not [d for d in docs if d["metadata"]["name"] == "personagate-gateway-webrtc-media"]
    media = [r for r in _policies(docs, "gateway", "ingress") if any(
        p.get("port") == 32768 for p in r.get("ports", []))]
    assert media == [{"from": [{"ipBlock": {"cidr": "192.0.2.10/32"}}],
                      "ports": [{"protocol": "UDP", "port": 32768, "endPort": 60999}]}]
    for rule in _policies(docs, "gateway", "egress"):
        for peer in rule.get("to", []):
            if "ipBlock" in peer and any(p["protocol"] == "UDP" for p in rule["ports"]):
                assert ipaddress.ip_network(peer["ipBlock"]["cidr"]).prefixlen > 0, rule  # no 0.0.0.0/0
    container = _one(docs, "Deployment", "personagate-gateway")["spec"]["template"]["spec"]["containers"][0]
    servers = json.loads(_env(container)["PERSONAGATE_GATEWAY_WEBRTC_ICE_SERVERS"]["value"])
    assert servers and all(url.startswith("turn") for s in servers for url in s["urls"])
    settings = GatewaySettings(webrtc_ice_servers=servers)
    assert settings.webrtc_ice_servers


@pytest.mark.e2e  # starts a process
def test_behind_an_ingress_deletes_reach_the_owning_gateway_and_clients_are_told_apart(
        rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    """A browser call lives in the gateway that took its offer. components/ingress-nginx: cookie affinity (persistent,
    for the whole site path, outliving the longest call) on an Ingress that publishes only the page and its
    signalling (never the admin API), to the gateway Service; and the gateway trusts X-Forwarded-For from the
    controller's addresses (forwarded-allow-ips), a value its settings accept. Without it the gateway trusts
    loopback only, and the Service keeps ClientIP affinity for the longest call."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for overlay, docs in rendered.items():
        service = _one(docs, "Service", "personagate-gateway")["spec"]
        assert service["sessionAffinity"] == "ClientIP", overlay
        assert service["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"] >= LONGEST_CALL
        env = _env(_one(docs, "Deployment", "personagate-gateway")["spec"]["template"]["spec"]["containers"][0])
        assert json.loads(env["PERSONAGATE_GATEWAY_FORWARDED_ALLOW_IPS"]["value"]) == ["127.0.0.1"]
    docs = _write_overlay(tmp_path, ["netpol-node-cidr", "network", "ingress-nginx"],
                          {"forwarded-allow-ips": '["10.42.0.0/16", "192.0.2.7"]'})
    (ingress,) = [d for d in docs if d["kind"] == "Ingress"]
    kubernetes_validate.validate(ingress, "1.30", strict=True)
    notes = ingress["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/affinity"] == "cookie"
    assert notes["nginx.ingress.kubernetes.io/affinity-mode"] == "persistent"
    assert notes["nginx.ingress.kubernetes.io/session-cookie-path"] == "/"
    assert int(notes["nginx.ingress.kubernetes.io/session-cookie-max-age"]) >= LONGEST_CALL
    paths = [p for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert sorted(p["path"] for p in paths) == ["/call", "/v1/webrtc"]
    service = _one(docs, "Service", "personagate-gateway")
    assert {p["backend"]["service"]["name"] for p in paths} == {service["metadata"]["name"]}
    assert {p["backend"]["service"]["port"]["name"] for p in paths} <= {p["name"] for p in service["spec"]["ports"]}
    container = _one(docs, "Deployment", "personagate-gateway")["spec"]["template"]["spec"]["containers"][0]
    trusted = json.loads(_env(container)["PERSONAGATE_GATEWAY_FORWARDED_ALLOW_IPS"]["value"])
    assert trusted == ["10.42.0.0/16", "192.0.2.7"]
    assert GatewaySettings(forwarded_allow_ips=trusted).forwarded_allow_ips


# ------------------------------------------------------------------ containers


def test_every_container_is_unprivileged_with_requests_and_limits(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay, docs in rendered.items():
        for workload in _workloads(docs):
            pod = workload["spec"]["template"]["spec"]
            for c in _containers(workload):
                where = (overlay, workload["metadata"]["name"], c["name"])
                resources = c.get("resources", {})
                assert {"cpu", "memory"} <= set(resources.get("requests", {})), where
                # Memory is always bounded; CPU too, except for the real-time containers (the next test).
                limited = {"memory"} if (workload["metadata"]["name"], c["name"]) in REAL_TIME else {"cpu", "memory"}
                assert limited <= set(resources.get("limits", {})), where
                security = c.get("securityContext", {})
                assert security.get("runAsNonRoot", pod.get("securityContext", {}).get("runAsNonRoot")) is True, where
                assert (security.get("runAsUser") or pod["securityContext"].get("runAsUser", 0)) > 0, where
                assert security.get("allowPrivilegeEscalation") is False, where
                assert security.get("readOnlyRootFilesystem") is True, where
                assert security.get("capabilities", {}).get("drop") == ["ALL"], where
                assert not security.get("privileged", False) and "add" not in security.get("capabilities", {}), where


def test_real_time_containers_request_cpu_without_a_cpu_limit(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The gateway's 20 ms RTP loop and the worker's 80 ms tick must not be CFS-throttled: a CPU limit is a quota
    per 100 ms period, and a container that spends it early (a burst of calls starting, the model's thread pool)
    is stopped for the rest of the period — a gap every caller hears. They get a CPU request (their share when the
    node is busy) and no CPU limit; memory stays limited."""
    for overlay, docs in rendered.items():
        for name, container_name in REAL_TIME:
            (container,) = [c for c in _containers(_one(docs, "Deployment", name)) if c["name"] == container_name]
            resources = container["resources"]
            assert "cpu" in resources["requests"] and "memory" in resources["limits"], (overlay, name)
            assert "cpu" not in resources.get("limits", {}), f"{overlay}: {name}/{container_name} has a CPU limit"


def test_a_failed_start_shows_its_reason_in_the_pods_status(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """A worker whose model cannot load exits 3 and a gateway refusing its settings exits 2, each naming why in its
    last log lines: with FallbackToLogsOnError those lines are the container's termination message, so `kubectl
    describe pod` (and CrashLoopBackOff's status) shows the reason without digging in logs."""
    for overlay, docs in rendered.items():
        for name, container_name in REAL_TIME:
            (container,) = [c for c in _containers(_one(docs, "Deployment", name)) if c["name"] == container_name]
            assert container.get("terminationMessagePolicy") == "FallbackToLogsOnError", (overlay, name)


def test_worker_thread_pools_follow_its_cpu_request(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """torch sizes its OpenMP/MKL pools to the node's cores unless told: on a 64-core node a worker requesting 4
    would run 64 threads that contend with its own tick and with other pods. OMP_NUM_THREADS and MKL_NUM_THREADS
    come from the worker container's own CPU request (downward API, whole cores), so an overlay that changes the
    request changes them too."""
    for overlay, docs in rendered.items():
        pod = _one(docs, "Deployment", "personagate-worker")["spec"]["template"]["spec"]
        (container,) = [c for c in pod["containers"] if c["name"] == "worker"]
        env = _env(container)
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            ref = env[name]["valueFrom"]["resourceFieldRef"]
            assert ref["containerName"] == "worker" and ref["resource"] == "requests.cpu", (overlay, name, ref)
            assert str(ref.get("divisor", "1")) == "1", (overlay, name, ref)
        assert "cpu" in container["resources"]["requests"], overlay


def test_every_object_carries_the_recommended_labels(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """app.kubernetes.io/{name,instance,component,part-of,version,managed-by} on every object and every pod
    template (what cost reports, policy engines and `kubectl get -l` select on), with the version the images'
    tag says; selectors stay on name and component only, so a version bump does not orphan a ReplicaSet."""
    for overlay, docs in rendered.items():
        tags = {c["image"].rsplit(":", 1)[1].removesuffix("-cpu") for w in _workloads(docs) for c in _containers(w)
                if c["image"].startswith("personagate/")}
        assert len(tags) == 1, (overlay, tags)
        for doc in docs:
            where = (overlay, doc["kind"], doc["metadata"]["name"])
            label_sets = [doc["metadata"].get("labels", {})]
            if doc["kind"] in WORKLOADS:
                label_sets.append(doc["spec"]["template"]["metadata"]["labels"])
                assert set(doc["spec"]["selector"]["matchLabels"]) == {"app.kubernetes.io/name",
                                                                       "app.kubernetes.io/component"}, where
            for labels in label_sets:
                missing = [k for k in RECOMMENDED_LABELS if not labels.get(f"app.kubernetes.io/{k}")]
                assert not missing, (where, missing)
                assert labels["app.kubernetes.io/name"] == "personagate", where
                assert labels["app.kubernetes.io/part-of"] == "personagate", where
                assert labels["app.kubernetes.io/version"] in tags, (where, tags)


def test_workers_are_spread_prioritised_and_gateways_tolerate_edge_taints(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Scheduling defaults docs/deploy.md documents: production workers spread over nodes and zones (a preference,
    selecting the worker pods of one ReplicaSet), gateways and workers at a priority class the overlay ships
    (nothing preempts a pod that carries calls), and gateways tolerate the taint that keeps other pods off SIP
    edge nodes."""
    deploy_md = (ROOT / "docs" / "deploy.md").read_text()
    for overlay, docs in rendered.items():
        gateway = _one(docs, "Deployment", "personagate-gateway")["spec"]["template"]["spec"]
        assert {"key": "personagate.io/sip-edge", "operator": "Exists", "effect": "NoSchedule"} in \
            gateway["tolerations"], overlay
        for workload in _workloads(docs):
            pod = workload["spec"]["template"]["spec"]
            if "priorityClassName" in pod:
                assert ("PriorityClass", pod["priorityClassName"]) in {(d["kind"], d["metadata"]["name"])
                                                                      for d in docs}, (overlay, pod)
                assert pod["priorityClassName"] in deploy_md
    docs = rendered["gpu-prod"]
    worker = _one(docs, "Deployment", "personagate-worker")
    pod = worker["spec"]["template"]["spec"]
    assert pod["priorityClassName"] and _one(docs, "Deployment", "personagate-gateway")["spec"]["template"]["spec"][
        "priorityClassName"] == pod["priorityClassName"]
    spread = pod["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} >= {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    for constraint in spread:
        assert constraint["whenUnsatisfiable"] == "ScheduleAnyway", constraint
        assert _selects(constraint["labelSelector"]["matchLabels"], worker["spec"]["template"]["metadata"]["labels"])
        assert "pod-template-hash" in constraint.get("matchLabelKeys", []), constraint


def test_gpu_workers_request_a_gpu_on_gpu_nodes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    worker = _one(rendered["gpu-prod"], "Deployment", "personagate-worker")
    pod = worker["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert _env(container)["PERSONAGATE_WORKER_MODEL"]["value"] == "personaplex"
    demo = _one(rendered["cpu-demo"], "Deployment", "personagate-worker")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in demo["containers"][0]["resources"]["limits"]


def _dockerfile_image(name: str) -> str:
    text = (ROOT / "deploy" / "docker" / f"{name}.Dockerfile").read_text()
    match = re.search(r"^# image: (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{name}.Dockerfile names its image on a '# image:' line"
    return match.group(1)


def test_images_are_the_dockerfiles(rendered: dict[str, list[dict[str, Any]]]) -> None:
    gateway_image, worker_image = _dockerfile_image("gateway"), _dockerfile_image("worker")
    for overlay, docs in rendered.items():
        images = {c["name"]: c["image"] for w in _workloads(docs) for c in _containers(w)
                  if w["metadata"]["name"] in ("personagate-gateway", "personagate-worker")}
        assert images["gateway"].rsplit(":", 1)[0] == gateway_image, overlay
        # Workers run the worker image: production's the CUDA build, the CPU demo's tiny model its CPU build.
        name, tag = images["worker"].rsplit(":", 1)
        assert name == worker_image and tag.endswith("-cpu") == (overlay == "cpu-demo"), (overlay, tag)
        if overlay == "cpu-demo":  # the runbook builds the tag the demo pulls
            assert f"{worker_image}:{tag}" in (ROOT / "docs" / "deploy.md").read_text(), tag


def test_no_gateway_container_runs_a_worker(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The gateway image has no torch and no moshi (EXTRAS=gateway): nothing runs `personagate worker` (or `up`,
    which starts one) from it, and every worker runs from the worker image."""
    gateway_image, worker_image = _dockerfile_image("gateway"), _dockerfile_image("worker")
    for overlay, docs in rendered.items():
        for workload in _workloads(docs):
            for container in _containers(workload):
                image = container["image"].rsplit(":", 1)[0]
                run = [*container.get("command", []), *container.get("args", [])]
                where = (overlay, workload["metadata"]["name"], container["name"], run)
                runs_a_worker = run[:1] in (["worker"], ["up"])
                if image == gateway_image:
                    assert not runs_a_worker, where
                if runs_a_worker:
                    assert image == worker_image, where


# ------------------------------------------------------------------ settings, secrets, tenants, autoscaling


def test_env_var_names_are_settings(rendered: dict[str, list[dict[str, Any]]]) -> None:
    fields = {"PERSONAGATE_GATEWAY_": set(GatewaySettings.model_fields),
              "PERSONAGATE_WORKER_": set(WorkerSettings.model_fields)}
    seen = 0
    for overlay, doc in _all(rendered):
        if doc["kind"] not in WORKLOADS:
            continue
        for c in _containers(doc):
            for name in _env(c):
                for prefix, known in fields.items():
                    if name.startswith(prefix):
                        assert name.removeprefix(prefix).lower() in known, (overlay, c["name"], name)
                        seen += 1
    assert seen > 20


def _resolved_env(docs: list[dict[str, Any]], container: dict[str, Any], files: Path) -> dict[str, str]:
    """The container's PERSONAGATE_* environment as the kubelet would give it, on this machine: the node's and
    pod's addresses are loopback, Secrets the overlay ships are read, those the operator creates get examples,
    files from Secrets are written under ``files``."""
    secrets = {d["metadata"]["name"].rsplit("-", 1)[0] if re.search(r"-[a-z0-9]{10}$", d["metadata"]["name"])
               else d["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in d.get("data", {}).items()}
               for d in docs if d["kind"] == "Secret"}
    examples = {("personagate-redis", "url"): "redis+sentinel://redis-sentinel.redis:26379/mymaster"}
    fields = {"status.hostIP": "127.0.0.1", "status.podIP": "10.244.1.7", "metadata.name": "personagate-worker-x"}
    env: dict[str, str] = {}
    for name, entry in _env(container).items():
        if "value" in entry:
            for var in re.findall(r"\$\((\w+)\)", entry["value"]):
                # The kubelet expands $(VAR) only from variables listed earlier, and passes it literally otherwise
                # (a strategic-merge patch moves the entries it sets to the front of the list).
                assert var in env, f"{name}: $({var}) is not defined before it, and would reach the process as is"
            value = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], entry["value"])
        elif "fieldRef" in entry["valueFrom"]:
            value = fields[entry["valueFrom"]["fieldRef"]["fieldPath"]]
        elif "resourceFieldRef" in entry["valueFrom"]:
            continue  # a thread count from the CPU request (OMP_NUM_THREADS): not a setting
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            ref = ref | {"name": re.sub(r"-[a-z0-9]{10}$", "", ref["name"])}  # kustomize's hash suffix
            known = secrets.get(ref["name"], {})
            if ref["key"] in known:
                value = known[ref["key"]]
            elif ref.get("optional"):
                continue
            else:
                value = examples[(ref["name"], ref["key"])]
        env[name] = value
    for name in ("PERSONAGATE_GATEWAY_WORKER_SECRET_FILE", "PERSONAGATE_WORKER_SESSION_SECRET_FILE"):
        if name in env:  # the personagate-plane Secret, which the operator creates: an example
            path = files / "worker-secret"
            path.write_text("example-shared-secret-0123456789\n")
            env[name] = str(path)
    if "PERSONAGATE_GATEWAY_SIP_AUTH_USERS_FILE" in env:  # a Secret volume: the overlay's, or an example
        content = secrets.get("personagate-sip-auth", {}).get("sip-auth-users.yaml", "trunk-1: example-password\n")
        path = files / "sip-auth-users.yaml"
        path.write_text(content)
        env["PERSONAGATE_GATEWAY_SIP_AUTH_USERS_FILE"] = str(path)
    return env


def test_the_settings_the_manifests_pass_are_accepted(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """What a pod would do first: load its settings from this environment. A value the settings refuse (an RTP
    range too small for sip_max_calls, a malformed list, a listen address as advertise_url) would be a crash
    loop in the cluster; here it is a failed test."""
    for overlay, docs in rendered.items():
        loaders: dict[str, Callable[[], GatewaySettings | WorkerSettings]] = {
            "personagate-gateway": load_gateway_settings, "personagate-worker": load_worker_settings}
        for name, load in loaders.items():
            container = _one(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
            with monkeypatch.context() as m:
                for key in [k for k in os.environ if k.startswith("PERSONAGATE_")]:
                    m.delenv(key)
                for key, value in _resolved_env(docs, container, tmp_path).items():
                    m.setenv(key, value)
                try:
                    settings = load()
                except SettingsError as exc:
                    pytest.fail(f"{overlay}: {name} would not start: {exc}")
            if isinstance(settings, GatewaySettings):
                assert settings.sip_enabled and settings.sip_public_address == "127.0.0.1"
                assert settings.redis_url is not None and settings.tenants_dir == TENANTS_DIR
            else:
                assert settings.redis_url is not None
                assert settings.resolved_advertise_url() == "ws://10.244.1.7:8765/v1/sessions"  # the pod's own
                assert settings.resolved_worker_id() == "personagate-worker-x"


def test_workers_and_gateways_share_the_planes_secret_from_a_secret_never_a_literal(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Worker sessions need the shared secret: the worker's accepted secrets and the gateway's are the same key of
    the same Secret (personagate-plane, which no overlay ships), mounted as a file; no overlay turns the check off
    or writes a secret into a manifest."""
    wanted = {"personagate-worker": "PERSONAGATE_WORKER_SESSION_SECRET_FILE",
              "personagate-gateway": "PERSONAGATE_GATEWAY_WORKER_SECRET_FILE"}
    for overlay, docs in rendered.items():
        assert not any(d["kind"] == "Secret" and d["metadata"]["name"].startswith("personagate-plane") for d in docs)
        for name, setting in wanted.items():
            pod = _one(docs, "Deployment", name)["spec"]["template"]["spec"]
            (container,) = [c for c in pod["containers"] if c["name"] in ("worker", "gateway")]
            env = _env(container)
            assert "PERSONAGATE_WORKER_INSECURE_OPEN_SESSIONS" not in env, (overlay, name)
            assert not any(k.endswith(("_SESSION_SECRET", "_WORKER_SECRET")) for k in env), (overlay, name)
            path = Path(env[setting]["value"])
            (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent)]
            (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
            assert volume["secret"]["secretName"] == "personagate-plane" and not volume["secret"].get("optional")
            assert {"key": "worker-secret", "path": path.name} in volume["secret"]["items"], (overlay, name)


def test_referenced_secrets_config_maps_and_volumes_exist_or_are_the_operators(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    deploy_md = (ROOT / "docs" / "deploy.md").read_text()
    for overlay, docs in rendered.items():
        shipped = {(d["kind"], d["metadata"]["name"]) for d in docs}
        shipped |= {(kind, re.sub(r"-[a-z0-9]{10}$", "", name)) for kind, name in shipped}
        wanted: set[tuple[str, str]] = set()
        for workload in _workloads(docs):
            pod = workload["spec"]["template"]["spec"]
            for volume in pod.get("volumes", []):
                if "secret" in volume:
                    wanted.add(("Secret", volume["secret"]["secretName"]))
                if "configMap" in volume:
                    wanted.add(("ConfigMap", volume["configMap"]["name"]))
                if "persistentVolumeClaim" in volume:
                    wanted.add(("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]))
            for c in _containers(workload):
                for entry in _env(c).values():
                    if "secretKeyRef" in entry.get("valueFrom", {}):
                        wanted.add(("Secret", entry["valueFrom"]["secretKeyRef"]["name"]))
                for source in c.get("envFrom", []):
                    if "configMapRef" in source:
                        wanted.add(("ConfigMap", source["configMapRef"]["name"]))
        wanted = {(kind, re.sub(r"-[a-z0-9]{10}$", "", name)) for kind, name in wanted}
        missing = wanted - shipped
        assert missing <= EXTERNAL[overlay], (overlay, missing - EXTERNAL[overlay])
        for _, name in missing:
            assert name in deploy_md, f"docs/deploy.md must say how to create {name}"


def test_tenants_come_from_the_sync_sidecar_and_hot_reload(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """No tenant file is in a manifest: tenants-sync (git-sync, a native sidecar) checks the tenants repository out
    into a node-local volume the gateway reads, read-only, at the folder its setting names; the repository comes
    from a ConfigMap, so the pod template names no tenant and no tenant change restarts a gateway."""
    for overlay, docs in rendered.items():
        assert not [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "personagate-tenants"]
        gateway = _one(docs, "Deployment", "personagate-gateway")
        pod = gateway["spec"]["template"]["spec"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == "tenants"]
        assert set(volume) == {"name", "emptyDir"}, overlay  # no storage class, nothing per tenant
        (sync,) = [c for c in pod.get("initContainers", []) if c["name"] == "tenants-sync"]
        assert sync["restartPolicy"] == "Always", overlay  # a native sidecar: it keeps syncing
        assert sync["image"].startswith("registry.k8s.io/git-sync/git-sync:v4."), overlay
        env = {e["name"]: e.get("value") for e in sync["env"]}
        assert env["GITSYNC_ROOT"] == str(TENANTS_VOLUME) and env["GITSYNC_LINK"] == TENANTS_DIR.parent.name
        assert env["GITSYNC_MAX_FAILURES"] == "-1" and env["GITSYNC_SUBMODULES"] == "off", overlay
        (source,) = [ref["configMapRef"]["name"] for ref in sync["envFrom"]]
        config_map = _one(docs, "ConfigMap", source)
        assert {"GITSYNC_REPO", "GITSYNC_REF", "GITSYNC_PERIOD"} <= set(config_map["data"]), overlay
        # The gateway waits for the first checkout: the startup probe is on git-sync's health endpoint.
        probe = sync["startupProbe"]["httpGet"]
        assert f"{probe['host']}:{probe['port']}" == env["GITSYNC_HTTP_BIND"], overlay
        (writes,) = [m for m in sync["volumeMounts"] if m["name"] == "tenants"]
        assert writes["mountPath"] == str(TENANTS_VOLUME) and not writes.get("readOnly"), overlay
        (container,) = [c for c in pod["containers"] if c["name"] == "gateway"]
        (reads,) = [m for m in container["volumeMounts"] if m["name"] == "tenants"]
        # The same path in both (the link resolves alike), read-only (the admin API answers 409), no subPath
        # (a subPath mount is never updated).
        assert reads["mountPath"] == str(TENANTS_VOLUME) and reads["readOnly"] is True and "subPath" not in reads
        assert _env(container)["PERSONAGATE_GATEWAY_TENANTS_DIR"]["value"] == str(TENANTS_DIR), overlay


def _last_applied(doc: dict[str, Any]) -> str:
    """The annotation `kubectl apply` (client-side) writes: the object as given, without that annotation, as Go's
    encoding/json writes it (compact, sorted keys, '<' '>' '&' and U+2028/9 escaped, UTF-8, a final newline)."""
    doc = json.loads(json.dumps(doc))
    annotations = doc.get("metadata", {}).get("annotations") or {}
    annotations.pop(LAST_APPLIED, None)
    text = json.dumps(doc, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                          ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)
    return text + "\n"


def _too_big_to_apply(doc: dict[str, Any]) -> list[str]:
    """Why the API server would refuse ``doc`` sent by client-side apply (none: it fits)."""
    value = _last_applied(doc)
    annotations = {k: v for k, v in (doc["metadata"].get("annotations") or {}).items() if k != LAST_APPLIED}
    annotations[LAST_APPLIED] = value
    total = sum(len(k.encode()) + len(v.encode()) for k, v in annotations.items())
    sent = len(json.dumps(doc | {"metadata": doc["metadata"] | {"annotations": annotations}},
                          separators=(",", ":"), ensure_ascii=False).encode())
    where = f"{doc['kind']}/{doc['metadata']['name']}"
    return ([f"{where}: annotations {total} bytes > {ANNOTATIONS_LIMIT}"] if total > ANNOTATIONS_LIMIT else []) + \
           ([f"{where}: object {sent} bytes > {OBJECT_LIMIT}"] if sent > OBJECT_LIMIT else [])


def _tenants_like_the_shipped_ones(folder: Path, count: int) -> list[str]:
    """``count`` tenants in ``folder``, copies of the shipped examples (their YAML and voice clips) with their own
    ids and numbers; returns the ids."""
    examples = sorted(p for p in (ROOT / "tenants").iterdir() if p.is_dir())
    ids = []
    for i in range(count):
        example = examples[i % len(examples)]
        tenant = f"t{i:03d}-{example.name}"
        shutil.copytree(example, folder / tenant)
        text = (example / "tenant.yaml").read_text()
        text = re.sub(r"^tenant: .*$", f"tenant: {tenant}", text, count=1, flags=re.MULTILINE)
        # Each number once in all: +1, the tenant's index, the example's number's last 7 digits.
        text = re.sub(r"^(  )\+\d*(\d{7}):", rf"\g<1>+1{i:03d}\g<2>:", text, flags=re.MULTILINE)
        (folder / tenant / "tenant.yaml").write_text(text)
        ids.append(tenant)
    return ids


def _render_as_an_operator(checkout: Path, tenant_count: int, rename: bool = False) -> dict[str, list[dict[str, Any]]]:
    """What an operator renders after adding tenants the documented way (docs/deploy.md, "Adding a tenant"): a
    copy of this repository's layout, its `tenants/` folder holding ``tenant_count`` tenants like the shipped ones
    (committed to the repository tenants-sync reads), its overlays pointed at that repository."""
    if checkout.exists():
        shutil.rmtree(checkout)
    shutil.copytree(K8S, checkout / "deploy" / "k8s")
    (checkout / "tenants").mkdir()
    ids = _tenants_like_the_shipped_ones(checkout / "tenants", tenant_count)
    if rename:  # a tenant renamed: its folder and its id
        (checkout / "tenants" / ids[0]).rename(checkout / "tenants" / f"{ids[0]}-renamed")
    out = {}
    for overlay in OVERLAYS:
        kustomization = checkout / "deploy" / "k8s" / "overlays" / overlay / "kustomization.yaml"
        text = re.sub(r"GITSYNC_REPO=.*", "GITSYNC_REPO=https://git.example.com/acme/call-center.git",
                      kustomization.read_text())
        kustomization.write_text(text)
        out[overlay] = _kustomize(kustomization.parent)
    return out


@pytest.mark.e2e  # starts processes
def test_fifty_tenants_fit_client_side_apply(tmp_path: Path) -> None:
    """`kubectl apply -k` (client-side, Argo CD's default) puts the whole object in an annotation of at most 256 KiB,
    and no object may pass 1 MiB. With 50 tenants like the shipped ones, every rendered object fits both. The check
    is the one that failed the old tenants ConfigMap (its voice clips in the object): it still fails it."""
    from gateway.tenants.loader import load_tenants

    rendered = _render_as_an_operator(tmp_path / "ops", 50)
    tenants = tmp_path / "ops" / "tenants"
    result = load_tenants(tenants)  # the generated tenants are real ones: valid, each number once
    assert len(result.tenants) == 50 and not result.problems, result.problems[:3]
    for overlay, docs in rendered.items():
        problems = [p for doc in docs for p in _too_big_to_apply(doc)]
        assert not problems, (overlay, problems)
        assert len(_last_applied(_one(docs, "Deployment", "personagate-gateway"))) < ANNOTATIONS_LIMIT // 4

    # The same check on the ConfigMap the tenants used to be (every file a key, the clips base64 binaryData).
    files = sorted(p for p in tenants.glob("*/**/*") if p.is_file())
    old = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "personagate-tenants",
                                                                 "namespace": "personagate"},
           "data": {str(p.relative_to(tenants)).replace("/", "."): p.read_text() for p in files
                    if p.suffix == ".yaml"},
           "binaryData": {str(p.relative_to(tenants)).replace("/", "."): base64.b64encode(p.read_bytes()).decode()
                          for p in files if p.suffix != ".yaml"}}
    refused = _too_big_to_apply(old)
    assert len(refused) == 2 and "annotations" in refused[0] and "object" in refused[1], refused
    two = {**old, "data": {k: v for k, v in old["data"].items() if k.startswith(("t000-", "t001-"))},
           "binaryData": {k: v for k, v in old["binaryData"].items() if k.startswith(("t000-", "t001-"))}}
    assert [p for p in _too_big_to_apply(two) if "annotations" in p], "the shipped two already failed apply"


@pytest.mark.e2e  # starts processes
def test_adding_or_renaming_a_tenant_changes_no_pod_template(tmp_path: Path) -> None:
    """A tenant added or renamed is a commit to the tenants repository: the rendered objects, and so the gateways'
    pod template, are the same with N and N+1 tenants (a changed template would roll, draining every gateway)."""
    before = _render_as_an_operator(tmp_path / "ops", 3)
    for after in (_render_as_an_operator(tmp_path / "ops", 4), _render_as_an_operator(tmp_path / "ops", 3, True)):
        for overlay in OVERLAYS:
            deployments = {d["metadata"]["name"]: d for d in before[overlay] if d["kind"] == "Deployment"}
            assert deployments == {d["metadata"]["name"]: d for d in after[overlay] if d["kind"] == "Deployment"}
            assert before[overlay] == after[overlay], overlay


def _recorded() -> dict[str, str]:
    spec = yaml.safe_load((K8S / "components" / "monitoring" / "prometheusrule.yaml").read_text())["spec"]
    return {r["record"]: r["expr"] for g in spec["groups"] for r in g["rules"] if "record" in r}


def _names_used(query: str, recorded: dict[str, str]) -> set[str]:
    """The metrics a query reads, through the recording rules it names."""
    names = set(re.findall(r"(?<![\w:])personagate_\w+", query))
    for rule in re.findall(r"(?<![\w:])[a-z_]+:personagate_\w+:\w+", query):
        assert rule in recorded, f"{rule} is not a recording rule of components/monitoring"
        names |= _names_used(recorded[rule], recorded)
    return names


def test_workers_scale_on_demand_through_the_adapters_rules(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The worker HPA's metrics are each served by a rule of the adapter snippet (Pods metrics by `rules.custom`,
    External ones by `rules.external`) from metrics the gateway and worker really export; one of them counts the
    calls refused for capacity, so demand beyond the slots shows (slot use alone tops at 1.0). The snippet carries
    rules only — no `rules.default: false`, which would switch off the rules of an adapter the cluster already
    runs."""
    hpa = _one(rendered["gpu-prod"], "HorizontalPodAutoscaler", "personagate-worker")
    target = hpa["spec"]["scaleTargetRef"]
    assert target["kind"] == "Deployment"
    worker = _one(rendered["gpu-prod"], "Deployment", target["name"])
    assert "replicas" not in worker["spec"]  # the HPA owns it; a manifest's count would reset it on each apply
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    assert set(values) == {"rules"} and set(values["rules"]) <= {"custom", "external"}, values
    served = {"Pods": {r["name"]["as"]: r for r in values["rules"].get("custom", [])},
              "External": {r["name"]["as"]: r for r in values["rules"].get("external", [])}}
    gateway_registry = CollectorRegistry()
    GatewayMetrics(gateway_registry)
    exported = {m.name for m in WorkerMetrics().registry.collect()} | {
        m.name + ("_total" if m.type == "counter" else "") for m in gateway_registry.collect()}
    recorded = _recorded()
    refusals_counted = False
    for metric in hpa["spec"]["metrics"]:
        kind = metric["type"]
        spec = metric[kind.lower()]
        rule = served[kind].get(spec["metric"]["name"])
        assert rule is not None, f"{kind} metric {spec['metric']['name']} has no adapter rule"
        used = _names_used(rule["metricsQuery"] + " " + rule["seriesQuery"], recorded)
        assert used and used <= exported, used - exported
        refusals_counted |= "personagate_gateway_call_starts_total" in used
        value = spec["target"].get("averageValue") or spec["target"]["value"]
        assert 0 < float(str(value).removesuffix("m")) / (1000 if str(value).endswith("m") else 1) < 1, metric
    assert refusals_counted, "no HPA metric counts the calls refused for capacity"
    assert 'result="no_capacity"' in recorded["namespace:personagate_gateway_capacity_refusals:increase5m"]
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 1800


def _kustomize(directory: Path) -> list[dict[str, Any]]:
    done = subprocess.run([require("kubectl"), "kustomize", str(directory)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.mark.e2e  # starts a process
def test_pod_deletion_cost_component_grants_only_what_the_annotation_needs(tmp_path: Path) -> None:
    """components/pod-deletion-cost (for when the gateway and worker keep controller.kubernetes.io/pod-deletion-cost
    on their own pod, docs/deploy.md): on gpu-prod, each Deployment runs as its own ServiceAccount with the token
    mounted and POD_NAME/POD_NAMESPACE from the downward API; the Role grants get and patch on pods and nothing
    else, bound to exactly those accounts; no other pod mounts a token. The cluster-scoped admission policy renders
    without a namespace, is bound, and pins both the pod (the token's pod-name) and the annotation. Once the
    settings exist in the product, they are checked to be real settings too."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    component = K8S / "components" / "pod-deletion-cost"
    relative = Path(*[".."] * len(tmp_path.parts[1:]))
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "personagate",
        "resources": [str(relative / (K8S / "overlays" / "gpu-prod").relative_to("/"))],
        "components": [str(relative / component.relative_to("/"))]}))
    docs = _kustomize(tmp_path)
    (role,) = [d for d in docs if d["kind"] == "Role"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "patch"]}]
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    accounts = {s["name"] for s in binding["subjects"] if s["kind"] == "ServiceAccount"
                and s["namespace"] == "personagate"}
    assert accounts == {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    settings = {"personagate-gateway": ("PERSONAGATE_GATEWAY_", GatewaySettings),
                "personagate-worker": ("PERSONAGATE_WORKER_", WorkerSettings)}
    missing_settings = []
    for workload in _workloads(docs):
        pod = workload["spec"]["template"]["spec"]
        name = workload["metadata"]["name"]
        if name not in settings:
            assert pod.get("automountServiceAccountToken") is False, name
            continue
        assert pod["serviceAccountName"] in accounts and pod["automountServiceAccountToken"] is True, name
        env = _env(pod["containers"][0])
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", name
        assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace", name
        prefix, cls = settings[name]
        assert env[f"{prefix}POD_DELETION_COST"]["value"] == "true", name
        if "pod_deletion_cost" not in cls.model_fields:
            missing_settings.append(f"{prefix}POD_DELETION_COST")
    for doc in docs:
        if doc["kind"] in ("ServiceAccount", "Role", "RoleBinding"):
            kubernetes_validate.validate(doc, "1.30", strict=True)
    cluster = _kustomize(component / "cluster")
    (policy,) = [d for d in cluster if d["kind"] == "ValidatingAdmissionPolicy"]
    (policy_binding,) = [d for d in cluster if d["kind"] == "ValidatingAdmissionPolicyBinding"]
    for doc in cluster:
        assert "namespace" not in doc["metadata"], doc["kind"]
        kubernetes_validate.validate(doc, "1.30", strict=True)
    assert policy_binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert policy_binding["spec"]["validationActions"] == ["Deny"]
    condition = policy["spec"]["matchConditions"][0]["expression"]
    assert {f"system:serviceaccount:personagate:{a}" for a in accounts} <= set(re.findall(r"'([^']+)'", condition))
    checks = " ".join(v["expression"] for v in policy["spec"]["validations"])
    assert "authentication.kubernetes.io/pod-name" in checks and "object.spec == oldObject.spec" in checks
    assert "controller.kubernetes.io/pod-deletion-cost" in checks
    if missing_settings:
        pytest.skip(f"the product does not read {missing_settings} yet (docs/deploy.md's contract); the component "
                    "stays out of the overlays until it does")

