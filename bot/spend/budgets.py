"""Budgets: the monthly caps, which caps a reservation is subject to, and their words.

Pure logic, no database: `bot/spend/ledger.py` measures the month's usage and asks this module which
caps apply (`scopes_for`), whether one would be passed (`caps_for` + `refusal`) and where the
degrade ladder stands (`Budgets.level`).

    money     BUDGET_MONTHLY_USD            the whole bot, in dollars, paid actions only
    units     BUDGET_KIND_CAPS              per kind, the whole bot   e.g. {"image": 300,
                                                                            "gpu_seconds": 36000}
              BUDGET_USER_CAPS              per kind and user         e.g. {"image": 20}
              BUDGET_GUILD_CAPS             per kind and guild/server e.g. {"image": 100}
    persona   budget_usd_month (YAML)       one persona's own dollars, paid actions only, with
                                            the same ladder as the whole bot's

A cap the bot cannot enforce (tokens, GPU seconds per user) is refused at start-up with the
reason (`ENFORCED`), never silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, NamedTuple

from bot.errors import BotError, ConfigError

if TYPE_CHECKING:
    from bot.config import Settings

NORMAL, FREE_ONLY, LOCAL_ONLY, PAID_REFUSED = 0, 1, 2, 3
LADDER = {
    FREE_ONLY: "only free backends answer now",
    LOCAL_ONLY: "only the local model answers now",
    PAID_REFUSED: "paid actions (images, cloud GPUs) are refused until the 1st",
}
NOUNS = {
    "image": "images",
    "gpu_seconds": "GPU seconds",
    "chat_tokens": "chat tokens",
    "embed_tokens": "embedding tokens",
    "moderation_tokens": "moderation tokens",
}
# The caps the bot enforces. Images are reserved before Fal is asked (every scope); GPU seconds
# of paid backends are counted as machines run (sessions booked every minute) and, at the cap,
# only free backends answer (the degrade ladder's first step).
ENFORCED = {"kind": {"image", "gpu_seconds"}, "user": {"image"}, "guild": {"image"}}
_AFTER = "tokens are counted after each model call, never reserved before it, so a cap on them"
UNENFORCEABLE = {
    **{
        (kind, scope): f"cannot be enforced: {_AFTER} could not hold; leave it out"
        for kind in ("chat_tokens", "embed_tokens", "moderation_tokens")
        for scope in ("kind", "user", "guild")
    },
    **{
        ("gpu_seconds", scope): "cannot be enforced: a machine's time is shared by everyone"
        f" using it, not counted per {scope}; cap it for the whole bot (BUDGET_KIND_CAPS)"
        for scope in ("user", "guild")
    },
}
GLOBAL_REFUSAL = (
    "The bot's budget for this month is spent, so paid features are paused until the 1st."
)
PERSONA_REFUSAL = (
    "{name}'s budget for this month is spent, so {name}'s paid features are paused until the 1st."
)


def persona_scope(name: str) -> str:
    """The `budget_scopes` row of a persona's own monthly cap."""
    return f"persona:{name}"


class BudgetExceeded(BotError):
    """A cap would be passed; `user_message` says which, in plain words."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.user_message = message


def utcnow() -> datetime:
    return datetime.now(UTC)


def month_of(at: datetime) -> date:
    """The first day of `at`'s month in UTC (a naive datetime is taken as UTC)."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC).date().replace(day=1)


@dataclass(frozen=True)
class Budgets:
    """Monthly caps: money for the whole bot, units per kind (globally, per user, per guild)."""

    monthly_usd: Decimal | None = None
    kind_caps: dict[str, Decimal] = field(default_factory=dict)
    user_caps: dict[str, Decimal] = field(default_factory=dict)
    guild_caps: dict[str, Decimal] = field(default_factory=dict)
    alert_fraction: Decimal = Decimal("0.8")
    degrade_at: tuple[Decimal, Decimal, Decimal] = (
        Decimal("0.75"),
        Decimal("0.9"),
        Decimal("0.98"),
    )

    @classmethod
    def from_settings(cls, settings: Settings) -> Budgets:
        """The caps in the settings; a cap on a kind that does not exist, or one the bot
        cannot enforce (see ENFORCED), is a ConfigError that says why: never ignored."""
        for name, scope in (
            ("budget_kind_caps", "kind"),
            ("budget_user_caps", "user"),
            ("budget_guild_caps", "guild"),
        ):
            kinds = set(getattr(settings, name))
            unknown = sorted(kinds - set(NOUNS))
            if unknown:
                raise ConfigError(
                    f"{name.upper()}: no such kind {', '.join(unknown)}; kinds are"
                    f" {', '.join(NOUNS)}"
                )
            unenforced = sorted(kinds - ENFORCED[scope])
            if unenforced:
                why = UNENFORCEABLE[unenforced[0], scope]
                raise ConfigError(f"{name.upper()}: a cap on {unenforced[0]} {why}")
        free, local, refused = sorted(settings.budget_degrade_at)
        return cls(
            monthly_usd=settings.budget_monthly_usd,
            kind_caps=dict(settings.budget_kind_caps),
            user_caps=dict(settings.budget_user_caps),
            guild_caps=dict(settings.budget_guild_caps),
            alert_fraction=settings.budget_alert_fraction,
            degrade_at=(free, local, refused),
        )

    def level(self, spent: Decimal) -> int:
        """The degrade ladder's step for this much spent of the monthly budget."""
        return self.level_of(spent, self.monthly_usd)

    def level_of(self, spent: Decimal, cap: Decimal | None) -> int:
        """The ladder's step for `spent` of `cap` (the bot's budget or a persona's own)."""
        if not cap:
            return NORMAL
        fraction = spent / cap
        return sum(1 for threshold in self.degrade_at if fraction >= threshold)


