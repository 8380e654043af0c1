"""A cast member's name and face on Matrix: MSC4144 per-message profiles, with their fallback.

A larger cast speaks from the bot's one account; each reply carries the persona in
`com.beeper.per_message_profile` (the MSC's unstable prefix, until `m.per_message_profile` is
accepted): `id` (the persona's name, so clients group its messages), `displayname`,
`avatar_url` (an mxc URI) and `has_fallback`. Clients without the MSC see the fallback the MSC
prescribes: the plain `body` starts with `{displayname}: `, and the `formatted_body` with
`<strong data-mx-profile-fallback>{displayname}: </strong>`. An edit carries the profile (and
the fallback) in `m.new_content`, as the MSC asks.

Avatars: Matrix profiles take only mxc URIs, so a persona's local picture (`avatar: mimi.png`
in the personas directory) is uploaded to the media repository once per process and its mxc URI
reused (a changed file is uploaded again). An https avatar is not fetched: the message goes
without `avatar_url` and clients show the bot's own avatar.
"""

from __future__ import annotations

import asyncio
import html
import logging
import mimetypes
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nio import AsyncClient, UploadResponse

from bot.core.personas import Persona, has_local_avatar

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
    """Local persona pictures uploaded to the media repository once; their mxc URIs."""

    def __init__(self, client: AsyncClient, personas_dir: Path) -> None:
        self.client = client
        self.personas_dir = personas_dir
        self._uploaded: dict[tuple[Path, int], str] = {}  # (file, mtime ns) → mxc URI
        self._lock = asyncio.Lock()

    async def face(self, persona: Persona) -> Face:
        return Face(persona.name, persona.display_name, await self.mxc(persona))

    async def mxc(self, persona: Persona) -> str | None:
        """The persona's avatar as an mxc URI; None for none, an https one or a failed upload."""
        if not has_local_avatar(persona):
            return None
        path = self.personas_dir / persona.avatar
        try:
            key = (path, path.stat().st_mtime_ns)
        except OSError:
            log.warning("the avatar %s of %s is missing", path, persona.name)
            return None
        async with self._lock:  # two replies at once upload it once
            if key not in self._uploaded:
                uri = await self._upload(path)
                if uri is None:
                    return None
                self._uploaded[key] = uri
            return self._uploaded[key]

    async def _upload(self, path: Path) -> str | None:
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        try:
            data = await asyncio.to_thread(path.read_bytes)
            response, _ = await self.client.upload(
                lambda *_: data, content_type=mime, filename=path.name, filesize=len(data)
            )
        except Exception:
            log.warning("uploading the avatar %s failed", path.name, exc_info=True)
            return None
        if not isinstance(response, UploadResponse):
            log.warning("uploading the avatar %s failed: %s", path.name, response)
            return None
        log.info("uploaded the avatar %s as %s", path.name, response.content_uri)
        return str(response.content_uri)
