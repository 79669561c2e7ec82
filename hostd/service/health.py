"""hostd's readiness checks (GET /readyz, ttci/infra/health.py): its database takes writes,
libvirt answers, and, for a host that joined with --join, the scheduler answered lately."""

from __future__ import annotations

from flask import Flask

from hostd.vm.manager import VMManager
from ttci.infra.health import Check, store_writable

__all__ = ["hostd_checks"]


def hostd_checks(app: Flask, mgr: VMManager) -> dict[str, Check]:
    def scheduler() -> str:
        joiner = app.config.get("JOINER")  # serve.py sets it for --join
        if joiner is None:
            return "not joined (a static host the scheduler polls)"
        return str(joiner.ready())

    def libvirt() -> str:
        return mgr.engine.check()

    return {
        "database": lambda: store_writable(mgr.store),
        "libvirt": libvirt,
        "scheduler": scheduler,
    }