@dataclass(frozen=True)
class Cap:
    scope: str
    limit: Decimal
    used: Decimal
    adding: Decimal
    refusal: str
    alert: str


class PersonaCap(NamedTuple):
    """A persona's own monthly cap: its name, the dollars (its YAML's `budget_usd_month`) and
    what members call it (its display name; the name when none is known)."""

    name: str
    usd: Decimal
    shown: str


def scopes_for(
    b: Budgets,
    kind: str,
    cost: Decimal,
    user: str | None,
    guild: str | None,
    *,
    persona: PersonaCap | None = None,
) -> list[str]:
    """The `budget_scopes` rows a reservation locks, in the one order every process uses."""
    scopes = []
    if b.monthly_usd is not None and cost > 0:
        scopes.append("global")
    if persona is not None and cost > 0:
        scopes.append(persona_scope(persona.name))
    if kind in b.kind_caps:
        scopes.append(f"kind:{kind}")
    if user and kind in b.user_caps:
        scopes.append(f"user:{user}:{kind}")
    if guild and kind in b.guild_caps:
        scopes.append(f"guild:{guild}:{kind}")
    return sorted(scopes)


def caps_for(
    b: Budgets,
    used: Any,
    *,
    kind: str,
    units: Decimal,
    cost: Decimal,
    user: str | None,
    guild: str | None,
    persona: PersonaCap | None = None,
) -> list[Cap]:
    """The caps this reservation is subject to; `used` holds the month's usage so far."""
    caps = []
    if b.monthly_usd is not None and cost > 0:
        alert = f"Spend alert: {usd(used['cost'] + cost)} of the {usd(b.monthly_usd)} monthly"
        caps.append(
            Cap("global", b.monthly_usd, used["cost"], cost, GLOBAL_REFUSAL, alert + " budget.")
        )
    if persona is not None and cost > 0:
        name, limit = persona.name, persona.usd
        so_far = used["persona_cost"]
        alert = f"Spend alert: {name} has used {usd(so_far + cost)} of its {usd(limit)} monthly"
        words = PERSONA_REFUSAL.format(name=persona.shown)  # members know it by this name
        caps.append(Cap(persona_scope(name), limit, so_far, cost, words, alert + " budget."))
    noun = NOUNS[kind]
    specs = [
        (f"kind:{kind}", b.kind_caps, "kind_units", "the bot",
         "The bot has used all {cap} {noun} it may this month. They come back on the 1st."),
        (f"user:{user}:{kind}", b.user_caps if user else {}, "user_units", user,
         "You've used your {cap} {noun} for this month. More on the 1st!"),
        (f"guild:{guild}:{kind}", b.guild_caps if guild else {}, "guild_units", guild,
         "This server has used its {cap} {noun} for this month. More on the 1st!"),
    ]  # fmt: skip
    for scope, table, column, who, refusal in specs:
        if kind in table:
            limit, so_far = table[kind], used[column]
            alert = f"Spend alert: {who} has used {num(so_far + units)} of {num(limit)} {noun}"
            caps.append(
                Cap(
                    scope,
                    limit,
                    so_far,
                    units,
                    refusal.format(cap=num(limit), noun=noun),
                    alert + " this month.",
                )
            )
    return caps


def refusal(b: Budgets, caps: list[Cap]) -> BudgetExceeded | None:
    """The error for the first cap this reservation would pass (or None: it fits)."""
    for cap in caps:
        over = cap.used + cap.adding > cap.limit
        if cap.scope == "global" or cap.scope.startswith("persona:"):
            over = over or b.level_of(cap.used, cap.limit) >= PAID_REFUSED
        if over:
            return BudgetExceeded(cap.refusal)
    return None


def num(value: Decimal) -> str:
    """10.000 → '10', 2.50 → '2.5'."""
    return format(value.normalize(), "f")


def usd(value: Decimal | None) -> str:
    return "$?" if value is None else f"${value.quantize(Decimal('0.01'))}"
