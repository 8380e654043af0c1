"""Fal's queue API through the official `fal-client`, and the download of what it drew.

    submit → status (IN_QUEUE with a position, IN_PROGRESS with logs, COMPLETED) → result

`fal_client` is imported lazily, on the first picture: it reads `FAL_RUN_HOST` and
`FAL_QUEUE_RUN_HOST` when imported, and a bot that never draws never loads it. Its errors, and
httpx's, are translated here into `ImageError`s whose messages are safe to show a user; the key
is handed to the client (`key=`), never to a log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from bot.errors import BotError
from bot.images.fetch import Downloaded, FetchFailed, fetch_picture

if TYPE_CHECKING:
    from fal_client import AsyncClient, AsyncRequestHandle

log = logging.getLogger(__name__)

Progress = Callable[[str], Awaitable[None]]

_MIN_START_TIMEOUT = 2.0  # seconds; fal-client refuses 1 s or less
_IMAGE_TYPES = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}


class ImageError(BotError):
    """A picture could not be made; `user_message` says why in plain words."""

    user_message = "I couldn't draw that just now. Please try again in a moment."
    fal_request_id: str | None = None  # Fal's id, when the request got as far as its queue
    billed = False  # Fal ran it (IN_PROGRESS or COMPLETED was seen): Fal bills it all the same

    def __init__(self, reason: str, user_message: str | None = None) -> None:
        super().__init__(reason)
        if user_message is not None:
            self.user_message = user_message


class ImageUnavailable(ImageError):
    user_message = "The image service isn't working right now. Please try again later."


class ImageTimeout(ImageError):
    user_message = "The image service took too long to draw that. Please try again later."


class ImageKeyRejected(ImageError):
    user_message = (
        "The image service refused my key, so I can't draw right now; an admin needs to "
        "check FAL_KEY."
    )


class ImageBalanceExhausted(ImageError):
    user_message = (
        "The image service account has run out of credit, so I can't draw right now; "
        "an admin needs to top it up."
    )


class ImageRefused(ImageError):
    user_message = "I can't draw that."


@dataclass(frozen=True)
class Drawn:
    """What Fal answered: the first image's address and size, its seed and its safety flag."""

    fal_request_id: str
    url: str
    width: int
    height: int
    seed: int
    nsfw: bool


class FalFlux:
    """One `fal_client.AsyncClient` for the bot's lifetime; `close()` ends its connections."""

    def __init__(
        self,
        key: str,
        *,
        timeout: float,
        poll_interval: float,
        download_timeout: float = 30.0,
        max_bytes: int = 20_000_000,
    ) -> None:
        self._key = key
        self._timeout = timeout
        self._poll_interval = poll_interval
        self._download_timeout = download_timeout
        self._max_bytes = max_bytes
        self._client: AsyncClient | None = None

    def _fal(self) -> AsyncClient:
        if self._client is None:
            import fal_client

            self._client = fal_client.AsyncClient(key=self._key, default_timeout=self._timeout)
        return self._client

    async def draw(
        self,
        model: str,
        arguments: dict[str, Any],
        progress: Progress | None,
        submitted: Progress | None = None,
    ) -> Drawn:
        """Submit, follow the queue until done, and return the result. Raises ImageError,
        with `billed` set when Fal had started running the request (its cancel only removes
        queued requests, so Fal bills a started one whatever becomes of it). `submitted` hears
        Fal's request id as soon as there is one."""
        handle: AsyncRequestHandle | None = None
        seen: set[str] = set()
        try:
            async with asyncio.timeout(self._timeout):
                # start_timeout: Fal drops a request that has not started by then, even if
                # our cancel below never reaches it.
                start_timeout = max(self._timeout, _MIN_START_TIMEOUT)
                handle = await self._fal().submit(model, arguments, start_timeout=start_timeout)
                log.info("fal request %s submitted to %s", handle.request_id, model)
                if submitted is not None:  # kept at once: a crash after this is billed
                    await submitted(handle.request_id)
                await _say(progress, "Sent to the image service…")
                await self._follow(handle, progress, seen)
                result = await handle.get(interval=self._poll_interval)
        except BaseException as exc:
            error = translate(exc)
            if handle is not None and "running" not in seen:
                await _cancel(handle)
            if error is None:
                raise
            if handle is not None:
                error.fal_request_id = handle.request_id
                error.billed = "running" in seen
            raise error from exc
        return parse_result(handle.request_id, result)

    async def _follow(
        self, handle: AsyncRequestHandle, progress: Progress | None, seen: set[str]
    ) -> None:
        from fal_client import Completed, InProgress, Queued

        last = ""
        async for status in handle.iter_events(with_logs=True, interval=self._poll_interval):
            if isinstance(status, Queued):
                text = f"Waiting in the image service's queue: {status.position} ahead of you…"
            elif isinstance(status, InProgress):
                seen.add("running")
                text = "Drawing…" + _last_log(status.logs)
            elif isinstance(status, Completed):
                if status.error:  # it failed at Fal: no picture, nothing billed per megapixel
                    seen.discard("running")
                    log.warning("fal request %s failed: %s", handle.request_id, status.error_type)
                    raise ImageUnavailable(f"fal reported {status.error_type or 'an error'}")
                seen.add("running")
                text = "Fetching the picture…"
            else:  # pragma: no cover - the client knows no other status
                continue
            if text != last:
                last = text
                await _say(progress, text)

    async def download(self, url: str) -> Downloaded:
        """The image bytes (Fal's addresses expire, so the file is kept). Raises ImageError."""
        try:
            return await fetch_picture(
                url, seconds=self._download_timeout, max_bytes=self._max_bytes, types=_IMAGE_TYPES
            )
        except FetchFailed as exc:
            error = ImageTimeout if exc.timed_out else ImageUnavailable
            raise error(f"the image from fal: {exc}") from exc

    async def close(self) -> None:
        """Close the client's connection pool (fal-client has no public close of its own)."""
        if self._client is None:
            return
        with contextlib.suppress(Exception):
            http = await self._client._client  # cached httpx.AsyncClient
            await http.aclose()
        self._client = None


