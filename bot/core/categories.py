"""The Llama Guard 3 hazard categories, S1 to S14, by code and name.

Kept apart from `bot/safety/guard.py` so that persona validation can use them without importing the
guard (which imports personas).
"""

from __future__ import annotations

CATEGORIES: dict[str, str] = {
    "S1": "Violent Crimes",
    "S2": "Non-Violent Crimes",
    "S3": "Sex-Related Crimes",
    "S4": "Child Sexual Exploitation",
    "S5": "Defamation",
    "S6": "Specialized Advice",
    "S7": "Privacy",
    "S8": "Intellectual Property",
    "S9": "Indiscriminate Weapons",
    "S10": "Hate",
    "S11": "Suicide & Self-Harm",
    "S12": "Sexual Content",
    "S13": "Elections",
    "S14": "Code Interpreter Abuse",
}

ALL_CODES: tuple[str, ...] = tuple(CATEGORIES)

SEXUAL_CONTENT = "S12"  # relaxed in NSFW channels for personas with `allow_nsfw`
CHILD_EXPLOITATION = "S4"  # always blocks, whatever the persona or channel says
UNSPECIFIED = "unspecified"  # the guard said unsafe but named no category it was asked about


def category_name(code: str) -> str:
    if code == UNSPECIFIED:
        return "no category named"
    return CATEGORIES.get(code, "unknown category")


def describe(codes: list[str] | tuple[str, ...]) -> str:
    """'S1 Violent Crimes, S10 Hate' for messages and logs."""
    return ", ".join(
        UNSPECIFIED if code == UNSPECIFIED else f"{code} {category_name(code)}" for code in codes
    )


def normalize_code(value: str) -> str | None:
    """'s10' or ' S10 ' → 'S10'; None when it is not one of S1 to S14."""
    code = value.strip().upper()
    return code if code in CATEGORIES else None
