import datetime as dt
import errno
import json

import pytest

from signalcraft.errors import StorageError
from signalcraft.export import MANIFEST, STAGING, SegmentWriter, atomic_write, folder_name, is_complete, storage_error

START = dt.datetime(2026, 3, 4, 5, 6, 7, 500000, tzinfo=dt.timezone.utc)


def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")

    def failing(tmp):
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(StorageError, match="a.bin: cannot write: the disk is full"):
        atomic_write(target, failing)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_a_segment_folder_appears_whole_or_not_at_all(tmp_path):
    with SegmentWriter(tmp_path, START) as w:
        w.path("mic_0/mix.pt").write_bytes(b"x")
        assert not any(p.name != STAGING for p in tmp_path.iterdir())  # nothing visible yet
        final = w.commit({"k": 1})
    assert final.name == folder_name(START) == START.astimezone().strftime("%Y-%m-%d_%H-%M-%S")
    assert is_complete(final)
    assert json.loads((final / MANIFEST).read_text()) == {"k": 1, "files": ["mic_0/mix.pt"]}

    with pytest.raises(RuntimeError):
        with SegmentWriter(tmp_path, START) as w:
            w.path("mic_0/mix.pt").write_bytes(b"x")
            raise RuntimeError("crash mid-segment")
    assert [p.name for p in tmp_path.iterdir() if p.name != STAGING] == [final.name]
    assert not any((tmp_path / STAGING).iterdir())


def test_segments_in_the_same_second_do_not_collide(tmp_path):
    names = []
    for _ in range(3):
        with SegmentWriter(tmp_path, START) as w:
            names.append(w.commit({}).name)
    base = folder_name(START)
    assert names == [base, f"{base}_2", f"{base}_3"]


def test_storage_error_says_what_to_do(tmp_path):
    assert "no permission" in str(storage_error(tmp_path / "f", OSError(errno.EACCES, "Permission denied")))
