"""Changing `drflow.yaml` in place: a group added or removed, the rest of the file as it was.

The operator's comments, key order and layout are kept (a round trip through ruamel.yaml). The
new text is checked as `drflow config check` would before anything is written; then it replaces
the file atomically (a crash leaves the old file or the new one, never half of one), with the
file's mode kept, and the previous version beside it as `<file>.bak`.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.util import load_yaml_guess_indent

from drflow.config.loader import parse_config


class EditError(ValueError):
    """The change was refused; the file is unchanged."""


def _yaml(text: str) -> YAML:
    """A round-trip YAML (comments and order survive) writing lists indented as `text` does:
    `- item` under its key (PyYAML's way) or indented beneath it."""
    seq, offset = 4, 2
    with contextlib.suppress(Exception):
        _data, guessed, guessed_bsi = load_yaml_guess_indent(text)
        if guessed is not None:
            seq, offset = guessed, guessed_bsi or 0
    y = YAML()
    y.preserve_quotes = True
    y.indent(mapping=2, sequence=seq, offset=offset)
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


def _write(path: Path, doc: Any, original: str) -> str:
    buf = io.StringIO()
    _yaml(original).dump(doc, buf)
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
    original = path.read_text()
    doc = _yaml(original).load(original)
    groups = _groups(doc, path)
    name = group.get("name")
    if any(isinstance(g, dict) and g.get("name") == name for g in groups):
        raise EditError(f"{path} already has a group named {name!r}: nothing was written")
    groups.append(group)
    return _write(path, doc, original)


def remove_group(path: Path, name: str) -> bool:
    """Remove the group called `name`; False (and nothing written) if there is none."""
    original = path.read_text()
    doc = _yaml(original).load(original)
    groups = _groups(doc, path)
    keep = [i for i, g in enumerate(groups) if not (isinstance(g, dict) and g.get("name") == name)]
    if len(keep) == len(groups):
        return False
    for i in reversed(range(len(groups))):
        if i not in keep:
            del groups[i]
    _write(path, doc, original)
    return True
