"""The scheduler: the one public API (state, hosts, placement, ENVs)."""
