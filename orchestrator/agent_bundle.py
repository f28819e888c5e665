"""The guest agent as one file to push into a VM: its code and every library it imports.

A gzipped tar, unpacked at `/opt/drflow` in the guest:

    bin/drflow-agent    runs the agent CLI (`drflow-agent run --config …`, `… discover --json`)
                        with the guest's python3, on `lib/` only (no site-packages of the guest)
    lib/                drflow's `agents` and `drflow` packages, and the libraries they import,
                        copied from this installation (compiled ones included)
    BUNDLE.json         the Python it was built for, its libraries, and a digest of its content

So the guest needs the same Python (minor version, platform) as this machine and PostgreSQL's
client library, libpq.so.5 (psycopg reaches it through ctypes), and nothing else: no pip, no
network. Built once per content and cached.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

INSTALL_DIR = "/opt/drflow"
ENTRY = "bin/drflow-agent"
REPO = Path(__file__).resolve().parent.parent
_OWN = ("agents", "drflow")
# In site-packages but not libraries: an editable install's finder, setuptools' shim.
_NOT_LIBRARIES = ("__editable__", "_distutils_hack")

# psycopg's pure-Python wrapper over the guest's own libpq.so.5 (every VM with PostgreSQL has
# it), not psycopg-binary: that wheel's private libpq, libssl and libcrypto would cost every
# agent about 4 MB of memory, for a SQL check a second. Set before psycopg is first imported.
_PSYCOPG_IMPL = 'os.environ.setdefault("PSYCOPG_IMPL", "python")'

# Imports every module of the agent, then prints the files of what was imported.
_PROBE = f"""
import os
{_PSYCOPG_IMPL}
import importlib, json, pkgutil, sys
import agents
for m in pkgutil.walk_packages(agents.__path__, "agents."):
    importlib.import_module(m.name)
import rich.console, rich.table  # imported where `discover` prints tables
print(json.dumps(sorted({{getattr(m, "__file__", None) or "" for m in list(sys.modules.values())}})))
"""

# Finds lib/ beside its own bin/, wherever the bundle was unpacked (INSTALL_DIR in a guest).
_BOOTSTRAP = f"""#!/usr/bin/python3 -sE
# drflow guest agent: its libraries only, whatever the guest's python3 has installed.
import os
import sys

{_PSYCOPG_IMPL}
sys.path[:0] = [os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "lib")]
from agents.cli import main

sys.exit(main(prog="drflow-agent"))
"""


def python_tag() -> str:
    """What a guest's python3 must be to run the bundle: `cpython-3.11-x86_64`."""
    return (f"{sys.implementation.name}-{sys.version_info.major}.{sys.version_info.minor}-"
            f"{platform.machine()}")


# Prints python_tag() as another interpreter (a guest's python3) would say it.
TAG_PROBE = ("import platform,sys; print(f'{sys.implementation.name}-{sys.version_info.major}."
             "{sys.version_info.minor}-{platform.machine()}')")


def tag_of(python: str) -> str:
    """python_tag() of another interpreter on this machine; empty when it cannot run."""
    try:
        done = subprocess.run([python, "-c", TAG_PROBE], capture_output=True, text=True,
                              timeout=30, check=False)
    except OSError:
        return ""
    return done.stdout.strip()


def _libraries() -> list[Path]:
    """Top-level files and directories of site-packages that the agent imports (with the
    shared libraries their wheels carry, `<name>.libs`)."""
    done = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"importing the agent to bundle it failed:\n{done.stderr[-2000:]}")
    roots = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    tops: set[Path] = set()
    for f in json.loads(done.stdout):
        path = Path(f).resolve() if f else None
        for root in roots:
            if path is not None and path.is_relative_to(root) and path != root:
                tops.add(root / path.relative_to(root).parts[0])
    for top in list(tops):
        libs = top.with_name(top.name.split(".")[0] + ".libs")
        if libs.is_dir():
            tops.add(libs)
    return sorted(t for t in tops if t.name not in _OWN
                  and not t.name.startswith(_NOT_LIBRARIES))


def _add(tar: tarfile.TarFile, src: Path, name: str) -> None:
    """Add a file or tree reproducibly (sorted, no timestamps or owners, no bytecode caches)."""
    paths = [src] if src.is_file() else sorted(p for p in src.rglob("*")
                                               if "__pycache__" not in p.parts and p.is_file())
    for p in paths:
        arcname = name if p == src else f"{name}/{p.relative_to(src).as_posix()}"
        info = tarfile.TarInfo(arcname)
        info.size = p.stat().st_size
        info.mode = 0o755 if os.access(p, os.X_OK) else 0o644
        with open(p, "rb") as fh:
            tar.addfile(info, fh)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    tar.addfile(info, io.BytesIO(data))


def build(cache: Path | None = None) -> Path:
    """The bundle for this installation's agent: built, or the cached one of the same content."""
    libraries = _libraries()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for own in _OWN:
            _add(tar, REPO / own, f"lib/{own}")
        for lib in libraries:
            _add(tar, lib, f"lib/{lib.name}")
        _add_bytes(tar, ENTRY, _BOOTSTRAP.encode(), 0o755)
    digest = hashlib.sha256(raw.getvalue()).hexdigest()[:16]
    out_dir = cache or REPO / ".cache" / "agent-bundle"
    out = out_dir / f"drflow-agent-{digest}.tar.gz"
    if out.exists():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"python": python_tag(), "digest": digest,
                "libraries": [lib.name for lib in libraries]}
    fd, tmp = tempfile.mkstemp(prefix=".bundle-", dir=out_dir)
    os.close(fd)
    try:
        with tarfile.open(tmp, mode="w:gz", compresslevel=6) as gz:
            raw.seek(0)
            with tarfile.open(fileobj=raw, mode="r") as plain:
                for member in plain.getmembers():
                    gz.addfile(member, plain.extractfile(member))
            _add_bytes(gz, "BUNDLE.json", json.dumps(manifest, indent=1).encode())
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    for old in out_dir.glob("drflow-agent-*.tar.gz"):
        if old != out:
            old.unlink(missing_ok=True)
    return out
