"""Fal's own list of the requests it ran, checked against ours: every picture Fal bills is booked.

`fal-client` retries a submit whose connection broke (a reset, an ingress 502/503/504) up to ten
times by itself. When the first POST did reach Fal's queue, Fal runs and bills that request too,
and the bot never learns its id: only the retry's id comes back. Nothing on the submit path can
see it, so a scheduled job asks Fal's platform API which requests ran on our endpoints
(``GET /v1/models/requests/by-endpoint``: fal.ai/docs/platform-apis/v1/models/requests/
by-endpoint; items with ``request_id``, ``endpoint_id``, ``sent_at``, ``status_code`` and, with
``expand=payloads``, ``json_input``/``json_output``; pages through ``next_cursor``/``has_more``)
and books the ones it does not know.

A request Fal lists is ours when its input is one of our pictures (the same prompt with the
persona's style, the same seed) or, when Fal kept no payloads (``X-Fal-Store-IO`` off), when it
was sent while one of our pictures on that endpoint was being drawn. It is booked as a settled
row without a member (the member was charged once, for the picture they got), under
``fal:<Fal's id>``, so a second run books nothing twice. A request that matches none of ours
(the same Fal account used elsewhere) is logged, not booked. Only requests Fal answered with
success are billed (fal bills per megapixel of output).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx

from bot.config import Settings
from bot.images.presets import MODELS, megapixels
from bot.spend.ledger import Ledger

log = logging.getLogger(__name__)

LOOKBACK = timedelta(hours=24)  # Fal's list defaults to (and is cheapest over) the last day
_SLACK = timedelta(seconds=5)  # clock skew between us and Fal when matching by time
_PAGE = 100  # the API's largest page


@dataclass(frozen=True)
class FalRequest:
    """One request as Fal's platform API lists it."""

    request_id: str
    endpoint_id: str
    sent_at: datetime | None
    status_code: int | None
    json_input: dict[str, Any] | None
    json_output: dict[str, Any] | None

    @property
    def billed(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    def megapixels(self) -> int | None:
        """The output's size in whole megapixels, when Fal kept the output."""
        try:
            first = (self.json_output or {})["images"][0]
            return megapixels(int(first["width"]), int(first["height"]))
        except (KeyError, IndexError, TypeError, ValueError):
            return None


class FalRequestLog:
    """Reads Fal's platform API with the bot's key (handed to httpx, never to a log)."""

    def __init__(self, key: str, api_url: str, *, timeout: float = 30.0) -> None:
        self._key = key
        self._api_url = api_url.rstrip("/")
        self._timeout = timeout

    async def ran(self, endpoints: list[str], start: datetime, end: datetime) -> list[FalRequest]:
        """Every request on `endpoints` that ended in [start, end), all pages."""
        found: list[FalRequest] = []
        params: dict[str, Any] = {
            "endpoint_id": endpoints,
            "start": start.isoformat(),
            "end": end.isoformat(),
            "limit": _PAGE,
            "expand": "payloads",
        }
        headers = {"Authorization": f"Key {self._key}"}
        async with httpx.AsyncClient(timeout=self._timeout) as http:
            while True:
                response = await http.get(
                    f"{self._api_url}/models/requests/by-endpoint", params=params, headers=headers
                )
                response.raise_for_status()
                page = response.json()
                found.extend(_request(item) for item in page.get("items") or [])
                cursor = page.get("next_cursor")
                if not page.get("has_more") or not cursor:
                    return found
                params["cursor"] = cursor


class FalAudit:
    """The scheduled job: books what Fal ran for us that no ledger row covers."""

    def __init__(
        self, pool: Any, ledger: Ledger, requests: FalRequestLog, endpoints: list[str]
    ) -> None:
        self.pool = pool
        self.ledger = ledger
        self.requests = requests
        self.endpoints = endpoints

    async def run(self) -> int:
        """Book the unknown requests of the last day; returns how many were booked now."""
        end = self.ledger.now()
        start = end - LOOKBACK
        try:
            listed = await self.requests.ran(self.endpoints, start, end)
        except (httpx.HTTPError, KeyError, TypeError, ValueError) as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            log.warning(
                "could not read Fal's request list (%s%s); pictures are checked next time",
                type(exc).__name__,
                f", HTTP {status}" if status else "",
            )
            return 0
        ours = await self._pictures(start - LOOKBACK)
        known = {row["fal_request_id"] for row in ours if row["fal_request_id"]}
        booked = 0
        for item in listed:
            if not item.billed or item.request_id in known:
                continue
            row = _owner(item, ours, end)
            if row is None:
                log.info("fal request %s is not one of ours", item.request_id)
                continue
            if await self._book(item, row):
                booked += 1
        if booked:
            log.warning("booked %d picture(s) Fal ran that the bot never saw", booked)
        return booked

    async def _pictures(self, since: datetime) -> list[Any]:
        return list(
            await self.pool.fetch(
                "SELECT request_id, fal_request_id, model, full_prompt, seed, megapixels,"
                " created_at, finished_at, platform, guild, persona FROM images"
                " WHERE created_at >= $1",
                since,
            )
        )

    async def _book(self, item: FalRequest, row: Any) -> bool:
        booked = await self.ledger.record(
            kind="image",
            provider="fal",
            model=item.endpoint_id,
            units=Decimal(item.megapixels() or row["megapixels"]),
            request_id=f"fal:{item.request_id}",
            platform=row["platform"],
            guild=row["guild"],
            persona=row["persona"],
        )
        if booked:
            log.warning(
                "fal request %s was run for picture %s but never seen by the bot (a retried "
                "submit?); booked without a member",
                item.request_id,
                row["request_id"],
            )
        return booked


def _owner(item: FalRequest, ours: list[Any], now: datetime) -> Any | None:
    """Our picture this Fal request drew: by its input when Fal kept it, else by time."""
    same_endpoint = [row for row in ours if row["model"] == item.endpoint_id]
    if item.json_input is not None:
        for row in same_endpoint:
            if item.json_input.get("prompt") == row["full_prompt"] and _same_seed(item, row):
                return row
        return None
    if item.sent_at is None:
        return None
    for row in same_endpoint:
        until = row["finished_at"] or now
        if row["created_at"] - _SLACK <= item.sent_at <= until + _SLACK:
            return row
    return None


def _same_seed(item: FalRequest, row: Any) -> bool:
    seed = (item.json_input or {}).get("seed")
    return seed is None or str(seed) == str(row["seed"])


def _request(item: dict[str, Any]) -> FalRequest:
    sent = item.get("sent_at")
    return FalRequest(
        request_id=str(item["request_id"]),
        endpoint_id=str(item.get("endpoint_id", "")),
        sent_at=datetime.fromisoformat(sent.replace("Z", "+00:00")) if sent else None,
        status_code=item.get("status_code"),
        json_input=item.get("json_input") if isinstance(item.get("json_input"), dict) else None,
        json_output=item.get("json_output") if isinstance(item.get("json_output"), dict) else None,
    )


def build_fal_audit(settings: Settings, pool: Any, ledger: Ledger) -> FalAudit | None:
    """The audit job as configured: none without FAL_KEY or with FAL_AUDIT_INTERVAL=0."""
    key = settings.fal_key.get_secret_value() if settings.fal_key is not None else ""
    if not key or settings.fal_audit_interval <= 0:
        return None
    requests = FalRequestLog(key, settings.fal_api_url)
    return FalAudit(pool, ledger, requests, sorted(set(MODELS.values())))
