"""Offline checks of the deployment files: Dockerfile, build context, Kustomize overlays,
KEDA objects and the Compose file. Nothing here needs a cluster, a Docker engine or the
network.

`deploy/check` runs every check from the command line (`python -m deploy_checks` with
deploy/ on sys.path); `tests/deploy/test_manifests.py` runs each one and feeds it broken
input. Each check returns a list of problems, empty when the files pass, so one run
reports every problem at once. A missing or too old tool raises `ToolError` instead,
whose message names what to install.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SCHEMAS = DEPLOY / "schemas"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE_FILE = DEPLOY / "compose.yaml"
YAMLLINT_CONFIG = ROOT / ".yamllint"
KEDA_SCHEMA = SCHEMAS / "keda.sh-v1alpha1.schema.json"
COMPOSE_SCHEMA = SCHEMAS / "compose-spec.json"

# The Kubernetes minor the manifests are validated against (kubernetes-validate bundles
# its schemas). docs/deploy.md names it too.
KUBERNETES_VERSION = "1.31"


class ToolError(RuntimeError):
    """A tool that a check needs is missing or too old; the message names the tool and the fix."""
