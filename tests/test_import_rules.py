"""The packages' import rules: the gateway and the worker share ``personagate_common`` and never import each other.

The gateway's image has no torch or moshi, the worker's no pjsua2 or aiortc (pyproject.toml's extras), so an
import across the line would fail there, maybe only on the code path that needs it. The static check reads every
module's syntax tree, so imports inside functions and under ``TYPE_CHECKING`` count too; the runtime check catches
a third-party library that pulls a forbidden one in behind our back.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Top-level module names each package must never import. ``personagate`` (the command) sits above both sides.
FORBIDDEN: dict[str, frozenset[str]] = {
    "gateway": frozenset({"agent_runtime", "personagate", "torch", "moshi"}),
    "agent_runtime": frozenset({"gateway", "personagate", "pjsua2", "aiortc"}),
    "personagate_common": frozenset({"gateway", "agent_runtime", "personagate", "torch", "moshi", "pjsua2",
                                     "aiortc"}),
}
DYNAMIC_IMPORTERS = frozenset({"import_module", "__import__"})


def imported_modules(source: str, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in ``source``, the text of ``module``: statements at any
    depth (functions, ``if TYPE_CHECKING``), relative ones resolved, and ``importlib.import_module("…")`` /
    ``__import__("…")`` with a literal name."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                yield node.lineno, ".".join([*base, node.module] if node.module else base)
            else:
                yield node.lineno, node.module or ""
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in DYNAMIC_IMPORTERS:
                yield node.lineno, node.args[0].value


def violations(package: str) -> list[str]:
    """``path:line: module`` for each import in ``package`` of a module its rule forbids."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        relative = path.relative_to(ROOT)
        is_package = path.name == "__init__.py"
        module = ".".join(relative.parent.parts if is_package else relative.with_suffix("").parts)
        for line, name in imported_modules(path.read_text(encoding="utf-8"), module, is_package):
            if name.split(".")[0] in FORBIDDEN[package]:
                found.append(f"{relative}:{line}: {name}")
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_what_its_rule_forbids(package: str) -> None:
    assert (ROOT / package / "__init__.py").is_file()
    assert violations(package) == [], f"{package} must not import {sorted(FORBIDDEN[package])}"


def test_the_check_sees_imports_in_functions_relative_and_dynamic_ones() -> None:
    source = """
import os
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from agent_runtime.server import Worker
def later():
    import torch.nn
    from ..routing import Refusal
    from . import calls
    importlib.import_module("moshi.models")
"""
    found = sorted(imported_modules(source, "gateway.sip.inbound", is_package=False))
    assert found == [(2, "os"), (3, "typing"), (5, "agent_runtime.server"), (7, "torch.nn"),
                     (8, "gateway.routing"), (9, "gateway.sip"), (10, "moshi.models")]
    assert [name for _, name in imported_modules("from . import x", "gateway.sip", is_package=True)] == \
        ["gateway.sip"]


