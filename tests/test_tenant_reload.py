"""Hot reload: an admin's change reaches new calls within seconds without a restart; a broken change
never takes a phone line down (the tenant keeps its last good configuration and the problem is
reported); calls in progress keep the persona they started with."""

from __future__ import annotations

import asyncio
import os
import shutil

from prometheus_client import generate_latest

from gateway.tenants.registry import TenantRegistry
from tests.helpers.tenant_files import TEMPLATE, routed_persona, write_tenant
from tests.helpers.wait import until_async

APPLY_WITHIN = 5.0  # seconds in which an admin's change reaches new calls


async def test_a_valid_edit_reaches_new_calls_within_5_s_and_a_call_in_progress_keeps_its_persona(tmp_path):
    write_tenant(tmp_path, "acme", prompt="You are agent one.")
    registry = TenantRegistry(tmp_path, poll_seconds=0.5)
    watcher = asyncio.create_task(registry.watch())
    try:
        await until_async(lambda: routed_persona(registry, "+14155550100") is not None,
                          "the change is applied", timeout=APPLY_WITHIN)
        in_call = routed_persona(registry, "+14155550100")
        assert in_call is not None and in_call.prompt == "You are agent one."

        write_tenant(tmp_path, "acme", prompt="You are agent two.")
        await until_async(lambda: routed_persona(registry, "+14155550100").prompt == "You are agent two.",
                          "the change is applied", timeout=APPLY_WITHIN)
        assert in_call.prompt == "You are agent one."  # the call that started before keeps its persona
        assert in_call.worker_persona["prompt"] == "You are agent one."
    finally:
        watcher.cancel()


async def test_a_broken_edit_keeps_the_last_good_configuration_and_is_reported(tmp_path):
    write_tenant(tmp_path, "acme", prompt="You are agent one.")
    write_tenant(tmp_path, "zenith", number="+14155550199")
    registry = TenantRegistry(tmp_path, poll_seconds=0.2)
    registry.reload()
    assert registry.status.ok

    path = tmp_path / "acme" / "tenant.yaml"
    path.write_text(path.read_text().replace("You are agent one.", "You are agent two.").replace("NATF0", "NOPE"))
    watcher = asyncio.create_task(registry.watch())
    try:
        await until_async(lambda: not registry.status.ok, "the change is applied", timeout=APPLY_WITHIN)
        status = registry.status.tenants["acme"]
        assert status.state == "serving_previous"
        assert [str(p) for p in status.problems] == [
            ("acme/tenant.yaml:8:21: personas.agent.voice.preset: unknown voice preset 'NOPE'; expected one of NATF0, NATF1, "
            "NATF2, NATF3, NATM0, NATM1, NATM2, NATM3, VARF0, VARF1, VARF2, VARF3, VARF4, VARM0, VARM1, VARM2, "
            "VARM3, VARM4")]
        assert routed_persona(registry, "+14155550100").prompt == "You are agent one."  # the line stays up
        metrics = generate_latest(registry.metrics.registry).decode()
        assert 'personagate_gateway_tenant_config_errors{tenant="acme"} 1.0' in metrics
        assert 'personagate_gateway_tenant_config_errors{tenant="zenith"} 0.0' in metrics
        assert 'personagate_gateway_tenant_reloads_total{result="partial"} 1.0' in metrics

        # Another tenant's valid change still applies while acme is broken.
        write_tenant(tmp_path, "zenith", number="+14155550199", prompt="Zenith, updated.")
        await until_async(lambda: routed_persona(registry, "+14155550199").prompt == "Zenith, updated.",
                          "the change is applied", timeout=APPLY_WITHIN)
        assert registry.status.tenants["acme"].state == "serving_previous"

        # The fix applies, and the error is cleared.
        write_tenant(tmp_path, "acme", prompt="You are agent three.")
        await until_async(lambda: routed_persona(registry, "+14155550100").prompt == "You are agent three.",
                          "the change is applied", timeout=APPLY_WITHIN)
        assert registry.status.ok
        metrics = generate_latest(registry.metrics.registry).decode()
        assert 'personagate_gateway_tenant_config_errors{tenant="acme"} 0.0' in metrics
    finally:
        watcher.cancel()


def test_a_new_tenant_with_errors_is_rejected_and_serves_nothing(tmp_path):
    path = write_tenant(tmp_path, "acme")
    path.write_text(path.read_text().replace("tenant: acme", "tenant: Acme!"))
    registry = TenantRegistry(tmp_path)
    registry.reload()
    assert registry.status.tenants["acme"].state == "rejected"
    assert registry.route("+14155550100") is None


def test_a_number_taken_by_another_tenant_is_refused_and_the_owner_keeps_it(tmp_path):
    write_tenant(tmp_path, "acme", number="+14155550100")
    registry = TenantRegistry(tmp_path)
    registry.reload()
    write_tenant(tmp_path, "zenith", number="+14155550100")
    registry.reload()
    assert registry.route("+14155550100")[0].id == "acme"
    [problem] = registry.status.tenants["zenith"].problems
    assert str(problem) == ("zenith/tenant.yaml:4:3: numbers.+14155550100: is also routed by tenant "
                            "'acme' (acme/tenant.yaml:4); expected each number in one tenant")
    assert registry.status.tenants["zenith"].state == "rejected"


