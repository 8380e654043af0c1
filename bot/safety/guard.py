"""Llama Guard 3 through Ollama: a verdict for every message in and every reply out.

    verdict = await guard.check("input", text, persona=persona, platform="discord", ...)
    verdict = await guard.judge_reply(message, before, new, persona=persona, where=where)
    verdict = await guard.check_image_prompt(prompt, persona=persona, platform="matrix", ...)

`Verdict.safe` is the decision, after the fail policy: True means the text may go on.

How the model is asked: the Llama Guard 3 prompt is built here (`bot/safety/prompt.py`, Meta's
format) and sent with Ollama's `/api/generate` and `raw: true`, so no template rewrites it. An
input check is one `User:` turn; a reply is judged as the `Agent:` turn that answers the user's
message ("ONLY THE LAST Agent message"). Only the categories the persona enforces here are
listed (S4 always; S12 left out in an NSFW channel for a persona with `allow_nsfw`), so the
model judges against exactly those and any `unsafe` blocks. A text too long for GUARD_CONTEXT
is judged in consecutive windows; the context before it is cut oldest first.

The answer: a first line `safe` or `unsafe` (any case); the codes after `unsafe` are kept when
they are S1 to S14, and an `unsafe` without one blocks as "unspecified". Anything else is no
verdict, like no answer within `timeout` seconds or an unreachable server; those are decided by
the platform's fail policy: `closed` refuses, `open` lets it through and says so. Every verdict
is recorded in `moderation_verdicts`, every call in `model_calls` (purpose `moderation`), in
the background; `drain()` waits for those writes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bot.brains.base import CallStats, ChatRequest
from bot.brains.http import ollama_client
from bot.brains.ollama_brain import OLLAMA_ERRORS, failure_reason, redact_host
from bot.core.background import Background
from bot.core.calls import CallContext, CallLog
from bot.core.categories import describe
from bot.core.personas import Persona
from bot.ops.notify import AdminNotifier
from bot.safety.prompt import (
    GuardTurn,
    Role,
    budget_bytes,
    build,
    fit,
    neutralise,
    tail,
)
from bot.safety.prompt import windows as split_windows
from bot.safety.verdict import (
    NO_VERDICT,
    UNCHECKED,
    FailPolicy,
    Kind,
    Verdict,
    Where,
    enforced_codes,
    parse_verdict,
)

__all__ = [
    "NO_VERDICT",
    "UNCHECKED",
    "FailPolicy",
    "Guard",
    "Kind",
    "Verdict",
    "Where",
    "enforced_codes",
    "parse_verdict",
]

log = logging.getLogger(__name__)

# Ollama's failures, and an answer whose shape pydantic rejects (a ValueError).
_GUARD_ERRORS: tuple[type[BaseException], ...] = (*OLLAMA_ERRORS, ValueError)

_MAX_VERDICT_TOKENS = 48  # "unsafe" and all fourteen codes fit
_REPLY_CONTEXT_BYTES = 1500  # how much of the reply before a new paragraph is shown with it


@dataclass(frozen=True)
class _Case:
    """One text being judged, and the turns it is judged with."""

    kind: Kind
    text: str
    persona: Persona
    where: Where
    before: tuple[GuardTurn, ...] = ()  # the conversation before it (output: the message)
    lead: str = ""  # the reply so far, before `text` (paragraph mode)

    @property
    def role(self) -> Role:
        return "Agent" if self.kind == "output" else "User"


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
        context: int = 8192,
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
        self._context = context
        self._client = ollama_client(host, read_timeout=timeout, connect_timeout=connect_timeout)
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
        """`check()` with the place already gathered: `text` as a `User:` turn (an input, an
        image prompt, a memory) or, for "output", as an `Agent:` turn with nothing before."""
        return await self._judge(_Case(kind, text, persona, where))

    async def judge_reply(
        self, message: str, before: str, new: str, *, persona: Persona, where: Where
    ) -> Verdict:
        """Judge `new`, the latest part of a reply, as the Agent's answer to the user's
        `message`, after the reply's `before` (whose oldest text is left out past a few
        paragraphs: each check costs the same however long the reply grows)."""
        turns = (GuardTurn("User", neutralise(message)),)
        return await self._judge(_Case("output", new, persona, where, turns, before))

    async def _judge(self, case: _Case) -> Verdict:
        """The verdict on every window of the text in turn; the first that does not pass.

        A window takes at most half the room; the turns before it and the text before it in
        its own turn (the reply so far) a quarter each, their newest words."""
        if not self.enabled:
            return UNCHECKED
        codes = enforced_codes(case.persona, nsfw=case.where.nsfw, model=self.model)
        budget = budget_bytes(self._context, _MAX_VERDICT_TOKENS, case.role, codes)
        quarter = budget // 4
        before = [GuardTurn(t.role, tail(t.text, quarter).lstrip()) for t in case.before]
        lead, verdict = neutralise(case.lead), UNCHECKED
        for window in split_windows(neutralise(case.text), max(1, budget // 2)):
            shown = tail(lead, min(_REPLY_CONTEXT_BYTES, quarter)).lstrip()
            last = GuardTurn(case.role, f"{shown}\n{window}".strip())
            turns = fit([*before, last], budget, keep=len(window.encode()))
            verdict = await self._ask_once(case, build(case.role, codes, turns))
            if not verdict.safe:
                break
            lead = f"{lead}\n{window}"
        return verdict

    async def _ask_once(self, case: _Case, prompt: str) -> Verdict:
        request = self._request(prompt)
        started = time.perf_counter()
        raw, stats, error = await self._ask(prompt)
        latency = (time.perf_counter() - started) * 1000
        parsed = parse_verdict(raw) if raw is not None else None
        if parsed is None:
            reason = error or NO_VERDICT
            policy = self._fail_policy(case.where.platform)
            verdict = Verdict(
                policy == "open",
                unknown=True,
                reason=reason,
                policy=policy,
                latency_ms=latency,
                answered=error is None,
            )
        else:
            categories = parsed[1]
            verdict = Verdict(parsed[0], categories, blocking=categories, latency_ms=latency)
        self._log(case, verdict)
        self._spawn(self._record(case, verdict, request, stats, error))
        self._spawn(self._alert(case, verdict, error))
        return verdict

    def _request(self, prompt: str) -> ChatRequest:
        """For the call log: the raw prompt, as the one message it is."""
        return ChatRequest(
            model=self.model,
            messages=[{"role": "raw", "content": prompt}],
            temperature=0.0,
            seed=0,
            max_tokens=_MAX_VERDICT_TOKENS,
            context_window=self._context,
            repeat_penalty=1.0,
        )

    async def _ask(self, prompt: str) -> tuple[str | None, CallStats | None, str | None]:
        """(raw answer, call stats, None) or (None, None, why it failed)."""
        options = self._request("").options()
        try:
            response = await asyncio.wait_for(
                self._client.generate(
                    model=self.model,
                    prompt=prompt,
                    raw=True,
                    options=options,
                    keep_alive=self._keep_alive,
                ),
                self.timeout,
            )
        except TimeoutError:
            return None, None, f"it did not answer within {self.timeout:g}s"
        except _GUARD_ERRORS as exc:
            return None, None, failure_reason(exc, self.model)
        stats = CallStats(
            backend=self.backend,
            model=self.model,
            prompt_tokens=response.prompt_eval_count,
            completion_tokens=response.eval_count,
            total_ms=_ms(response.total_duration),
            load_ms=_ms(response.load_duration),
            prompt_eval_ms=_ms(response.prompt_eval_duration),
            eval_ms=_ms(response.eval_duration),
            done_reason=response.done_reason,
        )
        return response.response or "", stats, None

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
            log.warning("guard: %s is unsafe (%s): blocked", who, describe(verdict.categories))
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


def _ms(nanoseconds: int | None) -> float | None:
    return nanoseconds / 1e6 if nanoseconds is not None else None


_KIND_WORDS: dict[Kind, str] = {
    "input": "a message",
    "output": "a reply",
    "image_prompt": "an image prompt",
    "memory": "a fact to remember",
}
