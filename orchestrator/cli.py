"""The `drflow` command (entry point `orchestrator.cli:main`).

`drflow agent …` is the guest agent's own command line: it is dispatched before anything else
is imported, so an agent started this way loads only what it uses (no Typer, no pydantic).
"""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:2] == ["agent"]:
        from agents.cli import DRFLOW_PROG
        from agents.cli import main as agent_main

        sys.exit(agent_main(sys.argv[2:], prog=DRFLOW_PROG))
    from orchestrator.cli_app import run

    run()


if __name__ == "__main__":
    main()
