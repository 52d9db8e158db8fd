"""Static checks of the images (deploy/docker/*.Dockerfile) and of the hashed locks they and `make install` use.

No Docker daemon runs here, so the Dockerfiles are read, not built: the install goes through the Makefile (the
README's recipe) from requirements/<extras>.lock with --require-hashes, the dependency layer comes before the source,
no image has the dev extra, the worker runs on a slim base with torch's own CUDA libraries, pjproject comes from its
checksummed archive, and unpinned system packages follow the documented policy. The locks are checked against
pyproject.toml, so that a dependency added there without `make lock` fails here rather than in an image.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "deploy" / "docker"
IMAGES = ("gateway", "worker")
# Each image's extras set, and so its lock (the Makefile: requirements/<set>.lock).
IMAGE_EXTRAS = {"gateway": "gateway", "worker": "worker"}
LOCK_SETS = ("gateway", "worker", "dev")
# Left out of every lock on purpose (the Makefile's `lock` target says why): torch is installed on its own, the
# CPU or CUDA build as the machine wants; personagate is this package (dev names its own extras).
NOT_LOCKED = {"torch", "personagate"}
DEV_ONLY = {"pytest", "pytest-asyncio", "pytest-timeout", "ruff", "hypothesis", "jsonschema", "kubernetes-validate",
            "yamllint", "playwright", "schemathesis"}


def _dockerfile(name: str) -> str:
    return (DOCKER / f"{name}.Dockerfile").read_text(encoding="utf-8")


def _instructions(text: str) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    joined = re.sub(r"\s*\\\n\s*", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [line.strip() for line in joined.splitlines() if line.strip()]


def _stages(text: str) -> list[list[str]]:
    stages: list[list[str]] = []
    for line in _instructions(text):
        if line.startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def _lock(name: str) -> dict[str, tuple[str, list[str]]]:
    """requirements/<name>.lock as {name: (version, hashes)}; fails on a requirement that is not `==` with hashes."""
    text = (ROOT / "requirements" / f"{name}.lock").read_text(encoding="utf-8")
    pins: dict[str, tuple[str, list[str]]] = {}
    for entry in re.sub(r"\s*\\\n\s*", " ", text).splitlines():
        entry = entry.split("#", 1)[0].strip()
        if not entry:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)((?: --hash=sha256:[0-9a-f]{64})+)", entry)
        assert match is not None, f"{name}.lock: not pinned with hashes: {entry[:120]}"
        pins[canonicalize_name(match.group(1))] = (match.group(2), re.findall(r"sha256:([0-9a-f]{64})", entry))
    return pins


def _packages() -> set[str]:
    packages = re.search(r'include = \[([^]]*)\]', (ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert packages is not None
    return {p.strip(' "*') for p in packages.group(1).split(",")}


def test_make_install_installs_from_the_hashed_lock() -> None:
    """The README's recipe: the extras' lock with --require-hashes, then torch on its own, then moshi==0.2.13
    --no-deps from its own hashed lock, then the package itself without dependencies or build isolation."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^EXTRAS \?= dev$", makefile, re.MULTILINE)
    assert re.search(r"^LOCK := requirements/\$\(subst \$\(comma\),-,\$\(EXTRAS\)\)\.lock$", makefile, re.MULTILINE)
    deps = makefile.split("$(DEPS_STAMP): $(LOCK)", 1)[1].split("\n\n", 1)[0]
    steps = [line for line in deps.splitlines() if "pip install" in line]
    assert "--require-hashes -r $(LOCK)" in steps[0], steps
    assert all("torch==$(TORCH_VERSION)" in step for step in steps[1:-1]) and len(steps) == 4, steps
    assert "--require-hashes --no-deps -r requirements/moshi.lock" in steps[-1], steps
    install = makefile.split("$(STAMP): $(DEPS_STAMP)", 1)[1].split("\n\n", 1)[0]
    (step,) = [line for line in install.splitlines() if "pip install" in line]
    assert "--no-deps" in step and "--no-build-isolation" in step and step.rstrip().endswith("-e ."), step
    assert "pip install" not in makefile.split("$(STAMP): $(DEPS_STAMP)", 1)[0].split("$(DEPS_STAMP): $(LOCK)")[0]
    lock = makefile.split("\nlock:", 1)[1].split("\n\n", 1)[0]
    assert "--generate-hashes" in lock and "--unsafe-package torch" in lock and "$(LOCK_SETS)" in lock
    assert "--no-emit-index-url" in lock and "--no-emit-find-links" in lock  # no machine's paths in a lock
    sets = re.search(r"^LOCK_SETS \?= (.+)$", makefile, re.MULTILINE)
    assert sets is not None and set(sets.group(1).split()) == set(LOCK_SETS)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "`--require-hashes`" in readme and "`moshi==0.2.13` with `--no-deps`" in readme and "make lock" in readme