def test_a_number_moved_between_tenants_in_one_change_moves(tmp_path):
    write_tenant(tmp_path, "zenith", number="+14155550111")
    write_tenant(tmp_path, "acme", number="+14155550100")
    registry = TenantRegistry(tmp_path)
    registry.reload()
    # acme is applied first (sorted), while zenith still holds the number it is giving up.
    write_tenant(tmp_path, "acme", number="+14155550111")
    write_tenant(tmp_path, "zenith", number="+14155550122")
    registry.reload()
    assert registry.status.ok, registry.status.problems
    assert registry.route("+14155550111")[0].id == "acme"
    assert registry.route("+14155550122")[0].id == "zenith"
    assert registry.route("+14155550100") is None


def test_a_removed_tenant_folder_stops_taking_calls(tmp_path):
    path = write_tenant(tmp_path, "acme")
    registry = TenantRegistry(tmp_path)
    registry.reload()
    path.unlink()
    path.parent.rmdir()
    registry.reload()
    assert registry.route("+14155550100") is None and "acme" not in registry.tenants


async def test_a_kubernetes_configmap_swap_is_seen(tmp_path):
    """Kubernetes mounts a ConfigMap as `..data -> ..<timestamp>/` with `tenant.yaml -> ..data/tenant.yaml`
    and applies an update by renaming a new `..data` link over the old one."""
    folder = tmp_path / "acme"
    folder.mkdir()

    def publish(version: str, prompt: str) -> None:
        versioned = folder / f"..{version}"
        versioned.mkdir()
        (versioned / "tenant.yaml").write_text(TEMPLATE.format(tenant="acme", number="+14155550100", prompt=prompt))
        os.symlink(versioned.name, folder / "..data_tmp")
        os.replace(folder / "..data_tmp", folder / "..data")

    publish("2026_11_25_10_00_00.1", "Version one.")
    os.symlink("..data/tenant.yaml", folder / "tenant.yaml")
    registry = TenantRegistry(tmp_path, poll_seconds=0.2)
    watcher = asyncio.create_task(registry.watch())
    try:
        await until_async(lambda: routed_persona(registry, "+14155550100") is not None,
                          "the change is applied", timeout=APPLY_WITHIN)
        assert routed_persona(registry, "+14155550100").prompt == "Version one."
        publish("2026_11_25_10_05_00.2", "Version two.")
        await until_async(lambda: routed_persona(registry, "+14155550100").prompt == "Version two.",
                          "the change is applied", timeout=APPLY_WITHIN)
    finally:
        watcher.cancel()


async def test_a_git_sync_swap_adds_renames_and_removes_tenants(tmp_path):
    """git-sync (the Kubernetes manifests' tenants-sync sidecar) checks each commit out into a new worktree,
    `.worktrees/<hash>/`, swaps the `repo` link to it atomically and then deletes the old worktree; the gateway
    reads `repo/tenants`, a path through that link. A tenant added, one renamed and one removed in a commit are
    seen; files of a tenant appearing before its tenant.yaml (never in a git-sync swap, possible by hand) are
    reported, and the tenant applied once complete."""
    root = tmp_path / "git"
    (root / ".worktrees").mkdir(parents=True)

    def commit(name: str, tenants: dict[str, str]) -> None:
        tree = root / ".worktrees" / name / "tenants"
        tree.mkdir(parents=True)
        for tenant, number in tenants.items():
            write_tenant(tree, tenant, number=number)
        old = os.readlink(root / "repo") if (root / "repo").is_symlink() else None
        os.symlink(f".worktrees/{name}", root / "repo-new")
        os.replace(root / "repo-new", root / "repo")
        if old is not None:
            shutil.rmtree(root / old)

    commit("aaa", {"acme": "+14155550100", "zenith": "+14155550199"})
    registry = TenantRegistry(root / "repo" / "tenants", poll_seconds=0.2)
    watcher = asyncio.create_task(registry.watch())
    try:
        await until_async(lambda: set(registry.tenants) == {"acme", "zenith"}, "the first checkout is applied",
                          timeout=APPLY_WITHIN)
        commit("bbb", {"acme-renamed": "+14155550100", "nova": "+14155550150"})
        await until_async(lambda: set(registry.tenants) == {"acme-renamed", "nova"}, "the commit is applied",
                          timeout=APPLY_WITHIN)
        assert registry.route("+14155550100")[0].id == "acme-renamed"  # the number moved with the rename
        assert registry.route("+14155550199") is None and registry.status.ok

        late = root / "repo" / "tenants" / "late"
        late.mkdir()  # an empty folder changes nothing to check; its first file does
        (late / "notes.txt").write_text("tenant.yaml follows\n")
        await until_async(lambda: "late" in registry.status.tenants, "the new folder is seen", timeout=APPLY_WITHIN)
        assert registry.status.tenants["late"].state == "rejected" and set(registry.tenants) == {"acme-renamed", "nova"}
        write_tenant(root / "repo" / "tenants", "late", number="+14155550177")
        await until_async(lambda: "late" in registry.tenants, "the completed tenant is applied", timeout=APPLY_WITHIN)
    finally:
        watcher.cancel()


def test_an_unchanged_folder_is_not_read_again(tmp_path):
    write_tenant(tmp_path, "acme")
    registry = TenantRegistry(tmp_path)
    first = registry.reload()
    assert registry.reload() is first
    assert registry.reload(force=True) is not first
