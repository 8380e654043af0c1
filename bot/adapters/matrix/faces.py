"""A cast member's name and face on Matrix: MSC4144 per-message profiles, with their fallback.

A larger cast speaks from the bot's one account; each reply carries the persona in
`com.beeper.per_message_profile` (the MSC's unstable prefix, until `m.per_message_profile` is
accepted): `id` (the persona's name, so clients group its messages), `displayname`,
`avatar_url` (an mxc URI) and `has_fallback`. Clients without the MSC see the fallback the MSC
prescribes: the plain `body` starts with `{displayname}: `, and the `formatted_body` with
`<strong data-mx-profile-fallback>{displayname}: </strong>`. An edit carries the profile (and
the fallback) in `m.new_content`, as the MSC asks.

Avatars: Matrix profiles take only mxc URIs, so a persona's picture is uploaded to the media
repository, whether it is a file in the personas directory (`avatar: mimi.png`) or an https URL
(`avatar: https://…`, fetched once per process: a picture of at most 5 MB, its type from the
answer). What was uploaded is kept in Postgres by the SHA-256 of its bytes (`matrix_media`), so
a restart uses the same mxc URI again instead of uploading the picture anew; a changed picture
is uploaded once more. A picture that cannot be read, fetched or uploaded leaves the message
without `avatar_url` (clients show the bot's own avatar) and is tried again a minute later, not
on every reply.
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import logging
import mimetypes
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nio import AsyncClient, UploadResponse

from bot.adapters.matrix.state import MatrixState
from bot.core.personas import Persona, has_local_avatar
from bot.images.fetch import FetchFailed, fetch_picture

log = logging.getLogger(__name__)

PROFILE = "com.beeper.per_message_profile"  # MSC4144's unstable prefix
_HTML_FALLBACK = '<strong data-mx-profile-fallback="">{name}: </strong>'


@dataclass(frozen=True)
class Face:
    """Who a reply is from: `id` is the persona's name; `avatar_url` an mxc URI or None."""

    id: str
    displayname: str
    avatar_url: str | None = None

    def profile(self) -> dict[str, Any]:
        profile: dict[str, Any] = {
            "id": self.id,
            "displayname": self.displayname,
            "has_fallback": True,
        }
        if self.avatar_url:
            profile["avatar_url"] = self.avatar_url
        return profile


def dress(content: dict[str, Any], face: Face) -> dict[str, Any]:
    """`content` (a message's body and formatted body) under `face`: the profile and the
    MSC's fallback for clients without it. Returns a new dict."""
    dressed = dict(content)
    dressed["body"] = f"{face.displayname}: {content.get('body', '')}"
    formatted = content.get("formatted_body")
    if isinstance(formatted, str):
        fallback = _HTML_FALLBACK.format(name=html.escape(face.displayname))
        if formatted.startswith("<p>"):
            dressed["formatted_body"] = f"<p>{fallback}{formatted[3:]}"
        else:
            dressed["formatted_body"] = fallback + formatted
    dressed[PROFILE] = face.profile()
    return dressed


def profile_id(content: dict[str, Any]) -> str | None:
    """The per-message profile id of a message's content (the persona that wrote it)."""
    new = content.get("m.new_content")
    profile = (new if isinstance(new, dict) else content).get(PROFILE)
    if isinstance(profile, dict) and isinstance(profile.get("id"), str):
        return str(profile["id"])
    return None


def without_fallback(content: dict[str, Any], body: str) -> str:
    """`body` (of `content`) without the name fallback a per-message profile says it has."""
    profile = content.get(PROFILE)
    if isinstance(profile, dict) and profile.get("has_fallback"):
        prefix = f"{profile.get('displayname')}: "
        if body.startswith(prefix):
            return body[len(prefix) :].strip()
    return body.strip()


