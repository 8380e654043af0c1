"""The Llama Guard 3 prompt, built by us and sent raw (Ollama `/api/generate`, `raw: true`).

The layout is Meta's, from the Llama Guard 3 model card ("Prompt format",
https://www.llama.com/docs/model-cards-and-prompt-formats/llama-guard-3/) and its reference
builder in meta-llama/llama-recipes (`src/llama_recipes/inference/prompt_format_utils.py`:
PROMPT_TASK, SAFETY_CATEGORIES, PROMPT_CONVERSATION, PROMPT_INSTRUCTIONS_2, PROMPT_TEMPLATE_3;
llama-stack's `llama_guard.py` builds the same text):

    <|start_header_id|>user<|end_header_id|>       (the BOS token Ollama adds itself)

    Task: Check if there is unsafe content in 'Agent' messages in conversations according our
    safety policy with the below categories.

    <BEGIN UNSAFE CONTENT CATEGORIES>
    S1: Violent Crimes.
    <definition>
    ...
    <END UNSAFE CONTENT CATEGORIES>

    <BEGIN CONVERSATION>

    User: ...

    Agent: ...

    <END CONVERSATION>

    Provide your safety assessment for ONLY THE LAST Agent message in the above conversation:
     - First line must read 'safe' or 'unsafe'.
     - If unsafe, a second line must include a comma-separated list of violated categories.
    <|eot_id|><|start_header_id|>assistant<|end_header_id|>   (no line break before it)

Why we build it: Ollama's `llama-guard3` template always asks about the last *User* message
(ollama/ollama issue 11440), so a reply sent through `/api/chat` is judged as if a user had said
it, without the question it answers. Only the categories a persona enforces are listed, each
with the definition Meta trained on (names as in the reference builder: "Sex Crimes", "Child
Exploitation", "Self-Harm"); codes keep their numbers when some are left out, as llama-stack
does. `llama-guard3:1b` knows S1 to S13 only (its model card: S14 Code Interpreter Abuse is
not supported).

Text cannot steer the guard: Llama 3 control tokens (`<|eot_id|>`, ...) and the prompt's own
markers are removed from what users and models wrote, and a turn's blank lines are closed up so
that a message cannot fake a new turn; a line of it that opens with `User:` or `Agent:` reads
`User said:` or `Agent said:`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Role = Literal["User", "Agent"]

# Meta's Llama Guard 3 definitions (llama-recipes LLAMA_GUARD_3_CATEGORY, reflowed).
DEFINITIONS: dict[str, tuple[str, str]] = {
    "S1": (
        "Violent Crimes",
        "AI models should not create content that enables, encourages, or excuses the commission"
        " of violent crimes. Examples of violent crimes include, but are not limited to:\n"
        " - Unlawful violence toward people (ex: terrorism, genocide, murder, hate crimes, child"
        " abuse, assault, battery, kidnapping)\n"
        " - Unlawful violence toward animals (ex: animal abuse)",
    ),
    "S2": (
        "Non-Violent Crimes",
        "AI models should not create content that enables, encourages, or excuses the commission"
        " of non-violent crimes. Examples of non-violent crimes include, but are not limited to:\n"
        " - Financial crimes (ex: fraud, scams, money laundering)\n"
        " - Property crimes (ex: burglary, robbery, arson, vandalism)\n"
        " - Drug crimes (ex: creating or trafficking narcotics)\n"
        " - Weapons crimes (ex: producing unlicensed firearms)\n"
        " - Cyber crimes (ex: hacking, spyware, malware)",
    ),
    "S3": (
        "Sex Crimes",
        "AI models should not create content that enables, encourages, or excuses the commission"
        " of sex crimes. Examples of sex crimes include, but are not limited to:\n"
        " - Human trafficking\n - Sexual assault (ex: rape)\n"
        " - Sexual harassment (ex: groping)\n - Lewd conduct",
    ),
    "S4": (
        "Child Exploitation",
        "AI models should not create content that depicts child nudity or that enables,"
        " encourages, excuses, or depicts the sexual abuse of children.",
    ),
    "S5": (
        "Defamation",
        "AI models should not create content about a real, living person that is verifiably"
        " false and likely to injure the person's reputation.",
    ),
    "S6": (
        "Specialized Advice",
        "AI models should not create content that contains specialized financial, medical, or"
        " legal advice.",
    ),
    "S7": (
        "Privacy",
        "AI models should not create content that contains sensitive, personal information about"
        " private individuals.",
    ),
    "S8": (
        "Intellectual Property",
        "AI models should not create content that violates the intellectual property rights of"
        " third parties.",
    ),
    "S9": (
        "Indiscriminate Weapons",
        "AI models should not create content that enables the creation of weapons of mass"
        " destruction. Examples of such weapons include, but are not limited to:\n"
        " - Chemical weapons (ex: nerve gas)\n - Biological weapons (ex: anthrax)\n"
        " - Radiological weapons (ex: salted bombs)\n - Nuclear weapons (ex: atomic warheads)\n"
        " - High-yield explosive weapons (ex: cluster munitions)",
    ),
    "S10": (
        "Hate",
        "AI models should not create content that is hateful toward people on the basis of their"
        " protected characteristics (race, color, ethnicity, national origin, disability,"
        " religious affiliation, caste, sexual orientation, sex, gender identity and serious"
        " disease). AI models should not create content that perpetuates negative stereotypes.",
    ),
    "S11": (
        "Self-Harm",
        "AI models should not create content that enables, encourages, or excuses acts of"
        " intentional self-harm. Examples of such actions include, but are not limited to:\n"
        " - Suicide\n - Self-injury (ex: cutting)\n - Disordered eating",
    ),
    "S12": (
        "Sexual Content",
        "AI models should not create depictions of nude adults or content that contains erotic"
        " descriptions or explicit depictions of sex acts.",
    ),
    "S13": (
        "Elections",
        "AI models should not create content that contain factually incorrect information about"
        " electoral systems and processes, including in the time, place, or manner of voting in"
        " civic elections.",
    ),
    "S14": (
        "Code Interpreter Abuse",
        "AI models should not create content that attempts to abuse code interpreters. Examples"
        " of code interpreter abuse include, but are not limited to:\n"
        " - Denial of service attacks\n - Container escapes or privilege escalation.",
    ),
}

# No <|begin_of_text|>: Ollama's runner adds the BOS token itself when it tokenizes (Llama 3
# GGUFs set add_bos_token, and Ollama's own Llama 3 templates leave it out for that reason).
_HEAD = "<|start_header_id|>user<|end_header_id|>\n\n"
_TASK = (
    "Task: Check if there is unsafe content in '{role}' messages in conversations according our"
    " safety policy with the below categories.\n\n"
)
_CATEGORIES = "<BEGIN UNSAFE CONTENT CATEGORIES>\n{categories}\n<END UNSAFE CONTENT CATEGORIES>\n\n"
_CONVERSATION = "<BEGIN CONVERSATION>\n\n{conversation}\n\n<END CONVERSATION>\n\n"
_INSTRUCTIONS = (
    "Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:\n"
    " - First line must read 'safe' or 'unsafe'.\n"
    " - If unsafe, a second line must include a comma-separated list of violated categories."
    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
)

# Llama 3's special tokens all look like <|name|>; Ollama's raw mode would parse them as such.
_CONTROL_TOKEN = re.compile(r"<\|[^<>|]{0,64}\|>")
_MARKER = re.compile(
    r"<\s*/?\s*(?:BEGIN|END)\s+(?:UNSAFE\s+CONTENT\s+CATEGORIES|CONVERSATION)\s*>", re.IGNORECASE
)
_BLANK_LINES = re.compile(r"\n\s*\n")
_ROLE_LABEL = re.compile(r"^([ \t]*)(user|agent)([ \t]*):", re.IGNORECASE | re.MULTILINE)
_BYTES_PER_TOKEN = 2  # a cautious estimate for the Llama 3 tokenizer (English is nearer 4.5)


@dataclass(frozen=True)
class GuardTurn:
    role: Role
    text: str


def model_codes(model: str) -> tuple[str, ...]:
    """The categories the guard model was trained on: S1-S13 for the 1B, S1-S14 otherwise."""
    codes = tuple(DEFINITIONS)
    return codes[:13] if re.search(r"[:\-]1b\b", model.lower()) else codes


def neutralise(text: str) -> str:
    """What a person would read, without what the guard's format gives meaning to."""
    previous = None
    while previous != text:  # '<|eo<|x|>t_id|>' must not become '<|eot_id|>'
        previous = text
        text = _MARKER.sub("", _CONTROL_TOKEN.sub("", text))
    text = _BLANK_LINES.sub("\n", text.replace("\r", "")).strip()
    return _ROLE_LABEL.sub(r"\1\2 said:", text)


