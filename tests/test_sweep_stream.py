"""Sweeps of any size: chunked evaluation equals the one-shot grid, files are streamed in bounded memory,
and a grid too large to print is refused with its size and the flag to use."""

import tracemalloc

import numpy as np
import pandas as pd
import pytest

from perfmodel.cli.app import main
from perfmodel.costmodel import sweep as sw
from perfmodel.output import write_frames
from perfmodel.specs import load_hardware, load_model

M, H = load_model("mistral-7b"), load_hardware("h100-sxm")  # sliding window: pieces break at the window


def test_chunks_and_batch_blocks_equal_the_whole_grid(monkeypatch):
    batches, inputs, outputs = np.arange(1, 40), np.array([100, 3000, 9000]), np.array([2, 700])
    whole = sw.sweep([M], [H], batches, inputs, outputs)
    monkeypatch.setattr(sw, "BATCH_BLOCK", 5)  # pieces found 5 batches at a time
    parts = list(sw.iter_sweep([M], [H], batches, inputs, outputs, chunk=17))
    assert max(len(p) for p in parts) == 17 and len(parts) == -(-len(whole) // 17)
    pd.testing.assert_frame_equal(pd.concat(parts, ignore_index=True), whole)
    assert sw.grid_points(1, 1, (1,), batches, inputs, outputs) == len(whole) == 39 * 3 * 2


def _peak_writing(tmp_path, n_batches, chunk):
    frames = sw.iter_sweep([M], [H], np.arange(1, n_batches + 1), [128, 5000], [64], chunk=chunk)
    tracemalloc.start()
    rows = write_frames(tmp_path / f"g{n_batches}.csv", frames)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert rows == 2 * n_batches
    return peak


def test_streamed_file_memory_does_not_grow_with_the_grid(tmp_path):
    small, large = _peak_writing(tmp_path, 1_000, 500), _peak_writing(tmp_path, 8_000, 500)
    assert large < 1.5 * small  # 8x the rows, the same chunk: the same memory
    df = pd.read_csv(tmp_path / "g8000.csv")
    assert len(df) == 16_000 and df["batch"].is_monotonic_increasing
    assert not list(tmp_path.glob(".*tmp"))


def test_grid_too_large_to_print_is_refused(capsys):
    code = main(["sweep", "--batch", "1:10000000"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "60,000,000 points" in err[0] and "--out" in err[0]


def test_large_grid_with_out_prints_a_summary(tmp_path, capsys, monkeypatch):
    from perfmodel.cli import cost_commands

    monkeypatch.setattr(cost_commands, "PRINT_MAX", 50)
    out = tmp_path / "g.csv"
    code = main(["sweep", "--batch", "1:30", "--out", str(out), "--format", "json"])
    assert code == 0
    import json

    d = json.loads(capsys.readouterr().out)
    assert d["points"] == 30 * 3 * 2 == len(pd.read_csv(out)) and d["points_per_s"] > 0
    assert (out.stat().st_mode & 0o777) == 0o666 & ~_umask()


def _umask():
    import os

    m = os.umask(0)
    os.umask(m)
    return m


def test_parquet_equals_csv(tmp_path, capsys):
    pytest.importorskip("pyarrow")
    args = ["sweep", "--batch", "1:8", "--input", "128,4096", "--output", "16", "--format", "json"]
    assert main(args + ["--out", str(tmp_path / "g.csv")]) == 0
    assert main(args + ["--out", str(tmp_path / "g.parquet")]) == 0
    a, b = pd.read_csv(tmp_path / "g.csv"), pd.read_parquet(tmp_path / "g.parquet")
    assert len(a) == 16
    np.testing.assert_array_equal(a["e2e_s"].to_numpy(), b["e2e_s"].to_numpy())
