"""Optional btrfs storage for the lab's PostgreSQL: a loop-mounted image, a subvolume per data dir.

With it a DR drill snapshots the standby's data directory (copy-on-write, atomic, instant)
instead of copying the database through the standby with pg_basebackup.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from drflow.btrfs import is_btrfs, is_subvolume

_MOUNTS = Path("/proc/self/mounts")


class StorageError(RuntimeError):
    """The btrfs storage could not be set up or removed; the message says why."""


def _run(argv: list[str], what: str, timeout: float = 60.0) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        out = (r.stderr or r.stdout).strip()[-500:]
        raise StorageError(f"{what} failed ({' '.join(argv)}): {out or f'exit {r.returncode}'}")


@functools.cache
def available() -> str | None:
    """None if the lab can keep PostgreSQL on btrfs here, else why not (cached per process)."""
    for tool, deb in (("mkfs.btrfs", "btrfs-progs"), ("btrfs", "btrfs-progs"),
                      ("mount", "mount"), ("umount", "mount")):
        if shutil.which(tool) is None:
            return f"{tool} is missing: `apt-get install {deb}`"
    if os.geteuid() != 0:
        return "mounting a btrfs image needs root"
    # The only sure test is to try: the kernel may lack btrfs, loop devices may be denied
    # (a container), or mount may be forbidden.
    with tempfile.TemporaryDirectory(prefix="drflow-btrfs-probe-", dir="/tmp") as tmp:
        mnt = Path(tmp) / "mnt"
        mnt.mkdir()
        try:
            mount_btrfs(mnt, size_gb=1)
        except (StorageError, OSError, subprocess.TimeoutExpired) as e:
            return f"cannot mount a btrfs image here: {e}"
        finally:
            unmount(mnt)
    return None


def image_path(mountpoint: Path) -> Path:
    """The image file behind `mountpoint`: beside it, e.g. `<lab dir>/pg.btrfs.img`."""
    return mountpoint.parent / f"{mountpoint.name}.btrfs.img"


def mount_btrfs(mountpoint: Path, size_gb: int = 8) -> None:
    """Make a sparse btrfs image beside `mountpoint` and loop-mount it there (made if missing)."""
    img = image_path(mountpoint)
    mountpoint.mkdir(parents=True, exist_ok=True)
    # Sparse: takes only what is written, so a generous size costs nothing.
    with open(img, "wb") as f:
        f.truncate(size_gb * 1024**3)
    try:
        _run(["mkfs.btrfs", "-q", "-f", str(img)], f"mkfs.btrfs of {img}")
        # `-o loop` attaches the loop device with autoclear: umount detaches it again.
        _run(["mount", "-t", "btrfs", "-o", "loop", str(img), str(mountpoint)],
             f"mounting {img} on {mountpoint}")
    except BaseException:
        img.unlink(missing_ok=True)
        raise
    # The file system's root is root's; PostgreSQL runs as `postgres` and must traverse it.
    mountpoint.chmod(0o755)


def _unescape(field: str) -> str:
    # /proc/self/mounts writes space, tab, newline and backslash as octal escapes.
    for code, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, ch)
    return field


def is_mounted(mountpoint: Path) -> bool:
    """Whether something is mounted on `mountpoint` (by the mount table, not by stat: a lazily
    unmounted or stale mount point may not stat)."""
    want = os.path.realpath(mountpoint)
    try:
        lines = _MOUNTS.read_text().splitlines()
    except OSError:
        return os.path.ismount(mountpoint)
    return any(len(f := line.split()) > 1 and _unescape(f[1]) == want for line in lines)


def unmount(mountpoint: Path) -> None:
    """Unmount `mountpoint` (lazily if busy) and remove its image. Safe to repeat."""
    while is_mounted(mountpoint):  # stacked mounts: a repeated `up` of a crashed lab
        r = subprocess.run(["umount", str(mountpoint)], capture_output=True, text=True,
                           timeout=60)
        if r.returncode != 0:
            # Busy (a straggler's open file, a namespace still holding it): detach it now, the
            # kernel frees the loop device once the last user is gone.
            _run(["umount", "-l", str(mountpoint)], f"lazy unmount of {mountpoint}")
    # Unlinking is safe even with the loop device still attached: it holds the inode open.
    with contextlib.suppress(FileNotFoundError):
        image_path(mountpoint).unlink()


def make_datadir(path: Path) -> None:
    """Create `path` (mode 0700) as a btrfs subvolume when its parent is on btrfs, else a plain
    directory. The caller gives it to PostgreSQL's OS user."""
    if is_btrfs(path.parent):
        # A subvolume, not a directory: only a subvolume can be snapshotted on its own.
        _run(["btrfs", "subvolume", "create", str(path)], f"creating subvolume {path}")
    else:
        path.mkdir()
    path.chmod(0o700)


def delete_subvolume(path: Path) -> None:
    """Remove subvolume `path` (and its contents); nothing if it is not one."""
    if path.exists() and is_subvolume(path):
        _run(["btrfs", "subvolume", "delete", str(path)], f"deleting subvolume {path}")
