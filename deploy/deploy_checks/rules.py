"""Rules of this deployment that no schema expresses, checked on `kubectl kustomize` output."""

from __future__ import annotations

import re
from typing import Any

from deploy_checks.tools import object_name

# Commands each role's container runs after the image's ENTRYPOINT (`python -m`).
API_COMMANDS = (["service"], ["service", "serve"])
WORKER_COMMANDS = (["workers"], ["workers", "run"])
MIGRATE_COMMAND = ["service", "migrate"]

# Settings the manifests must pin in the ConfigMap, because the rules below compare
# the manifests with them.
REQUIRED_SETTINGS = (
    "HTTP_HOST",
    "HTTP_PORT",
    "HTTP_DRAIN_TIMEOUT",
    "METRICS_PORT",
    "WORKER_HTTP_HOST",
    "WORKER_HTTP_PORT",
    "WORKER_SHUTDOWN_TIMEOUT",
    "AMQP_QUEUE",
)

# Placeholder marker that every value of a committed Secret must contain.
SECRET_PLACEHOLDER = "CHANGE-ME"

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _pod_spec(document: dict) -> dict | None:
    kind = document.get("kind")
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return document.get("spec", {}).get("template", {}).get("spec")
    if kind == "CronJob":
        return document.get("spec", {}).get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec")
    if kind == "Pod":
        return document.get("spec")
    return None


def _containers(pod: dict) -> list[dict]:
    return list(pod.get("initContainers", [])) + list(pod.get("containers", []))


def _role(document: dict) -> str | None:
    """Return "api", "worker" or "migrate" from the command of the first container."""
    pod = _pod_spec(document)
    if not pod or not pod.get("containers"):
        return None
    args = pod["containers"][0].get("args", [])
    if args in API_COMMANDS:
        return "api"
    if args in WORKER_COMMANDS:
        return "worker"
    if args == MIGRATE_COMMAND:
        return "migrate"
    return None


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _port(settings: dict, key: str) -> int | None:
    value = _number(settings.get(key))
    return None if value is None else int(value)


def _pre_stop_seconds(container: dict) -> float | None:
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre_stop:
        return _number(pre_stop["sleep"].get("seconds"))
    command = pre_stop.get("exec", {}).get("command", [])
    if len(command) == 2 and command[0].endswith("sleep"):
        return _number(command[1])
    return None


def _selects(selector: dict, labels: dict) -> bool:
    match = selector.get("matchLabels", {})
    return bool(match) and all(labels.get(key) == value for key, value in match.items())


def _settings(documents: list[dict], problems: list[str]) -> dict[str, str]:
    maps = [
        document
        for document in documents
        if document.get("kind") == "ConfigMap"
        and document["metadata"]["name"].startswith("cloudapi-images-settings")
    ]
    if len(maps) != 1:
        problems.append(f"expected one ConfigMap cloudapi-images-settings, found {len(maps)}")
        return {}
    data = maps[0].get("data", {})
    for key in REQUIRED_SETTINGS:
        if key not in data:
            problems.append(f"ConfigMap {maps[0]['metadata']['name']} does not set {key}")
    return data


