"""Subcommands of the `kvindex` command (see kvindex.cli)."""
