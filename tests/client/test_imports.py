"""sdctl stays light: no torch, diffusers or the server's web stack."""

import subprocess
import sys


def test_client_imports_no_torch():
    code = (
        "import sys, client.cli, client.jobs, client.models, client.submit, client.endpoints, client.config, client.storage;"
        "print([m for m in ('torch', 'diffusers', 'transformers', 'fastapi', 'serve') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "client.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "jobs" in out.stdout and "txt2img" in out.stdout and "models" in out.stdout