@pytest.mark.parametrize("name", LOCK_SETS)
def test_each_lock_pins_every_dependency_of_its_extras(name: str) -> None:
    """Every requirement of the extras (pyproject.toml: the base dependencies, the extras, dev's own extras), but
    torch, is pinned in the lock at a version its specifier allows, with hashes; nothing is unpinned."""
    pins = _lock(name)
    assert all(hashes for _, hashes in pins.values())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    environment = {"python_version": "3.11", "sys_platform": "linux", "platform_system": "Linux"}
    todo, seen, requirements = [name], set(), list(map(Requirement, project["dependencies"]))
    while todo:
        extra = todo.pop()
        seen.add(extra)
        for text in project["optional-dependencies"][extra]:
            requirement = Requirement(text)
            if canonicalize_name(requirement.name) == "personagate":
                todo.extend(sorted(requirement.extras - seen))
            else:
                requirements.append(requirement)
    missing = []
    for requirement in requirements:
        key = canonicalize_name(requirement.name)
        if key in NOT_LOCKED or (requirement.marker and not requirement.marker.evaluate(environment)):
            continue
        if key not in pins or not requirement.specifier.contains(pins[key][0], prereleases=True):
            missing.append(f"{requirement} (locked: {pins.get(key, ('none',))[0]})")
    assert missing == [], f"requirements/{name}.lock is stale: run `make lock` ({missing})"
    assert set(pins).isdisjoint(NOT_LOCKED)
    # What goes in with --no-build-isolation and upgrades the venv's pip is hashed too.
    assert {"pip", "setuptools"} <= set(pins)
    # torch's CPU resolution: its CUDA build's own wheels would be installed on every machine from a lock.
    assert not any(key.startswith("nvidia-") or key == "triton" for key in pins), name


def test_images_have_no_dev_extra_and_the_gateway_no_torch() -> None:
    """The images' locks are their side's alone: no test tools (playwright's Node binary, pytest, ruff...), the
    gateway's no torch or torch's own dependencies, the worker's no WebRTC."""
    for image, extras in IMAGE_EXTRAS.items():
        text = _dockerfile(image)
        for line in _instructions(text):
            for value in re.findall(r"\bEXTRAS=\"?([^\s\"]+)", line):
                assert value == "${EXTRAS}" or "dev" not in value.split(","), (image, line)
        default = re.search(r"^ARG EXTRAS=(\S+)$", text, re.MULTILINE)
        if image == "gateway":
            assert default is not None and default.group(1) == extras, image
        else:
            assert re.search(rf"make (deps|install) .*EXTRAS={extras}\b", text), image
        pins = set(_lock(extras))
        assert pins.isdisjoint(DEV_ONLY), (image, pins & DEV_ONLY)
    assert set(_lock("gateway")).isdisjoint({"torch", "moshi", "sympy", "networkx", "einops", "sentencepiece"})
    assert set(_lock("worker")).isdisjoint({"aiortc", "av", "aioice", "fastapi"})
    assert DEV_ONLY <= set(_lock("dev"))


