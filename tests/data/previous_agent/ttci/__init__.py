"""TT CI: a light-weight private VM cloud for CI (stdlib only here: the guest imports it)."""

__version__ = "0.1.0"
