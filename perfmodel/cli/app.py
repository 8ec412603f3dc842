"""The typer app and the error boundary: user errors become one line on stderr and exit code 2."""

from __future__ import annotations

import functools
import inspect
import sys
from pathlib import PurePath

import typer

from perfmodel.errors import PerfmodelError, one_line, short

try:  # typer >= 0.20 vendors its own click; older ones use click itself
    from typer._click import exceptions as _cx
except ImportError:  # pragma: no cover
    from click import exceptions as _cx

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="perfmodel: how an LLM will run on an accelerator, before you rent one.")


def _register() -> None:
    from perfmodel.cli import cost_commands  # noqa: F401  (registers commands)
    from perfmodel.cli import engine_commands, kv_commands, planning_commands, validation_commands  # noqa: F401
    from perfmodel.cli import serving_commands  # noqa: F401

    for info in app.registered_commands:
        _guard(info)


def command_name(info) -> str:
    return info.name or info.callback.__name__.replace("_", "-")


def flag_of(name: str, param: inspect.Parameter) -> str:
    """The option as the user types it: its first long declaration, else --name-with-dashes."""
    decls = getattr(param.default, "param_decls", None) or ()
    longs = [d for d in decls if isinstance(d, str) and d.startswith("--")]
    return longs[0].split("/")[0] if longs else "--" + name.replace("_", "-")


def _guard(info) -> None:
    """Wrap a command so every number and path it receives is checked before its body runs (functools.wraps
    keeps the signature typer reads). Idempotent: main() registers on every call."""
    from perfmodel.cli.options import PATH_ROLE_OVERRIDES, PATH_ROLES, check_number, check_path

    f = info.callback
    if f is None or getattr(f, "_perfmodel_checked", False):
        return
    sig = inspect.signature(f)
    cmd = command_name(info)
    flags = {n: flag_of(n, p) for n, p in sig.parameters.items()}
    roles = {n: PATH_ROLE_OVERRIDES.get((cmd, n), PATH_ROLES.get(n, "any")) for n in sig.parameters}

    @functools.wraps(f)
    def checked(*args, **kwargs):
        bound = sig.bind_partial(*args, **kwargs)
        for name, value in bound.arguments.items():
            if isinstance(value, PurePath):
                check_path(flags[name], value, roles[name])
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                check_number(flags[name], value)
        return f(*args, **kwargs)

    checked._perfmodel_checked = True  # type: ignore[attr-defined]
    info.callback = checked


def _error(message: object) -> int:
    print(f"perfmodel: error: {one_line(message)}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    _register()
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="perfmodel")
        return rv if isinstance(rv, int) else 0
    except PerfmodelError as e:
        return _error(e)
    except _cx.UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":
            print(e.format_message())
            return 0
        return _error(e.format_message())
    except (typer.Abort, KeyboardInterrupt):
        print("perfmodel: aborted", file=sys.stderr)
        return 1
    except typer.Exit as e:
        return e.exit_code
    except OSError as e:  # a user path the OS refuses (too long, a folder, no permission, disk full)
        where = f"{short(e.filename, 120)}: " if getattr(e, "filename", None) else ""
        return _error(f"{where}{e.strerror or e}")
    except MemoryError:
        return _error("out of memory: the request is too large for this machine (use smaller ranges, or "
                      "sweep --out FILE to stream)")


def _terminate(signum, frame):
    raise KeyboardInterrupt  # unwinds like Ctrl-C, so atomic writes remove their temp files


def run() -> None:
    import signal

    signal.signal(signal.SIGTERM, _terminate)  # `timeout`, a job scheduler, kill: leave no temp file behind
    sys.exit(main())
