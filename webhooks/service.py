"""The GitHub webhook service: `workflow_job` deliveries become fresh VMs with JIT runners.

Assembled from one part per concern: deliveries (the request path), provisioning (dispatcher,
VM, JIT runner, run.sh), cleanup (runner removal, results, VM deletion, the reconciler).
"""

from __future__ import annotations

from webhooks.cleanup import Cleanup
from webhooks.deliveries import Deliveries
from webhooks.provisioning import Provisioning
from webhooks.service_base import Settings

__all__ = ["Service", "Settings"]


class Service(Deliveries, Provisioning, Cleanup):
    """The whole service: see the parts for each concern."""
