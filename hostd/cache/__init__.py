"""Cache volumes: per-scope chains of committed disk versions, cloned into jobs' VMs."""
