"""The plumbing every layer uses: process ownership (psutil) and shared files (filelock)."""

from __future__ import annotations

import subprocess
import sys
import time

from fashion_exp import procs
from fashion_exp.files import file_lock, read_json, write_json


def test_a_process_is_alive_until_it_ends_and_a_reused_pid_is_not_its_owner() -> None:
    me = procs.this_process()
    assert procs.alive(me) is True
    assert procs.alive(me | {"started": "1.0"}) is False  # same pid, another start: reused
    assert procs.alive(me | {"host": "elsewhere"}) is None  # cannot be checked from here
    assert procs.alive({}) is None
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert procs.alive(me | {"pid": str(child.pid), "started": ""}) is False


def test_a_process_start_is_recorded_readable_and_older_records_still_match() -> None:
    import datetime

    import psutil

    me = procs.this_process()
    started = datetime.datetime.fromisoformat(me["started"])  # ISO 8601, in UTC
    assert started.tzinfo == datetime.UTC and me["started"].endswith("+00:00")
    created = psutil.Process().create_time()
    assert abs(started.timestamp() - created) < 1e-3
    assert procs.alive(me | {"started": repr(created)}) is True  # as runs recorded it before


def test_state_files_are_replaced_whole(tmp_path) -> None:
    path = tmp_path / "state.json"
    write_json(path, {"run_id": "a" * 32, "epochs_done": 1})
    write_json(path, {"run_id": "a" * 32, "epochs_done": 2})
    assert read_json(path) == {"run_id": "a" * 32, "epochs_done": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary left


def test_the_file_lock_excludes_another_process(tmp_path) -> None:
    lock = tmp_path / "sub" / "x.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from fashion_exp.files import file_lock\n"
         "with file_lock(__import__('pathlib').Path(sys.argv[1])):\n"
         "    print('held', flush=True); time.sleep(1.5)", str(lock)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    start = time.monotonic()
    with file_lock(lock):
        waited = time.monotonic() - start
    holder.wait(timeout=30)
    assert waited > 0.5  # it waited for the other process to let go
