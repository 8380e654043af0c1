"""/imagine end to end: the real fal-client over TLS to a fake Fal queue on loopback, the real
ledger on the embedded PostgreSQL, files on disk. The fake Fal's fixtures are in
tests/fal_fixtures.py (fal_client must not be imported before the fake starts).
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from bot.adapters.console import ConsoleChat
from bot.app import App
from bot.core.commands import CommandContext, CommandResult
from bot.core.prompts import user_seed
from bot.errors import BotError, CommandError
from bot.images.commands import parse_imagine_args
from bot.images.fal import (
    ImageBalanceExhausted,
    ImageKeyRejected,
    ImageRefused,
    ImageTimeout,
    ImageUnavailable,
)
from bot.images.presets import megapixels, with_style
from bot.images.store import ImageLimited
from bot.spend.ledger import BudgetExceeded
from tests.fakes.fal import FakeFal
from tests.fakes.ollama import FakeOllama
from tests.fal_fixtures import start_app
from tests.safety.llama_guard import read


@pytest.fixture
async def image_app(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama, fake_fal: FakeFal
) -> AsyncIterator[App]:
    async with await start_app(tmp_path, database_url, fake_ollama) as app:
        yield app


class Progress:
    def __init__(self) -> None:
        self.messages: list[str] = []

    async def __call__(self, text: str) -> None:
        self.messages.append(text)


def ctx(
    *, user: str = "alice", nsfw: bool = False, progress: Progress | None = None
) -> CommandContext:
    return CommandContext("test", "c1", user, user.title(), progress=progress, nsfw=nsfw)


async def imagine(app: App, *args: str, **kwargs: Any) -> CommandResult:
    return await app.commands.run(ctx(**kwargs), "imagine", list(args))


async def charged(app: App, user_key: str = "test:alice") -> Decimal:
    value = await app.pool.fetchval(
        "SELECT COALESCE(sum(cost), 0) FROM ledger WHERE user_key = $1 AND status <> 'released'",
        user_key,
    )
    return Decimal(value)


async def image_rows(app: App) -> list[dict[str, Any]]:
    return [dict(r) for r in await app.pool.fetch("SELECT * FROM images ORDER BY id")]


# -- the happy path ----------------------------------------------------------------------------


async def test_imagine_end_to_end(image_app: App, fake_fal: FakeFal) -> None:
    progress = Progress()
    result = await imagine(image_app, "a red fox in the snow", progress=progress)

    persona = await image_app.engine.persona_for("test", "c1")
    assert [s["endpoint"] for s in fake_fal.submissions] == ["fal-ai/flux/schnell"]
    sent = fake_fal.submissions[0]["arguments"]
    assert sent["prompt"] == with_style("a red fox in the snow", persona.image_style)
    if persona.image_style:
        assert persona.image_style.strip() in sent["prompt"]
    assert sent["seed"] == user_seed("test", "alice")
    assert sent["image_size"] == "square_hd"
    assert sent["enable_safety_checker"] is True
    assert sent["num_images"] == 1

    assert progress.messages[0] == "Sent to the image service…"
    assert "2 ahead of you" in progress.messages[1]
    assert "1 ahead of you" in progress.messages[2]
    assert any(m.startswith("Drawing…") and "step 1/4" in m for m in progress.messages)
    assert any("step 4/4" in m for m in progress.messages)
    assert progress.messages[-1] == "Fetching the picture…"
    assert len(progress.messages) == len(set(progress.messages)), "no repeated edits"

    assert result.attachment is not None and not result.spoiler
    assert result.attachment.parent == image_app.settings.data_dir / "images"
    assert result.attachment.read_bytes() == fake_fal.png
    assert result.attachment.read_bytes().startswith(b"\x89PNG")
    assert "a red fox in the snow" in result.text and "schnell" in result.text

    assert await charged(image_app) == Decimal("0.003")
    ledger = await image_app.pool.fetchrow("SELECT * FROM ledger WHERE kind = 'image'")
    assert ledger["status"] == "settled" and ledger["provider"] == "fal"
    assert ledger["model"] == "fal-ai/flux/schnell" and ledger["units"] == 1
    [row] = await image_rows(image_app)
    assert row["status"] == "ok" and row["prompt"] == "a red fox in the snow"
    assert row["seed"] == user_seed("test", "alice") and row["size"] == "square"
    assert row["cost"] == Decimal("0.003") and row["megapixels"] == 1
    assert row["width"] == 1024 and row["file_path"] == str(result.attachment)
    assert row["fal_request_id"] and row["fal_request_id"] in fake_fal.polls


async def test_size_model_and_seed_options(image_app: App, fake_fal: FakeFal) -> None:
    result = await imagine(image_app, "a lighthouse", "size:portrait", "model:dev", "seed:7")
    [submission] = fake_fal.submissions
    assert submission["endpoint"] == "fal-ai/flux/dev"
    assert submission["arguments"]["seed"] == 7
    assert submission["arguments"]["image_size"] == "portrait_4_3"
    assert "seed 7" in result.text and "portrait" in result.text
    assert await charged(image_app) == Decimal("0.025")  # 768x1024 rounds up to 1 MP


def test_parse_and_price_helpers() -> None:
    options = parse_imagine_args(["prompt:a cat", "on a mat", "size=landscape", "seed:3"])
    assert (options.prompt, options.size, options.seed) == ("a cat on a mat", "landscape", 3)
    assert parse_imagine_args(["a", "dog"]).size == "square"
    # The prompt is kept as written, and ordinary words are not options.
    assert parse_imagine_args(["prompt:E=mc2", "on a blackboard"]).prompt == (
        "E=mc2 on a blackboard"
    )
    assert parse_imagine_args(["E=mc2"]).prompt == "E=mc2"
    shoe = parse_imagine_args(["a", "shoe,", "size:", "10", "model=", "T"])
    assert (shoe.prompt, shoe.size, shoe.model) == ("a shoe, size: 10 model= T", "square", None)
    with pytest.raises(CommandError, match="what to draw"):
        parse_imagine_args(["size:square"])
    with pytest.raises(CommandError, match="Size must be one of"):
        parse_imagine_args(["a dog", "size:huge"])
    with pytest.raises(CommandError, match="Model must be one of"):
        parse_imagine_args(["a dog", "model:sdxl"])
    with pytest.raises(CommandError, match="long prompt"):
        parse_imagine_args(["a" * 1001])
    with pytest.raises(CommandError, match="whole number"):
        parse_imagine_args(["a dog", "seed:x"])
    assert megapixels(1024, 1024) == 1
    assert megapixels(1025, 1024) == 2  # rounded up to whole megapixels
    assert megapixels(512, 512) == 1
    assert with_style("a cat ", "") == "a cat"
    assert with_style("a cat", "watercolour") == "a cat, watercolour"


async def test_terminal_imagine_prints_the_path(image_app: App, fake_fal: FakeFal) -> None:
    out, err = io.StringIO(), io.StringIO()
    chat = ConsoleChat(image_app.engine, image_app.commands, user="alice", out=out, err=err)
    assert await chat.command("/imagine 'a paper boat' size:landscape")
    path = Path(out.getvalue().strip().splitlines()[-1])
    assert path.parent == image_app.settings.data_dir / "images"
    assert await asyncio.to_thread(path.read_bytes) == fake_fal.png
    assert "ahead of you" in err.getvalue() and "Drawing…" in err.getvalue()

    fake_fal.fail_submit = 500
    out.seek(0)
    out.truncate()
    assert not await chat.command("/imagine a sinking boat")
    assert out.getvalue() == ""
    assert err.getvalue().endswith(
        "[The image service isn't working right now. Please try again later.]\n"
    )


# -- money ---------------------------------------------------------------------------------------


async def test_budget_refusal_submits_nothing(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama, fake_fal: FakeFal
) -> None:
    caps = {"budget_user_caps": {"image": Decimal(1)}}
    async with await start_app(tmp_path, database_url, fake_ollama, **caps) as app:
        await imagine(app, "first picture")
        with pytest.raises(BudgetExceeded) as refused:
            await imagine(app, "second picture")
        assert "You've used your 1 images for this month" in refused.value.user_message
        assert len(fake_fal.submissions) == 1, "a refused request never reaches Fal"
        assert await charged(app) == Decimal("0.003")
        statuses = [r["status"] for r in await image_rows(app)]
        assert statuses == ["ok", "failed"]


async def test_global_budget_spent_refuses(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama, fake_fal: FakeFal
) -> None:
    budget = {"budget_monthly_usd": Decimal("0.001")}
    async with await start_app(tmp_path, database_url, fake_ollama, **budget) as app:
        with pytest.raises(BudgetExceeded, match="budget for this month is spent"):
            await imagine(app, "too dear")
        assert fake_fal.submissions == []
        assert await charged(app) == 0


@pytest.mark.parametrize(
    ("setup", "error", "words", "fal_billed"),
    [
        ("fail_submit", ImageUnavailable, "isn't working right now", False),
        ("fail_result", ImageUnavailable, "isn't working right now", True),
        ("fail_download", ImageUnavailable, "isn't working right now", True),
        ("hang", ImageTimeout, "took too long", False),
        ("hang_running", ImageTimeout, "took too long", True),
        ("complete_with_error", ImageUnavailable, "isn't working right now", False),
        # fal-client retries a 429 with back-off, so our deadline ends it: nothing was sent.
        ("rate_limited", ImageTimeout, "took too long", False),
    ],
)
async def test_failures_charge_the_member_nothing_and_book_what_fal_bills(
    tmp_path: Path,
    database_url: str,
    fake_ollama: FakeOllama,
    fake_fal: FakeFal,
    setup: str,
    error: type[BotError],
    words: str,
    fal_billed: bool,
) -> None:
    if setup in ("hang", "hang_running", "complete_with_error"):
        setattr(fake_fal, setup, True)
    elif setup == "rate_limited":
        fake_fal.fail_submit = 429
    else:
        setattr(fake_fal, setup, 500 if setup != "fail_download" else 404)
    async with await start_app(tmp_path, database_url, fake_ollama, image_timeout=0.5) as app:
        with pytest.raises(error) as failed:
            await imagine(app, "a doomed picture")
        assert words in failed.value.user_message
        assert "500" not in failed.value.user_message and "http" not in failed.value.user_message
        assert await charged(app) == 0
        ledger = await app.pool.fetch(
            "SELECT status, cost, user_key, request_id FROM ledger WHERE kind = 'image' ORDER BY id"
        )
        assert (ledger[0]["status"], ledger[0]["cost"]) == ("released", 0)
        if fal_billed:  # Fal ran it, so Fal bills it: booked, without the member
            assert [(r["status"], r["user_key"]) for r in ledger[1:]] == [("settled", None)]
            assert ledger[1]["cost"] == Decimal("0.003")
            assert ledger[1]["request_id"] == f"{ledger[0]['request_id']}:failed"
        else:
            assert len(ledger) == 1
        [row] = await image_rows(app)
        assert row["status"] == "failed" and row["cost"] == 0 and row["file_path"] is None
        assert not list((app.settings.data_dir / "images").glob("*"))
        if setup not in ("fail_submit", "rate_limited"):
            assert row["fal_request_id"] in fake_fal.polls, "Fal's id is kept for support"
            assert fake_fal.submissions[0]["start_timeout"] == "2.0"  # Fal's least
        if setup == "hang":
            assert fake_fal.cancels == [row["fal_request_id"]], "a timed-out request is cancelled"


async def test_an_exhausted_fal_balance_is_its_own_message(
    tmp_path: Path,
    database_url: str,
    fake_ollama: FakeOllama,
    fake_fal: FakeFal,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake_fal.exhausted_balance = True
    async with await start_app(tmp_path, database_url, fake_ollama) as app:
        with pytest.raises(ImageBalanceExhausted) as failed:
            await imagine(app, "a picture on credit")
        assert "run out of credit" in failed.value.user_message
        assert "Exhausted balance" in caplog.text  # Fal's own words reach the log
        assert await charged(app) == 0


async def test_bad_key_is_plain_and_never_logged(
    tmp_path: Path,
    database_url: str,
    fake_ollama: FakeOllama,
    fake_fal: FakeFal,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "wrong-key-d3adb33f"
    async with await start_app(tmp_path, database_url, fake_ollama, fal_key=secret) as app:
        with pytest.raises(ImageKeyRejected) as rejected:
            await imagine(app, "a locked door")
        assert "FAL_KEY" in rejected.value.user_message
        assert await charged(app) == 0
    assert fake_fal.submissions == [], "the fake refuses the key before taking the request"
    assert secret not in caplog.text


async def test_no_key_means_no_pictures(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama
) -> None:
    async with await start_app(tmp_path, database_url, fake_ollama, fal_key=None) as app:
        with pytest.raises(BotError) as off:
            await imagine(app, "anything")
        assert "FAL_KEY" in off.value.user_message
        assert await app.pool.fetchval("SELECT count(*) FROM ledger") == 0


# -- safety --------------------------------------------------------------------------------------


async def test_a_flagged_picture_is_a_black_square_refused_even_in_an_nsfw_channel(
    image_app: App, fake_fal: FakeFal
) -> None:
    fake_fal.nsfw = True
    with pytest.raises(ImageRefused) as refused:
        await imagine(image_app, "a bath painting", nsfw=True)
    assert "weren't charged" in refused.value.user_message
    assert fake_fal.submissions[0]["arguments"]["enable_safety_checker"] is True
    assert fake_fal.downloads == [], "the black square is not even fetched"
    assert await charged(image_app) == 0
    [row] = await image_rows(image_app)
    assert row["status"] == "refused_nsfw" and row["cost"] == 0


async def test_an_admin_may_turn_the_checker_off_in_nsfw_channels(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama, fake_fal: FakeFal
) -> None:
    from tests.fakes.fal import BLACK_PNG

    fake_fal.nsfw = True
    overrides = {"image_nsfw_safety_checker_off": True}
    async with await start_app(tmp_path, database_url, fake_ollama, **overrides) as app:
        result = await imagine(app, "a bath painting", nsfw=True)
        assert result.spoiler and result.attachment is not None
        assert result.attachment.read_bytes() != BLACK_PNG
        assert fake_fal.submissions[0]["arguments"]["enable_safety_checker"] is False
        assert await charged(app) == Decimal("0.003")
        # Elsewhere the checker stays on, and a flagged picture is refused.
        with pytest.raises(ImageRefused):
            await imagine(app, "a bath painting")
        assert fake_fal.submissions[1]["arguments"]["enable_safety_checker"] is True


async def test_flagged_picture_is_refused_elsewhere_and_not_charged(
    image_app: App, fake_fal: FakeFal
) -> None:
    fake_fal.nsfw = True
    with pytest.raises(ImageRefused) as refused:
        await imagine(image_app, "a bath painting")
    assert "can't post here" in refused.value.user_message
    assert "weren't charged" in refused.value.user_message
    assert fake_fal.downloads == [], "a refused picture is not even fetched"
    assert await charged(image_app) == 0, "the user is not charged"
    # Fal bills the flagged picture all the same: booked without a user, so the budget is true.
    booked = await image_app.pool.fetch(
        "SELECT user_key, status, cost, request_id FROM ledger WHERE kind = 'image' ORDER BY id"
    )
    assert [(r["user_key"], r["status"], r["cost"]) for r in booked] == [
        ("test:alice", "released", 0),
        (None, "settled", Decimal("0.003")),
    ]
    assert booked[1]["request_id"].endswith(":flagged")
    [row] = await image_rows(image_app)
    assert row["status"] == "refused_nsfw" and row["nsfw"] and row["cost"] == 0
    assert not list((image_app.settings.data_dir / "images").glob("*"))


async def test_guard_refused_prompt_never_reaches_fal(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama, fake_fal: FakeFal
) -> None:
    judged: list[str] = []

    async def llama_guard(body: dict[str, Any]) -> str:
        asked = read(str(body["prompt"]))  # the raw Llama Guard prompt, as the model reads it
        text = asked.judged if asked is not None else ""
        judged.append(text)
        return "unsafe\nS1" if "knife" in text else "safe"

    async with FakeOllama(models=["llama-guard3:1b"], responder=llama_guard) as guard:
        on = {"guard_enabled": True, "guard_host": guard.url, "guard_timeout": 2.0}
        async with await start_app(tmp_path, database_url, fake_ollama, **on) as app:
            with pytest.raises(ImageRefused) as refused:
                await imagine(app, "a knife fight in an alley")
            assert "can't draw that" in refused.value.user_message
            assert fake_fal.submissions == [], "a refused prompt never reaches Fal"
            assert await app.pool.fetchval("SELECT count(*) FROM ledger") == 0
            [row] = await image_rows(app)
            assert row["status"] == "refused_prompt" and row["cost"] == 0

            await imagine(app, "a kitten asleep on a rug")  # a safe prompt goes through
            assert len(fake_fal.submissions) == 1
            assert any("a knife fight" in text for text in judged)
            assert any("a kitten asleep" in text for text in judged)


async def test_a_guard_outage_is_not_called_against_the_rules(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama, fake_fal: FakeFal
) -> None:
    from tests.fakes.loopback import dead_url

    on = {"guard_enabled": True, "guard_host": dead_url(), "guard_timeout": 1.0}
    async with await start_app(tmp_path, database_url, fake_ollama, **on) as app:
        with pytest.raises(ImageUnavailable) as failed:  # platform "test": fails closed
            await imagine(app, "a kitten asleep on a rug")
        assert "can't check prompts right now" in failed.value.user_message
        assert "rules" not in failed.value.user_message
        assert fake_fal.submissions == [] and await charged(app) == 0


# -- limits --------------------------------------------------------------------------------------


async def test_rate_limit_per_user(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama, fake_fal: FakeFal
) -> None:
    limits = {"image_rate_per_minute": 1.0, "image_rate_burst": 1}
    async with await start_app(tmp_path, database_url, fake_ollama, **limits) as app:
        await imagine(app, "one")
        with pytest.raises(ImageLimited, match="rate limit") as limited:
            await imagine(app, "two")
        assert "wait a minute" in limited.value.user_message
        await imagine(app, "for bob", user="bob")  # another user has a bucket of their own
        assert len(fake_fal.submissions) == 2
        assert await charged(app) == Decimal("0.003")


async def test_monthly_cap_per_user(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama, fake_fal: FakeFal
) -> None:
    async with await start_app(tmp_path, database_url, fake_ollama, image_monthly_cap=2) as app:
        fake_fal.fail_submit = 500
        with pytest.raises(ImageUnavailable):
            await imagine(app, "failed ones do not count")
        fake_fal.fail_submit = None
        await imagine(app, "one")
        await imagine(app, "two")
        with pytest.raises(ImageLimited) as capped:
            await imagine(app, "three")
        assert "your 2 pictures for this month" in capped.value.user_message
        assert len(fake_fal.submissions) == 3


async def test_terminal_one_shot_imagine_as_a_user_runs_it(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama, fake_fal: FakeFal
) -> None:
    """`python -m bot chat -m "/imagine …"` in a subprocess: the path on stdout, progress on
    stderr; the fresh process imports fal_client with the fake's hosts from its environment."""
    from tests.test_cli import base_env, run_bot

    env = base_env(tmp_path, database_url, fake_ollama.url)
    env.update(
        FAL_KEY="test-key",
        FAL_RUN_HOST=fake_fal.host,
        FAL_QUEUE_RUN_HOST=fake_fal.host,
        SSL_CERT_FILE=str(fake_fal.cert),
        IMAGE_POLL_INTERVAL="0.01",
    )
    code, out, err = await run_bot(
        "chat", "--user", "alice", "-m", "/imagine a paper boat", env=env
    )
    assert code == 0, err
    text, path_line = out.strip().splitlines()
    assert "a paper boat" in text
    path = Path(path_line)
    assert path.parent == tmp_path / "data" / "images"
    assert await asyncio.to_thread(path.read_bytes) == fake_fal.png
    assert "[Waiting in the image service's queue: 2 ahead of you…]" in err
    assert fake_fal.submissions[0]["arguments"]["seed"] == user_seed("console", "alice")


