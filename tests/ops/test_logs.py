"""No secret ever reaches a log line: stderr and the log file, text and JSON, in-process and as a
real `python -m bot` subprocess whose errors mention the secrets."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.config import Settings
from bot.ops.logs import setup_logging
from tests.conftest import make_settings
from tests.fakes.loopback import free_port
from tests.fakes.ollama import FakeOllama
from tests.test_cli import base_env, run_bot

SECRETS = {
    "DISCORD_TOKEN": "MTIzNDU2Nzg5MDEyMzQ1Njc4.GaBcDe.sEcReT-dIsCoRd-ToKeN-0123456789abcdef",
    "FAL_KEY": "fal-key-id-42:fal-secret-9f8e7d6c5b4a",
    "MATRIX_ACCESS_TOKEN": "syt_bWltaQ_matrixSecretToken_1a2b3c",
    "MATRIX_PASSWORD": "correct-horse-battery-staple",
    "FLY_API_TOKEN": "FlyV1 fm2_flySecretMacaroon_abcdef0123",
}
URL_PASSWORD = "pg-pass-w0rd-xyz"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


def settings_with_secrets(tmp_path: Path, log_format: str) -> Settings:
    values = {name.lower(): value for name, value in SECRETS.items()}
    return make_settings(
        tmp_path,
        "postgresql://localhost/x",
        "http://127.0.0.1:9",
        log_file=True,
        log_format=log_format,
        log_level="DEBUG",
        matrix_homeserver="https://matrix.example.org",
        **values,
    )


def leak_attempts() -> None:
    """Errors and records that carry every secret in every place a record can hold text."""
    log = logging.getLogger("bot.test_logs")
    token = SECRETS["DISCORD_TOKEN"]
    log.error("login failed with token %s", token)
    log.warning("headers: %s", {"Authorization": f"Bot {token}", "fal": SECRETS["FAL_KEY"]})
    log.info("matrix login", extra={"password": SECRETS["MATRIX_PASSWORD"], "user": "@mimi:x"})
    try:
        raise RuntimeError(f"fly said no to {SECRETS['FLY_API_TOKEN']}")
    except RuntimeError:
        log.exception("wake failed for %s", SECRETS["MATRIX_ACCESS_TOKEN"])
    log.error("db at postgresql://bot:%s@db.internal:5432/bot is down", URL_PASSWORD)
    logging.getLogger("discord.http").warning("third-party library echoed %s", token)
    log.debug("stack", stack_info=True, extra={"ids": [SECRETS["FAL_KEY"]]})


def assert_clean(text: str) -> None:
    for name, secret in SECRETS.items():
        assert secret not in text, f"{name} leaked"
        for part in secret.split("."):
            if len(part) > 12:
                assert part not in text, f"part of {name} leaked"
    assert URL_PASSWORD not in text


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_secrets_are_redacted_on_stderr_and_in_the_file(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], restore_logging: None, log_format: str
) -> None:
    settings = settings_with_secrets(tmp_path, log_format)
    setup_logging(settings)
    leak_attempts()
    for handler in logging.getLogger().handlers:
        handler.flush()
    stderr = capfd.readouterr().err
    logfile = (settings.log_dir / "bot.log").read_text(encoding="utf-8")
    for text in (stderr, logfile):
        assert "login failed with token ***" in text
        assert "postgresql://bot:***@db.internal" in text
        assert "RuntimeError: fly said no to ***" in text, "tracebacks are redacted too"
        assert_clean(text)
    if log_format == "json":
        records = [json.loads(line) for line in stderr.splitlines() if line.strip()]
        assert {r["level"] for r in records} >= {"ERROR", "WARNING", "INFO", "DEBUG"}
        matrix = next(r for r in records if r["message"] == "matrix login")
        assert matrix["password"] == "***" and matrix["user"] == "@mimi:x"
        failed = next(r for r in records if r["message"].startswith("wake failed"))
        assert failed["logger"] == "bot.test_logs" and "Traceback" in failed["exception"]
        assert all(set(r) >= {"time", "level", "logger", "message"} for r in records)


async def test_a_failing_bot_run_logs_no_secret(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama
) -> None:
    """Real failures through the real CLI, every secret set, debug logs and prompts kept."""
    env = base_env(tmp_path, database_url, fake_ollama.url)
    env.update(SECRETS)
    env.update(
        LOG_FORMAT="json",
        LOG_LEVEL="DEBUG",
        LOG_FILE="true",
        LOG_PROMPTS="true",
        MATRIX_HOMESERVER="https://matrix.example.org",
        MATRIX_USER_ID="@mimi:example.org",
        OLLAMA_HOST=f"http://ollama:{URL_PASSWORD}@127.0.0.1:{free_port()}",
    )
    message = f"my fal key is {SECRETS['FAL_KEY']}, keep it safe"
    code, out, err = await run_bot("chat", "--user", "alice", "-m", message, env=env)
    assert code == 1, err
    logfile = (tmp_path / "data" / "logs" / "bot.log").read_text(encoding="utf-8")
    assert "nothing is listening" in err + logfile, "the failure itself is logged"
    for text in (out, err, logfile):
        assert_clean(text)
    lines = [json.loads(line) for line in logfile.splitlines() if line.strip()]
    assert lines and all("message" in line for line in lines)
