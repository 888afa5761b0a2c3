"""Run every check and print one line per check: `python -m deploy_checks`.

Exit status: 0 when every check passes, 1 when one finds problems, 2 when a tool is
missing or too old.
"""

from __future__ import annotations

import sys

import yaml

from deploy_checks import (
    COMPOSE_FILE,
    DOCKERFILE,
    DOCKERIGNORE,
    KEDA_SCHEMA,
    KUBERNETES_VERSION,
    ROOT,
    ToolError,
)
from deploy_checks.dockerfile import check_build_context, check_dockerfile
from deploy_checks.rules import check_compose, check_semantics
from deploy_checks.schemas import validate_compose, validate_keda
from deploy_checks.tools import (
    build_kustomization,
    kustomization_dirs,
    lint_yaml,
    require_kubectl,
    require_kubernetes_validate,
    split_keda,
    validate_kubernetes,
    yaml_files,
)


def run_all(out=sys.stdout) -> int:
    """Run every check and print one line per check; return 0, 1 (problems) or 2 (tools)."""
    failed = False

    def report(title: str, problems: list[str]) -> None:
        nonlocal failed
        failed |= bool(problems)
        print(f"{'ok    ' if not problems else 'FAILED'} {title}", file=out)
        for problem in problems:
            print(f"         {problem}", file=out)

    try:
        kubectl = require_kubectl()
        require_kubernetes_validate()
    except ToolError as exc:
        print(f"deploy/check: {exc}", file=sys.stderr)
        return 2

    report("yamllint", lint_yaml(yaml_files()))
    dockerfile = DOCKERFILE.read_text(encoding="utf-8")
    report("Dockerfile", check_dockerfile(dockerfile))
    report(
        "build context (.dockerignore)",
        check_build_context(DOCKERIGNORE.read_text(encoding="utf-8"), dockerfile),
    )
    report("compose.yaml against the Compose specification", validate_compose())
    report("compose.yaml rules", check_compose(yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))))
    for directory in kustomization_dirs():
        try:
            build = build_kustomization(directory, kubectl)
        except RuntimeError as exc:
            report(f"kustomize {directory.relative_to(ROOT)}", [str(exc)])
            continue
        core, keda = split_keda(build.documents)
        report(
            f"{build.name}: kubernetes-validate --strict (Kubernetes {KUBERNETES_VERSION})",
            validate_kubernetes(core),
        )
        report(f"{build.name}: KEDA objects against {KEDA_SCHEMA.name}", validate_keda(keda))
        report(f"{build.name}: deployment rules", check_semantics(build.documents))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_all())
