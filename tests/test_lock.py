"""The run-folder lock (jobs.lock, core.lock): one copydet process per run folder, re-entrant in its process,
refused at once for another one (naming the holder), freed by the OS when the holder dies."""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import main
from jobs.layout import RunDir
from jobs.lock import FolderBusy, locked

ROOT = Path(__file__).parent.parent


def hold(folder: Path) -> subprocess.Popen:
    """Another process that holds ``folder``'s lock until it is killed."""
    code = ("import time; from jobs.layout import RunDir; from jobs.lock import locked\n"
            f"with locked(RunDir({str(folder)!r})):\n    print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_the_lock_is_reentrant_in_its_process_and_freed_after(tmp_path):
    (tmp_path / "run").mkdir()  # a folder the lock did not create keeps its lock file after the block
    run = RunDir(str(tmp_path / "run"))
    with locked(run):
        with locked(run):  # `copydet run` holds it over run_stages and evaluate_run, which lock again
            pass
        assert f"pid {os.getpid()} on {socket.gethostname()}" == Path(run.lock).read_text()
    holder = hold(tmp_path / "run")  # released: another process takes it at once (hold asserts it)
    holder.kill()
    holder.wait()


def test_the_first_holder_deletes_what_killed_writers_left(tmp_path, caplog):
    """A writer killed by SIGKILL leaves its hidden temp file; each kill added one more."""
    caplog.set_level(logging.INFO)
    run = RunDir(str(tmp_path / "run"))
    shards = tmp_path / "run" / "features" / "m@64"
    (shards / ".query-00000.parquet.0a1b2c3d.tmp").mkdir(parents=True)  # atomic_dir's
    (shards / ".query-00000.parquet.0a1b2c3d.tmp" / "part").write_text("x")
    (shards / ".query-00001.parquet.deadbeef.tmp").write_text("half a shard")  # atomic_output's
    kept = [shards / "query-00002.parquet", shards / ".notes.tmp", tmp_path / "run" / "tune" / "run" / ".lock",
            tmp_path / "run" / "tune" / "run" / ".fused.parquet.0a1b2c3d.tmp"]  # another lock's folder: its own
    for f in kept:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("")
    with locked(run):
        assert sorted(p.name for p in shards.iterdir()) == [".notes.tmp", "query-00002.parquet"]
        (shards / ".query-00003.parquet.0a1b2c3d.tmp").write_text("being written")
        with locked(run):  # held again by its own process: a writer of this run may be at work
            pass
        assert (shards / ".query-00003.parquet.0a1b2c3d.tmp").exists()
    assert all(f.exists() for f in kept)
    assert f"{run.root}: removed 2 unfinished file(s) that a killed run left" in caplog.text


def test_a_run_refused_before_it_writes_leaves_no_folder_behind(tmp_path, capsys):
    """The lock made the folder; a run refused by its early checks removes it again (a stale .lock was left)."""
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--set", f"data.root={tmp_path / 'nowhere'}"]) == 2
    assert "is not a folder" in capsys.readouterr().err and not out.exists()
    out.mkdir()  # a folder that was there before stays, with its lock file
    with locked(RunDir(str(out))):
        pass
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_a_second_process_is_refused_at_once_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    holder = hold(out)
    try:
        busy = rf"{out} is in use by pid {holder.pid} on {socket.gethostname()}"
        with pytest.raises(FolderBusy, match=busy), locked(RunDir(str(out))):
            pytest.fail("ran while another process held the folder")
        # the command line: exit 2, one line, nothing checked or written (no config.yaml)
        assert main(["run", "--out", str(out)]) == 2
        assert f"in use by pid {holder.pid}" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()


def test_report_is_refused_while_a_run_holds_the_folder(tmp_path, capsys):
    """`copydet report` writes into the run folder: refused while a run holds it, nothing written."""
    out = tmp_path / "run"
    holder = hold(out)
    try:
        assert main(["report", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"in use by pid {holder.pid}" in err and err.rstrip().endswith("wait until it ends")  # no --out
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()


def test_an_index_is_not_built_from_a_run_folder_a_run_holds(tmp_path, capsys):
    """`index build --from-run` reads the run's shards: refused while a run writes them, no index made."""
    out, index = tmp_path / "run", tmp_path / "index"
    out.mkdir()
    (out / "config.yaml").write_text((ROOT / "configs" / "smoke.yaml").read_text())
    holder = hold(out)
    try:
        assert main(["index", "build", "--from-run", str(out), "--out", str(index)]) == 2
        assert f"in use by pid {holder.pid}" in capsys.readouterr().err
        assert not index.exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "run"
    holder = hold(out)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with locked(RunDir(str(out))):  # the OS dropped the dead holder's lock; its pid file is not a lock
        assert Path(out / ".lock").read_text().startswith(f"pid {os.getpid()} ")


def test_a_uri_run_folder_is_not_locked_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="core.lock"), locked(RunDir("s3://bucket/run")):
        pass
    assert "cannot be locked" in caplog.text