# What each side's modules may not load at run time, even through a third-party library.
RUNTIME_FORBIDDEN = {
    "gateway": ("agent_runtime", "torch", "moshi"),
    "agent_runtime": ("gateway", "pjsua2", "aiortc"),
    "personagate_common": ("gateway", "agent_runtime", "torch", "moshi", "pjsua2", "aiortc"),
}
_LOAD_ALL = """
import importlib, json, pkgutil, sys
package = importlib.import_module(sys.argv[1])
for info in pkgutil.walk_packages(package.__path__, sys.argv[1] + "."):
    if not info.name.endswith("__main__"):
        importlib.import_module(info.name)
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


@pytest.mark.e2e  # starts a process
@pytest.mark.parametrize("package", sorted(RUNTIME_FORBIDDEN))
def test_importing_every_module_of_a_side_loads_nothing_forbidden(package: str) -> None:
    done = subprocess.run([sys.executable, "-c", _LOAD_ALL, package], check=False, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout))
    assert loaded.isdisjoint(RUNTIME_FORBIDDEN[package]), sorted(loaded & set(RUNTIME_FORBIDDEN[package]))


# The echo worker (`personagate worker --model echo`) runs on the worker's side without a model: the modules it
# serves with load torch and moshi only where a model bundle is built (tests/test_echo_worker.py checks a process).
ECHO_WORKER_MODULES = ("personagate.cli", "agent_runtime.drain", "agent_runtime.server", "agent_runtime.pool",
                       "agent_runtime.echo", "agent_runtime.slots")
_LOAD_THESE = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


@pytest.mark.e2e  # starts a process
def test_the_echo_workers_modules_load_no_torch_or_moshi() -> None:
    done = subprocess.run([sys.executable, "-c", _LOAD_THESE, *ECHO_WORKER_MODULES], check=False, capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout))
    assert "agent_runtime" in loaded and loaded.isdisjoint({"torch", "moshi"}), sorted(loaded & {"torch", "moshi"})


def test_each_sides_extra_leaves_out_the_other_sides_heavy_dependencies() -> None:
    """pyproject.toml: the base (shared) dependencies carry neither side's, the gateway extra no torch, the worker
    extra no aiortc; dev is both sides. (moshi and pjsua2 are installed by the Makefile, not by pip's extras.)"""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}

    extras = project["optional-dependencies"]
    gateway_only, worker_only = {"aiortc", "av", "aioice", "fastapi"}, {"torch", "einops", "sentencepiece"}
    assert names(project["dependencies"]).isdisjoint(gateway_only | worker_only)
    assert gateway_only <= names(extras["gateway"]) and names(extras["gateway"]).isdisjoint(worker_only)
    assert worker_only <= names(extras["worker"]) and names(extras["worker"]).isdisjoint(gateway_only)
    assert f"{project['name']}[gateway,worker]" in extras["dev"]


# Within the gateway: the call core and the browser front end never load the SIP stack when imported (a
# browser-only gateway runs without pjsua2; escalation to a human loads it when it dials), nor the SIP front end
# aiortc. Imports inside functions and under TYPE_CHECKING are allowed here: they load nothing at import.
FRONT_END_FORBIDDEN = {
    "gateway.call": ("pjsua2", "aiortc", "av", "gateway.sip", "gateway.webrtc"),
    "gateway.webrtc": ("pjsua2", "gateway.sip"),
    "gateway.sip": ("aiortc", "av", "gateway.webrtc"),
}


def top_level_imports(source: str, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """``imported_modules`` of the statements run at import: outside functions and ``if TYPE_CHECKING``."""

    def run_at_import(nodes: list[ast.stmt]) -> Iterator[ast.stmt]:
        for node in nodes:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                yield from run_at_import(node.orelse)
            elif isinstance(node, ast.ClassDef):
                yield from run_at_import(node.body)
            else:
                yield node

    body = list(run_at_import(ast.parse(source).body))
    yield from imported_modules(ast.unparse(ast.Module(body=body, type_ignores=[])), module, is_package)


@pytest.mark.parametrize("package", sorted(FRONT_END_FORBIDDEN))
def test_front_ends_and_the_call_core_import_only_their_own_stack(package: str) -> None:
    forbidden = FRONT_END_FORBIDDEN[package]
    found = []
    for path in sorted((ROOT / package.replace(".", "/")).rglob("*.py")):
        relative = path.relative_to(ROOT)
        is_package = path.name == "__init__.py"
        module = ".".join(relative.parent.parts if is_package else relative.with_suffix("").parts)
        for _, name in top_level_imports(path.read_text(encoding="utf-8"), module, is_package):
            if any(name == bad or name.startswith(bad + ".") for bad in forbidden):
                found.append(f"{relative}: {name}")
    assert found == [], f"{package} must not import {forbidden} when it is imported"


_LOAD_MODULES = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(sys.modules)))
"""


@pytest.mark.e2e  # starts a process
def test_a_browser_only_gateway_never_loads_pjsua2() -> None:
    """The browser front end, its API and the call core, imported together, load neither pjsua2 nor any of the
    SIP front end's modules."""
    done = subprocess.run([sys.executable, "-c", _LOAD_MODULES, "gateway.webrtc.api", "gateway.webrtc.call",
                           "gateway.call.core", "gateway.call.escalation"], check=False, capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout)
    assert [name for name in loaded if name == "pjsua2" or name.startswith("gateway.sip")] == []
