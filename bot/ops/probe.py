"""`python -m bot healthcheck`, the container's HEALTHCHECK: ask the running bot's /healthz.

Standard library only, so the probe that runs every 30 seconds stays cheap.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

from bot.config import Settings

_ANY_ADDRESS = ("0.0.0.0", "::", "")  # noqa: S104 (the server's bind address, not ours)


def probe(settings: Settings, timeout: float = 4.0) -> int:
    """0 when /healthz answers 200; 1 otherwise. Its JSON (or the reason) goes to stdout."""
    host = "127.0.0.1" if settings.web_host in _ANY_ADDRESS else settings.web_host
    url = f"http://{host}:{settings.web_port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            sys.stdout.write(response.read().decode("utf-8", "replace").strip() + "\n")
            return 0
    except urllib.error.HTTPError as exc:
        sys.stdout.write(exc.read().decode("utf-8", "replace").strip() + "\n")
        return 1
    except (urllib.error.URLError, OSError) as exc:
        sys.stdout.write(f"unhealthy: {url} did not answer ({type(exc).__name__})\n")
        return 1
