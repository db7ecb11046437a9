"""Subcommands of the `epp` command (see epp.cli)."""
