"""Client libraries that cannot share .venv with loraxd, run as subprocesses by the tests.

The unmodified lorax-client pins huggingface_hub<1, which transformers 5 cannot live with:
scripts/setup installs it alone into .venv-lorax-client. A test runs `lorax_client.py`
under that interpreter against the server's URL and asserts on the JSON summary it prints.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

HERE = Path(__file__).parent
LORAX_PYTHON = HERE.parents[1] / ".venv-lorax-client" / "bin" / "python"

needs_lorax_client = pytest.mark.skipif(
    not LORAX_PYTHON.exists(),
    reason="no .venv-lorax-client (the unmodified lorax-client): run scripts/setup")


async def run_lorax_client(scenario: str, url: str, prompt: str, timeout: float = 120.0
                           ) -> dict:
    """Run one scenario of lorax_client.py; returns its summary. A subprocess under asyncio,
    so that a server on the test's own event loop keeps serving meanwhile."""
    cmd = [str(LORAX_PYTHON), str(HERE / "lorax_client.py"), scenario, url, prompt]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, f"lorax_client.py {scenario} failed:\n{err.decode()}"
    return json.loads(out)
