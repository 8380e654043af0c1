"""Llama Guard 3 through Ollama: a verdict for every message in and every reply out.

    verdict = await guard.check("input", text, persona=persona, platform="discord", ...)
    verdict = await guard.check_image_prompt(prompt, persona=persona, platform="matrix", ...)

`Verdict.safe` is the decision, after the persona's policy, the channel's NSFW flag and the fail
policy: True means the text may go on. `Verdict.categories` is what the model named.

How the model is asked. Ollama's llama-guard3 template ends with "Provide your safety assessment
for ONLY THE LAST User message" whatever the last role is (ollama/ollama issue 11440), so a
reply sent as the assistant's turn would be judged on the user's words instead. Every check
therefore sends exactly one message, role `user`, holding exactly the text to judge: the
template then judges that text, whether or not Ollama ever fixes the template to name the
role. The hazard taxonomy is the same for prompts and responses, so nothing is lost.

The answer is parsed strictly: `safe`, or `unsafe` and one line of codes S1 to S14 (`S1,S10`).
Anything else, like no answer within `timeout` seconds or an unreachable server, is an
unknown verdict, decided by the platform's fail policy: `closed` refuses, `open` lets it
through and says so. Every verdict is recorded in `moderation_verdicts`, every call in
`model_calls` (purpose `moderation`), in the background; `drain()` waits for those writes.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import httpx
import ollama

from bot.brains.base import CallStats, ChatRequest
from bot.brains.ollama_brain import OLLAMA_ERRORS, call_stats, failure_reason, redact_host
from bot.core.background import Background
from bot.core.calls import CallContext, CallLog
from bot.core.personas import Persona
from bot.ops.notify import AdminNotifier
from bot.safety.categories import CATEGORIES, CHILD_EXPLOITATION, SEXUAL_CONTENT, describe

log = logging.getLogger(__name__)

# Ollama's failures, and an answer whose shape pydantic rejects (a ValueError).
_GUARD_ERRORS: tuple[type[BaseException], ...] = (*OLLAMA_ERRORS, ValueError)

Kind = Literal["input", "output", "image_prompt"]
FailPolicy = Literal["open", "closed"]

_CODES_LINE = re.compile(r"S\d{1,2}(?:\s*,\s*S\d{1,2})*")
_MAX_VERDICT_TOKENS = 48  # "unsafe" and all fourteen codes fit
_GUARD_CONTEXT = 8192


def parse_verdict(raw: str) -> tuple[bool, list[str]] | None:
    """'safe' → (True, []); 'unsafe\\nS1,S10' → (False, ['S1', 'S10']); anything else → None.

    Surrounding whitespace is tolerated (the model often starts with a blank line); a second
    line with anything but known codes, a missing category line, or extra lines are not.
    """
    lines = [line.strip() for line in raw.strip().splitlines()]
    if lines == ["safe"]:
        return True, []
    if len(lines) != 2 or lines[0] != "unsafe" or not _CODES_LINE.fullmatch(lines[1]):
        return None
    codes = [code.strip() for code in lines[1].split(",")]
    if any(code not in CATEGORIES for code in codes):
        return None
    return False, list(dict.fromkeys(codes))


def blocking_categories(categories: list[str], persona: Persona, *, nsfw: bool) -> list[str]:
    """Which of the named categories block for this persona here; S4 always does."""
    blocks = set(persona.guard_block) | {CHILD_EXPLOITATION}
    if nsfw and persona.allow_nsfw:
        blocks.discard(SEXUAL_CONTENT)
    return [code for code in categories if code in blocks]


@dataclass(frozen=True)
class Verdict:
    safe: bool  # the decision: the text may go on
    categories: list[str] = field(default_factory=list)  # what the model named
    unknown: bool = False  # no valid verdict: unreachable, too slow or malformed
    blocking: list[str] = field(default_factory=list)  # named categories that block here
    reason: str = ""  # why the verdict is unknown
    policy: FailPolicy | None = None  # the fail policy applied to an unknown verdict
    checked: bool = True  # False when the guard is turned off
    latency_ms: float = 0.0
    at: datetime = field(default_factory=lambda: datetime.now(UTC))  # when it was decided

    @property
    def label(self) -> str:
        """The model's verdict: 'safe', 'unsafe' or 'unknown'."""
        if self.unknown:
            return "unknown"
        return "unsafe" if self.categories else "safe"

    @property
    def blocked(self) -> bool:
        """The guard named a category that blocks here."""
        return not self.safe and not self.unknown

    @property
    def unmoderated(self) -> bool:
        """Let through without a verdict, under the `open` fail policy."""
        return self.unknown and self.safe