def translate(exc: BaseException) -> ImageError | None:
    """Our error for a fal-client or httpx failure; None for what must propagate (cancel)."""
    import fal_client

    if isinstance(exc, ImageError):
        return exc
    if isinstance(exc, TimeoutError | fal_client.FalClientTimeoutError | httpx.TimeoutException):
        return ImageTimeout("fal did not finish in time")
    if isinstance(exc, fal_client.FalClientHTTPError):
        detail = " ".join(str(exc.message or "").split())[:200]  # Fal's words, shortened
        log.warning("fal answered HTTP %s (%s): %s", exc.status_code, exc.error_type, detail)
        return _http_error(exc.status_code, detail)
    if isinstance(exc, httpx.HTTPError | fal_client.FalClientError | OSError):
        return ImageUnavailable(f"fal could not be reached ({type(exc).__name__})")
    if isinstance(exc, KeyError | ValueError | TypeError):
        return ImageUnavailable(f"fal's answer could not be read ({type(exc).__name__})")
    return None


def _http_error(status: int, detail: str = "") -> ImageError:
    if status == 403 and "balance" in detail.lower():  # Fal's "Exhausted balance"
        return ImageBalanceExhausted(f"fal: {detail}")
    if status in (401, 403):
        return ImageKeyRejected(f"fal refused the key (HTTP {status})")
    if status in (400, 422):
        return ImageError(
            f"fal rejected the request (HTTP {status})",
            "The image service turned that request down. Try a different prompt?",
        )
    if status == 429:
        return ImageUnavailable(
            "fal is rate limiting us", "The image service is busy. Please try again in a minute."
        )
    return ImageUnavailable(f"fal answered HTTP {status}")


def parse_result(fal_request_id: str, result: dict[str, Any]) -> Drawn:
    try:
        first = result["images"][0]
        flags = result.get("has_nsfw_concepts") or [False]
        return Drawn(
            fal_request_id=fal_request_id,
            url=str(first["url"]),
            width=int(first["width"]),
            height=int(first["height"]),
            seed=int(result["seed"]),
            nsfw=bool(flags[0]),
        )
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ImageUnavailable(f"fal's result could not be read ({type(exc).__name__})") from exc


def _last_log(logs: list[dict[str, Any]] | None) -> str:
    """The newest log line, short and printable (Fal's logs are the model's, not ours)."""
    if not logs:
        return ""
    message = str(logs[-1].get("message", ""))
    clean = "".join(ch for ch in message if ch.isprintable()).strip()[:60]
    return f" ({clean})" if clean else ""


async def _say(progress: Progress | None, text: str) -> None:
    if progress is None:
        return
    try:
        await progress(text)
    except Exception:
        log.exception("progress callback failed")


async def _cancel(handle: AsyncRequestHandle) -> None:
    """Best effort: a request cancelled while still queued is never run, so never billed."""
    try:
        async with asyncio.timeout(5):
            await handle.cancel()
    except Exception as exc:
        log.info(
            "fal request %s could not be cancelled (%s)", handle.request_id, type(exc).__name__
        )