def _check_containers(document: dict, problems: list[str]) -> None:
    name = object_name(document)
    pod = _pod_spec(document)
    if pod.get("automountServiceAccountToken") is not False:
        problems.append(
            f"{name}: automountServiceAccountToken is not false (no process calls the Kubernetes API)"
        )
    pod_security = pod.get("securityContext", {})
    if pod_security.get("runAsNonRoot") is not True:
        problems.append(f"{name}: pod securityContext.runAsNonRoot is not true")
    if pod_security.get("runAsUser") == 0:
        problems.append(f"{name}: pod securityContext.runAsUser is 0 (root)")
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    for container in _containers(pod):
        where = f"{name} container {container.get('name')}"
        resources = container.get("resources", {})
        for path in ("requests.cpu", "requests.memory", "limits.memory"):
            group, _, key = path.partition(".")
            if key not in resources.get(group, {}):
                problems.append(f"{where}: resources.{path} is not set")
        security = container.get("securityContext", {})
        seccomp = security.get("seccompProfile", pod_security.get("seccompProfile", {}))
        if seccomp.get("type") != "RuntimeDefault":
            problems.append(f"{where}: seccompProfile.type is not RuntimeDefault")
        if security.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: securityContext.allowPrivilegeEscalation is not false")
        if security.get("privileged"):
            problems.append(f"{where}: securityContext.privileged is true")
        if "ALL" not in security.get("capabilities", {}).get("drop", []):
            problems.append(f"{where}: securityContext.capabilities.drop does not contain ALL")
        if security.get("capabilities", {}).get("add"):
            problems.append(f"{where}: securityContext.capabilities.add is not empty")
        if security.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: securityContext.readOnlyRootFilesystem is not true")
        if security.get("runAsUser") == 0 or security.get("runAsNonRoot") is False:
            problems.append(f"{where}: the container may run as root")
        tmp = [mount for mount in container.get("volumeMounts", []) if mount.get("mountPath") == "/tmp"]
        if not tmp or "emptyDir" not in volumes.get(tmp[0]["name"], {}):
            problems.append(f"{where}: /tmp is not an emptyDir volume (the root file system is read-only)")
        image = container.get("image", "")
        untagged = ":" not in image.rsplit("/", 1)[-1] and "@" not in image
        if untagged or image.endswith(":latest"):
            problems.append(f"{where}: image {image!r} has no release tag")


def _check_probes(document: dict, container: dict, problems: list[str]) -> None:
    where = f"{object_name(document)} container {container.get('name')}"
    ports = {port.get("name"): port.get("containerPort") for port in container.get("ports", [])}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        spec = container.get(probe)
        if spec is None:
            problems.append(f"{where}: no {probe}")
            continue
        port = spec.get("httpGet", {}).get("port")
        if isinstance(port, str) and port not in ports:
            problems.append(f"{where}: {probe} uses port {port!r}, which the container does not declare")
    liveness = container.get("livenessProbe", {}).get("httpGet", {}).get("path")
    if liveness not in (None, "/livez"):
        problems.append(f"{where}: livenessProbe checks {liveness}; only /livez does no I/O")
    readiness = container.get("readinessProbe", {}).get("httpGet", {}).get("path")
    if readiness not in (None, "/readyz"):
        problems.append(f"{where}: readinessProbe checks {readiness}, not /readyz")


def _check_metrics(document: dict, container: dict, port: int | None, problems: list[str]) -> None:
    where = f"{object_name(document)} container {container.get('name')}"
    declared = [entry.get("containerPort") for entry in container.get("ports", [])]
    if port is None or port not in declared:
        problems.append(f"{where}: metrics port {port} is not declared in ports")
    annotations = document["spec"]["template"].get("metadata", {}).get("annotations", {})
    if (
        annotations.get("prometheus.io/scrape") == "true"
        and _number(annotations.get("prometheus.io/port")) != port
    ):
        problems.append(f"{where}: prometheus.io/port {annotations.get('prometheus.io/port')} is not {port}")


