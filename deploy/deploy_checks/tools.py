"""The external tools of the checks: kubectl (Kustomize), kubernetes-validate and yamllint."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deploy_checks import DEPLOY, K8S, KUBERNETES_VERSION, ROOT, YAMLLINT_CONFIG, ToolError

# The kubectl of the development machines: kubectl 1.32, which bundles Kustomize 5.5.
# Older Kustomize releases build these overlays differently or not at all.
REQUIRED_KUBECTL = (1, 32)
REQUIRED_KUSTOMIZE = (5, 5)

# Objects validated against deploy/schemas/keda.sh-v1alpha1.schema.json instead of the
# Kubernetes schemas, which do not know custom resources.
KEDA_API_VERSION = "keda.sh/v1alpha1"


def _version_tuple(text: str | None) -> tuple[int, ...] | None:
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    if not match:
        return None
    return tuple(int(part) for part in match.groups() if part is not None)


def _shown(version: tuple[int, ...] | None) -> str:
    return "unknown" if version is None else ".".join(str(part) for part in version)


def find_kubectl() -> str | None:
    """Return the kubectl to use: $KUBECTL if set, else the one on PATH, else None."""
    return os.environ.get("KUBECTL") or shutil.which("kubectl")


def kubectl_versions(kubectl: str) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
    """Return the (kubectl, Kustomize) versions that `kubectl version --client` reports."""
    try:
        result = subprocess.run(
            [kubectl, "version", "--client", "-o", "json"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except OSError as exc:
        raise ToolError(f"cannot run {kubectl}: {exc}") from None
    if result.returncode != 0:
        raise ToolError(f"`{kubectl} version --client -o json` failed: {result.stderr.strip()}")
    report = json.loads(result.stdout)
    client = report.get("clientVersion", {})
    return _version_tuple(client.get("gitVersion")), _version_tuple(report.get("kustomizeVersion"))


def check_kubectl_version(kubectl_version, kustomize_version) -> None:
    """Raise ToolError unless kubectl and its Kustomize are at least the required versions."""
    required = f"kubectl >= {_shown(REQUIRED_KUBECTL)} with Kustomize >= {_shown(REQUIRED_KUSTOMIZE)}"
    if (
        kubectl_version is None
        or kustomize_version is None
        or kubectl_version[:2] < REQUIRED_KUBECTL
        or kustomize_version[:2] < REQUIRED_KUSTOMIZE
    ):
        raise ToolError(
            f"kubectl is too old: found kubectl {_shown(kubectl_version)} with Kustomize "
            f"{_shown(kustomize_version)}; required: {required}. Debian 12's package "
            "kubernetes-client is kubectl 1.20 with Kustomize 2.0; install a newer kubectl "
            "(docs/deploy.md lists the ways) or point $KUBECTL at one."
        )


def require_kubectl() -> str:
    """Return the path of a kubectl that is new enough, or raise ToolError."""
    kubectl = find_kubectl()
    if kubectl is None:
        raise ToolError("kubectl not found on PATH (set $KUBECTL to use another one)")
    check_kubectl_version(*kubectl_versions(kubectl))
    return kubectl


def kustomization_dirs() -> list[Path]:
    """Return the base and every overlay, each a folder with a kustomization.yaml."""
    found = [K8S / "base"]
    overlays = K8S / "overlays"
    found += sorted(path.parent for path in overlays.glob("*/kustomization.yaml"))
    return found


@dataclass
class Build:
    """The output of `kubectl kustomize` for one folder."""

    directory: Path
    text: str
    documents: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return (
            str(self.directory.relative_to(ROOT))
            if self.directory.is_relative_to(ROOT)
            else str(self.directory)
        )


def build_kustomization(directory: Path, kubectl: str) -> Build:
    """Run `kubectl kustomize DIRECTORY`; raise RuntimeError with its stderr if it fails."""
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory} failed: {result.stderr.strip()}")
    documents = [document for document in yaml.safe_load_all(result.stdout) if document]
    return Build(directory, result.stdout, documents)


def split_keda(documents: Iterable[dict]) -> tuple[list[dict], list[dict]]:
    """Split documents into (Kubernetes built-in objects, KEDA objects)."""
    core, keda = [], []
    for document in documents:
        (keda if document.get("apiVersion") == KEDA_API_VERSION else core).append(document)
    return core, keda


def object_name(document: dict) -> str:
    return f"{document.get('kind', '?')}/{document.get('metadata', {}).get('name', '?')}"


def require_kubernetes_validate(version: str = KUBERNETES_VERSION) -> None:
    """Raise ToolError unless the installed kubernetes-validate bundles schemas for `version`."""
    try:
        from kubernetes_validate import utils
        from kubernetes_validate.version import __version__
    except ImportError:
        raise ToolError("kubernetes-validate is not installed (pip install -e '.[test]')") from None
    bundled = sorted({utils.major_minor(found) for found in utils.all_versions()}, key=_version_tuple)
    if version not in bundled:
        raise ToolError(
            f"kubernetes-validate {__version__} bundles schemas for Kubernetes {bundled[0]} to "
            f"{bundled[-1]}, not {version}; install the range that pyproject.toml's test extra names"
        )


def validate_kubernetes(
    documents: list[dict], version: str = KUBERNETES_VERSION, label: str = "kustomize output"
) -> list[str]:
    """Validate built-in objects with `kubernetes-validate --strict`; warnings count as problems.

    For a kind it has no schema for, kubernetes-validate only warns and exits 0. A typo in
    apiVersion or kind would then pass, so its warnings are problems here.
    """
    if not documents:
        return []
    with tempfile.TemporaryDirectory(prefix="k8s-validate-") as folder:
        path = Path(folder) / "objects.yaml"
        path.write_text(yaml.safe_dump_all(documents, sort_keys=False), encoding="utf-8")
        result = subprocess.run(
            [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", "-k", version, str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    output = (result.stdout + result.stderr).replace(str(path), label)
    problems = [line for line in output.splitlines() if line.strip()]
    if result.returncode != 0 and not problems:
        problems.append(f"kubernetes-validate exited with status {result.returncode} and printed nothing")
    return problems


def yaml_files() -> list[Path]:
    """Return the YAML files of the deployment, relative to ROOT, without broken fixtures.

    The broken fixtures are left out here, not only in .yamllint, because yamllint
    matches its `ignore` patterns against each path as given, and an absolute path
    escapes them.
    """
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    files += sorted((ROOT / "tests" / "deploy").rglob("*.yaml"))
    fixtures = ROOT / "tests" / "deploy" / "fixtures"
    kept = [
        path
        for path in files
        if not (path.is_relative_to(fixtures) and path.relative_to(fixtures).parts[0].startswith("broken-"))
    ]
    return [path.relative_to(ROOT) for path in [YAMLLINT_CONFIG, *kept]]


def lint_yaml(paths: Iterable[Path], config: Path = YAMLLINT_CONFIG) -> list[str]:
    """Run yamllint in strict mode (warnings fail too) and return its findings."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "yamllint",
            "--strict",
            "--format",
            "parsable",
            "--config-file",
            str(config),
            *[str(path) for path in paths],
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    problems = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    if result.returncode != 0 and not problems:
        problems.append(f"yamllint exited with status {result.returncode} and printed nothing")
    return problems
