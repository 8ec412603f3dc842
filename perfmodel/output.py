"""Rendering results: rich tables for people, JSON and CSV for scripts."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from perfmodel.errors import bad_value

FORMATS = ("table", "json", "csv")


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise bad_value("--format", fmt, "|".join(FORMATS))
    return fmt


def si(x: float, unit: str = "", base: float = 1000.0) -> str:
    """1.23 G, 45.6 M ... human figures for tables."""
    x = float(x)
    for prefix in ("", "k", "M", "G", "T", "P", "E"):
        if abs(x) < base:
            return f"{x:.3g} {prefix}{unit}".rstrip()
        x /= base
    return f"{x:.3g} Z{unit}"


def seconds(x: float) -> str:
    x = float(x)
    if x == 0:
        return "0"
    if x < 1e-3:
        return f"{x * 1e6:.1f} µs"
    if x < 1:
        return f"{x * 1e3:.2f} ms"
    return f"{x:.2f} s"


def _plain(o):
    if isinstance(o, dict):
        return {k: _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_plain(v) for v in o]
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return o


def to_json(obj) -> str:
    return json.dumps(_plain(obj), indent=2)


def rows_to_csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(_plain(r))
    return buf.getvalue()


def print_table(rows: list[dict], title: str = "", columns: dict | None = None) -> None:
    """columns maps a row key to (header, formatter); default: every key, str()."""
    from rich.console import Console
    from rich.table import Table

    if not rows:
        Console().print(f"{title}: (empty)")
        return
    columns = columns or {k: (k, str) for k in rows[0]}
    t = Table(title=title or None, show_lines=False)
    for key, (header, _) in columns.items():
        t.add_column(header, justify="left" if isinstance(rows[0].get(key), str) else "right")
    for r in rows:
        t.add_row(*(fmt(r[k]) for k, (_, fmt) in columns.items()))
    console().print(t)


def console():
    from rich.console import Console

    return Console(width=max(120, _terminal_width()))


def _terminal_width() -> int:
    try:
        return os.get_terminal_size().columns
    except OSError:
        return 160


def emit(fmt: str, payload, rows: list[dict] | None = None) -> bool:
    """Print payload as JSON or rows as CSV; return False when the caller should draw its table."""
    if fmt == "json":
        sys.stdout.write(to_json(payload) + "\n")
        return True
    if fmt == "csv":
        sys.stdout.write(rows_to_csv(rows if rows is not None else payload))
        return True
    return False


def _umask_mode() -> int:
    """The mode a plain new file gets here (0644 under the usual 022 umask); mkstemp's own is 0600."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: Path, write) -> Path:
    """Write through a temp file in the same folder, then rename: a failure leaves nothing half-written and
    an earlier file at path untouched. The file gets the mode a plain write would (the existing file's, else
    the umask's), not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o7777 if path.is_file() else _umask_mode()
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:  # name the user's path, not the temp file's
        raise OSError(e.errno, e.strerror, str(path)) from None
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename == tmp:
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    return path


def write_frames(path: Path, frames, progress=None) -> int:
    """Stream DataFrames (same columns) to one CSV or Parquet file, atomically: rows are appended to a temp
    file chunk by chunk, so memory holds one chunk whatever the total. Returns the rows written."""
    path = Path(path)
    rows = 0

    def write(tmp: Path) -> None:
        nonlocal rows
        if path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            writer = None
            try:
                for df in frames:
                    table = pa.Table.from_pandas(df, preserve_index=False)
                    writer = writer or pq.ParquetWriter(tmp, table.schema)
                    writer.write_table(table)
                    rows += len(df)
                    if progress:
                        progress(len(df))
            finally:
                if writer is not None:
                    writer.close()
            return
        with open(tmp, "w", newline="") as f:
            for df in frames:
                df.to_csv(f, index=False, header=rows == 0, lineterminator="\n")
                rows += len(df)
                if progress:
                    progress(len(df))

    atomic_write(path, write)
    return rows
