"""JSON Schema validation of the KEDA objects and of the Compose file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from deploy_checks import COMPOSE_FILE, COMPOSE_SCHEMA, KEDA_SCHEMA
from deploy_checks.tools import object_name


def _schema_problems(validator: jsonschema.Draft202012Validator, document: Any, label: str) -> list[str]:
    problems = []
    for error in sorted(
        validator.iter_errors(document), key=lambda error: [str(part) for part in error.absolute_path]
    ):
        where = ".".join(str(part) for part in error.absolute_path) or "(top level)"
        problems.append(f"{label}: {where}: {error.message}")
    return problems


def load_schema(path: Path) -> jsonschema.Draft202012Validator:
    schema = json.loads(path.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def validate_keda(documents: list[dict], schema_path: Path = KEDA_SCHEMA) -> list[str]:
    """Validate ScaledObject and TriggerAuthentication objects against the committed schema."""
    validator = load_schema(schema_path)
    problems = []
    for document in documents:
        problems += _schema_problems(validator, document, object_name(document))
    return problems


def validate_compose(path: Path = COMPOSE_FILE, schema_path: Path = COMPOSE_SCHEMA) -> list[str]:
    """Validate a Compose file against the Compose specification's JSON schema.

    YAML anchors and `<<` merge keys are resolved first, as Docker Compose does.
    Interpolation (`${VAR}`) is not resolved, so a value that needs it is checked as
    its literal text.
    """
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        return [f"{path.name}: invalid YAML: {exc}"]
    return _schema_problems(load_schema(schema_path), document, path.name)
