"""The typer app and the error boundary: user errors become one line on stderr and exit code 2."""

from __future__ import annotations

import sys

import typer

from perfmodel.errors import PerfmodelError

try:  # typer >= 0.20 vendors its own click; older ones use click itself
    from typer._click import exceptions as _cx
except ImportError:  # pragma: no cover
    from click import exceptions as _cx

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="perfmodel: how an LLM will run on an accelerator, before you rent one.")


def _register() -> None:
    from perfmodel.cli import cost_commands  # noqa: F401  (registers commands)
    from perfmodel.cli import engine_commands, kv_commands, planning_commands, validation_commands  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    _register()
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="perfmodel")
        return rv if isinstance(rv, int) else 0
    except PerfmodelError as e:
        print(f"perfmodel: error: {e}", file=sys.stderr)
        return 2
    except _cx.UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":
            print(e.format_message())
            return 0
        print(f"perfmodel: error: {' '.join(e.format_message().split())}", file=sys.stderr)
        return 2
    except (typer.Abort, KeyboardInterrupt):
        print("perfmodel: aborted", file=sys.stderr)
        return 1
    except typer.Exit as e:
        return e.exit_code


def run() -> None:
    sys.exit(main())
