"""docs/operations.md's "Rehearse a failover" block, run as written against a real daemon, gate and llama-server.

An operator follows that block start to end; if it stops being true, this fails.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import anyio
import httpx
import pytest

from tests.support.moto import MOTO_ENV
from tests.support.node import NodeConfig, running_node

pytestmark = [pytest.mark.anyio, pytest.mark.llama]
DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
MARKER = "<!-- rehearsal: the block below is run by tests/agent/test_rehearsal_doc.py -->"


def rehearsal_block() -> str:
    text = DOC.read_text()
    found = re.search(re.escape(MARKER) + r"\n```sh\n(?P<body>.*?)\n```", text, re.DOTALL)
    assert found, f"the rehearsal block is gone from {DOC}"
    return found.group("body")


async def test_the_documented_rehearsal_runs_as_written(tmp_path: Path,
                                                        node_config: NodeConfig) -> None:
    config, url, gate, _arn, _rest = node_config
    script = tmp_path / "rehearsal.sh"
    script.write_text("set -euo pipefail\nset -x\n" + rehearsal_block() + "\n")
    with running_node(tmp_path, node_config) as node:
        async with httpx.AsyncClient(timeout=5) as http:
            await node.daemon.readyz(http, 200)
        env = {**os.environ, **MOTO_ENV, "SG": url, "GATE": gate, "SPOTGUARD_CONFIG": str(config),
               "PATH": f"{Path(node.daemon.proc.args[0]).parent}:{os.environ.get('PATH', '')}"}
        done = await anyio.to_thread.run_sync(lambda: subprocess.run(
            ["bash", str(script)], capture_output=True, text=True, env=env, timeout=120, check=False))
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n--- daemon log ---\n{node.daemon.log_tail()}"
    assert "undrained: serving again" in done.stdout