class Avatars:
    """Persona pictures uploaded to the media repository once; their mxc URIs."""

    def __init__(
        self,
        client: AsyncClient,
        personas_dir: Path,
        state: MatrixState | None = None,
        *,
        fetch_seconds: float = 10.0,
        max_bytes: int = 5_000_000,
        retry_after: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.personas_dir = personas_dir
        self.state = state  # uploads kept across restarts; None: for this process only
        self.fetch_seconds = fetch_seconds
        self.max_bytes = max_bytes
        self.retry_after = retry_after
        self._clock = clock
        # (file, its mtime ns) or (https URL, 0) → mxc URI
        self._uploaded: dict[tuple[str, int], str] = {}
        self._failed: dict[tuple[str, int], float] = {}  # → when it may be tried again
        self._lock = asyncio.Lock()

    async def face(self, persona: Persona) -> Face:
        return Face(persona.name, persona.display_name, await self.mxc(persona))

    async def mxc(self, persona: Persona) -> str | None:
        """The persona's avatar as an mxc URI; None for none, or one that could not be had."""
        key = self._key(persona)
        if key is None:
            return None
        found = self._uploaded.get(key)
        if found is not None or self._failed.get(key, 0.0) > self._clock():
            return found
        async with self._lock:  # two replies at once upload it once
            if key not in self._uploaded and self._failed.get(key, 0.0) <= self._clock():
                uri = await self._mxc_of(persona)
                if uri is None:
                    self._failed[key] = self._clock() + self.retry_after
                else:
                    self._uploaded[key] = uri
                    self._failed.pop(key, None)
            return self._uploaded.get(key)

    def _key(self, persona: Persona) -> tuple[str, int] | None:
        if not persona.avatar:
            return None
        if not has_local_avatar(persona):
            return (persona.avatar, 0)
        path = self.personas_dir / persona.avatar
        try:
            return (str(path), path.stat().st_mtime_ns)
        except OSError:
            log.warning("the avatar %s of %s is missing", path, persona.name)
            return None

    async def _mxc_of(self, persona: Persona) -> str | None:
        picture = await self._picture(persona)
        if picture is None:
            return None
        data, mime, name = picture
        digest = hashlib.sha256(data).hexdigest()
        if self.state is not None:
            try:
                kept = await self.state.media(digest)
            except Exception:
                log.warning("reading the uploaded avatars failed", exc_info=True)
                kept = None
            if kept is not None:
                return kept
        uri = await self._upload(data, mime, name)
        if uri is not None and self.state is not None:
            try:
                await self.state.save_media(digest, uri)
            except Exception:
                log.warning("keeping the avatar %s's upload failed", name, exc_info=True)
        return uri

    async def _picture(self, persona: Persona) -> tuple[bytes, str, str] | None:
        """The avatar's bytes, MIME type and file name; None when they cannot be had."""
        if has_local_avatar(persona):
            path = self.personas_dir / persona.avatar
            mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            try:
                return await asyncio.to_thread(path.read_bytes), mime, path.name
            except OSError:
                log.warning("the avatar %s of %s cannot be read", path, persona.name)
                return None
        try:
            fetched = await fetch_picture(
                persona.avatar, seconds=self.fetch_seconds, max_bytes=self.max_bytes
            )
        except FetchFailed as exc:  # its words never carry the URL (a query can be a key)
            log.warning("the avatar of %s could not be fetched: %s", persona.name, exc)
            return None
        return fetched.data, fetched.mime, f"{persona.name}{fetched.suffix}"

    async def _upload(self, data: bytes, mime: str, name: str) -> str | None:
        try:
            response, _ = await self.client.upload(
                lambda *_: data, content_type=mime, filename=name, filesize=len(data)
            )
        except Exception:
            log.warning("uploading the avatar %s failed", name, exc_info=True)
            return None
        if not isinstance(response, UploadResponse):
            log.warning("uploading the avatar %s failed: %s", name, response)
            return None
        log.info("uploaded the avatar %s as %s", name, response.content_uri)
        return str(response.content_uri)