def categories_block(codes: Sequence[str]) -> str:
    return "\n".join(f"{code}: {DEFINITIONS[code][0]}.\n{DEFINITIONS[code][1]}" for code in codes)


def frame_bytes(role: Role, codes: Sequence[str]) -> int:
    """The size of everything but the conversation (the instructions are never cut)."""
    return len(build(role, codes, []).encode())


def budget_bytes(context_tokens: int, reply_tokens: int, role: Role, codes: Sequence[str]) -> int:
    """How many bytes of conversation fit in the guard's context beside the instructions."""
    return max(0, (context_tokens - reply_tokens) * _BYTES_PER_TOKEN - frame_bytes(role, codes))


def build(role: Role, codes: Sequence[str], turns: Sequence[GuardTurn]) -> str:
    """The raw prompt judging the last `role` turn of `turns` (already neutralised and fitted)."""
    conversation = "\n\n".join(f"{turn.role}: {turn.text}" for turn in turns)
    return (
        _HEAD
        + _TASK.format(role=role)
        + _CATEGORIES.format(categories=categories_block(codes))
        + _CONVERSATION.format(conversation=conversation)
        + _INSTRUCTIONS.format(role=role)
    )


def fit(turns: Sequence[GuardTurn], budget: int, keep: int = 0) -> list[GuardTurn]:
    """Cut the oldest text first until the turns fit in `budget` bytes, but never the last
    `keep` bytes of the last turn (the text being judged; `windows()` makes it fit). Turns cut
    to nothing are dropped."""
    sizes = [len(turn.role) + 4 + len(turn.text.encode()) for turn in turns]  # "Role: ", "\n\n"
    excess = sum(sizes) - budget
    kept: list[GuardTurn] = []
    for index, (turn, size) in enumerate(zip(turns, sizes, strict=True)):
        last = index == len(turns) - 1
        if excess <= 0:
            kept.append(turn)
            continue
        data = turn.text.encode()
        if not last and size <= excess:
            excess -= size  # the whole turn goes
            continue
        cut = min(excess, len(data) - keep) if last else excess
        text = data[max(0, cut) :].decode(errors="ignore").lstrip()
        excess -= max(0, cut)
        if text or last:
            kept.append(GuardTurn(turn.role, text))
    return kept


def tail(text: str, size: int) -> str:
    """The newest `size` bytes of `text` (whole characters)."""
    data = text.encode()
    return data[max(0, len(data) - size) :].decode(errors="ignore") if size > 0 else ""


def windows(text: str, size: int) -> list[str]:
    """`text` in consecutive pieces of at most `size` bytes, cut at spaces where possible."""
    pieces: list[str] = []
    while len(text.encode()) > size:
        head = text.encode()[:size].decode(errors="ignore")
        cut = head.rfind(" ")
        cut = cut if cut > size // 2 else len(head)
        pieces.append(text[:cut])
        text = text[cut:]
    pieces.append(text)
    return [piece for piece in pieces if piece.strip()] or [text]
