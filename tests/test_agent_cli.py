"""The agent's own command line and the bundle's bootstrap: what the process in every VM loads.

The agent stays resident in every protected VM: no CLI framework in it (typer, click, rich for
one parse of argv), and psycopg over the guest's libpq rather than psycopg-binary's private
copies of libpq, libssl and libcrypto.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator import agent_bundle
from orchestrator.cli_app import app

ROOT = Path(__file__).resolve().parent.parent
GUEST_PYTHON = "/usr/bin/python3"  # the bootstrap's shebang
FRAMEWORKS = ("typer", "click", "rich")


def _loaded(code: str, *argv: str, python: str = sys.executable) -> set[str]:
    """Names of the modules loaded once `code` ran (it may exit through SystemExit)."""
    wrapped = ("import json, sys\ntry:\n" + textwrap.indent(code, "    ")
               + "\nexcept SystemExit:\n    pass\nprint(json.dumps(sorted(sys.modules)))\n")
    out = subprocess.run([python, *argv, "-c", wrapped], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.splitlines()[-1]))


def _tops(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def test_the_agents_command_line_loads_no_cli_framework() -> None:
    loaded = _loaded(textwrap.dedent("""
        from agents.cli import main
        assert main(["--help"]) == 0
        assert main(["run", "--help"]) == 0
        assert main(["discover", "--help"]) == 0
        assert main(["run", "--config", "/nonexistent/agent.yaml"]) == 2
    """))
    assert "agents.cli" in loaded
    assert _tops(loaded) & set(FRAMEWORKS) == set()


def test_usage_errors_and_help_exit_as_before(capsys: pytest.CaptureFixture[str]) -> None:
    from agents.cli import main

    assert main([]) == 2  # no command: the help, as a usage error
    assert "Usage: drflow-agent" in capsys.readouterr().out
    assert main(["run"]) == 2
    assert "the following arguments are required: --config" in capsys.readouterr().err
    assert main(["discover", "--write", "/nonexistent/agent.yaml"]) == 2
    assert "--agent-id is required with --write" in capsys.readouterr().err
    assert main(["run", "--help"]) == 0
    assert "Usage: drflow-agent run" in capsys.readouterr().out


def test_drflow_agent_through_the_drflow_command_loads_no_cli_framework_nor_pydantic() -> None:
    """`drflow agent run` (how the lab starts its agents, and an install with the whole of
    drflow) is the agent alone: typer and the rest of the command line are never imported."""
    loaded = _loaded(textwrap.dedent("""
        from orchestrator.cli import main
        sys.argv = ["drflow", "agent", "run", "--config", "/nonexistent/agent.yaml"]
        main()
    """))
    assert "agents.cli" in loaded
    assert _tops(loaded) & {*FRAMEWORKS, "pydantic", "prefect"} == set()


def test_drflow_agent_hands_every_argument_to_the_agent(tmp_path: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(app, ["agent", "run", "-c", str(tmp_path / "none.yaml"),
                              "--log-level", "DEBUG"])
    assert out.exit_code == 2, out.output
    assert f"error: cannot read agent config {tmp_path / 'none.yaml'}" in out.output
    out = runner.invoke(app, ["agent", "discover", "--help"])
    assert out.exit_code == 0, out.output
    assert "Usage: drflow agent discover" in out.output and "--control-master-ref" in out.output
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "agent", "run", "--config",
                           str(tmp_path / "none.yaml")], capture_output=True, text=True,
                          cwd=ROOT, timeout=60, check=False)
    assert done.returncode == 2 and "error: cannot read agent config" in done.stderr


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The agent bundle, unpacked as in a guest."""
    d = tmp_path_factory.mktemp("bundle")
    with tarfile.open(agent_bundle.build(cache=d / "cache")) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(d / "opt", filter="data")
        else:  # Python < 3.11.4 (Debian 12's) has no extraction filters; the bundle is our own
            tar.extractall(d / "opt")
    return d / "opt"


def _guest_python() -> str:
    """The bootstrap's own interpreter where it is the Python the bundle is for, else this one."""
    tag = agent_bundle.tag_of(GUEST_PYTHON)
    return GUEST_PYTHON if tag == agent_bundle.python_tag() else sys.executable


def test_the_bundle_carries_no_cli_framework_nor_psycopg_binary_nor_pydantic(bundle: Path) -> None:
    manifest = json.loads((bundle / "BUNDLE.json").read_text())
    assert manifest["python"].endswith(platform.machine())
    libs = {p.name for p in (bundle / "lib").iterdir()}
    assert "psycopg" in libs
    assert {lib for lib in libs
            if lib.startswith(("psycopg_binary", "typer", "click", "pydantic"))} == set()
    assert set(manifest["libraries"]) <= libs


def test_the_bundled_agent_loads_no_cli_framework_nor_pydantic_and_psycopg_over_libpq(bundle: Path) -> None:
    boot = bundle / agent_bundle.ENTRY
    # The bootstrap as the guest runs it, then what `run` imports for a postgres resource.
    code = textwrap.dedent(f"""
        import runpy
        sys.argv = [{str(boot)!r}, "run", "--help"]
        try:
            runpy.run_path({str(boot)!r}, run_name="__main__")
        except SystemExit as exc:
            assert exc.code == 0, exc.code
        import agents, agents.drivers.postgres, psycopg
        assert agents.__file__.startswith({str(bundle)!r}), agents.__file__
        assert psycopg.pq.__impl__ == "python", psycopg.pq.__impl__
    """)
    loaded = _loaded(code, "-sE", python=_guest_python())
    assert "psycopg" in loaded
    assert _tops(loaded) & {"typer", "click", "psycopg_binary", "pydantic"} == set()


def test_the_bundled_agent_without_libpq_says_to_install_it(bundle: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(yaml.safe_dump({
        "agent_id": "vm-1", "group": "g", "outbox": str(tmp_path / "outbox.sqlite"),
        "gateway": {"url": "http://127.0.0.1:9/v1/events",
                    "webhook_secret": {"ref": f"file:{tmp_path / 'secret'}"}},
        "resources": [{"name": "pg", "type": "postgres", "port": 5999,
                       "datadir": str(tmp_path / "data")}]}))
    (tmp_path / "secret").write_text("s3cret")
    boot = bundle / agent_bundle.ENTRY
    # A guest without libpq.so.5: psycopg finds no library to load.
    code = textwrap.dedent(f"""
        import ctypes.util, runpy, sys
        find = ctypes.util.find_library
        ctypes.util.find_library = lambda name: None if name == "pq" else find(name)
        sys.argv = [{str(boot)!r}, "run", "--config", {str(cfg)!r}]
        runpy.run_path({str(boot)!r}, run_name="__main__")
    """)
    out = subprocess.run([_guest_python(), "-sE", "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120, check=False)
    assert out.returncode == 2, out.stderr
    assert "libpq.so.5 is not installed in this VM" in out.stderr
    assert "apt-get install libpq5" in out.stderr
    assert "Traceback" not in out.stderr
