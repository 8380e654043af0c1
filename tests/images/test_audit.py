"""The Fal audit: requests Fal ran that the bot never saw are booked, once, without a member.

The real fal-client retries a submit whose connection broke after Fal's queue took it (the fake's
`drop_accepted`); Fal runs both requests and bills both, and only the retry's id reaches us.
The audit reads Fal's platform API (the fake's ``/v1/models/requests/by-endpoint``) with the
production builder and the app's own settings.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from bot.app import App
from bot.core.commands import CommandContext
from bot.images.audit import FalAudit, build_fal_audit
from bot.images.fal import ImageUnavailable
from tests.fakes.fal import FakeFal, _Request
from tests.fakes.ollama import FakeOllama
from tests.fal_fixtures import start_app


@pytest.fixture
async def app(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama, fake_fal: FakeFal
) -> AsyncIterator[App]:
    api = f"https://{fake_fal.host}/v1"
    async with await start_app(tmp_path, database_url, fake_ollama, fal_api_url=api) as app:
        yield app


def audit_of(app: App) -> FalAudit:
    assert app.ledger is not None
    audit = build_fal_audit(app.settings, app.pool, app.ledger)
    assert audit is not None
    return audit


async def imagine(app: App, prompt: str) -> None:
    await app.commands.run(CommandContext("test", "c1", "alice", "Alice"), "imagine", [prompt])


async def image_ledger(app: App) -> list[dict[str, Any]]:
    rows = await app.pool.fetch(
        "SELECT request_id, status, user_key, units, cost, persona FROM ledger"
        " WHERE kind = 'image' ORDER BY id"
    )
    return [dict(r) for r in rows]


async def test_a_submit_fal_client_retried_is_booked_once_without_the_member(
    app: App, fake_fal: FakeFal
) -> None:
    fake_fal.drop_accepted = 1
    await imagine(app, "a lighthouse at dusk")
    first, retry = (s["arguments"] for s in fake_fal.submissions)
    assert first == retry, "fal-client sent the same POST twice"
    [picture] = await app.pool.fetch("SELECT request_id, fal_request_id FROM images")
    unseen = next(r for r in fake_fal._requests if r != picture["fal_request_id"])
    before = await image_ledger(app)
    assert [(r["status"], r["user_key"]) for r in before] == [("settled", "test:alice")]

    assert await audit_of(app).run() == 1
    after = await image_ledger(app)
    assert after[:1] == before, "the member is charged once, for the picture they got"
    booked = after[1]
    assert booked["request_id"] == f"fal:{unseen}"
    assert (booked["status"], booked["user_key"], booked["persona"]) == ("settled", None, "mimi")
    assert booked["cost"] == before[0]["cost"] > 0, "Fal bills the duplicate like the picture"

    assert await audit_of(app).run() == 0, "a second run books nothing twice"
    assert len(await image_ledger(app)) == 2
    assert "fal-audit" in app.scheduler.jobs()


async def test_without_payloads_a_request_sent_while_drawing_is_ours(
    app: App, fake_fal: FakeFal
) -> None:
    fake_fal.drop_accepted = 1
    fake_fal.store_payloads = False  # the account keeps no payloads: matched by time
    await imagine(app, "a quiet harbour")
    assert await audit_of(app).run() == 1
    [_, booked] = await image_ledger(app)
    assert booked["user_key"] is None and booked["units"] == Decimal(1)


async def test_requests_that_are_not_ours_or_not_billed_are_left_alone(
    app: App, fake_fal: FakeFal
) -> None:
    await imagine(app, "a red kite")
    # the same Fal account drew something else (another tool using the key) …
    fake_fal._requests["foreign"] = _Request(
        "foreign", "fal-ai/flux", "fal-ai/flux/schnell", {"prompt": "a tractor", "seed": 7}, []
    )
    assert await audit_of(app).run() == 0
    # … and a request that failed at Fal is not billed even when it was ours
    fake_fal.drop_accepted = 1
    fake_fal.complete_with_error = True
    with pytest.raises(ImageUnavailable):
        await imagine(app, "a doomed red kite")
    assert await audit_of(app).run() == 0
    assert all(r["user_key"] == "test:alice" for r in await image_ledger(app))


async def test_every_page_of_fal_s_list_is_read(app: App, fake_fal: FakeFal) -> None:
    await imagine(app, "a field of poppies")
    [submitted] = fake_fal.submissions
    for n in range(130):  # more than one page (at most 100 a page)
        rid = f"retried-{n}"
        fake_fal._requests[rid] = _Request(
            rid, "fal-ai/flux", submitted["endpoint"], submitted["arguments"], []
        )
    assert await audit_of(app).run() == 130


async def test_an_unreadable_list_books_nothing_and_never_logs_the_key(
    app: App, fake_fal: FakeFal, caplog: pytest.LogCaptureFixture
) -> None:
    fake_fal.drop_accepted = 1
    await imagine(app, "a windmill")
    fake_fal.key = "another-key"  # Fal now refuses ours
    with caplog.at_level(logging.INFO):
        assert await audit_of(app).run() == 0
    assert "HTTP 401" in caplog.text and "test-key" not in caplog.text
    fake_fal.key = "test-key"
    assert await audit_of(app).run() == 1, "the next run catches up"


async def test_the_audit_is_off_without_a_key_or_with_interval_zero(app: App) -> None:
    assert app.ledger is not None
    settings = app.settings.model_copy(update={"fal_audit_interval": 0})
    assert build_fal_audit(settings, app.pool, app.ledger) is None
    settings = app.settings.model_copy(update={"fal_key": None})
    assert build_fal_audit(settings, app.pool, app.ledger) is None
