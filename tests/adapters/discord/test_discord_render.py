"""Splitting, mention cleaning and attachment inlining for Discord: pure functions."""

from __future__ import annotations

from bot.adapters.discord.render import (
    Throttle,
    clean_text,
    inline_attachment,
    is_text_attachment,
    split_message,
)


def fences_balanced(chunk: str) -> bool:
    return sum(1 for line in chunk.split("\n") if line.strip().startswith("```")) % 2 == 0


def test_short_text_is_one_message() -> None:
    assert split_message("hello there") == ["hello there"]
    assert split_message("   ") == []


def test_cuts_fall_between_paragraphs() -> None:
    first, second = "a" * 1200, "b" * 1200
    assert split_message(f"{first}\n\n{second}") == [first, second]


def test_long_paragraph_is_cut_at_sentence_ends() -> None:
    sentences = [f"Sentence number {i} is here." for i in range(200)]
    chunks = split_message(" ".join(sentences))
    assert len(chunks) > 1
    assert all(len(c) <= 2000 for c in chunks)
    assert all(c.endswith(".") for c in chunks), "every cut falls after a sentence"
    assert " ".join(chunks) == " ".join(sentences)


def test_one_enormous_word_is_cut_hard() -> None:
    chunks = split_message("x" * 4500)
    assert [len(c) for c in chunks] == [2000, 2000, 500]


def test_code_block_is_kept_whole_when_it_fits() -> None:
    code = "```python\n" + "\n".join(f"print({i})" for i in range(100)) + "\n```"
    text = "intro " * 200 + "\n\n" + code + "\n\nafter"
    chunks = split_message(text)
    assert any(code in c for c in chunks), "the block sits whole in one message"
    assert all(fences_balanced(c) for c in chunks)


def test_long_code_block_is_closed_and_reopened() -> None:
    body = "\n".join(f"    value_{i} = compute({i})  # a comment" for i in range(200))
    text = f"Here you go:\n\n```python\n{body}\n```\n\nThat's all."
    chunks = split_message(text)
    assert len(chunks) >= 5
    assert all(len(c) <= 2000 for c in chunks)
    assert all(fences_balanced(c) for c in chunks)
    code_chunks = [c for c in chunks if "value_" in c]
    assert all(c.count("```python\n") == 1 for c in code_chunks), "each part reopens the fence"
    assert all(c.split("value_")[-1].split("\n")[1] == "```" for c in code_chunks), "and closes it"
    lines = [ln for c in code_chunks for ln in c.split("\n") if "value_" in ln]
    assert lines == body.split("\n"), "no code line lost, cut or reordered"


def test_blank_lines_inside_code_do_not_split_the_block() -> None:
    text = "```\nline one\n\nline three\n```"
    assert split_message(text) == [text]


def test_unclosed_fence_while_streaming_is_closed() -> None:
    body = "\n".join(f"x = {i}" for i in range(500))
    chunks = split_message(f"```py\n{body}")
    assert all(fences_balanced(c) for c in chunks)


def test_clean_text_drops_own_mention_and_names_others() -> None:
    text = clean_text(
        "<@42> hi, ask <@!7> in <#9> or ping <@&5> and <@8>",
        bot_id=42,
        users={7: "Bob"},
        roles={5: "mods"},
        channels={9: "general"},
    )
    assert text == "hi, ask @Bob in #general or ping @mods and @someone"


def test_text_attachments_are_recognised_and_defused() -> None:
    assert is_text_attachment("notes.TXT", None)
    assert is_text_attachment("data", "text/plain; charset=utf-8")
    assert not is_text_attachment("cat.png", "image/png")
    block = inline_attachment("a.md", b"before\n```\nevil\n```\nafter")
    assert block.startswith('Attached file "a.md":\n```\n') and block.endswith("\n```")
    assert block.count("```") == 2


def test_throttle_allows_once_per_interval() -> None:
    now = [0.0]
    throttle = Throttle(1.0, clock=lambda: now[0])
    assert throttle.ready()
    now[0] = 0.5
    assert not throttle.ready()
    now[0] = 1.0
    assert throttle.ready()
