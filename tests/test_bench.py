"""Every bench script still imports what it uses from copydet (a renamed function broke one unseen:
bench scripts run by hand, not in the suite), and the cheapest one runs end to end."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(BENCH.glob("*.py"))


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_a_bench_script_imports(path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # scripts import their sibling helpers (synthetic.py)
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)  # top level only: each runs its work under __main__
    assert module.__doc__, f"{path.name}: say in its docstring what it measures and how to run it"


def test_the_verify_driver_bench_runs(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH / "verify_windows.py"), "--queries", "40", "80", "--window", "20"],
                         capture_output=True, text=True, timeout=300, cwd=BENCH.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[-1].split()[:2] == ["80", "4"]  # 80 queries in 4 windows


def test_score_variants_takes_the_best_view_pair_of_each_image_pair(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from score_variants import image_scores, normalised

    q = np.array([[1, 0], [0, 1], [1, 0]], np.float32)  # query A: views 0-1, query B: view 2
    r = np.array([[1, 0], [0, 1], [0.6, 0.8]], np.float32)  # reference X: view 0, Y: views 1-2
    t = np.array([[0.8, 0.6]], np.float32)
    views = normalised(q, r, t)  # less each query view's best train similarity: 0.8, 0.6, 0.8
    assert np.allclose(views[1], [-0.6, 0.4, 0.2])
    assert np.allclose(image_scores(views, np.array([0, 2]), np.array([0, 1])), [[0.2, 0.4], [0.2, -0.2]])
    # gamma discounts each reference view by its own best train similarity: 0.8, 0.6, 0.96
    assert np.allclose(normalised(q, r, t, gamma=1.0)[1], [-1.4, -0.2, -0.76])
