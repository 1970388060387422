"""``nanoflow serve`` whose engine fails every request whose prompt starts with the first
argument: ``python fault_server.py PREFIX SERVE-ARGS...`` (the server of test_server_faults)."""

from __future__ import annotations

import sys

from nanoflow.cli import serve
from nanoflow.cli.main import build_parser
from nanoflow.server.engine_process import PromptFaults

if __name__ == "__main__":
    prefix, *argv = sys.argv[1:]
    sys.exit(serve.run(build_parser().parse_args(["serve", *argv]), PromptFaults(prefix)))