def _check_api(api: dict, settings: dict, documents: list[dict], problems: list[str]) -> None:
    name = object_name(api)
    spec = api["spec"]
    if "replicas" in spec:
        problems.append(f"{name}: sets replicas, which the HorizontalPodAutoscaler owns")
    rolling = spec.get("strategy", {}).get("rollingUpdate", {})
    if spec.get("strategy", {}).get("type", "RollingUpdate") != "RollingUpdate" or str(
        rolling.get("maxUnavailable")
    ) not in ("0", "0%"):
        problems.append(f"{name}: the rolling update may make pods unavailable (set maxUnavailable: 0)")
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    _check_probes(api, container, problems)
    _check_metrics(api, container, _port(settings, "METRICS_PORT"), problems)
    http_ports = [
        port.get("containerPort") for port in container.get("ports", []) if port.get("name") == "http"
    ]
    if http_ports != [_port(settings, "HTTP_PORT")]:
        problems.append(
            f"{name}: container port http {http_ports} is not HTTP_PORT {settings.get('HTTP_PORT')}"
        )
    pre_stop = _pre_stop_seconds(container)
    drain = _number(settings.get("HTTP_DRAIN_TIMEOUT"))
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if pre_stop is None:
        problems.append(f"{name}: no preStop sleep, so requests still routed to a stopping pod fail")
    elif drain is not None and not grace > pre_stop + drain:
        problems.append(
            f"{name}: terminationGracePeriodSeconds {grace} is not greater than the preStop sleep "
            f"{pre_stop:g} + HTTP_DRAIN_TIMEOUT {drain:g}"
        )
    if settings.get("HTTP_HOST") != "0.0.0.0":
        problems.append(f"ConfigMap: HTTP_HOST is {settings.get('HTTP_HOST')!r}; in a pod it must be 0.0.0.0")

    labels = spec["template"]["metadata"].get("labels", {})
    hpas = [
        document
        for document in documents
        if document.get("kind") == "HorizontalPodAutoscaler"
        and document["spec"].get("scaleTargetRef", {}).get("name") == api["metadata"]["name"]
        and document["spec"]["scaleTargetRef"].get("kind") == "Deployment"
    ]
    if len(hpas) != 1:
        problems.append(f"{name}: expected one HorizontalPodAutoscaler targeting it, found {len(hpas)}")
    elif hpas[0]["apiVersion"] != "autoscaling/v2" or not any(
        metric.get("resource", {}).get("name") == "cpu" for metric in hpas[0]["spec"].get("metrics", [])
    ):
        problems.append(f"{object_name(hpas[0])}: not an autoscaling/v2 autoscaler on CPU")
    if not any(
        document.get("kind") == "PodDisruptionBudget"
        and _selects(document["spec"].get("selector", {}), labels)
        for document in documents
    ):
        problems.append(f"{name}: no PodDisruptionBudget selects its pods")

    services = [
        document
        for document in documents
        if document.get("kind") == "Service"
        and _selects({"matchLabels": document["spec"].get("selector", {})}, labels)
    ]
    if not services:
        problems.append(f"{name}: no Service selects its pods")
    for service in services:
        if service["spec"].get("type", "ClusterIP") != "ClusterIP":
            problems.append(
                f"{object_name(service)}: type {service['spec']['type']} exposes the API without TLS; use ClusterIP"
            )
    _check_ingress(documents, {service["metadata"]["name"] for service in services}, problems)


def _check_ingress(documents: list[dict], api_services: set[str], problems: list[str]) -> None:
    ingresses = [document for document in documents if document.get("kind") == "Ingress"]
    if not ingresses:
        problems.append("no Ingress in front of the API")
    for ingress in ingresses:
        name = object_name(ingress)
        spec = ingress["spec"]
        tls_hosts = {host for entry in spec.get("tls", []) for host in entry.get("hosts", [])}
        if not tls_hosts or not all(entry.get("secretName") for entry in spec.get("tls", [])):
            problems.append(f"{name}: no TLS section with a certificate Secret")
        if "defaultBackend" in spec:
            problems.append(f"{name}: a defaultBackend answers for any host, outside the TLS hosts")
        for rule in spec.get("rules", []):
            host = rule.get("host")
            if host is None or host not in tls_hosts:
                problems.append(f"{name}: rule host {host!r} is not covered by TLS")
            for path in rule.get("http", {}).get("paths", []):
                backend = path.get("backend", {}).get("service", {}).get("name")
                if backend not in api_services:
                    problems.append(
                        f"{name}: path {path.get('path')} routes to {backend!r}, not the API Service"
                    )
        annotations = ingress["metadata"].get("annotations", {})
        if (
            spec.get("ingressClassName") == "nginx"
            and annotations.get("nginx.ingress.kubernetes.io/force-ssl-redirect") != "true"
        ):
            problems.append(f"{name}: ingress-nginx would answer plain HTTP (set force-ssl-redirect)")


