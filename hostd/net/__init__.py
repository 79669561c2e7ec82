"""VM networking: per-ENV bridges and subnets, taps, one nftables table per hostd."""
