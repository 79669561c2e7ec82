"""Prometheus metrics of the webhook service (served at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ttci.infra.metrics_common import BuildInfo

__all__ = ["Metrics"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(BuildInfo("tt-github-webhooks"))
        self.deliveries = Counter(
            "ttci_github_deliveries",
            "Webhook deliveries by event and outcome",
            ["event", "outcome"],
            registry=self.registry,
        )
        self.jobs = Counter(
            "ttci_github_jobs", "Job outcomes on our side", ["outcome"], registry=self.registry
        )
        self.active = Gauge(
            "ttci_github_active_vms", "VMs held for GitHub jobs", registry=self.registry
        )
        self.in_queue = Gauge(
            "ttci_github_jobs_in_tt_queue",
            "Jobs of this service waiting in TT CI's admission queue (at most --max-waiting)",
            registry=self.registry,
        )
        self.latency = Histogram(
            "ttci_github_webhook_seconds",
            "Time to answer a delivery",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
