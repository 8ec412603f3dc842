"""Bad or extreme input never gives a wrong answer: counts past int64, output file modes, protected files."""

import numpy as np

from perfmodel.costmodel.operators import count_arrays, kv_cache_bytes
from perfmodel.costmodel.request import Workload, analyze
from perfmodel.specs import load_hardware, load_model


def test_counts_past_int64_stay_positive_and_finite():
    # 2**24 prompts of 2**24 tokens: attention FLOPs ~1e27, far past int64 (which would wrap to negative)
    a = analyze(load_model("llama-3.1-8b"), load_hardware("h100-sxm"), Workload(2**24, 2**24, 2))
    d = a.to_dict()
    for phase in ("prefill", "decode"):
        assert d[phase]["flops"] > 2**63 and d[phase]["bytes"] > 0
        assert np.isfinite(d[phase]["time_s"]) and d[phase]["time_s"] > 0
    assert all(r["flops"] >= 0 and r["bytes"] >= 0 for r in d["ops"])
    assert d["memory"]["kv_cache_bytes"] > 2**63


def test_small_counts_stay_exact_integers():
    b, t, p = count_arrays(8, 2048, np.arange(4))
    assert b.dtype.kind == t.dtype.kind == p.dtype.kind == "i"
    m = load_model("llama-3.1-8b")
    # closed form: 2 * layers * kv_heads * head_dim * tokens * bytes
    assert int(kv_cache_bytes(m, 1000, 3, "bf16")) == 2 * 32 * 8 * 128 * 1000 * 3 * 2
    assert float(kv_cache_bytes(m, 2**24, 2**24, "bf16")) == 2.0 * 32 * 8 * 128 * 2**24 * 2**24 * 2


def _umask() -> int:
    import os

    m = os.umask(0)
    os.umask(m)
    return m


def test_atomic_write_keeps_plain_file_modes_and_the_earlier_file_on_failure(tmp_path):
    import os

    import pytest

    from perfmodel.output import atomic_write

    old = os.umask(0o022)
    try:
        p = atomic_write(tmp_path / "sub" / "r.csv", lambda t: t.write_text("a\n1\n"))
        assert p.stat().st_mode & 0o777 == 0o644  # as open() would make it, not mkstemp's 0600
        os.chmod(p, 0o640)
        atomic_write(p, lambda t: t.write_text("a\n2\n"))
        assert p.stat().st_mode & 0o777 == 0o640 and p.read_text() == "a\n2\n"  # a re-run keeps the file's mode

        def fail(t):
            t.write_text("half")
            raise RuntimeError("disk full")

        with pytest.raises(RuntimeError):
            atomic_write(p, fail)
        assert p.read_text() == "a\n2\n" and sorted(x.name for x in p.parent.iterdir()) == ["r.csv"]
    finally:
        os.umask(old)


def test_calibrate_never_overwrites_a_file_it_did_not_write(tmp_path, capsys):
    from perfmodel.cli.app import main

    lib = tmp_path / "local-box.yaml"
    lib.write_text("# a hand-written hardware file\nname: box\n")
    assert main(["calibrate", "--name", "box", "--out-dir", str(tmp_path), "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "never overwritten" in err[0]
    assert lib.read_text().startswith("# a hand-written")
    for bad in ("../box", "a/b", ".x", "x" * 65):
        assert main(["calibrate", "--name", bad, "--out-dir", str(tmp_path)]) == 2
    assert "--name" in capsys.readouterr().err


def test_output_path_that_is_a_folder_or_unwritable_is_one_line(tmp_path, capsys):
    import os

    from perfmodel.cli.app import main

    (tmp_path / "d.csv").mkdir()
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    cases = [["sweep", "--batch", "1", "--out", str(tmp_path / "d.csv")],
             ["kv-quality", "--out", str(tmp_path / "f")], ["compare", "--out-dir", str(tmp_path / "f")]]
    (tmp_path / "f").write_text("x")
    if os.geteuid() != 0:  # root writes anywhere
        cases.append(["sweep", "--batch", "1", "--out", str(ro / "g.csv")])
    for args in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("perfmodel: error: --out"), err


def test_no_deprecation_warning_on_import_or_command():
    """Every module (torch and pynvml included) imports, and a command runs, with deprecations as errors."""
    import subprocess
    import sys

    code = ("import pkgutil, importlib, perfmodel\n"
            "for m in pkgutil.walk_packages(perfmodel.__path__, 'perfmodel.'):\n"
            "    if not m.name.endswith('__main__'): importlib.import_module(m.name)\n"
            "import pynvml\n"
            "from perfmodel.cli.app import main\n"
            "raise SystemExit(main(['analyze', '--format', 'json']) + main(['simulate', '--requests', '20']))\n")
    r = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-W", "error::FutureWarning",
                        "-W", "error::PendingDeprecationWarning", "-c", code], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Warning" not in r.stderr


def test_tensor_parallel_degree_beyond_the_heads_is_refused(capsys):
    from perfmodel.cli.app import main

    # 8 KV heads divide 64, but 32 query heads cannot be split 64 ways (it printed 1/2 a head per device)
    for args in (["analyze", "--tp", "64"], ["sweep", "--tp", "1,64", "--batch", "1"]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "32 attention heads" in err[0]
    assert main(["analyze", "--tp", "32", "--format", "json"]) == 0


def test_simulator_refuses_a_run_that_would_take_hours():
    import numpy as np
    import pytest

    from perfmodel.errors import PerfmodelError
    from perfmodel.planning.deploy import Deployment
    from perfmodel.planning.simulate import SIM_MAX_REQUESTS, simulate
    from perfmodel.planning.workload import Requests

    n = SIM_MAX_REQUESTS + 1
    reqs = Requests(np.arange(n, dtype=float), np.full(n, 8), np.full(n, 2))
    with pytest.raises(PerfmodelError, match="at most 1,000,000"):
        simulate(Deployment(load_model("smollm2-135m"), load_hardware("h100-sxm")), reqs)


def test_report_name_cannot_leave_its_folder(tmp_path, capsys):
    from perfmodel.cli.app import main

    for bad in ("../../x", "a/b", "", ".."):
        assert main(["report", "--name", bad, "--out-root", str(tmp_path / "rep")]) == 2
        assert "--name" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path.parent / "x").exists()


def test_a_terminated_sweep_leaves_no_file(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "big.csv"
    p = subprocess.Popen([sys.executable, "-m", "perfmodel", "sweep", "--input", "1:10000000", "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".big.csv.*.tmp")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.1)
    assert p.poll() is None, p.communicate()  # writing when terminated
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=60)
    assert p.returncode in (1, 130)  # interrupted (typer's Ctrl-C code is 130)
    assert list(tmp_path.iterdir()) == []  # the temp file went with it, and no half grid was renamed in