async def test_monthly_cap_holds_under_concurrent_requests(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama, fake_fal: FakeFal
) -> None:
    async with await start_app(tmp_path, database_url, fake_ollama, image_monthly_cap=2) as app:
        outcomes = await asyncio.gather(
            *(imagine(app, f"picture {i}") for i in range(6)), return_exceptions=True
        )
        made = [o for o in outcomes if isinstance(o, CommandResult)]
        capped = [o for o in outcomes if isinstance(o, ImageLimited)]
        assert (len(made), len(capped)) == (2, 4), outcomes
        assert len(fake_fal.submissions) == 2
        assert await charged(app) == Decimal("0.006")


async def test_a_crash_mid_draw_leaves_nothing_counting(image_app: App) -> None:
    """What a process that died mid-draw leaves: `pending` rows and `reserved` ledger rows,
    one that Fal had accepted (it has Fal's request id) and one that never got there."""
    from datetime import timedelta

    app = image_app
    assert app.ledger is not None
    for rid, fal_id in (("img-accepted", "fal-123"), ("img-never-sent", None)):
        await app.pool.execute(
            "INSERT INTO images (request_id, fal_request_id, platform, user_key, conversation,"
            " persona, prompt, full_prompt, model, size, seed, megapixels)"
            " VALUES ($1, $2, 'test', 'test:alice', 'c1', 'aria', 'a cat', 'a cat',"
            " 'fal-ai/flux/schnell', 'square', 1, 1)",
            rid,
            fal_id,
        )
        await app.ledger.reserve(
            kind="image",
            provider="fal",
            model="fal-ai/flux/schnell",
            units=Decimal(1),
            request_id=rid,
            user_key="test:alice",
        )
    assert await charged(app) == Decimal("0.006")  # the crash's reservations count …
    assert await app.images.sweep(timedelta(hours=1)) == (0, 0)  # … until they are stale
    assert await app.images.sweep(timedelta(0)) == (1, 2)
    assert await charged(app) == 0
    rows = await app.pool.fetch("SELECT request_id, status, user_key, cost FROM ledger ORDER BY id")
    assert [(r["request_id"], r["status"], r["user_key"]) for r in rows] == [
        ("img-accepted", "released", "test:alice"),
        ("img-never-sent", "released", "test:alice"),
        ("img-accepted:swept", "settled", None),  # Fal's bill, booked without the member
    ]
    assert {r["status"] for r in await image_rows(app)} == {"failed"}
    assert await app.images.sweep(timedelta(0)) == (0, 0)
    assert "spend-sweep" in app.scheduler.jobs()
