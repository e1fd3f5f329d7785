"""Which file system holds the inbox, read from /proc/self/mountinfo; pure functions over its text.

inotify sees only changes made through this machine's kernel: on a network share or a FUSE file
system, a file written by another computer (the scanner, a NAS) raises no event. The watcher asks
here whether the inbox lives on such a file system, and whether the mount it lived on is gone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"

REMOTE_FILESYSTEMS = frozenset({
    "cifs", "smb3", "smbfs",          # Windows shares, Samba
    "nfs", "nfs4",                    # NFS
    "9p", "virtiofs", "vboxsf",       # folders shared into a VM or WSL by the host
    "ceph", "glusterfs", "lustre", "afs", "gpfs",  # cluster file systems
    "davfs", "fuse",                  # WebDAV; FUSE with no sub-type
})
"""File systems where other machines (or the host of a VM) change files without an inotify event."""


@dataclass(frozen=True)
class Mount:
    """One line of mountinfo, as much as the watcher needs."""

    mount_point: str
    fstype: str


def needs_polling(fstype: str) -> bool:
    """True for network, cluster, VM-shared and FUSE file systems (fuse.sshfs, fuse.rclone, ...).

    `fuseblk` (NTFS or exFAT on a local disk through FUSE) is left out: every change to it goes
    through this kernel, so inotify sees it.
    """
    return fstype in REMOTE_FILESYSTEMS or fstype.startswith("fuse.")


def _unescape(field: str) -> str:
    r"""mountinfo writes space, tab, newline and backslash as octal escapes (`\040`, `\011`, ...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """Every mount in `text`, in the kernel's order (a later mount on the same point hides earlier ones).

    A line is `id parent major:minor root mount-point options [optional fields...] - fstype source
    super-options`; the optional fields vary in number, so the file system type is found as the
    first field after the lone `-`.
    """
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            separator = fields.index("-", 6)
            mounts.append(Mount(_unescape(fields[4]), fields[separator + 1]))
        except (ValueError, IndexError):
            continue  # not a mountinfo line: skip it rather than guess
    return mounts


def _is_under(path: str, mount_point: str) -> bool:
    return mount_point == "/" or path == mount_point or path.startswith(mount_point.rstrip("/") + "/")


def mount_of(path: str, mountinfo: str) -> Mount | None:
    """The mount holding `path` (absolute, symlinks resolved): the longest mount point above it."""
    best: Mount | None = None
    for mount in parse_mountinfo(mountinfo):
        if _is_under(path, mount.mount_point) and (
                best is None or len(mount.mount_point) >= len(best.mount_point)):
            best = mount
    return best


def filesystem_type(path: str, mountinfo: str) -> str | None:
    """The type of the file system holding `path` (`ext4`, `cifs`, `fuse.sshfs`), None if unknown."""
    mount = mount_of(path, mountinfo)
    return mount.fstype if mount else None


def mount_gone(watched: Mount | None, current: Mount | None) -> bool:
    """True when the mount the inbox was watched on has been unmounted.

    The path then falls through to a mount *above* it (the empty mount point on the disk below
    the share). A mount appearing deeper, or the same mount point mounted again, is a folder that
    can be watched.
    """
    if watched is None or current is None or current.mount_point == watched.mount_point:
        return False
    return _is_under(watched.mount_point, current.mount_point)


def read_mountinfo(path: str = MOUNTINFO) -> str:
    """This process's mount table; empty when it cannot be read (not Linux, /proc not mounted)."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except OSError:
        return ""
