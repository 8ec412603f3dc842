"""`python -m perfmodel ...` runs the CLI (handy from a checkout that is not the installed one)."""

from perfmodel.cli.app import run

run()
