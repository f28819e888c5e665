"""What a path is on btrfs: the facts a drill's snapshot and the lab's storage both need."""

from __future__ import annotations

import subprocess
from pathlib import Path

BTRFS_MAGIC = 0x9123683E  # statfs f_type
SUBVOLUME_INO = 256  # every btrfs subvolume's root directory has this inode number


def fs_type(path: Path) -> int | None:
    """The statfs type of the file system holding `path`; None if it cannot be read."""
    try:
        out = subprocess.run(["stat", "-f", "-c", "%t", str(path)], capture_output=True,
                             text=True, timeout=10, check=True).stdout
        return int(out.strip(), 16)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def is_btrfs(path: Path) -> bool:
    """Whether `path` lies on a btrfs file system."""
    return fs_type(path) == BTRFS_MAGIC


def is_subvolume(path: Path) -> bool:
    """Whether `path` is the root of a btrfs subvolume."""
    try:
        return not path.is_symlink() and path.stat().st_ino == SUBVOLUME_INO and is_btrfs(path)
    except OSError:
        return False
