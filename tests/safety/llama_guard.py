"""A stand-in for llama-guard3 behind Ollama's `/api/generate` with `raw: true`.

It reads the prompt the way the model does (Meta's Llama Guard 3 format, see
bot/safety/prompt.py): the role asked about ("ONLY THE LAST Agent message"), the categories
listed, and the conversation's turns. A prompt not in that format gets prose back, as a model
given a wrong prompt would answer. Rules map a marker found in the judged turn to a verdict; the
codes of an `unsafe` rule are in order of salience and the model names the most salient one
among the categories it was given, and says `safe` when it was given none of them (the real
model's behaviour that makes filtering a verdict after the fact unsafe).
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Any

_ROLE = re.compile(r"Provide your safety assessment for ONLY THE LAST (User|Agent) message")
_CATEGORIES = re.compile(
    r"<BEGIN UNSAFE CONTENT CATEGORIES>\n(.*?)\n<END UNSAFE CONTENT CATEGORIES>", re.S
)
_CONVERSATION = re.compile(r"<BEGIN CONVERSATION>\n\n(.*?)\n\n<END CONVERSATION>", re.S)
_TURN = re.compile(r"^(User|Agent): ", re.M)


@dataclass
class Asked:
    """One guard call as the model read it."""

    prompt: str
    role: str
    listed: list[str]
    turns: list[tuple[str, str]]

    @property
    def judged(self) -> str:
        return next((text for role, text in reversed(self.turns) if role == self.role), "")


def read(prompt: str) -> Asked | None:
    *_, role = [None, *_ROLE.finditer(prompt)]  # the instruction after the conversation
    categories = _CATEGORIES.search(prompt)
    conversation = _CONVERSATION.search(prompt)
    if role is None or categories is None or conversation is None:
        return None
    listed = re.findall(r"^(S\d{1,2}): ", categories.group(1), re.M)
    parts = _TURN.split(conversation.group(1))
    turns = [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]
    return Asked(prompt, role.group(1), listed, turns)


@dataclass
class GuardScript:
    rules: dict[str, str] = field(default_factory=dict)  # marker → "unsafe\nS12,S1" or prose
    delays: dict[str, float] = field(default_factory=dict)  # marker → seconds before answering
    asked: list[Asked] = field(default_factory=list)
    answered_at: list[float] = field(default_factory=list)

    @property
    def judged(self) -> list[str]:
        return [asked.judged for asked in self.asked]

    async def __call__(self, body: dict[str, Any]) -> str:
        asked = read(str(body.get("prompt") or "")) if body.get("raw") else None
        if asked is None:
            return "I'm sorry, I can't help with that request."
        self.asked.append(asked)
        text = asked.judged
        delay = max((d for marker, d in self.delays.items() if marker in text), default=0.0)
        if delay:
            await asyncio.sleep(delay)
        self.answered_at.append(time.perf_counter())
        answer = next((a for marker, a in self.rules.items() if marker in text), "safe")
        head, _, codes = answer.partition("\n")
        if head != "unsafe" or not codes.startswith("S"):
            return answer
        named = [code for code in codes.split(",") if code in asked.listed]
        return f"unsafe\n{named[0]}" if named else "safe"
