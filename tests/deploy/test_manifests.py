"""Offline checks of deploy/: the Dockerfile, the Kustomize overlays, the KEDA objects, the
Compose file and YAML style. No cluster, Docker engine or network is used.

Each validator first passes on the real files, then catches a broken input: a committed
fixture under tests/deploy/fixtures/broken-* or a copy of the real manifests with one
rule broken. kubectl is required (CI installs it); only its absence skips the tests
that build overlays.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(ROOT / "deploy"))

from deploy_checks import (  # noqa: E402 (deploy/ is not a package on sys.path until above)
    COMPOSE_FILE,
    DOCKERFILE,
    DOCKERIGNORE,
    KUBERNETES_VERSION,
    ToolError,
)
from deploy_checks.dockerfile import (  # noqa: E402
    check_build_context,
    check_dockerfile,
    dockerignore_rules,
    in_build_context,
)
from deploy_checks.rules import check_compose, check_semantics  # noqa: E402
from deploy_checks.schemas import validate_compose, validate_keda  # noqa: E402
from deploy_checks.tools import (  # noqa: E402
    build_kustomization,
    check_kubectl_version,
    find_kubectl,
    kubectl_versions,
    kustomization_dirs,
    lint_yaml,
    require_kubernetes_validate,
    split_keda,
    validate_kubernetes,
    yaml_files,
)

pytestmark = pytest.mark.deploy

PRODUCTION = ROOT / "deploy" / "k8s" / "overlays" / "production"


# --- fixtures ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def kubectl() -> str:
    """The kubectl to build with; skips when none is installed, fails when it is too old."""
    found = find_kubectl()
    if found is None or shutil.which(found) is None:
        pytest.skip("kubectl not found on PATH or in $KUBECTL: install kubectl >= 1.32 (docs/deploy.md)")
    try:
        check_kubectl_version(*kubectl_versions(found))
    except ToolError as exc:
        pytest.fail(str(exc), pytrace=False)
    return found


@pytest.fixture(scope="module")
def builds(kubectl):
    """`kubectl kustomize` output of the base and of every overlay, by folder name."""
    return {
        directory.relative_to(ROOT).as_posix(): build_kustomization(directory, kubectl)
        for directory in kustomization_dirs()
    }


@pytest.fixture(scope="module")
def production(kubectl):
    return build_kustomization(PRODUCTION, kubectl).documents


def _find(documents: list[dict], kind: str, name_prefix: str) -> dict:
    matches = [
        document
        for document in documents
        if document["kind"] == kind and document["metadata"]["name"].startswith(name_prefix)
    ]
    assert len(matches) == 1, f"expected one {kind} named {name_prefix}*, found {len(matches)}"
    return matches[0]


def _fake_kubectl(tmp_path: Path, report: dict) -> Path:
    """Write an executable that prints `report` as `kubectl version --client -o json` does."""
    script = tmp_path / "kubectl"
    script.write_text(f"#!/bin/sh\ncat <<'JSON'\n{json.dumps(report)}\nJSON\n", encoding="utf-8")
    script.chmod(0o755)
    return script


# --- kubectl and Kustomize ---------------------------------------------------------


def test_kubectl_version_supported(kubectl):
    kubectl_version, kustomize_version = kubectl_versions(kubectl)

    assert kubectl_version[:2] >= (1, 32)
    assert kustomize_version[:2] >= (5, 5)


def test_old_kubectl_fails_with_versions(tmp_path):
    # Debian 12's kubernetes-client package: kubectl 1.20, which reports no Kustomize version.
    old = _fake_kubectl(tmp_path, {"clientVersion": {"major": "1", "minor": "20", "gitVersion": "v1.20.2"}})

    with pytest.raises(ToolError) as caught:
        check_kubectl_version(*kubectl_versions(str(old)))

    message = str(caught.value)
    assert "found kubectl 1.20.2 with Kustomize unknown" in message
    assert "required: kubectl >= 1.32 with Kustomize >= 5.5" in message


def test_old_kustomize_fails_with_versions():
    with pytest.raises(ToolError) as caught:
        check_kubectl_version((1, 32, 4), (5, 4, 3))

    assert "found kubectl 1.32.4 with Kustomize 5.4.3" in str(caught.value)


def test_current_kubectl_version_passes(tmp_path):
    current = _fake_kubectl(
        tmp_path,
        {
            "clientVersion": {"major": "1", "minor": "32+", "gitVersion": "v1.32.4-dispatcher"},
            "kustomizeVersion": "v5.5.0",
        },
    )

    versions = kubectl_versions(str(current))

    assert versions == ((1, 32, 4), (5, 5, 0))
    check_kubectl_version(*versions)


def test_every_overlay_builds(builds):
    assert "deploy/k8s/base" in builds
    assert "deploy/k8s/overlays/production" in builds
    for name, build in builds.items():
        assert build.documents, f"{name} built no objects"


def test_kustomize_catches_broken_fixture(kubectl):
    with pytest.raises(RuntimeError) as caught:
        build_kustomization(FIXTURES / "broken-kustomization", kubectl)

    assert "deployment-that-does-not-exist.yaml" in str(caught.value)


# --- kubernetes-validate -----------------------------------------------------------


def test_kubernetes_validate_bundles_pinned_version():
    require_kubernetes_validate(KUBERNETES_VERSION)


def test_kubernetes_validate_rejects_missing_version():
    with pytest.raises(ToolError) as caught:
        require_kubernetes_validate("1.2")

    assert "not 1.2" in str(caught.value)


def test_overlays_pass_strict_validation(builds):
    for name, build in builds.items():
        core, _ = split_keda(build.documents)

        assert validate_kubernetes(core) == [], name


def test_strict_validation_catches_unknown_field():
    documents = list(yaml.safe_load_all((FIXTURES / "broken-unknown-field.yaml").read_text()))

    problems = validate_kubernetes(documents, label="broken-unknown-field.yaml")

    assert any("'imagePullPolcy' was unexpected" in problem for problem in problems), problems


def test_strict_validation_fails_on_warning():
    documents = list(yaml.safe_load_all((FIXTURES / "broken-unknown-kind.yaml").read_text()))

    problems = validate_kubernetes(documents, label="broken-unknown-kind.yaml")

    assert any(problem.startswith("WARN") and "Deploymnet" in problem for problem in problems), problems


# --- KEDA --------------------------------------------------------------------------


def test_keda_objects_match_schema(builds):
    for name, build in builds.items():
        _, keda = split_keda(build.documents)

        assert sorted(document["kind"] for document in keda) == ["ScaledObject", "TriggerAuthentication"], (
            name
        )
        assert validate_keda(keda) == [], name


def test_keda_schema_catches_broken_fixture():
    documents = list(yaml.safe_load_all((FIXTURES / "broken-keda.yaml").read_text()))

    problems = validate_keda(documents)

    assert any(
        "ScaledObject/broken: spec.triggers.0.metadata.value: 500 is not of type 'string'" in p
        for p in problems
    )
    assert any("ScaledObject/broken" in p and "'queuename' was unexpected" in p for p in problems), problems
    assert any("TriggerAuthentication/broken" in p and "'key' is a required property" in p for p in problems)


# --- yamllint ----------------------------------------------------------------------


def test_yaml_files_pass_yamllint():
    files = yaml_files()

    assert any(path.name == "compose.yaml" for path in files)
    assert lint_yaml(files) == []


def test_yamllint_catches_broken_fixture(tmp_path):
    # .yamllint ignores the broken-* fixtures, so lint a copy outside the repository.
    copied = tmp_path / "linted.yaml"
    shutil.copy(FIXTURES / "broken-yamllint.yaml", copied)

    problems = lint_yaml([copied])

    assert any('duplication of key "AMQP_QUEUE"' in problem for problem in problems), problems
    assert any("trailing spaces" in problem for problem in problems), problems


# --- Compose -----------------------------------------------------------------------


def test_compose_matches_specification():
    assert validate_compose(COMPOSE_FILE) == []


def test_compose_schema_catches_broken_fixture():
    problems = validate_compose(FIXTURES / "broken-compose.yaml")

    assert any(
        "services.api.ports" in problem and "is not of type 'array'" in problem for problem in problems
    )
    assert any("services.api.depends_on" in problem for problem in problems), problems


def test_compose_rules_pass():
    assert check_compose(yaml.safe_load(COMPOSE_FILE.read_text())) == []


@pytest.mark.parametrize(
    ("service", "key", "value", "expected"),
    [
        ("api", "ports", ["8080:8080"], "beyond 127.0.0.1"),
        ("api", "ports", ["0.0.0.0:8080:8080"], "beyond 127.0.0.1"),
        ("postgres", "ports", ["127.0.0.1:5432:5432"], "service postgres publishes port"),
        (
            "worker",
            "depends_on",
            {"rabbitmq": {"condition": "service_healthy"}},
            "service worker does not wait",
        ),
        ("api", "read_only", False, "service api does not run with a read-only root file system"),
    ],
)
def test_compose_rules_catch(service, key, value, expected):
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    document["services"][service][key] = value

    problems = check_compose(document)

    assert any(expected in problem for problem in problems), problems


# --- Dockerfile and build context --------------------------------------------------


def test_dockerfile_passes():
    assert check_dockerfile(DOCKERFILE.read_text()) == []


def test_dockerfile_catches_broken_fixture():
    problems = " | ".join(check_dockerfile((FIXTURES / "broken-Dockerfile").read_text()))

    assert "not a multi-stage build" in problems
    assert "is not a slim Python image" in problems
    assert "installs build tool 'gcc'" in problems
    assert "sets no USER" in problems
    assert "PYTHONDONTWRITEBYTECODE" in problems
    assert "exec (JSON) form" in problems
    assert 'ENTRYPOINT must be ["python", "-m"]' in problems


def _without_build_stage(text: str) -> str:
    final = text.index("FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime")
    first = text.index("FROM ")
    return text[:first] + text[final:].replace("COPY --from=build /opt/venv /opt/venv\n", "")


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda text: text.replace("USER 10001:10001\n", ""), "sets no USER"),
        (lambda text: text.replace("USER 10001:10001", "USER app"), "is not numeric"),
        (lambda text: text.replace("USER 10001:10001", "USER 0"), "is root"),
        (_without_build_stage, "not a multi-stage build"),
        (
            lambda text: text.replace(
                "AS runtime", "AS runtime\nRUN apt-get update && apt-get install -y build-essential"
            ),
            "installs build tool 'build-essential'",
        ),
        (
            lambda text: text.replace(
                "AS runtime", "AS runtime\nRUN apt-get install --no-install-recommends -y libpq-dev"
            ),
            "installs build tool 'libpq-dev'",
        ),
        (
            lambda text: text.replace(
                "FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime", "FROM python:3.11 AS runtime"
            ),
            "is not a slim Python image",
        ),
        (
            lambda text: text.replace(
                "    PYTHONDONTWRITEBYTECODE=1 \\\n    PYTHONUNBUFFERED", "    PYTHONUNBUFFERED"
            ),
            "PYTHONDONTWRITEBYTECODE",
        ),
        (
            lambda text: text.replace(
                'ENTRYPOINT ["python", "-m"]', 'ENTRYPOINT ["python", "-m", "service"]'
            ),
            'ENTRYPOINT must be ["python", "-m"]',
        ),
        (lambda text: text.replace('CMD ["service", "serve"]', "CMD service serve"), "exec (JSON) form"),
        (
            lambda text: text.replace('CMD ["service", "serve"]', 'CMD ["workers"]'),
            "CMD must default to the API",
        ),
    ],
    ids=[
        "no-user",
        "user-name",
        "root-user",
        "single-stage",
        "build-essential",
        "dev-headers",
        "full-base",
        "bytecode",
        "fixed-module",
        "shell-cmd",
        "worker-default",
    ],
)
def test_dockerfile_rule_catches(mutate, expected):
    original = DOCKERFILE.read_text()
    mutated = mutate(original)
    assert mutated != original, "the mutation did not apply; update it to the Dockerfile"

    problems = check_dockerfile(mutated)

    assert any(expected in problem for problem in problems), problems


def test_build_context_passes():
    assert check_build_context(DOCKERIGNORE.read_text(), DOCKERFILE.read_text()) == []


def test_dockerignore_matching():
    rules = dockerignore_rules("*\n!service\n!docs/openapi.yaml\n**/__pycache__\n")

    assert in_build_context("service/app.py", rules)
    assert in_build_context("docs/openapi.yaml", rules)
    assert not in_build_context("docs/deploy.md", rules)
    assert not in_build_context("service/__pycache__/app.cpython-311.pyc", rules)
    assert not in_build_context(".venv/bin/python", rules)


def test_build_context_catches_missing_openapi():
    dockerignore = DOCKERIGNORE.read_text().replace("!docs/openapi.yaml\n", "")

    problems = check_build_context(dockerignore, DOCKERFILE.read_text())

    assert problems == ["docs/openapi.yaml is needed by the image but .dockerignore leaves it out"]


def test_build_context_catches_uncopied_file():
    dockerfile = DOCKERFILE.read_text().replace("COPY docs/openapi.yaml docs/openapi.yaml\n", "")

    problems = check_build_context(DOCKERIGNORE.read_text(), dockerfile)

    assert problems == ["docs/openapi.yaml is needed by the image but no COPY in the Dockerfile copies it"]


def test_build_context_catches_leaks():
    problems = " | ".join(check_build_context("", DOCKERFILE.read_text()))

    assert ".git/config would be sent" in problems
    assert ".venv/bin/python would be sent" in problems
    assert ".env would be sent" in problems


# --- deployment rules --------------------------------------------------------------


def test_overlays_pass_deployment_rules(builds):
    for name, build in builds.items():
        assert check_semantics(build.documents) == [], name


def test_rules_catch_broken_fixture(kubectl):
    documents = build_kustomization(FIXTURES / "broken-rules", kubectl).documents
    core, keda = split_keda(documents)
    assert validate_kubernetes(core) == [], "the fixture must break only the rules, not the schemas"
    assert validate_keda(keda) == []

    problems = " | ".join(check_semantics(documents))

    assert (
        "terminationGracePeriodSeconds 12 is not greater than the preStop sleep 5 + HTTP_DRAIN_TIMEOUT 10"
        in problems
    )
    assert "Deployment/cloudapi-images-worker: sets replicas" in problems
    assert "queueName 'images.other-queue' is not AMQP_QUEUE 'images.read-model'" in problems


def _api(documents):
    return _find(documents, "Deployment", "cloudapi-images-api")


def _worker(documents):
    return _find(documents, "Deployment", "cloudapi-images-worker")


def _job(documents):
    return _find(documents, "Job", "cloudapi-images-migrate")


def _settings(documents):
    return _find(documents, "ConfigMap", "cloudapi-images-settings")["data"]


def _container(workload):
    return workload["spec"]["template"]["spec"]["containers"][0]


def _set(mapping: dict, path: str, value) -> None:
    """Set a nested field by a dotted path (keys must not contain dots)."""
    keys = path.split(".")
    for key in keys[:-1]:
        mapping = mapping.setdefault(key, {})
    mapping[keys[-1]] = value


def _delete(mapping: dict, path: str) -> None:
    keys = path.split(".")
    for key in keys[:-1]:
        mapping = mapping[key]
    del mapping[keys[-1]]


def _remove(documents, kind, name_prefix):
    documents.remove(_find(documents, kind, name_prefix))


def _add_secret(documents, value):
    documents.append(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "cloudapi-images-secrets"},
            "stringData": {"DATABASE_URL": value},
        }
    )


RULE_BREAKS = {
    "api-grace-too-short": (
        lambda d: _set(_api(d)["spec"]["template"]["spec"], "terminationGracePeriodSeconds", 15),
        "terminationGracePeriodSeconds 15 is not greater than the preStop sleep 5 + HTTP_DRAIN_TIMEOUT 10",
    ),
    "drain-timeout-raised": (
        lambda d: _set(_settings(d), "HTTP_DRAIN_TIMEOUT", "30"),
        "terminationGracePeriodSeconds 30 is not greater than the preStop sleep 5 + HTTP_DRAIN_TIMEOUT 30",
    ),
    "no-pre-stop": (lambda d: _delete(_container(_api(d)), "lifecycle"), "no preStop sleep"),
    "worker-grace-too-short": (
        lambda d: _set(_worker(d)["spec"]["template"]["spec"], "terminationGracePeriodSeconds", 20),
        "terminationGracePeriodSeconds 20 is not greater than WORKER_SHUTDOWN_TIMEOUT 20",
    ),
    "api-max-unavailable": (
        lambda d: _set(_api(d)["spec"], "strategy.rollingUpdate.maxUnavailable", 1),
        "the rolling update may make pods unavailable",
    ),
    "api-replicas": (
        lambda d: _set(_api(d)["spec"], "replicas", 2),
        "sets replicas, which the HorizontalPodAutoscaler",
    ),
    "worker-replicas": (
        lambda d: _set(_worker(d)["spec"], "replicas", 2),
        "sets replicas, which KEDA's ScaledObject",
    ),
    "no-readiness": (lambda d: _delete(_container(_api(d)), "readinessProbe"), "no readinessProbe"),
    "no-startup": (lambda d: _delete(_container(_worker(d)), "startupProbe"), "no startupProbe"),
    "liveness-on-readyz": (
        lambda d: _set(_container(_api(d)), "livenessProbe.httpGet.path", "/readyz"),
        "livenessProbe checks /readyz",
    ),
    "no-memory-limit": (
        lambda d: _delete(_container(_worker(d)), "resources.limits"),
        "container worker: resources.limits.memory is not set",
    ),
    "no-cpu-request": (
        lambda d: _delete(_container(_job(d)), "resources.requests.cpu"),
        "container migrate: resources.requests.cpu is not set",
    ),
    "privilege-escalation": (
        lambda d: _set(_container(_api(d)), "securityContext.allowPrivilegeEscalation", True),
        "allowPrivilegeEscalation is not false",
    ),
    "capabilities-kept": (
        lambda d: _set(_container(_worker(d)), "securityContext.capabilities.drop", []),
        "capabilities.drop does not contain ALL",
    ),
    "writable-root": (
        lambda d: _set(_container(_job(d)), "securityContext.readOnlyRootFilesystem", False),
        "readOnlyRootFilesystem is not true",
    ),
    "no-seccomp": (
        lambda d: _delete(_api(d)["spec"]["template"]["spec"]["securityContext"], "seccompProfile"),
        "seccompProfile.type is not RuntimeDefault",
    ),
    "root-allowed": (
        lambda d: _delete(_worker(d)["spec"]["template"]["spec"]["securityContext"], "runAsNonRoot"),
        "pod securityContext.runAsNonRoot is not true",
    ),
    "no-tmp-volume": (
        lambda d: _set(_container(_api(d)), "volumeMounts", []),
        "/tmp is not an emptyDir volume",
    ),
    "token-mounted": (
        lambda d: _delete(_job(d)["spec"]["template"]["spec"], "automountServiceAccountToken"),
        "automountServiceAccountToken is not false",
    ),
    "latest-image": (
        lambda d: _set(_container(_api(d)), "image", "cloudapi-images:latest"),
        "image 'cloudapi-images:latest' has no release tag",
    ),
    "metrics-port-missing": (
        lambda d: _set(
            _container(_api(d)), "ports", [p for p in _container(_api(d))["ports"] if p["name"] != "metrics"]
        ),
        "metrics port 9090 is not declared in ports",
    ),
    "scrape-wrong-port": (
        lambda d: _worker(d)["spec"]["template"]["metadata"]["annotations"].update(
            {"prometheus.io/port": "9090"}
        ),
        "prometheus.io/port 9090 is not 8081",
    ),
    "http-port-changed": (
        lambda d: _set(_settings(d), "HTTP_PORT", "8000"),
        "container port http [8080] is not HTTP_PORT 8000",
    ),
    "api-host-loopback": (lambda d: _set(_settings(d), "HTTP_HOST", "127.0.0.1"), "HTTP_HOST is '127.0.0.1'"),
    "drain-setting-missing": (
        lambda d: _delete(_settings(d), "HTTP_DRAIN_TIMEOUT"),
        "does not set HTTP_DRAIN_TIMEOUT",
    ),
    "no-hpa": (
        lambda d: _remove(d, "HorizontalPodAutoscaler", "cloudapi-images-api"),
        "expected one HorizontalPodAutoscaler targeting it, found 0",
    ),
    "no-worker-pdb": (
        lambda d: _remove(d, "PodDisruptionBudget", "cloudapi-images-worker"),
        "Deployment/cloudapi-images-worker: no PodDisruptionBudget selects its pods",
    ),
    "scaledobject-wrong-target": (
        lambda d: _set(
            _find(d, "ScaledObject", "cloudapi-images-worker")["spec"], "scaleTargetRef.name", "other"
        ),
        "expected one ScaledObject targeting it, found 0",
    ),
    "queue-setting-changed": (
        lambda d: _set(_settings(d), "AMQP_QUEUE", "images.other-queue"),
        "queueName 'images.read-model' is not AMQP_QUEUE 'images.other-queue'",
    ),
    "broker-url-in-trigger": (
        lambda d: _set(
            _find(d, "ScaledObject", "cloudapi-images-worker")["spec"]["triggers"][0]["metadata"],
            "host",
            "amqp://guest:guest@rabbitmq:5672/",
        ),
        "the broker URL is in the trigger",
    ),
    "auth-wrong-key": (
        lambda d: _set(
            _find(d, "TriggerAuthentication", "cloudapi-images-rabbitmq")["spec"]["secretTargetRef"][0],
            "key",
            "DATABASE_URL",
        ),
        "host comes from cloudapi-images-secrets/DATABASE_URL",
    ),
    "auth-missing": (
        lambda d: _remove(d, "TriggerAuthentication", "cloudapi-images-rabbitmq"),
        "authenticationRef 'cloudapi-images-rabbitmq' names no TriggerAuthentication",
    ),
    "service-load-balancer": (
        lambda d: _set(_find(d, "Service", "cloudapi-images-api")["spec"], "type", "LoadBalancer"),
        "type LoadBalancer exposes the API without TLS",
    ),
    "ingress-without-tls": (
        lambda d: _delete(_find(d, "Ingress", "cloudapi-images-api")["spec"], "tls"),
        "is not covered by TLS",
    ),
    "ingress-plain-http": (
        lambda d: _find(d, "Ingress", "cloudapi-images-api")["metadata"]["annotations"].pop(
            "nginx.ingress.kubernetes.io/force-ssl-redirect"
        ),
        "ingress-nginx would answer plain HTTP",
    ),
    "no-ingress": (lambda d: _remove(d, "Ingress", "cloudapi-images-api"), "no Ingress in front of the API"),
    "job-name-fixed": (
        lambda d: _set(_job(d)["metadata"], "name", "cloudapi-images-migrate"),
        "the name does not end with the image tag '0.1.0'",
    ),
    "job-name-invalid": (
        lambda d: (
            _set(_job(d)["metadata"], "name", "cloudapi-images-migrate-V1_0"),
            _set(_container(_job(d)), "image", "cloudapi-images:V1_0"),
        ),
        "not a valid Job name",
    ),
    "no-migrate-job": (
        lambda d: _remove(d, "Job", "cloudapi-images-migrate"),
        "expected one Job running the migrate",
    ),
    "unknown-command": (
        lambda d: _set(_container(_worker(d)), "args", ["workers", "drain"]),
        "runs neither the API",
    ),
    "real-looking-secret": (
        lambda d: _add_secret(d, "postgresql://app:hunter2@db.internal:5432/images"),
        "DATABASE_URL is not a placeholder",
    ),
    "namespace-not-restricted": (
        lambda d: _find(d, "Namespace", "cloudapi-images")["metadata"]["labels"].update(
            {"pod-security.kubernetes.io/enforce": "baseline"}
        ),
        "Pod Security Admission does not enforce restricted",
    ),
}


@pytest.mark.parametrize("case", sorted(RULE_BREAKS))
def test_deployment_rule_catches(production, case):
    mutate, expected = RULE_BREAKS[case]
    documents = copy.deepcopy(production)
    mutate(documents)

    problems = check_semantics(documents)

    assert any(expected in problem for problem in problems), problems


# --- what the overlays must contain ------------------------------------------------


def test_production_has_no_secret(production):
    assert [document for document in production if document["kind"] == "Secret"] == []


def test_production_objects_in_namespace(production):
    for document in production:
        if document["kind"] != "Namespace":
            assert document["metadata"].get("namespace") == "cloudapi-images", document["metadata"]["name"]


def test_base_secret_has_placeholders(builds):
    secret = _find(builds["deploy/k8s/base"].documents, "Secret", "cloudapi-images-secrets")

    assert sorted(secret["stringData"]) == ["AMQP_URL", "DATABASE_URL"]
    for value in secret["stringData"].values():
        assert "CHANGE-ME" in value
        assert ".invalid:" in value


def test_migrate_job_named_by_release(production):
    job = _job(production)

    assert job["metadata"]["name"] == "cloudapi-images-migrate-0.1.0"
    assert _container(job)["image"] == "registry.example.invalid/cloudapi-images:0.1.0"


def test_api_grace_covers_drain(production):
    # The rule in check_semantics, spelled out on the production numbers.
    pod = _api(production)["spec"]["template"]["spec"]
    pre_stop = _container(_api(production))["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(_settings(production)["HTTP_DRAIN_TIMEOUT"])

    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain


def test_container_commands_run(production):
    # Each role's args, after the image's ENTRYPOINT `python -m`, must be a command of
    # this code base; --help parses them without connecting to anything.
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    commands = {
        tuple(_container(document)["args"])
        for document in production
        if document["kind"] in ("Deployment", "Job")
    }
    commands |= {
        tuple(service["command"][:2]) for service in compose["services"].values() if "command" in service
    }
    assert ("service", "serve") in commands
    assert ("workers",) in commands
    assert ("service", "migrate") in commands

    for command in sorted(commands):
        result = subprocess.run(
            [sys.executable, "-m", *command, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

        assert result.returncode == 0, f"python -m {' '.join(command)} --help failed: {result.stderr}"


# --- deploy/check ------------------------------------------------------------------


def test_check_script_syntax():
    script = ROOT / "deploy" / "check"

    assert "set -euo pipefail" in script.read_text()
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0


def test_check_script_passes(kubectl):
    environment = {**os.environ, "PYTHON": sys.executable, "KUBECTL": kubectl}

    result = subprocess.run(
        [str(ROOT / "deploy" / "check")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=environment,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout
    assert "ok     deploy/k8s/overlays/production: deployment rules" in result.stdout


def test_check_script_rejects_old_kubectl(tmp_path):
    old = _fake_kubectl(tmp_path, {"clientVersion": {"major": "1", "minor": "20", "gitVersion": "v1.20.2"}})
    environment = {**os.environ, "PYTHON": sys.executable, "KUBECTL": str(old)}

    result = subprocess.run(
        [str(ROOT / "deploy" / "check")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=environment,
    )

    assert result.returncode == 2
    assert "found kubectl 1.20.2 with Kustomize unknown" in result.stderr
