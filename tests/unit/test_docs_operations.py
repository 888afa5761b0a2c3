"""docs/operations.md lists every metric the API and the worker export, names no metric
that does not exist, and its alert rules are well-formed Prometheus rule YAML."""

import re
from pathlib import Path

import yaml

from service.metrics import ApiMetrics
from workers.metrics import WorkerMetrics

DOC = Path(__file__).parents[2] / "docs" / "operations.md"
_SUFFIXES = ("_bucket", "_count", "_sum")


def _exported_names() -> set[str]:
    """Names of the metrics as scraped: counters with `_total`, histograms without suffix."""
    names = set()
    for registry in (ApiMetrics().registry, WorkerMetrics().registry):
        for family in registry.collect():
            names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names


def _text() -> str:
    return DOC.read_text(encoding="utf-8")


def _rules() -> list[dict]:
    blocks = re.findall(r"```yaml\n(.*?)\n```", _text(), re.DOTALL)
    assert len(blocks) == 1
    groups = yaml.safe_load(blocks[0])["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_every_metric_documented():
    documented = set(re.findall(r"`(cloudapi_images_\w+)`", _text()))

    assert sorted(_exported_names() - documented) == []


def test_documented_metrics_exist():
    exported = _exported_names()
    mentioned = set(re.findall(r"\bcloudapi_images_\w+", _text()))
    unknown = []
    for name in mentioned:
        base = next((name.removesuffix(suffix) for suffix in _SUFFIXES if name.endswith(suffix)), name)
        if name not in exported and base not in exported:
            unknown.append(name)

    assert sorted(unknown) == []


def test_alert_rules_well_formed():
    rules = _rules()

    assert len(rules) >= 3
    for rule in rules:
        assert re.fullmatch(r"[A-Z][A-Za-z]+", rule["alert"]), rule
        assert rule["expr"].strip(), rule
        assert rule["labels"]["severity"] in ("page", "ticket"), rule
        assert rule["annotations"]["summary"], rule
        assert re.fullmatch(r"\d+m", rule.get("for", "0m")), rule


def test_alert_rules_cover_the_operations_cases():
    expressions = " ".join(rule["expr"] for rule in _rules())

    assert "cloudapi_images_worker_consumer_active" in expressions
    assert 'rabbitmq_queue_messages_ready{queue="images.read-model.dead-letter"}' in expressions
    assert "cloudapi_images_event_lag_seconds_bucket" in expressions
