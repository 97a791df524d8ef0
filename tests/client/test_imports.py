"""sdctl stays light: no torch, diffusers or the server's web stack."""

import subprocess
import sys


def test_client_imports_no_torch():
    code = (
        "import sys, client.cli, client.jobs, client.models, client.submit, client.endpoints, client.config, client.storage,"
        " client.img2img, client.controlnet, client.upload, client.stale, client.cli_generate;"
        "print([m for m in ('torch', 'diffusers', 'transformers', 'fastapi', 'serve') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "client.cli", "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert all(c in out.stdout for c in ("jobs", "txt2img", "img2img", "models"))
