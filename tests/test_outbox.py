"""Outputs are atomic and never overwrite; moves keep every file."""

from __future__ import annotations

import errno
import os

from daemon.outbox import Folders, claim_name, move_file, remove_temporaries, temporary_file


def refuse_link(monkeypatch, source, error: int) -> None:
    """os.link of `source` fails as the kernel makes it: EXDEV across file systems, EPERM for a file
    fs.protected_hardlinks will not let this user link."""
    real_link = os.link

    def link(src, dst, *args, **kwargs):
        if str(src) == str(source):
            raise OSError(error, os.strerror(error))
        return real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "link", link)


def test_output_paths_mirror_the_inbox(tmp_path):
    folders = Folders(tmp_path / "out", tmp_path / "arch", tmp_path / "fail")
    assert folders.output_path("album 1/scan.tiff", ".tif") == tmp_path / "out" / "album 1" / "scan.tif"
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
    refuse_link(monkeypatch, source, errno.EXDEV)
    final = move_file(source, tmp_path / "other" / "a.jpg")
    assert final.read_bytes() == b"scan" * 1000 and not source.exists()
    assert [p.name for p in final.parent.iterdir()] == ["a.jpg"]


def test_temporaries_left_by_a_crash_are_removed(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".codeformer-0123abcd.tmp").write_bytes(b"partial")
    (tmp_path / "keep.png").write_bytes(b"x")
    assert remove_temporaries(tmp_path) == 1
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["keep.png"]


def test_a_symlink_is_moved_as_the_link_never_as_its_target(tmp_path):
    """A link in the inbox goes to failed/ as the link: never a hard link to (or copy of) its target."""
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(b"private")
    link = tmp_path / "in" / "scan.jpg"
    link.parent.mkdir()
    link.symlink_to(outside)
    final = move_file(link, tmp_path / "failed" / "scan.jpg")
    assert final.is_symlink() and os.readlink(final) == str(outside)
    assert outside.read_bytes() == b"private" and outside.stat().st_nlink == 1  # no hard link to the target
    assert not os.path.lexists(link)


def test_a_symlink_moved_across_file_systems_stays_a_link(tmp_path, monkeypatch):
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(b"private")
    link = tmp_path / "scan.jpg"
    link.symlink_to(outside)
    dangling = tmp_path / "gone.jpg"
    dangling.symlink_to(tmp_path / "nothing-here.jpg")
    refuse_link(monkeypatch, link, errno.EXDEV)
    final = move_file(link, tmp_path / "failed" / "scan.jpg")
    assert final.is_symlink() and os.readlink(final) == str(outside)
    assert outside.read_bytes() == b"private" and not os.path.lexists(link)
    refuse_link(monkeypatch, dangling, errno.EXDEV)
    final = move_file(dangling, tmp_path / "failed" / "gone.jpg")
    assert final.is_symlink() and not final.exists() and not os.path.lexists(dangling)


def test_a_dangling_link_already_there_keeps_its_name(tmp_path):
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "scan.jpg").symlink_to(tmp_path / "nothing-here.jpg")
    source = tmp_path / "scan.jpg"
    source.write_bytes(b"scan")
    final = move_file(source, failed / "scan.jpg")
    assert final == failed / "scan-1.jpg" and final.read_bytes() == b"scan"
    assert (failed / "scan.jpg").is_symlink()


def test_a_file_the_daemon_may_not_hard_link_is_renamed_never_clobbering(tmp_path, monkeypatch):
    """fs.protected_hardlinks refuses a link to someone else's file the daemon cannot read (EPERM)."""
    source = tmp_path / "in" / "locked.jpg"
    source.parent.mkdir()
    source.write_bytes(b"someone else's scan")
    inode = source.stat().st_ino
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / "locked.jpg").write_bytes(b"an older failure")
    refuse_link(monkeypatch, source, errno.EPERM)
    final = move_file(source, tmp_path / "failed" / "locked.jpg")
    assert final == tmp_path / "failed" / "locked-1.jpg" and final.stat().st_ino == inode  # moved, not copied
    assert (tmp_path / "failed" / "locked.jpg").read_bytes() == b"an older failure" and not source.exists()
