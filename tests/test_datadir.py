"""The data directory's lock (fanny_tui.datadir): real flock on real files, real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from fanny_tui.datadir import LOCK_NAME, DataDirBusy, DataDirLock, holder_line
from fanny_tui.store import StoreError

from .helpers import TIME_UNIT

_HOLD = textwrap.dedent("""
    import sys, time
    from fanny_tui.datadir import DataDirLock
    lock = DataDirLock(sys.argv[1])
    lock.acquire()
    print("locked", flush=True)
    time.sleep(600)
""")


def test_a_second_lock_on_one_directory_is_refused_naming_both(tmp_path):
    data_dir = tmp_path / "data"
    first = DataDirLock(data_dir)
    first.acquire()                                  # creates the directory
    assert first.held and (data_dir / LOCK_NAME).exists()
    with pytest.raises(DataDirBusy) as refused:
        DataDirLock(data_dir).acquire()
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"the data directory {data_dir} is in use by pid {os.getpid()}: ")
    assert refused.value.holder == holder_line()
    assert message.endswith("stop that process first, or use another --data-dir")
    first.release()
    first.release()                                  # idempotent
    assert (data_dir / LOCK_NAME).read_text() == ""  # the holder line is erased
    with DataDirLock(data_dir) as again:             # free again
        assert again.held
    assert not again.held


def test_a_lock_held_by_another_process_until_it_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(DataDirBusy) as refused:
            DataDirLock(tmp_path).acquire()
        assert refused.value.holder == f"pid {holder.pid}: -c {tmp_path}"   # python -c DIR
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10 * TIME_UNIT)
    # The kernel let the lock go with the process; the stale file does not matter.
    with DataDirLock(tmp_path):
        pass


def test_an_unusable_directory_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError) as failed:
        DataDirLock(blocker / "sub").acquire()
    assert not isinstance(failed.value, DataDirBusy)
    assert str(failed.value) == (f"cannot open the token store in {blocker / 'sub'}: "
                                 "Not a directory")


def test_a_data_dir_that_is_a_file_is_named_as_such(tmp_path):
    # trial6: `--data-dir device.toml` said "cannot open the token store in device.toml:
    # File exists"; the file is left as it was.
    blocker = tmp_path / "device.toml"
    blocker.write_text("[gps]\n")
    with pytest.raises(StoreError) as failed:
        DataDirLock(blocker).acquire()
    assert str(failed.value) == (f"cannot open the token store in {blocker}: it is a file, "
                                 "not a directory (check --data-dir or [storage] data_dir)")
    assert blocker.read_text() == "[gps]\n"


def test_holder_line_is_one_short_line():
    line = holder_line(42, ["/usr/local/bin/fanny-tui", "--headless", "--config", "a b\nc"])
    assert line == "pid 42: fanny-tui --headless --config a b c"
    assert len(holder_line(1, ["x", "y" * 500])) == 200


def test_a_holder_line_cut_at_a_space_reads_back_the_same(tmp_path):
    argv = ["x", "y" * (200 - len("pid 1: x ") - 1), "zzz"]   # the 200th character is a space
    line = holder_line(1, argv)
    assert line == f"pid 1: x {argv[1]}" and len(line) == 199
    data_dir = tmp_path / "data"
    with DataDirLock(data_dir):
        (data_dir / LOCK_NAME).write_text(line)   # as acquire() writes it, for this argv
        with pytest.raises(DataDirBusy) as refused:
            DataDirLock(data_dir).acquire()
    assert refused.value.holder == line


def test_one_object_cannot_lock_twice(tmp_path):
    lock = DataDirLock(tmp_path)
    lock.acquire()
    try:
        with pytest.raises(RuntimeError, match="already locked"):
            lock.acquire()
        assert lock.held
    finally:
        lock.release()