UNCHECKED = Verdict(safe=True, checked=False)


@dataclass(frozen=True)
class Where:
    """Where the text was said, for the policy and the records."""

    platform: str
    conversation: str | None = None  # the platform's id of the channel, room or chat
    conversation_id: int | None = None  # our conversations.id, when there is one
    user_key: str | None = None
    nsfw: bool = False


@dataclass(frozen=True)
class _Case:
    """One text being judged."""

    kind: Kind
    text: str
    persona: Persona
    where: Where


class Guard:
    def __init__(
        self,
        *,
        pool: Any,
        calls: CallLog,
        host: str,
        model: str = "llama-guard3:1b",
        timeout: float = 10.0,
        connect_timeout: float = 3.0,
        keep_alive: str | None = "10m",
        fail_policy: Callable[[str], FailPolicy] = lambda platform: "closed",
        notifier: AdminNotifier | None = None,
        alerts: bool = True,
        keep_text: bool = False,
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled
        self.model = model
        self.timeout = timeout
        self.backend = f"ollama:{redact_host(host)}"
        self._pool = pool
        self._calls = calls
        self._keep_alive = keep_alive
        self._fail_policy = fail_policy
        self._notifier = notifier if alerts else None
        self._keep_text = keep_text
        self._client = ollama.AsyncClient(
            host=host, timeout=httpx.Timeout(timeout, connect=min(connect_timeout, timeout))
        )
        self._down: str | None = None  # why the guard is unreachable, while it is
        self._background = Background("recording a guard verdict")

    async def check(
        self,
        kind: Kind,
        text: str,
        *,
        persona: Persona,
        platform: str = "unknown",
        conversation: str | None = None,
        conversation_id: int | None = None,
        user_key: str | None = None,
        nsfw: bool = False,
    ) -> Verdict:
        """Judge `text` for `persona` on `platform`; never raises for a guard failure."""
        where = Where(platform, conversation, conversation_id, user_key, nsfw)
        return await self.judge(kind, text, persona=persona, where=where)

    async def check_image_prompt(
        self,
        prompt: str,
        *,
        persona: Persona,
        platform: str = "unknown",
        conversation: str | None = None,
        conversation_id: int | None = None,
        user_key: str | None = None,
        nsfw: bool = False,
    ) -> Verdict:
        """The input check, for a picture's prompt (before anything is paid for)."""
        return await self.check(
            "image_prompt",
            prompt,
            persona=persona,
            platform=platform,
            conversation=conversation,
            conversation_id=conversation_id,
            user_key=user_key,
            nsfw=nsfw,
        )

    async def judge(self, kind: Kind, text: str, *, persona: Persona, where: Where) -> Verdict:
        """`check()` with the place already gathered."""
        if not self.enabled:
            return UNCHECKED
        request = self._request(text)
        started = time.perf_counter()
        raw, stats, error = await self._ask(request)
        latency = (time.perf_counter() - started) * 1000
        parsed = parse_verdict(raw) if raw is not None else None
        if parsed is None:
            reason = error or "it gave a malformed verdict"
            policy = self._fail_policy(where.platform)
            verdict = Verdict(
                policy == "open", unknown=True, reason=reason, policy=policy, latency_ms=latency
            )
        else:
            categories = parsed[1]
            blocking = blocking_categories(categories, persona, nsfw=where.nsfw)
            verdict = Verdict(not blocking, categories, blocking=blocking, latency_ms=latency)
        case = _Case(kind, text, persona, where)
        self._log(case, verdict)
        self._spawn(self._record(case, verdict, request, stats, error))
        self._spawn(self._alert(case, verdict, error))
        return verdict

    def _request(self, text: str) -> ChatRequest:
        # The text alone, as the one user message: see the module docstring (issue 11440).
        return ChatRequest(
            model=self.model,
            messages=[{"role": "user", "content": text}],
            temperature=0.0,
            seed=0,
            max_tokens=_MAX_VERDICT_TOKENS,
            context_window=_GUARD_CONTEXT,
            repeat_penalty=1.0,
        )

    async def _ask(self, request: ChatRequest) -> tuple[str | None, CallStats | None, str | None]:
        """(raw answer, call stats, None) or (None, None, why it failed)."""
        try:
            response = await asyncio.wait_for(
                self._client.chat(
                    model=request.model,
                    messages=request.messages,
                    stream=False,
                    options=request.options(),
                    keep_alive=self._keep_alive,
                ),
                self.timeout,
            )
        except TimeoutError:
            return None, None, f"it did not answer within {self.timeout:g}s"
        except _GUARD_ERRORS as exc:
            return None, None, failure_reason(exc, self.model)
        stats = call_stats(self.backend, request.model, response)
        return response.message.content or "", stats, None

    def _log(self, case: _Case, verdict: Verdict) -> None:
        where = case.where
        who = f"{case.kind} for {case.persona.name} from {where.user_key} on {where.platform}"
        if verdict.unknown:
            action = "answering unmoderated" if verdict.safe else "refusing"
            log.warning(
                "guard gave no verdict on %s (%s); fail policy %s: %s",
                who,
                verdict.reason,
                verdict.policy,
                action,
            )
        elif verdict.categories:
            action = "blocked" if verdict.blocked else "allowed by the persona's policy"
            log.warning("guard: %s is unsafe (%s): %s", who, describe(verdict.categories), action)
        else:
            log.info("guard: %s is safe (%.0f ms)", who, verdict.latency_ms)

    async def _record(
        self,
        case: _Case,
        verdict: Verdict,
        request: ChatRequest,
        stats: CallStats | None,
        error: str | None,
    ) -> None:
        where, persona = case.where, case.persona
        context = CallContext(
            where.platform, where.conversation_id, where.user_key or "", persona.name
        )
        await self._calls.record(
            context, request, backend=self.backend, stats=stats, error=error, purpose="moderation"
        )
        await self._pool.execute(
            "INSERT INTO moderation_verdicts (kind, verdict, categories, blocked, policy, reason,"
            " latency_ms, model, backend, platform, conversation, conversation_id, user_key,"
            " persona, text, at)"
            " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16)",
            case.kind,
            verdict.label,
            verdict.categories,
            not verdict.safe,
            verdict.policy,
            verdict.reason or None,
            verdict.latency_ms,
            self.model,
            self.backend,
            where.platform,
            where.conversation,
            where.conversation_id,
            where.user_key,
            persona.name,
            case.text if self._keep_text else None,
            verdict.at,
        )

    async def _alert(self, case: _Case, verdict: Verdict, error: str | None) -> None:
        """Tell the admins about blocks, and when the guard goes down or comes back."""
        message = None
        if verdict.blocked:
            where = case.where
            place = f"{where.platform} {where.conversation or ''}".strip()
            message = (
                f"Llama Guard blocked {_KIND_WORDS[case.kind]} ({case.persona.name}, {place}, "
                f"{where.user_key or 'unknown user'}): {describe(verdict.blocking)}"
            )
            if self._keep_text:
                message += f"\n> {case.text[:500]}"
        elif error is not None and self._down is None:
            self._down = error
            message = f"Llama Guard ({self.model}) is unreachable: {error}."
        elif error is None and self._down is not None:
            self._down = None
            message = f"Llama Guard ({self.model}) answers again."
        if message is not None and self._notifier is not None:
            await self._notifier.send(message)

    def _spawn(self, work: Awaitable[None]) -> None:
        self._background.spawn(work)

    async def drain(self) -> None:
        """Wait for the verdict records and alerts still being written."""
        await self._background.drain()

    async def aclose(self) -> None:
        await self.drain()
        await self._client.close()


_KIND_WORDS: dict[Kind, str] = {
    "input": "a message",
    "output": "a reply",
    "image_prompt": "an image prompt",
}
