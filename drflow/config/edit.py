"""Changing `drflow.yaml` in place: a group added or removed, the rest of the file as it was.

The operator's comments, key order and layout are kept (a round trip through ruamel.yaml). The
new text is checked as `drflow config check` would before anything is written; then it replaces
the file atomically (a crash leaves the old file or the new one, never half of one), with the
file's mode kept, and the previous version beside it as `<file>.bak`.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from drflow.config.loader import parse_config


class EditError(ValueError):
    """The change was refused; the file is unchanged."""


def _yaml() -> YAML:
    y = YAML()  # round-trip: comments and order survive
    y.preserve_quotes = True
    y.indent(mapping=2, sequence=4, offset=2)
    y.width = 4096
    return y


def _groups(doc: Any, path: Path) -> CommentedSeq:
    if not isinstance(doc, CommentedMap):
        raise EditError(f"{path} is not a YAML mapping: fix it first (`drflow config check`)")
    groups = doc.get("groups")
    if groups is None:
        groups = doc["groups"] = CommentedSeq()
    if not isinstance(groups, CommentedSeq):
        raise EditError(f"{path}: `groups` is not a list: fix it first (`drflow config check`)")
    return groups


def _write(path: Path, doc: Any) -> str:
    buf = io.StringIO()
    _yaml().dump(doc, buf)
    text = buf.getvalue()
    try:
        parse_config(text, str(path))
    except Exception as exc:
        raise EditError(f"the changed {path} would not be valid, so nothing was written:\n"
                        f"{exc}") from None
    mode = path.stat().st_mode & 0o777
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        shutil.copy2(path, path.with_name(path.name + ".bak"))
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return text


def add_group(path: Path, group: dict[str, Any]) -> str:
    """Append `group` (as drflow.yaml spells a group) to the file's groups; the new text."""
    doc = _yaml().load(path.read_text())
    groups = _groups(doc, path)
    name = group.get("name")
    if any(isinstance(g, dict) and g.get("name") == name for g in groups):
        raise EditError(f"{path} already has a group named {name!r}: nothing was written")
    groups.append(group)
    return _write(path, doc)


def remove_group(path: Path, name: str) -> bool:
    """Remove the group called `name`; False (and nothing written) if there is none."""
    doc = _yaml().load(path.read_text())
    groups = _groups(doc, path)
    keep = [i for i, g in enumerate(groups) if not (isinstance(g, dict) and g.get("name") == name)]
    if len(keep) == len(groups):
        return False
    for i in reversed(range(len(groups))):
        if i not in keep:
            del groups[i]
    _write(path, doc)
    return True
