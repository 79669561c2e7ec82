"""Disk storage backends: VM disks, template disks and cache volumes (qcow2 overlays or ZFS)."""
