"""The segment store: crash-safe writing, the strict versioned manifest, one order of
segments, tensors read without trusting the file."""

import dataclasses
import datetime as dt
import errno
import json
import pickle

import pytest
import torch

from signalcraft import clock
from signalcraft.errors import StorageError
from signalcraft.files import STAGING, atomic_write, storage_error
from signalcraft.segments import (
    FORMAT, MANIFEST, Manifest, ManifestError, SegmentWriter, TensorError, folder_name, is_complete,
    list_segments, open_segment, read_manifest,
)

from conftest import make_segment, segment_manifest


@pytest.fixture
def start():
    return clock.now().replace(microsecond=500000)


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


def test_a_segment_folder_appears_whole_or_not_at_all(tmp_path, start):
    tensor = torch.zeros(1, 240, 240)
    with SegmentWriter(tmp_path, start) as w:
        w.save_tensor(0, "mix", tensor)
        assert not any(p.name != STAGING for p in tmp_path.iterdir())  # nothing visible yet
        final = w.commit(segment_manifest(start))
    assert final.name == folder_name(start) == start.astimezone().strftime("%Y-%m-%d_%H-%M-%S")
    assert is_complete(final)
    segment = open_segment(final)
    assert segment.manifest.files == ("mic_0/mix.pt",) and segment.start_time == start
    assert torch.equal(segment.load_tensor(0, "mix"), tensor)

    with pytest.raises(RuntimeError):
        with SegmentWriter(tmp_path, start) as w:
            w.save_tensor(0, "mix", tensor)
            raise RuntimeError("crash mid-segment")
    assert [p.name for p in tmp_path.iterdir() if p.name != STAGING] == [final.name]
    assert not any((tmp_path / STAGING).iterdir())


def test_a_manifest_listing_tensors_that_were_not_written_is_not_committed(tmp_path, start):
    with pytest.raises(ValueError, match="not written"):
        with SegmentWriter(tmp_path, start) as w:
            w.commit(segment_manifest(start, mics=2))
    assert list_segments(tmp_path) == []


def test_segments_in_the_same_second_do_not_collide(tmp_path, start):
    names = [make_segment(tmp_path, start).name for _ in range(3)]
    base = folder_name(start)
    assert names == [base, f"{base}_2", f"{base}_3"]
    assert [s.name for s in list_segments(tmp_path)] == names  # same start: by name


def test_segments_are_listed_by_start_time_not_by_folder_name(tmp_path, berlin_fall_back):
    """Across a fall-back of the clocks, local folder names repeat an hour: a segment
    recorded later can get a name that sorts first."""
    later = berlin_fall_back + dt.timedelta(minutes=10)
    first = make_segment(tmp_path, later - dt.timedelta(minutes=40))  # 02:30 summer time
    second = make_segment(tmp_path, later)  # 02:10 winter time
    assert second.name < first.name
    assert [s.name for s in list_segments(tmp_path)] == [first.name, second.name]
    assert [s.name for s in list_segments(tmp_path, since=later)] == [second.name]
    assert [s.name for s in list_segments(tmp_path, until=later)] == [first.name]
    assert [s.name for s in list_segments(tmp_path, skip={first.name})] == [second.name]


def test_a_manifest_of_a_newer_version_is_refused_with_what_to_do(tmp_path, start, caplog):
    folder = make_segment(tmp_path, start)
    data = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**data, "format": FORMAT + 1}))
    with pytest.raises(ManifestError, match=f"newer signalcraft \\(manifest format {FORMAT + 1}.*Upgrade"):
        read_manifest(folder)
    assert list_segments(tmp_path) == []  # left out, and said
    assert str(folder / MANIFEST) in caplog.text and "Upgrade signalcraft" in caplog.text


def test_a_manifest_before_reference_microphones_reads_as_without_them(tmp_path, start):
    folder = make_segment(tmp_path, start)
    data = json.loads((folder / MANIFEST).read_text())
    assert data["format"] == FORMAT == 4 and data["reference"] is None and data["room"] == []
    data.pop("reference")
    data.pop("room")
    (folder / MANIFEST).write_text(json.dumps({**data, "format": 2}))
    assert read_manifest(folder).reference is None
    (folder / MANIFEST).write_text(json.dumps({**data, "format": 2, "reference": None}))
    with pytest.raises(ManifestError, match="unknown reference$"):
        read_manifest(folder)
    (folder / MANIFEST).write_text(json.dumps({**data, "format": 3}))  # format 3 must say
    with pytest.raises(ManifestError, match="missing reference$"):
        read_manifest(folder)
    (folder / MANIFEST).write_text(json.dumps({**data, "format": 3, "reference": [3]}))
    with pytest.raises(ManifestError, match="reference must be an object or null"):
        read_manifest(folder)