@pytest.mark.parametrize("image", IMAGES)
def test_dependency_layer_comes_before_the_source(image: str) -> None:
    """`make deps` runs with only the Makefile and requirements/ copied (and the gateway's deploy/pjsua2, built in
    a layer of its own before it), so that a change of the code reuses the dependency layers; `make install` runs
    after the source is copied, with everything it reads there."""
    build = _stages(_dockerfile(image))[0]
    runs = [i for i, line in enumerate(build) if line.startswith("RUN make ")]
    deps = [i for i in runs if build[i].startswith("RUN make deps ")]
    install = [i for i in runs if build[i].startswith("RUN make install ")]
    assert len(deps) == 1 and len(install) == 1 and deps[0] < install[0], build
    copied_before = [part for line in build[:deps[0]] if line.startswith("COPY ") for part in line.split()[1:-1]]
    allowed = {"Makefile", "requirements"} | ({"deploy/pjsua2"} if image == "gateway" else set())
    assert {"Makefile", "requirements"} <= set(copied_before) <= allowed, copied_before
    copied = {part for line in build[:install[0]] if line.startswith("COPY ") for part in line.split()[1:-1]}
    assert {"pyproject.toml", "README.md"} | _packages() <= copied, _packages() - copied
    # the same options for both steps: the deps layer is the one `make install` finds
    options = [re.sub(r"^RUN make (deps|install) ", "", build[i]).split(" && ")[0] for i in (deps[0], install[0])]
    assert options[0] == options[1], options
    text = _dockerfile(image)
    run = "\n".join(_instructions(text))
    assert "pip install" not in run and "pip3 install" not in run, f"{image}: installs only through make"
    assert re.search(r"^USER 10001", text, re.MULTILINE), image
    assert re.search(r'^ENTRYPOINT \["/app/\.venv/bin/personagate"\]$', text, re.MULTILINE), image


def test_the_worker_is_on_a_slim_base_with_torchs_cuda() -> None:
    """No CUDA base image: PyPI's CUDA build of torch brings its CUDA libraries as nvidia-* wheels, the node the
    driver. Both stages on the same Python image as the gateway (the venv's interpreter is the base's)."""
    text = _dockerfile("worker")
    bases = re.findall(r"^ARG (?:PYTHON_IMAGE|BASE_IMAGE)=(\S+)$", text, re.MULTILINE)
    assert bases == [re.search(r"^ARG PYTHON_IMAGE=(\S+)$", _dockerfile("gateway"), re.MULTILINE).group(1)], bases
    assert bases[0].startswith("python:3.11-slim"), bases
    assert "nvidia/cuda" not in "\n".join(_instructions(text)) and "cuda" not in bases[0]
    assert [line for line in _instructions(text) if line.startswith("FROM ")] == [
        "FROM ${PYTHON_IMAGE} AS build", "FROM ${PYTHON_IMAGE}"]
    assert 'TORCH_CPU_PIP_OPTS="${TORCH_CPU_PIP_OPTS}"' in text
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in text
    assert "nvidia-*" in text and "driver" in text  # the reason, where the next reader looks for it


def test_the_gateway_builds_pjproject_from_the_checksummed_archive() -> None:
    """The image builds pjsua2 from the release archive that build.sh checks against its SHA-256, and stops
    without it rather than clone (no git in the image)."""
    build_sh = (ROOT / "deploy" / "pjsua2" / "build.sh").read_text(encoding="utf-8")
    version = re.search(r'^PJPROJECT_VERSION="\$\{PJPROJECT_VERSION:-([0-9.]+)\}"$', build_sh, re.MULTILINE)
    assert version is not None
    assert re.search(rf"^\s*\[{re.escape(version.group(1))}\]=[0-9a-f]{{64}}$", build_sh, re.MULTILINE)
    build = _stages(_dockerfile("gateway"))[0]
    archive = f"deploy/pjsua2/pjproject-{version.group(1)}.tar.gz"
    (step,) = [line for line in build if "build.sh" in line]
    assert step.startswith(f"RUN test -f {archive} || ") and "exit 1" in step and "--no-install" in step, step
    apt = " ".join(line for line in build if "apt-get install" in line)
    assert apt and not re.search(r"\bgit\b", apt), apt


@pytest.mark.parametrize("image", IMAGES)
def test_system_packages_follow_the_documented_policy(image: str) -> None:
    """apt packages are pinned, or the Dockerfile points at the documented reason they are not (docs/deploy.md,
    "System packages"); the runtime stage installs none (the wheels bring their libraries)."""
    text = _dockerfile(image)
    stages = _stages(text)
    unpinned = []
    for line in stages[0]:
        if "apt-get install" in line:
            words = line.split("apt-get install", 1)[1].split("&&", 1)[0].split()
            unpinned += [w for w in words if not w.startswith("-") and "=" not in w]
    if unpinned:
        assert "docs/deploy.md#system-packages" in text, (image, unpinned)
    assert not any("apt-get" in line for line in stages[-1]), image
    deploy = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    assert re.search(r"^### System packages$", deploy, re.MULTILINE)
