"""`doctor` on an OpenAI-compatible backend: its key and model ids are checked with
`GET /v1/models` (the real `openai` client against the fake server on loopback), and its row
says which persona models it can serve. The key never appears in the table."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.ops.diagnostics import Check, render
from bot.ops.doctor import diagnose
from tests.conftest import make_settings
from tests.fakes.loopback import dead_url
from tests.fakes.openai import FakeOpenAI

KEY = "sk-doctor-91b2c3"
KEY_ENV = "PERSONABOT_DOCTOR_KEY"
SERVED = "meta-llama/llama-3.2-3b-instruct"


def api(fake_url: str, models: dict[str, str]) -> dict[str, object]:
    return {
        "name": "api",
        "kind": "openai",
        "url": fake_url,
        "api_key_env": KEY_ENV,
        "models": models,
    }


async def test_doctor_checks_the_key_and_the_model_ids(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with FakeOpenAI(key=KEY, models=(SERVED, "qwen/qwen3-8b")) as fake:

        async def checks(models: dict[str, str], key: str | None) -> dict[str, Check]:
            if key is None:
                monkeypatch.delenv(KEY_ENV, raising=False)
            else:
                monkeypatch.setenv(KEY_ENV, key)
            settings = make_settings(
                tmp_path, database_url, dead_url(), backends=[api(fake.url, models)]
            )
            found = await diagnose(settings)
            assert KEY not in render(found)
            return {c.name: c for c in found}

        good = await checks({"llama3.2:3b": SERVED}, KEY)
        row = good["backend api"]
        assert row.status == "ok" and row.detail == "key accepted; serves llama3.2:3b"
        assert good["model llama3.2:3b"].status == "ok"

        refused = (await checks({"llama3.2:3b": SERVED}, "sk-wrong"))["backend api"]
        assert refused.status == "FAIL" and "refused the API key (HTTP 401)" in refused.detail
        assert KEY_ENV in refused.fix

        unset = (await checks({"llama3.2:3b": SERVED}, None))["backend api"]
        assert unset.status == "FAIL" and f"{KEY_ENV}, which is not set" in unset.detail

        typo = await checks({"llama3.2:3b": "meta-llama/llama-3.2-3b"}, KEY)
        assert typo["backend api"].status == "FAIL"
        assert "meta-llama/llama-3.2-3b (for llama3.2:3b)" in typo["backend api"].detail
        assert typo["model llama3.2:3b"].status == "FAIL"
