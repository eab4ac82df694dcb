"""Subcommands of the magseg-hpc CLI, one module each."""
