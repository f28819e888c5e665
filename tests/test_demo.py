"""The README's first command works on a machine that never ran Prefect: the whole demo, run with
an empty HOME and no Prefect settings, passes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.lab
@pytest.mark.timeout(900)
def test_make_demo_passes_on_a_fresh_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "DRFLOW_")) or k == "DRFLOW_CACHE_DIR"}
    env.update(HOME=str(home), COLUMNS="160", PYTHONUNBUFFERED="1")
    log = tmp_path / "demo.log"
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-m", "lab.demo"], cwd=ROOT, env=env,
                              stdout=out, stderr=subprocess.STDOUT, timeout=840)
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, text[-6000:]
    assert "demo passed" in text, text[-6000:]
    assert not (home / ".prefect" / "prefect.db").exists()
