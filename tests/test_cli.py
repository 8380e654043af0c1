"""`python -m bot ...` as a user runs it: a real subprocess against real Postgres and the fake."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from bot.config import REPO_ROOT
from tests.fakes.ollama import FakeOllama


async def run_bot(
    *args: str, env: dict[str, str], stdin: bytes | None = None, limit: float = 120
) -> tuple[int, str, str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA", "DATABASE"))}
    full_env.update(env)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        *args,
        cwd=REPO_ROOT,
        env=full_env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), limit)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def base_env(tmp_path: Path, database_url: str, ollama: str) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "OLLAMA_HOST": ollama,
        "DATA_DIR": str(tmp_path / "data"),
        "LOCAL_MODEL_ENABLED": "false",
        "MEMORY_ENABLED": "false",  # tests/memory/test_memory.py runs chat -m with memory on
        "GUARD_ENABLED": "false",  # tests/safety/test_guard.py runs chat -m with the guard on
    }


async def test_one_shot_prints_only_the_reply(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama
) -> None:
    fake_ollama.queue_reply("Hi Alice! Nice to meet you.")
    env = base_env(tmp_path, database_url, fake_ollama.url)
    code, out, err = await run_bot("chat", "--user", "alice", "-m", "hi", env=env)
    assert code == 0, err
    assert out == "Hi Alice! Nice to meet you.\n"
    assert "answered by llama3.2:3b on Ollama at 127.0.0.1" in err
    body = fake_ollama.chat_requests()[-1]
    assert body["messages"][-1]["content"] == "hi"


async def test_persona_flag_and_history_survive_between_runs(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama
) -> None:
    env = base_env(tmp_path, database_url, fake_ollama.url)
    fake_ollama.queue_reply("Noted.")
    code, _, err = await run_bot(
        "chat", "--persona", "sage", "--user", "bob", "-m", "I like tea", env=env
    )
    assert code == 0, err
    fake_ollama.queue_reply("You like tea.")
    code, _out, err = await run_bot("chat", "--user", "bob", "-m", "what do I like?", env=env)
    assert code == 0, err
    body = fake_ollama.chat_requests()[-1]
    assert "Sage" in body["messages"][0]["content"]
    assert [m["content"] for m in body["messages"][1:]] == [
        "I like tea",
        "Noted.",
        "what do I like?",
    ]


async def test_unknown_persona_is_a_clear_error(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama
) -> None:
    env = base_env(tmp_path, database_url, fake_ollama.url)
    code, out, err = await run_bot("chat", "--persona", "zed", "-m", "hi", env=env)
    assert code == 2 and out == ""
    assert "no persona called 'zed'" in err


async def test_no_model_exits_nonzero_with_a_sentence(tmp_path: Path, database_url: str) -> None:
    env = base_env(tmp_path, database_url, "http://127.0.0.1:9")
    code, out, err = await run_bot("chat", "-m", "hi", env=env)
    assert code == 1 and out == ""
    assert "my model isn't answering" in err
    assert "Traceback" not in err


async def test_interactive_session_with_commands(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama
) -> None:
    env = base_env(tmp_path, database_url, fake_ollama.url)
    fake_ollama.queue_reply("Meow, hello!")
    lines = b"/help\nhello\n/persona sage\n/reset\n"
    code, out, err = await run_bot("chat", "--user", "carol", env=env, stdin=lines)
    assert code == 0, err
    assert "Mimi:" in out and "Meow, hello!" in out
    assert "persona [NAME]" in out
    assert "Sage is here now" in out or "is here now" in out
    assert "Forgot this conversation" in out


async def test_migrate_twice(tmp_path: Path, database_url: str) -> None:
    env = base_env(tmp_path, database_url, "http://127.0.0.1:9")
    code, out, _ = await run_bot("migrate", env=env)
    assert code == 0 and "0001_init.sql" in out
    code, out, _ = await run_bot("migrate", env=env)
    assert code == 0 and "nothing to apply" in out


async def test_personas_check(tmp_path: Path) -> None:
    env = {"DATA_DIR": str(tmp_path)}
    code, out, _ = await run_bot("personas", "check", env=env)
    assert code == 0 and "ok  mimi" in out and "ok  sage" in out
    bad = tmp_path / "personas"
    bad.mkdir()
    (bad / "oops.yaml").write_text("name: oops\ndisplay_name: Oops\ntemperature: 9\n")
    code, out, _ = await run_bot("personas", "check", str(bad), env=env)
    assert code == 1
    assert "oops.yaml:3: temperature" in out


async def test_run_without_a_platform_says_what_to_set(tmp_path: Path, database_url: str) -> None:
    env = base_env(tmp_path, database_url, "http://127.0.0.1:9")
    code, _, err = await run_bot("run", env=env)
    assert code == 2
    assert "DISCORD_TOKEN" in err and "MATRIX_HOMESERVER" in err
    assert "Traceback" not in err
