"""Pictures: /imagine through Fal Flux, with limits, the guard, the ledger and a record of each.

    limits (rate, monthly cap) → guard's check of the prompt → ledger.reserve
      → Fal queue (bot/images/fal.py: submit, position/progress, result) → safety flag
      → download (Fal's addresses expire) → file in DATA_DIR/images → ledger.settle

Any failure after the reservation releases it, so a failed picture costs the member nothing.
What Fal bills all the same (it ran: a download or result that fails after COMPLETED, a time-out
while IN_PROGRESS, a flagged picture) is booked as a settled row without a member
(`<request id>:failed`, `:flagged`), so the month's spend matches Fal's invoice.
Every request leaves a row in `images` (prompt, seed, model, size, cost, outcome).

Flagged pictures (`has_nsfw_concepts`): Fal's safety checker replaces them with a black square,
so they are refused everywhere. Fal bills a flagged picture all the same, so a refused one is
released from the member's reservation (the member is not charged and it does not count
against their cap) and the money is booked without a member, so the budget matches Fal's bill.
With IMAGE_NSFW_SAFETY_CHECKER_OFF an admin turns the checker off in channels marked NSFW:
there pictures are drawn unchecked and always posted spoilered.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from bot.config import Settings
from bot.core.events import user_key
from bot.core.personas import Persona
from bot.core.prompts import user_seed
from bot.errors import CommandError
from bot.images.fal import Drawn, FalFlux, ImageError, ImageRefused, ImageUnavailable, Progress
from bot.images.presets import MODELS, SIZES, USAGE, megapixels, with_style
from bot.images.store import ImageLimited, ImageStore
from bot.safety.guard import Guard
from bot.spend.ledger import Ledger
from bot.spend.ratelimit import RateLimiter

log = logging.getLogger(__name__)

SWEEP_AFTER = timedelta(minutes=30)  # longer than any draw and download


@dataclass(frozen=True)
class ImageRequest:
    platform: str
    conversation: str
    author_id: str
    prompt: str
    persona: Persona
    size: str = "square"
    model: str | None = None
    seed: int | None = None
    nsfw_allowed: bool = False  # the channel is marked NSFW: flagged pictures are spoilered
    guild: str | None = None
    progress: Progress | None = None

    @property
    def user_key(self) -> str:
        return user_key(self.platform, self.author_id)


@dataclass(frozen=True)
class ImageResult:
    path: Path
    spoiler: bool
    prompt: str  # with the persona's style
    model: str
    size: str
    width: int
    height: int
    seed: int
    megapixels: int
    cost: Decimal
    request_id: str


@dataclass
class _Job:
    request_id: str
    model: str
    size: str
    full_prompt: str
    seed: int
    units: int
    unit_price: Decimal = Decimal(0)  # from the ledger's price table, at reservation
    fal_request_id: str | None = None
    reserved: bool = field(default=False)
    finished: bool = field(default=False)  # its row in `images` has its outcome
    platform: str | None = None
    guild: str | None = None
    persona: str | None = None
    billed_units: int | None = None  # Fal drew it (so bills it) and it is not yet booked


class ImageService:
    def __init__(
        self,
        pool: Any,
        *,
        fal: FalFlux | None,
        ledger: Ledger,
        image_dir: Path,
        default_model: str = "schnell",
        monthly_cap: int = 0,
        rate: RateLimiter | None = None,
        guard: Guard | None = None,
        checker_off_in_nsfw: bool = False,
    ) -> None:
        self.store = ImageStore(pool)
        self.checker_off_in_nsfw = checker_off_in_nsfw
        self.fal = fal
        self.ledger = ledger
        self.image_dir = image_dir
        self.default_model = MODELS.get(default_model, default_model)
        self.monthly_cap = monthly_cap
        self.rate = rate
        self.guard = guard

    @property
    def configured(self) -> bool:
        return self.fal is not None

    async def generate(self, request: ImageRequest) -> ImageResult:
        """Draw one picture and keep it as a file. Raises BotErrors with plain messages."""
        if self.fal is None:
            raise ImageError(
                "FAL_KEY is not set", "Pictures aren't set up here: an admin needs to set FAL_KEY."
            )
        job = self._job(request)
        if self.rate is not None and not await self.rate.allow(f"image:{request.user_key}"):
            raise ImageLimited(f"{request.user_key} hit the image rate limit")
        await self.store.open(self._row(request, job), self.monthly_cap)
        try:
            await self._check_prompt(request, job)
            await self._reserve(request, job)
            return await self._draw(self.fal, request, job)
        except BaseException as exc:
            await self._fail(job, exc)
            raise

    async def sweep(self, older_than: timedelta = SWEEP_AFTER) -> tuple[int, int]:
        """A crash mid-draw leaves nothing counting: `pending` rows older than `older_than`
        become `failed` ("abandoned"), and the ledger's reservations that old are released;
        those Fal had accepted (it has a request id for them) are booked as Fal's bill, without
        the member. A scheduled job. Returns the ledger's (booked, released)."""
        before = self.ledger.now() - older_than
        abandoned = await self.store.abandon(before)
        if abandoned:
            log.warning("%d pictures were left pending by a crash; marked failed", abandoned)
        return await self.ledger.expire_reservations(before, billed=self.store.submitted)

    async def close(self) -> None:
        if self.fal is not None:
            await self.fal.close()

    def _job(self, request: ImageRequest) -> _Job:
        model = MODELS.get(request.model or "", request.model or self.default_model)
        if model not in MODELS.values():
            raise CommandError(f"Model must be one of {', '.join(MODELS)}. Usage: {USAGE}")
        if request.size not in SIZES:
            raise CommandError(f"Size must be one of {', '.join(SIZES)}. Usage: {USAGE}")
        preset = SIZES[request.size]
        seed = request.seed
        if seed is None:
            seed = user_seed(request.platform, request.author_id)
        return _Job(
            request_id=f"img-{uuid.uuid4().hex}",
            model=model,
            size=request.size,
            full_prompt=with_style(request.prompt, request.persona.image_style),
            seed=seed,
            units=megapixels(preset.width, preset.height),
            platform=request.platform,
            guild=request.guild,
            persona=request.persona.name,
        )

    def _row(self, request: ImageRequest, job: _Job) -> dict[str, Any]:
        return {
            "request_id": job.request_id,
            "platform": request.platform,
            "user_key": request.user_key,
            "conversation": request.conversation,
            "guild": request.guild,
            "persona": request.persona.name,
            "prompt": request.prompt,
            "full_prompt": job.full_prompt,
            "model": job.model,
            "size": job.size,
            "seed": job.seed,
            "megapixels": job.units,
        }

    async def _check_prompt(self, request: ImageRequest, job: _Job) -> None:
        if self.guard is None:
            return
        verdict = await self.guard.check_image_prompt(
            job.full_prompt,
            persona=request.persona,
            platform=request.platform,
            conversation=request.conversation,
            user_key=request.user_key,
            nsfw=request.nsfw_allowed,
        )
        if not verdict.safe:  # blocked, or no verdict under a closed fail policy
            log.warning(
                "image prompt %s from %s refused by the guard (%s)",
                job.request_id,
                request.user_key,
                ",".join(verdict.blocking) or verdict.reason or "no verdict",
            )
            if verdict.unknown:  # the guard is down or too slow: say so, blame nobody
                raise ImageUnavailable(
                    "the guard gave no verdict",
                    "I can't check prompts right now, so I can't draw. Please try again later.",
                )
            raise ImageRefused(
                "the guard refused the prompt", "I can't draw that: it's against the rules here."
            )

    async def _reserve(self, request: ImageRequest, job: _Job) -> None:
        reservation = await self.ledger.reserve(
            kind="image",
            provider="fal",
            model=job.model,
            units=Decimal(job.units),
            request_id=job.request_id,
            user_key=request.user_key,
            platform=request.platform,
            guild=request.guild,
            persona=request.persona.name,
        )
        job.reserved = True
        job.unit_price = reservation.unit_price

    async def _draw(self, fal: FalFlux, request: ImageRequest, job: _Job) -> ImageResult:
        # Fal's safety checker answers a flagged picture with a black one: it is refused
        # everywhere, unless an admin turned the checker off for channels marked NSFW.
        checker = not (request.nsfw_allowed and self.checker_off_in_nsfw)
        arguments = {
            "prompt": job.full_prompt,
            "image_size": SIZES[job.size].fal_name,
            "seed": job.seed,
            "num_images": 1,
            "enable_safety_checker": checker,
        }

        async def submitted(fal_request_id: str) -> None:
            job.fal_request_id = fal_request_id
            await self.store.submitted_as(job.request_id, fal_request_id)

        drawn = await fal.draw(job.model, arguments, request.progress, submitted)
        job.fal_request_id = drawn.fal_request_id
        units = megapixels(drawn.width, drawn.height)
        job.billed_units = units  # Fal has drawn it: from here on Fal bills it, whatever happens
        if drawn.nsfw and checker:
            await self._refuse_flagged(request, job, drawn, units)
        image = await fal.download(drawn.url)
        path = self.image_dir / f"{job.request_id}{image.suffix}"
        await asyncio.to_thread(_write, path, image.data)
        return await self._keep(request, job, drawn, path, spoiler=drawn.nsfw or not checker)

    async def _keep(
        self, request: ImageRequest, job: _Job, drawn: Drawn, path: Path, *, spoiler: bool
    ) -> ImageResult:
        """The picture is on disk: charge the member and close its row."""
        units = job.billed_units or job.units
        cost = units * job.unit_price
        await self.ledger.settle(job.request_id, Decimal(units))
        job.reserved = False
        job.billed_units = None  # booked, to the member
        await self.store.finish(
            job.request_id,
            "ok",
            fal_request_id=drawn.fal_request_id,
            width=drawn.width,
            height=drawn.height,
            megapixels=units,
            cost=cost,
            nsfw=drawn.nsfw,
            spoiler=spoiler,
            file_path=str(path),
        )
        job.finished = True
        log.info(
            "image %s for %s: %s, %d MP, $%s",
            job.request_id,
            request.user_key,
            job.model,
            units,
            cost,
        )
        return ImageResult(
            path=path,
            spoiler=spoiler,
            prompt=job.full_prompt,
            model=job.model,
            size=job.size,
            width=drawn.width,
            height=drawn.height,
            seed=drawn.seed,
            megapixels=units,
            cost=cost,
            request_id=job.request_id,
        )

    async def _refuse_flagged(
        self, request: ImageRequest, job: _Job, drawn: Drawn, units: int
    ) -> None:
        """Not posted, not charged to the user; Fal's bill for it is booked without a user."""
        await self._release(job)
        await self._book_unbilled(job, units, "flagged")
        job.billed_units = None  # booked
        await self.store.finish(
            job.request_id,
            "refused_nsfw",
            fal_request_id=drawn.fal_request_id,
            width=drawn.width,
            height=drawn.height,
            nsfw=True,
            error="flagged by Fal's safety checker",
        )
        job.finished = True
        raise ImageRefused(
            "fal flagged the picture",
            "That picture came out as something I can't post here, so I didn't. "
            "You weren't charged for it.",
        )

    async def _book_unbilled(self, job: _Job, units: int, why: str) -> None:
        """Fal's bill for a picture the member was not charged for: a settled row without a
        user, so the month's spend still matches Fal's invoice."""
        await self.ledger.record(
            kind="image",
            provider="fal",
            model=job.model,
            units=Decimal(units),
            request_id=f"{job.request_id}:{why}",
            unit_price=job.unit_price,
            platform=job.platform,
            guild=job.guild,
            persona=job.persona,
        )

    async def _release(self, job: _Job) -> None:
        if job.reserved:
            await self.ledger.release(job.request_id)
        job.reserved = False

    async def _fail(self, job: _Job, exc: BaseException) -> None:
        try:
            await self._release(job)
            if job.billed_units is None and isinstance(exc, ImageError) and exc.billed:
                job.billed_units = job.units  # it ran at Fal (a time-out while drawing, …)
            if job.billed_units is not None:
                await self._book_unbilled(job, job.billed_units, "failed")
        finally:
            if not job.finished:
                status = "refused_prompt" if isinstance(exc, ImageRefused) else "failed"
                fal_id = job.fal_request_id
                if fal_id is None and isinstance(exc, ImageError):
                    fal_id = exc.fal_request_id
                await self.store.finish(
                    job.request_id, status, error=type(exc).__name__, fal_request_id=fal_id
                )
                job.finished = True


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def build_images(
    settings: Settings, pool: Any, ledger: Ledger, guard: Guard | None = None
) -> ImageService:
    """The image service as configured; without FAL_KEY it answers that pictures are off."""
    fal = None
    if settings.fal_key is not None and settings.fal_key.get_secret_value():
        fal = FalFlux(
            settings.fal_key.get_secret_value(),
            timeout=settings.image_timeout,
            poll_interval=settings.image_poll_interval,
            download_timeout=settings.image_download_timeout,
            max_bytes=settings.image_max_bytes,
        )
    return ImageService(
        pool,
        fal=fal,
        ledger=ledger,
        image_dir=settings.data_dir / "images",
        default_model=settings.image_default_model,
        monthly_cap=settings.image_monthly_cap,
        rate=RateLimiter(pool, settings.image_rate_per_minute, settings.image_rate_burst),
        guard=guard,
        checker_off_in_nsfw=settings.image_nsfw_safety_checker_off,
    )
