"""One logging setup: stderr at LOG_LEVEL, a file in DATA_DIR/logs at INFO, secrets redacted."""

from __future__ import annotations

import logging
import logging.handlers
import re
import sys
from collections.abc import Iterable

from bot.config import Settings

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_URL_PASSWORD = re.compile(r"(\w+://[^:/@\s]+:)[^@\s]+@")


class RedactingFilter(logging.Filter):
    """Replaces every configured secret, and any password in a URL, with ***."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return _URL_PASSWORD.sub(r"\1***@", text)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg = self.redact(message)
        record.args = None
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        return True


def setup_logging(settings: Settings, *, stderr_level: str | None = None) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    redactor = RedactingFilter(settings.secret_values())
    console = logging.StreamHandler(sys.stderr)
    console.setLevel((settings.log_level or stderr_level or "WARNING").upper())
    console.setFormatter(logging.Formatter(_FORMAT))
    console.addFilter(redactor)
    root.addHandler(console)
    level = min(console.level, logging.INFO)
    if settings.log_file:
        settings.log_dir.mkdir(parents=True, exist_ok=True)
        file = logging.handlers.RotatingFileHandler(
            settings.log_dir / "bot.log", maxBytes=5_000_000, backupCount=3, encoding="utf-8"
        )
        file.setLevel(logging.DEBUG if settings.log_prompts else logging.INFO)
        file.setFormatter(logging.Formatter(_FORMAT))
        file.addFilter(redactor)
        root.addHandler(file)
        level = min(level, file.level)
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "asyncio", "pgserver"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
