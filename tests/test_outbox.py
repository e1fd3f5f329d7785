"""Outputs are atomic and never overwrite; moves keep every file."""

from __future__ import annotations

import errno
import os

from daemon.outbox import Folders, claim_name, move_file, remove_temporaries, temporary_file


def test_output_paths_mirror_the_inbox(tmp_path):
    folders = Folders(tmp_path / "out", tmp_path / "arch", tmp_path / "fail")
    assert folders.output_path("album 1/scan.tiff") == tmp_path / "out" / "album 1" / "scan.png"
    assert folders.archive_path("album 1/scan.tiff") == tmp_path / "arch" / "album 1" / "scan.tiff"


def test_an_existing_output_is_never_overwritten(tmp_path):
    (tmp_path / "photo.png").write_bytes(b"someone else's")
    (tmp_path / "photo-1.png").write_bytes(b"another")
    with temporary_file(tmp_path) as (temp, f):
        f.write(b"ours")
        f.flush()
        final = claim_name(temp, tmp_path / "photo.png")
    assert final == tmp_path / "photo-2.png" and final.read_bytes() == b"ours"
    assert (tmp_path / "photo.png").read_bytes() == b"someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo-1.png", "photo-2.png", "photo.png"]


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    try:
        with temporary_file(tmp_path) as (_temp, f):
            f.write(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        pass
    assert list(tmp_path.iterdir()) == []


def test_move_keeps_the_file_and_numbers_collisions(tmp_path):
    source = tmp_path / "in" / "a.jpg"
    source.parent.mkdir()
    source.write_bytes(b"scan")
    (tmp_path / "arch").mkdir()
    (tmp_path / "arch" / "a.jpg").write_bytes(b"older scan")
    final = move_file(source, tmp_path / "arch" / "a.jpg")
    assert final == tmp_path / "arch" / "a-1.jpg" and final.read_bytes() == b"scan" and not source.exists()


def test_move_across_file_systems_copies_then_removes(tmp_path, monkeypatch):
    source = tmp_path / "a.jpg"
    source.write_bytes(b"scan" * 1000)

    def no_cross_device_link(src, dst, *args, **kwargs):
        if str(src) == str(source):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_link(src, dst, *args, **kwargs)

    real_link = os.link
    monkeypatch.setattr(os, "link", no_cross_device_link)
    final = move_file(source, tmp_path / "other" / "a.jpg")
    assert final.read_bytes() == b"scan" * 1000 and not source.exists()
    assert [p.name for p in final.parent.iterdir()] == ["a.jpg"]


def test_temporaries_left_by_a_crash_are_removed(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".codeformer-0123abcd.tmp").write_bytes(b"partial")
    (tmp_path / "keep.png").write_bytes(b"x")
    assert remove_temporaries(tmp_path) == 1
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["keep.png"]
