"""The HTTP process never imports torch: its memory and start-up stay small, and /ping stays fast."""

import subprocess
import sys

HEAVY = ("torch", "diffusers", "transformers", "peft")


def test_http_side_is_torch_free():
    code = (
        "import sys, serve.app, serve.cli, serve.routes, serve.worker, serve.records, serve.outputs, model_cache.store;"
        "app = serve.app.create_app();"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_pipelines_never_import_http_or_aws():
    code = "import sys, pipelines.txt2img, pipelines.checkpoint, pipelines.infotext; print([m for m in ('fastapi', 'starlette', 'boto3', 'botocore') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
