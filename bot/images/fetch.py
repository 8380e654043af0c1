"""A picture fetched over https: what Fal drew (bot/images/fal.py), a persona's avatar given as
an https URL (bot/adapters/matrix/faces.py).

Its type comes from the answer's `Content-Type`, never from the address; anything bigger than
`max_bytes` is refused while it is read, not after; redirects are followed (Fal's CDN and most
image hosts redirect), to https only. Certificates are checked against certifi's store, or
`SSL_CERT_FILE` (httpx's own reading). A failure is a `FetchFailed` whose reason names what went
wrong, never the address (a signed URL's query is a credential) or the body.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import httpx

# The picture types a persona's avatar may have (bot/core/personas.py), by their MIME type.
PICTURE_TYPES: Mapping[str, str] = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/gif": ".gif",
    "image/webp": ".webp",
}


@dataclass(frozen=True)
class Downloaded:
    data: bytes
    suffix: str
    mime: str  # the answer's Content-Type


class FetchFailed(Exception):
    """A picture that could not be fetched; `timed_out` when the server was too slow."""

    def __init__(self, reason: str, *, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.timed_out = timed_out


async def fetch_picture(
    url: str,
    *,
    seconds: float,
    max_bytes: int,
    types: Mapping[str, str] = PICTURE_TYPES,
) -> Downloaded:
    """The picture at the https `url`, of one of `types` (MIME type → file suffix), waiting at
    most `seconds` for each step (the connection, each read)."""
    if not url.startswith("https://"):
        raise FetchFailed("the address is not https")
    try:
        async with (
            httpx.AsyncClient(timeout=httpx.Timeout(seconds), follow_redirects=True) as http,
            http.stream("GET", url) as response,
        ):
            if response.url.scheme != "https":
                raise FetchFailed("a redirect led away from https")
            if response.status_code != 200:
                raise FetchFailed(f"the server answered HTTP {response.status_code}")
            kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
            suffix = types.get(kind)
            if suffix is None:
                raise FetchFailed(f"the download was {kind or 'untyped'}, not a picture")
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data.extend(chunk)
                if len(data) > max_bytes:
                    raise FetchFailed(f"the download was larger than {max_bytes:,} bytes")
    except httpx.TimeoutException as exc:
        raise FetchFailed("the download timed out", timed_out=True) from exc
    except httpx.HTTPError as exc:
        raise FetchFailed(f"the download failed ({type(exc).__name__})") from exc
    return Downloaded(bytes(data), suffix, kind)
