"""The fake Fal for the real `fal-client`, shared by the image tests (registered in conftest).

`fal_client` reads FAL_RUN_HOST / FAL_QUEUE_RUN_HOST when first imported, so the session
fixture starts the fake, sets them, and only then lets anything import it (bot.images.service
imports
it lazily, on the first picture).
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.app import running_app
from tests.fakes.fal import FakeFal, make_certificate
from tests.fakes.ollama import FakeOllama


@pytest.fixture(scope="session")
async def fal_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FakeFal]:
    cert, key = make_certificate(tmp_path_factory.mktemp("fal-tls"))
    fake = FakeFal(cert, key)
    await fake.start()
    saved = {name: os.environ.get(name) for name in ("FAL_RUN_HOST", "FAL_QUEUE_RUN_HOST")}
    os.environ["FAL_RUN_HOST"] = fake.host
    os.environ["FAL_QUEUE_RUN_HOST"] = fake.host
    loaded = sys.modules.get("fal_client.client")
    if loaded is not None and fake.host not in loaded.QUEUE_URL_FORMAT:
        pytest.fail("fal_client was imported before the fake Fal started; it cannot reach it")
    try:
        yield fake
    finally:
        await fake.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def fake_fal(fal_server: FakeFal, monkeypatch: pytest.MonkeyPatch) -> FakeFal:
    """The session's fake, reset, with its certificate trusted (httpx reads SSL_CERT_FILE)."""
    fal_server.reset()
    monkeypatch.setenv("SSL_CERT_FILE", str(fal_server.cert))
    return fal_server


async def start_app(tmp_path: Path, database_url: str, ollama: FakeOllama, **overrides: Any) -> Any:
    """The app as production wires it, with pictures on (FAL_KEY) and fast, generous limits."""
    from tests.conftest import make_settings  # conftest registers these fixtures

    values: dict[str, Any] = {
        "fal_key": "test-key",
        "image_poll_interval": 0.01,
        "image_timeout": 10.0,
        "image_rate_per_minute": 600.0,
        "image_rate_burst": 100,
    }
    values.update(overrides)
    settings = make_settings(tmp_path, database_url, ollama.url, **values)
    return running_app(settings)
