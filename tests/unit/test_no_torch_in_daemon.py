"""The supervisor side must never import torch (it stays small and starts fast; the workers
hold the model): check in a fresh interpreter."""
import subprocess
import sys

DAEMON_MODULES = ["loraxd.daemon.main", "loraxd.engine.engine", "loraxd.http.app",
                  "loraxd.daemon.supervisor", "loraxd.daemon.model_files"]


def test_daemon_imports_no_torch():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in DAEMON_MODULES) +
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
            "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == ""
