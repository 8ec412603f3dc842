"""The perfmodel command line. Commands live in one module per area; heavy imports stay inside commands."""

from perfmodel.cli.app import app, main

__all__ = ["app", "main"]
