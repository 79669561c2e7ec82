"""hostd: everything one host owns (images, VMs, agent connections)."""