def _check_worker(worker: dict, settings: dict, documents: list[dict], problems: list[str]) -> None:
    name = object_name(worker)
    spec = worker["spec"]
    if "replicas" in spec:
        problems.append(f"{name}: sets replicas, which KEDA's ScaledObject owns")
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    _check_probes(worker, container, problems)
    _check_metrics(worker, container, _port(settings, "WORKER_HTTP_PORT"), problems)
    shutdown = _number(settings.get("WORKER_SHUTDOWN_TIMEOUT"))
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if shutdown is not None and not grace > shutdown:
        problems.append(
            f"{name}: terminationGracePeriodSeconds {grace} is not greater than WORKER_SHUTDOWN_TIMEOUT {shutdown:g}"
        )
    if settings.get("WORKER_HTTP_HOST") != "0.0.0.0":
        problems.append(
            f"ConfigMap: WORKER_HTTP_HOST is {settings.get('WORKER_HTTP_HOST')!r}; in a pod it must be 0.0.0.0"
        )
    labels = spec["template"]["metadata"].get("labels", {})
    if not any(
        document.get("kind") == "PodDisruptionBudget"
        and _selects(document["spec"].get("selector", {}), labels)
        for document in documents
    ):
        problems.append(f"{name}: no PodDisruptionBudget selects its pods")
    if any(
        document.get("kind") == "HorizontalPodAutoscaler"
        and document["spec"].get("scaleTargetRef", {}).get("name") == worker["metadata"]["name"]
        for document in documents
    ):
        problems.append(f"{name}: has its own HorizontalPodAutoscaler; KEDA creates the one it needs")

    amqp_secret = {
        entry["valueFrom"]["secretKeyRef"]["name"]
        for entry in container.get("env", [])
        if entry.get("name") == "AMQP_URL" and "secretKeyRef" in entry.get("valueFrom", {})
    }
    scaled = [
        document
        for document in documents
        if document.get("kind") == "ScaledObject"
        and document["spec"].get("scaleTargetRef", {}).get("name") == worker["metadata"]["name"]
        and document["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    ]
    if len(scaled) != 1:
        problems.append(f"{name}: expected one ScaledObject targeting it, found {len(scaled)}")
        return
    authentications = {
        document["metadata"]["name"]: document
        for document in documents
        if document.get("kind") == "TriggerAuthentication"
    }
    triggers = [
        trigger for trigger in scaled[0]["spec"].get("triggers", []) if trigger.get("type") == "rabbitmq"
    ]
    if not triggers:
        problems.append(f"{object_name(scaled[0])}: no rabbitmq trigger")
    for trigger in triggers:
        queue = trigger.get("metadata", {}).get("queueName")
        if queue != settings.get("AMQP_QUEUE"):
            problems.append(
                f"{object_name(scaled[0])}: queueName {queue!r} is not AMQP_QUEUE {settings.get('AMQP_QUEUE')!r}"
            )
        if trigger.get("metadata", {}).get("host"):
            problems.append(f"{object_name(scaled[0])}: the broker URL is in the trigger, not in a Secret")
        reference = trigger.get("authenticationRef", {}).get("name")
        authentication = authentications.get(reference)
        if authentication is None:
            problems.append(
                f"{object_name(scaled[0])}: authenticationRef {reference!r} names no TriggerAuthentication"
            )
            continue
        hosts = [
            ref for ref in authentication["spec"].get("secretTargetRef", []) if ref.get("parameter") == "host"
        ]
        if not hosts:
            problems.append(f"{object_name(authentication)}: no secretTargetRef for the parameter host")
        for ref in hosts:
            if ref.get("key") != "AMQP_URL" or (amqp_secret and ref.get("name") not in amqp_secret):
                problems.append(
                    f"{object_name(authentication)}: host comes from {ref.get('name')}/{ref.get('key')}, "
                    f"not the worker's AMQP_URL Secret {sorted(amqp_secret)}"
                )


def _check_migrate(job: dict, problems: list[str]) -> None:
    name = object_name(job)
    job_name = job["metadata"]["name"]
    image = job["spec"]["template"]["spec"]["containers"][0].get("image", "")
    tag = image.rsplit("/", 1)[-1].partition(":")[2]
    if not tag or not job_name.endswith("-" + tag):
        problems.append(
            f"{name}: the name does not end with the image tag {tag!r}, so it is not one Job per release"
        )
    if len(job_name) > 63 or not _DNS_SUBDOMAIN.match(job_name):
        problems.append(f"{name}: not a valid Job name (lower-case DNS name of at most 63 characters)")
    if job["spec"]["template"]["spec"].get("restartPolicy") not in ("Never", "OnFailure"):
        problems.append(f"{name}: restartPolicy must be Never or OnFailure")


def _check_secrets(documents: list[dict], problems: list[str]) -> None:
    for document in documents:
        if document.get("kind") != "Secret":
            continue
        values = dict(document.get("stringData", {}))
        if document.get("data"):
            problems.append(
                f"{object_name(document)}: holds base64 data; commit placeholders in stringData only"
            )
        for key, value in values.items():
            if SECRET_PLACEHOLDER not in str(value):
                problems.append(
                    f"{object_name(document)}: {key} is not a placeholder (contains no {SECRET_PLACEHOLDER})"
                )


def check_semantics(documents: list[dict]) -> list[str]:
    """Check the rules of this deployment that no schema expresses."""
    problems: list[str] = []
    settings = _settings(documents, problems)
    workloads = [document for document in documents if _pod_spec(document) is not None]
    roles: dict[str, list[dict]] = {}
    for document in workloads:
        _check_containers(document, problems)
        roles.setdefault(_role(document) or "unknown", []).append(document)
    for document in roles.pop("unknown", []):
        problems.append(f"{object_name(document)}: runs neither the API, a worker nor the migrations")

    for role, kind in (("api", "Deployment"), ("worker", "Deployment"), ("migrate", "Job")):
        found = [document for document in roles.get(role, []) if document.get("kind") == kind]
        if len(found) != 1:
            problems.append(f"expected one {kind} running the {role}, found {len(found)}")
            continue
        if role == "api":
            _check_api(found[0], settings, documents, problems)
        elif role == "worker":
            _check_worker(found[0], settings, documents, problems)
        else:
            _check_migrate(found[0], problems)
    _check_secrets(documents, problems)
    for document in documents:
        if document.get("kind") == "Namespace":
            labels = document["metadata"].get("labels", {})
            if labels.get("pod-security.kubernetes.io/enforce") != "restricted":
                problems.append(
                    f"{object_name(document)}: Pod Security Admission does not enforce restricted"
                )
    return problems


def check_compose(document: dict) -> list[str]:
    """Check the local stack: only the API is published, on 127.0.0.1, after the migrations."""
    problems = []
    services = document.get("services", {})
    for name, service in services.items():
        for port in service.get("ports", []):
            text = (
                port
                if isinstance(port, str)
                else str(port.get("host_ip", "")) + ":" + str(port.get("published"))
            )
            if name != "api":
                problems.append(f"service {name} publishes port {text}; only the API is published")
            elif not str(text).startswith("127.0.0.1:"):
                problems.append(f"service api publishes {text} beyond 127.0.0.1")
    if not services.get("api", {}).get("ports"):
        problems.append("service api publishes no port (expected 127.0.0.1:8080:8080)")
    for name in ("api", "worker"):
        service = services.get(name)
        if service is None:
            problems.append(f"no service {name}")
            continue
        condition = service.get("depends_on", {}).get("migrate", {}).get("condition")
        if condition != "service_completed_successfully":
            problems.append(f"service {name} does not wait for the migrations to complete")
    for name in ("migrate", "api", "worker"):
        service = services.get(name, {})
        if service.get("read_only") is not True:
            problems.append(f"service {name} does not run with a read-only root file system")
    return problems
