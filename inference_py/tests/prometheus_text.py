"""Parses Prometheus text expositions with prometheus_client's own parser, for the jest tests
(prom-client has no parser): reads a JSON list of texts on stdin, prints a JSON list with, for
each, its families by name: type, and samples (name, labels, value)."""

import json
import sys

from prometheus_client.parser import text_string_to_metric_families


def parse(text: str) -> dict[str, dict[str, object]]:
    families: dict[str, dict[str, object]] = {}
    for family in text_string_to_metric_families(text):
        # A family whose lines are split apart comes back twice: an invalid exposition.
        if family.name in families:
            raise SystemExit(f"family {family.name} appears twice")
        samples = [{"name": s.name, "labels": s.labels, "value": s.value} for s in family.samples]
        families[family.name] = {"type": family.type, "samples": samples}
    return families


json.dump([parse(text) for text in json.load(sys.stdin)], sys.stdout)
