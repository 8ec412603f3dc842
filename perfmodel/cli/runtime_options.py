"""The --exec and --framework options every costing command takes (one definition, one resolution)."""

from __future__ import annotations

import typer

EXEC_OPT = typer.Option(None, "--exec", help="eager | graph | fused (default: the framework's mode, else fused, "
                                             "what serving engines run)")
FRAMEWORK_OPT = typer.Option(None, "--framework", help="serving framework profile: vllm | sglang | tensorrt-llm | "
                                                       "llama.cpp | transformers | a profile YAML")


def runtime(hw, exec_mode: str | None, framework: str | None):
    """(hardware as the framework runs it, exec mode, profile or None)."""
    from perfmodel.frameworks import resolve_runtime

    return resolve_runtime(hw, exec_mode, framework)


def runtime_precision(precision, hw, prof):
    from perfmodel.frameworks import framework_precision

    return framework_precision(precision, hw, prof)
