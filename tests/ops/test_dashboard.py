"""The Grafana dashboard and the Prometheus config of the multi-node compose, checked without
Docker: every metric the dashboard queries is one chatpipe exports, and Prometheus scrapes
every chatpipe process of the compose file on the port it serves /metrics on."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import generate_latest

from chatpipe.metrics import Metrics

INFRA = Path(__file__).resolve().parents[2] / "infra"
DASHBOARD = INFRA / "grafana" / "dashboards" / "chatpipe.json"
PROMETHEUS = INFRA / "prometheus" / "prometheus.yml"
COMPOSE = INFRA / "docker-compose.multi.yml"


def exported() -> set[str]:
    """Every sample name chatpipe's metrics can have (counters' _total, histograms' _bucket)."""
    metrics = Metrics()
    names = set()
    for metric in metrics.registry.collect():
        base = metric.name
        names |= {base, f"{base}_total", f"{base}_bucket", f"{base}_sum", f"{base}_count"}
    assert b"chatpipe_cancels" in generate_latest(metrics.registry)
    return names


def test_the_dashboard_queries_only_metrics_chatpipe_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"chatpipe_[a-z_]+", e)}
    assert {"chatpipe_cancels_total", "chatpipe_cancel_tokens_bucket"} <= used
    assert used <= exported(), used - exported()
    titles = [p["title"] for p in dashboard["panels"]]
    assert any("phase" in t for t in titles)
    assert any("source" in t for t in titles)


def test_prometheus_scrapes_every_chatpipe_process_of_the_compose_file() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())["services"]
    chatpipe = {
        name: s["command"][-1]
        for name, s in compose.items()
        if s.get("command") and s["command"][-1] in ("api", "ai_consumer", "cancel_listener")
    }
    config = yaml.safe_load(PROMETHEUS.read_text())
    targets = {
        t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]
    }
    port = {"api": "8000", "ai_consumer": "9100", "cancel_listener": "9100"}
    assert targets == {f"{name}:{port[kind]}" for name, kind in chatpipe.items()}
    assert {"prometheus", "grafana"} <= set(compose)
