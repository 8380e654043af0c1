"""One logging setup: stderr at LOG_LEVEL, a file in DATA_DIR/logs at INFO, secrets redacted.

`LOG_FORMAT=json` writes one JSON object per line (time, level, logger, message, any `extra=`
fields such as user or conversation ids, and the traceback), for log collectors in production.
Redaction happens before formatting, on the message, the traceback and every extra field.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from bot.config import Settings

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_URL_PASSWORD = re.compile(r"(\w+://[^:/@\s]+:)[^@\s]+@")
_RECORD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",  # set by formatters that show the time
}


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
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        for key, value in _extras(record).items():
            setattr(record, key, self._redact_value(value))
        return True

    def _redact_value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, int | float | bool) or value is None:
            return value
        return self.redact(str(value))


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; fields given with `extra=` are kept as top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _extras(record).items():
            entry.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, ensure_ascii=False, default=str)


def _formatter(settings: Settings) -> logging.Formatter:
    return JsonFormatter() if settings.log_format == "json" else logging.Formatter(_FORMAT)


def setup_logging(settings: Settings, *, stderr_level: str | None = None) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    redactor = RedactingFilter(settings.secret_values())
    console = logging.StreamHandler(sys.stderr)
    console.setLevel((settings.log_level or stderr_level or "WARNING").upper())
    console.setFormatter(_formatter(settings))
    console.addFilter(redactor)
    root.addHandler(console)
    level = min(console.level, logging.INFO)
    if settings.log_file:
        settings.log_dir.mkdir(parents=True, exist_ok=True)
        file = logging.handlers.RotatingFileHandler(
            settings.log_dir / "bot.log", maxBytes=5_000_000, backupCount=3, encoding="utf-8"
        )
        file.setLevel(logging.DEBUG if settings.log_prompts else logging.INFO)
        file.setFormatter(_formatter(settings))
        file.addFilter(redactor)
        root.addHandler(file)
        level = min(level, file.level)
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "asyncio", "pgserver", "openai"):  # openai: prompts at DEBUG
        logging.getLogger(noisy).setLevel(logging.WARNING)
