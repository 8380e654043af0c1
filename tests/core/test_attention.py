"""When personas answer: triggers and the decaying attention model, with a fake clock and dice."""

from __future__ import annotations

from bot.core.attention import Attention, Trigger, mentions_name
from bot.core.personas import Persona


def persona(**fields: object) -> Persona:
    values: dict[str, object] = {
        "name": "mimi",
        "display_name": "Mimi",
        "description": "a cat",
        "greeting": "nya",
        "aliases": ["Whiskers"],
    }
    values.update(fields)
    return Persona.model_validate(values)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Dice:
    """Returns the queued rolls in order; records how often it was rolled."""

    def __init__(self, *rolls: float) -> None:
        self.rolls = list(rolls)
        self.rolled = 0

    def __call__(self) -> float:
        self.rolled += 1
        return self.rolls.pop(0)


def decide(att: Attention, text: str = "hello all", p: Persona | None = None, **trigger: bool):
    answer_dms = trigger.pop("answer_dms", True)
    answer_bots = trigger.pop("answer_bots", False)
    return att.decide(
        conversation_key="c1",
        persona=p or persona(),
        text=text,
        trigger=Trigger(**trigger),
        answer_dms=answer_dms,
        answer_bots=answer_bots,
    )


def test_addressed_messages_are_always_answered() -> None:
    att = Attention(clock=Clock(), rng=Dice())
    assert decide(att, mentioned=True).answer
    assert decide(att, reply_to_bot=True).answer
    assert decide(att, is_dm=True).answer
    assert decide(att, always_listen=True).answer
    assert decide(att, "hey MIMI, what's up?").answer
    assert decide(att, "whiskers!").answer


def test_unaddressed_message_in_a_new_conversation_is_ignored() -> None:
    dice = Dice()
    att = Attention(clock=Clock(), rng=dice)
    decision = decide(att, "the weather is nice")
    assert not decision.answer and decision.reason == "not addressed"
    assert dice.rolled == 0


def test_name_is_matched_as_a_whole_word_only() -> None:
    p = persona()
    assert mentions_name(p, "I asked Mimi.")
    assert mentions_name(p, "mimi's drawing")
    assert not mentions_name(p, "mimicry is an art")
    assert not mentions_name(p, "swhiskersy")


def test_bots_are_ignored_unless_configured() -> None:
    att = Attention(clock=Clock(), rng=Dice())
    decision = decide(att, mentioned=True, from_bot=True)
    assert not decision.answer and "bot" in decision.reason
    assert decide(att, mentioned=True, from_bot=True, answer_bots=True).answer


def test_dms_can_be_turned_off() -> None:
    att = Attention(clock=Clock(), rng=Dice())
    assert not decide(att, is_dm=True, answer_dms=False).answer


def test_follow_probability_decays_with_time_since_addressed() -> None:
    clock = Clock()
    p = persona(attention_start=0.6, attention_window=300)
    att = Attention(clock=clock, rng=Dice())
    assert att.probability("c1", p) == 0.0
    decide(att, mentioned=True, p=p)
    assert att.probability("c1", p) == 0.6
    clock.now += 150
    assert abs(att.probability("c1", p) - 0.3) < 1e-9
    clock.now += 150
    assert att.probability("c1", p) == 0.0
    assert att.probability("other", p) == 0.0


def test_follows_when_the_dice_fall_under_the_probability() -> None:
    clock = Clock()
    dice = Dice(0.5, 0.7, 0.29, 0.31)
    att = Attention(clock=clock, rng=dice)
    decide(att, mentioned=True)
    assert decide(att).answer  # 0.5 < 0.6
    assert not decide(att).answer  # 0.7 ≥ 0.6
    clock.now += 150  # p is 0.3 now: following did not refresh the last-addressed time
    assert decide(att).answer  # 0.29 < 0.3
    assert not decide(att).answer  # 0.31 ≥ 0.3
    assert dice.rolled == 4


def test_being_addressed_again_restarts_the_window() -> None:
    clock = Clock()
    att = Attention(clock=clock, rng=Dice(0.55))
    decide(att, mentioned=True)
    clock.now += 290
    decide(att, "mimi, still there?")
    clock.now += 10
    assert decide(att).answer  # p is back near 0.58


def test_start_zero_turns_following_off() -> None:
    dice = Dice()
    p = persona(attention_start=0)
    att = Attention(clock=Clock(), rng=dice)
    assert decide(att, mentioned=True, p=p).answer
    assert not decide(att, p=p).answer
    assert dice.rolled == 0


def test_attention_is_per_conversation_and_persona() -> None:
    att = Attention(clock=Clock(), rng=Dice(0.0, 0.0))
    decide(att, mentioned=True)
    sage = persona(name="sage", display_name="Sage", aliases=[])
    assert not decide(att, p=sage).answer
    assert not att.decide(
        conversation_key="c2", persona=persona(), text="hi", trigger=Trigger()
    ).answer
    assert decide(att).answer


def test_expired_conversations_are_pruned() -> None:
    clock = Clock()
    att = Attention(clock=clock, rng=Dice())
    p = persona(attention_window=10)
    for i in range(50):
        att.decide(conversation_key=f"c{i}", persona=p, text="", trigger=Trigger(mentioned=True))
    assert len(att) == 50
    clock.now += 11
    for _ in range(1100):
        decide(att, "nobody here", p=p)
    assert len(att) == 0
