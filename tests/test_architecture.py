"""The layer contract of pyproject.toml holds, and a planted upward import breaks it.

Layers: jobs -> (ensemble | patchers | pretrain, independent) -> core; inside core, the model
layer and the AugLy ops sit on the primitives, which sit on store and contracts; no package has
an import cycle between its modules. ``lint-imports`` (import-linter) checks all of it.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

from tests.conftest import imported_by

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "pretrain", "patchers", "ensemble", "jobs")
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(no_cache=True, no_logo=True))"]


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(LINT, cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_the_import_contract_holds():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def copy_sources(dest: Path) -> None:
    """The five packages' .py files and pyproject.toml, nothing else."""
    shutil.copy(ROOT / "pyproject.toml", dest)
    for package in PACKAGES:
        for src in (ROOT / package).rglob("*.py"):
            target = dest / src.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, target)


@pytest.mark.parametrize("module, planted, broken", [
    ("core/knn.py", "import jobs.config", "core is not allowed to import jobs"),
    ("patchers/views.py", "import ensemble.fuse", "patchers is not allowed to import ensemble"),
    ("core/store.py", "import core.models.cards", "core.store is not allowed to import core.models"),
])
def test_a_planted_upward_import_breaks_it(tmp_path, module, planted, broken):
    copy_sources(tmp_path)
    path = tmp_path / module
    path.write_text(path.read_text() + f"\n{planted}  # planted by the test\n")
    result = lint(tmp_path)
    assert result.returncode == 1
    assert broken in " ".join(result.stdout.split())


def test_no_import_cycles_anywhere():
    """Strongly connected components of the whole module graph: none has two modules."""
    graph = grimp.build_graph(*PACKAGES)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    assert cycles == []


HEAVY = ("torch", "timm", "torchvision", "sklearn", "ultralytics", "augly", "lightly", "cv2", "matplotlib")


def test_the_command_line_starts_without_torch(tmp_path):
    """Every command's module is imported to build the parser, so one that imports torch at its top
    made each `copydet --help`, `status` or `models list` wait for torch and timm: 8-16 s here, now
    about 1.5 s. Commands import their heavy code when they run it, and `run` after its config passed."""
    code = ("import sys; from jobs.cli import main; main(['models', 'list', '--registry', sys.argv[1]]); "
            "print(main(['run', '--set', 'search.nosuch=1']))")
    out, err, loaded = imported_by(code, HEAVY, str(tmp_path))
    assert "no models registered in" in out and "search.nosuch" in err
    assert out.splitlines()[-1] == "2" and loaded == []


def test_version_names_the_installed_package_without_torch():
    code = "from jobs.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit as e:\n    assert e.code == 0"
    out, err, loaded = imported_by(code, HEAVY)
    assert out.strip() == f"copydet {importlib.metadata.version('copydet')}" and loaded == [], err


def test_the_help_lists_every_command_once_in_the_order_a_user_meets_them():
    from jobs.cli import HELP_ORDER, build_parser
    from jobs.commands import COMMANDS

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(HELP_ORDER) == sorted(COMMANDS) and list(sub.choices) == list(HELP_ORDER)


REFUSED = [  # argv (TMP: a fresh folder) -> the error; each took 7-14 s of imports to say it
    (["index", "build", "--out", "TMP/index", "--train", "TMP"],
     "data.references: no references folder (set data.references (--references) or data.root)"),
    (["index", "add", "TMP", "TMP"], "TMP: not an index (no CURRENT)"),
    (["index", "remove", "TMP", "R1"], "TMP: not an index (no CURRENT)"),
    (["index", "compact", "TMP"], "TMP: not an index (no CURRENT)"),
    (["plan", "TMP/x.yaml"], "TMP/x.yaml: no such config file"),
    (["submit", "TMP/x.yaml", "--address", "http://127.0.0.1:1"], "TMP/x.yaml: no such config file"),
    (["submit", "--out", "runs/rel", "--address", "http://127.0.0.1:1"], "output 'runs/rel' is a relative local path"),
    (["submit", "--out", "TMP/run", "--reuse", "runs/a", "--address", "http://127.0.0.1:1"],
     "--reuse runs/a: the whole run (--stage run) starts from a run folder's shards"),
    (["serve", "TMP"], "TMP: not an index (no CURRENT)"),
    (["verify", "--out", "TMP"], "TMP: no pinned inputs or manifest settings; run `copydet manifest` first"),
    (["evaluate", "--out", "TMP"], "TMP: no pinned inputs or manifest settings; run `copydet manifest` first"),
    (["tune", "TMP/x.yaml"], "TMP/x.yaml: no such config file"),
    (["train-verifier", "TMP/x.yaml"], "TMP/x.yaml: no such config file"),
    (["detector", "train", "TMP/x.yaml"], "TMP/x.yaml: no such config file"),
]


@pytest.mark.parametrize("argv, error", REFUSED, ids=[" ".join(a[:2]).replace("TMP", "") for a, _ in REFUSED])
def test_a_command_refuses_a_mistake_before_it_imports_torch(tmp_path, argv, error):
    code = "import json, sys; from jobs.cli import main; print(main(json.loads(sys.argv[1])))"
    argv = [a.replace("TMP", str(tmp_path)) for a in argv]
    out, err, loaded = imported_by(code, HEAVY, json.dumps(argv))
    assert out.splitlines()[-1] == "2" and error.replace("TMP", str(tmp_path)) in err and loaded == [], err
    assert not (tmp_path / "index").exists()