def test_a_manifest_before_room_tensors_reads_as_without_them_and_a_room_must_be_a_microphones(tmp_path, start):
    folder = make_segment(tmp_path, start)
    data = json.loads((folder / MANIFEST).read_text())
    data.pop("room")
    (folder / MANIFEST).write_text(json.dumps({**data, "format": 3}))
    assert read_manifest(folder).room == ()
    (folder / MANIFEST).write_text(json.dumps({**data, "format": 4}))  # format 4 must say
    with pytest.raises(ManifestError, match="missing room$"):
        read_manifest(folder)
    (folder / MANIFEST).write_text(json.dumps({**data, "format": 3, "room": ["mic_0"]}))  # format 3 cannot
    with pytest.raises(ManifestError, match="unknown room$"):
        read_manifest(folder)
    for room, message in ((["mic_1"], "room lists mic_1, which is not one of its microphones"),
                          (["mic_0", "mic_0"], "room lists mic_0, which is not one of its microphones once"),
                          (["../x"], "room: '../x' is not a microphone folder name"), ("mic_0", "room must be a list")):
        (folder / MANIFEST).write_text(json.dumps({**data, "format": 4, "room": room}))
        with pytest.raises(ManifestError, match=message):
            read_manifest(folder)
    (folder / MANIFEST).write_text(json.dumps({**data, "format": 4, "room": [], "files": ["mic_0/_room.pt"]}))
    with pytest.raises(ManifestError, match="not a file of this layout"):  # a room file the manifest does not have
        read_manifest(folder)
    (folder / MANIFEST).write_text(json.dumps({**data, "format": 4, "room": ["mic_0"],
                                               "files": ["mic_0/_room.pt", "mic_0/mix.pt"]}))
    assert read_manifest(folder).room == (0,)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("tensors"), "missing tensors"),
    (lambda d: d.update(colour="red"), "unknown colour"),
    (lambda d: d.update(start_time_utc=d["start_time_utc"][:19]), "start_time_utc must be an ISO 8601 time with"),
    (lambda d: d.update(sample_rate="16000"), "sample_rate must be an integer"),
    (lambda d: d.update(tensors={"mic_0": ["../../etc/passwd"]}), "tensors.mic_0 must be a list of distinct source"),
    (lambda d: d.update(tensors={"microphone": ["mix"]}), "not a microphone folder name"),
    (lambda d: d.update(files=["../x.pt"]), "not a file of this layout"),
    (lambda d: d["features"].update(n_mels=0), "features.n_mels must be a positive integer"),
    (lambda d: d.update(duration_s=float("nan")), "duration_s must be a finite number"),
    (lambda d: d.update(levels=[{"mic": 0}]), "levels\\[0\\] must have the keys"),
])
def test_a_malformed_manifest_is_refused_naming_the_key(tmp_path, start, change, message):
    folder = make_segment(tmp_path, start)
    data = json.loads((folder / MANIFEST).read_text())
    change(data)
    (folder / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=message):
        read_manifest(folder)


def test_manifest_round_trips(start):
    manifest = dataclasses.replace(segment_manifest(start, mics=2, sources=("pump", "fan")), room=(1,),
                                   files=("mic_0/fan.pt", "mic_0/pump.pt", "mic_1/_room.pt", "mic_1/fan.pt",
                                          "mic_1/pump.pt"))
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest


def test_garbage_manifests_are_errors_not_crashes(tmp_path, start):
    folder = make_segment(tmp_path, start)
    for text in ("not json", "[]", "{}", '{"format": "1"}', "\udcff"):
        (folder / MANIFEST).write_text(text, errors="surrogateescape")
        with pytest.raises(ManifestError, match=str(folder / MANIFEST)):
            read_manifest(folder)


class _Evil:
    """A pickle that runs code when loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w')",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("content, message", [
    (b"not a tensor", "not a usable tensor"),
    ("pickle", "not a usable tensor"),
    (torch.zeros(1, 240, 239), "expected a tensor of shape \\(1, 240, 240\\)"),
    (torch.full((1, 240, 240), float("nan")), "non-finite"),
    (torch.zeros(1, 240, 240, dtype=torch.int64), "not a float tensor"),
    ({"a": torch.zeros(1)}, "holds dict"),
])
def test_tensor_files_are_not_trusted(tmp_path, start, content, message):
    folder = make_segment(tmp_path, start)
    path = folder / "mic_0" / "mix.pt"
    if content == "pickle":
        path.write_bytes(pickle.dumps(_Evil(tmp_path / "ran")))
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    segment = open_segment(folder)
    tensors, corrupt = segment.load_tensors()
    assert tensors == {} and corrupt == 1
    with pytest.raises(TensorError, match=message) as e:
        segment.load_tensor(0, "mix")
    assert not (tmp_path / "ran").exists()
    assert "weights_only" not in str(e.value)  # torch's advice to load it unsafely is never passed on


def test_storage_error_says_what_to_do(tmp_path):
    assert "no permission" in str(storage_error(tmp_path / "f", OSError(errno.EACCES, "Permission denied")))


def test_since_takes_iso_times_and_folder_names(tmp_path, berlin_fall_back):
    """--since/--until: ISO 8601 (UTC without an offset) or a folder name (local time,
    as the folders are named), so a time copied from either place means what it says."""
    from signalcraft.clock import parse_time
    from signalcraft.errors import ConfigError

    start = berlin_fall_back - dt.timedelta(hours=3)  # well before the clocks go back: one reading
    folder = folder_name(start)
    assert parse_time(folder, "--since") == start.replace(microsecond=0)
    iso = start.replace(microsecond=0)
    assert parse_time(iso.isoformat(), "--since") == iso
    assert parse_time(iso.replace(tzinfo=None).isoformat(), "--since") == iso  # no offset: UTC
    with pytest.raises(ConfigError, match=r"--since 'noon': not an ISO 8601 time .* nor a segment folder's name"):
        parse_time("noon", "--since")
