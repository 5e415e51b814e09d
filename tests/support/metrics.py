"""Reading a worker's Prometheus endpoint: tests assert on what the worker counted, not on its log text."""

from __future__ import annotations

import requests
from prometheus_client.parser import text_string_to_metric_families


def metric(port: int, name: str, **labels: str) -> float:
    """One sample from a worker's Prometheus endpoint (0 when absent)."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0
