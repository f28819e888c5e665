"""Volume: the path exists on the expected mount, is writable (probe file) and has free space."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from agents.monitors import CheckResult


def mount_point_of(path: Path) -> Path:
    """The mount point holding `path` (walks up until os.path.ismount)."""
    p = path.resolve()
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


class VolumeMonitor:
    def __init__(self, path: Path, mount_point: Path | None, probe: bool,
                 min_free_pct: float, min_free_mb: float) -> None:
        self.path = path
        self.mount_point = mount_point
        self.probe = probe
        self.min_free_pct = min_free_pct
        self.min_free_mb = min_free_mb
        self._probe_file = path / f".drflow-agent-probe-{os.getpid()}"

    def check(self) -> CheckResult:
        if not self.path.is_dir():
            return CheckResult(False, f"{self.path} is not a directory (missing or unmounted?)")
        mount = mount_point_of(self.path)
        facts: dict[str, Any] = {"mount_point": str(mount)}
        if self.mount_point is not None and mount != self.mount_point:
            return CheckResult(False, f"{self.path} is on {mount}, not on the expected mount "
                               f"{self.mount_point} (is the volume unmounted?)", facts)
        try:
            st = os.statvfs(self.path)
        except OSError as exc:
            return CheckResult(False, f"statvfs({self.path}) failed: {exc.strerror}", facts)
        if st.f_flag & os.ST_RDONLY:
            return CheckResult(False, f"{mount} is mounted read-only", facts)
        free_mb = st.f_bavail * st.f_frsize / 2**20
        free_pct = 100.0 * st.f_bavail / st.f_blocks if st.f_blocks else 0.0
        facts.update(free_mb=round(free_mb, 1), free_pct=round(free_pct, 2))
        if free_pct < self.min_free_pct or free_mb < self.min_free_mb:
            return CheckResult(False, f"{mount} low on space: {free_mb:.0f} MB ({free_pct:.1f} %) "
                               f"free, need {self.min_free_mb:g} MB and {self.min_free_pct:g} %",
                               facts)
        if self.probe:
            error = self._write_probe()
            if error:
                return CheckResult(False, f"{self.path} is not writable: {error}", facts)
        return CheckResult(True, f"{self.path} writable, {free_mb:.0f} MB free", facts)

    def _write_probe(self) -> str | None:
        try:
            fd = os.open(self._probe_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"drflow probe\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.unlink(self._probe_file)
        except OSError as exc:
            return exc.strerror or str(exc)
        return None


def build(r: Any) -> VolumeMonitor:
    return VolumeMonitor(r.path, r.mount_point, r.probe, r.min_free_pct, r.min_free_mb)
