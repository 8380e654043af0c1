"""The local model's worker process: llama.cpp runs here, never in the bot's own process.

Started by `bot/brains/supervisor.py` as `python -P bot/brains/local_worker.py` (or the command in
LOCAL_MODEL_WORKER_COMMAND). Native code that crashes (SIGILL from a CPU mismatch, SIGSEGV),
hangs or runs out of memory takes this process down, and the bot loses one reply, not itself.

It speaks JSON lines: requests on stdin, answers on the original stdout. Native libraries that
print are sent to stderr instead (fd 1 is pointed at fd 2), so nothing can corrupt the channel.

    bot → worker                                         worker → bot
    {"op": "load", "kind": "chat"|"embed",               {"ready": {"load_ms": 812.0}}
     "model_path": ..., "threads": 2, "context": 2048}   {"failed": "FileNotFoundError"}
    {"op": "chat", "id": 1, "messages": [...],           {"id": 1, "text": "Hel"} ...
     "temperature": .8, "seed": 7, "max_tokens": 200,    {"id": 1, "done": {"completion_tokens":
     "repeat_penalty": 1.3}                                 9, "eval_ms": 250.1, "done_reason": ..,
                                                           "prompt_tokens": 412,
                                                           "prompt_cached_tokens": 380,
                                                           "prompt_eval_ms": 96.0}}
    {"op": "stop", "id": 1}      (ends generation 1 at its next token; "done" follows)
    {"op": "embed", "id": 2, "texts": ["..."]}           {"id": 2, "vectors": [[...]], "tokens": 5}
                                                         {"id": n, "error": "ValueError"}

Like Ollama, llama-cpp-python keeps the tokens it evaluated last and evaluates only what follows
the longest beginning a new prompt shares with them. "done" says how that went, as Ollama does:
`prompt_tokens` (the prompt, counted by the GGUF's own chat template and tokenizer, which is
what the chat call itself does), `prompt_cached_tokens` (taken from that cache) and
`prompt_eval_ms` (llama.cpp's own timer for evaluating the prompt, `llama_perf_context`).

One request at a time: a second request waits until the first has answered "done". A reader
thread takes stdin so that "stop" reaches a generation in progress; end of stdin (the bot went
away) stops everything and the worker exits.
"""

from __future__ import annotations

import json
import math
import os
import queue
import sys
import threading
import time
from typing import IO, Any

_END = None


class _Channel:
    """The protocol's stdout, kept apart from fd 1 (which now goes to stderr)."""

    def __init__(self) -> None:
        sys.stdout.flush()
        self._out: IO[str] = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
        os.dup2(2, 1)
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        with self._lock:
            self._out.write(json.dumps(message, separators=(",", ":")) + "\n")
            self._out.flush()


class _Inbox:
    """stdin on a thread: requests into a queue, "stop" straight to the running generation."""

    def __init__(self) -> None:
        self.requests: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.cancelled: set[Any] = set()  # ids told to stop (may arrive before they start)
        self.closed = False  # stdin ended: the bot went away
        threading.Thread(target=self._read, name="inbox", daemon=True).start()

    def _read(self) -> None:
        for line in sys.stdin:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if message.get("op") == "stop":
                self.cancelled.add(message.get("id"))
            else:
                self.requests.put(message)
        self.closed = True
        self.requests.put(_END)

    def stopped(self, ident: Any) -> bool:
        return self.closed or ident in self.cancelled


def _volunteer_for_the_oom_killer() -> None:
    """If memory runs out, the kernel should kill this process, not the bot (Linux only)."""
    try:
        with open("/proc/self/oom_score_adj", "w", encoding="ascii") as handle:
            handle.write("1000")
    except OSError:
        pass


def _load(request: dict[str, Any]) -> Any:
    from llama_cpp import Llama

    embed = request.get("kind") == "embed"
    return Llama(
        model_path=str(request["model_path"]),
        embedding=embed,
        n_ctx=512 if embed else int(request.get("context", 2048)),
        n_threads=int(request.get("threads", 2)),
        verbose=False,
    )


class _PromptCounter:
    """Counts a chat's prompt tokens the way llama-cpp-python's handler for the GGUF's own chat
    template makes them (`chat_formatter_to_chat_completion_handler`: the template rendered by
    `Jinja2ChatFormatter`, then tokenized with special tokens). Another chat format (a GGUF
    without a template): None, the count is not known."""

    def __init__(self, llm: Any) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self._llm = llm
        template = llm.metadata.get("tokenizer.chat_template")
        own = llm.chat_handler is None and llm.chat_format == "chat_template.default"
        self._formatter = (
            Jinja2ChatFormatter(
                template, _token_text(llm, llm.token_eos()), _token_text(llm, llm.token_bos())
            )
            if own and template
            else None
        )

    def count(self, messages: Any) -> int | None:
        if self._formatter is None:
            return None
        try:
            result = self._formatter(messages=messages)
            prompt = result.prompt.encode("utf-8")
            tokens = self._llm.tokenize(prompt, add_bos=not result.added_special, special=True)
        except Exception:  # a figure, never a reason to fail the reply
            return None
        return len(tokens)


def _token_text(llm: Any, token: int) -> str:
    if token == -1:
        return ""
    return str(llm.detokenize([token], special=True).decode("utf-8", errors="replace"))


def _reset_perf(llm: Any) -> None:
    import llama_cpp

    reset = getattr(llama_cpp, "llama_perf_context_reset", None)  # llama-cpp-python 0.3 on
    if reset is not None:
        reset(llm.ctx)


def _prompt_figures(llm: Any, prompt_tokens: int | None) -> dict[str, Any]:
    """What the prompt cost, from llama.cpp's counters since `_reset_perf`. llama.cpp counts a
    decode of several tokens as prompt evaluation and of one token as generation, and reports
    at least 1 of each (it guards a division): a count whose time is zero is none. Every token
    in the context after the call was either decoded by it or kept from before, so what was
    kept (the cache hit) is the context less both counts."""
    import llama_cpp

    perf = getattr(llama_cpp, "llama_perf_context", None)
    if perf is None:
        return {}
    data = perf(llm.ctx)
    batched = data.n_p_eval if data.t_p_eval_ms > 0 else 0
    single = data.n_eval if data.t_eval_ms > 0 else 0
    figures: dict[str, Any] = {"prompt_eval_ms": float(data.t_p_eval_ms)}
    if prompt_tokens is not None:
        cached = min(max(0, int(llm.n_tokens) - batched - single), prompt_tokens)
        figures.update(prompt_tokens=prompt_tokens, prompt_cached_tokens=cached)
    return figures


def _chat(
    llm: Any, prompts: _PromptCounter, request: dict[str, Any], inbox: _Inbox, channel: _Channel
) -> None:
    ident = request["id"]
    count = 0
    finish: str | None = None
    prompt_tokens = prompts.count(request["messages"])
    _reset_perf(llm)
    started = time.perf_counter()
    stream = llm.create_chat_completion(
        messages=request["messages"],
        temperature=float(request["temperature"]),
        seed=int(request["seed"]),
        max_tokens=int(request["max_tokens"]),
        repeat_penalty=float(request["repeat_penalty"]),
        stream=True,
    )
    for part in stream:
        if inbox.stopped(ident):
            finish = "cancelled"
            break
        choice = part["choices"][0]
        finish = choice.get("finish_reason") or finish
        text = choice["delta"].get("content") or ""
        if text:
            count += 1
            channel.send({"id": ident, "text": text})
    done = {
        "completion_tokens": count,
        "eval_ms": (time.perf_counter() - started) * 1000,
        "done_reason": finish or "stop",
        **_prompt_figures(llm, prompt_tokens),
    }
    channel.send({"id": ident, "done": done})


def _embed(llm: Any, request: dict[str, Any], channel: _Channel) -> None:
    vectors, tokens = [], 0
    for text in request["texts"]:
        rows = llm.embed(text or " ", normalize=False, truncate=True)
        if rows and isinstance(rows[0], float):  # the model pooled it already
            rows = [rows]
        tokens += len(rows)
        vectors.append(unit(mean(rows)))
    channel.send({"id": request["id"], "vectors": vectors, "tokens": tokens})


def mean(rows: list[list[float]]) -> list[float]:
    count = len(rows) or 1
    return [sum(column) / count for column in zip(*rows, strict=True)]


def unit(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


def _serve(llm: Any, inbox: _Inbox, channel: _Channel) -> None:
    prompts: _PromptCounter | None = None
    while (request := inbox.requests.get()) is not _END:
        try:
            if request.get("op") == "chat":
                prompts = prompts or _PromptCounter(llm)
                _chat(llm, prompts, request, inbox, channel)
            elif request.get("op") == "embed":
                _embed(llm, request, channel)
            else:
                channel.send({"id": request.get("id"), "error": "unknown op"})
        except Exception as exc:  # a Python-level failure costs this request only
            channel.send({"id": request.get("id"), "error": type(exc).__name__})
        inbox.cancelled.discard(request.get("id"))


def main() -> int:
    channel = _Channel()
    _volunteer_for_the_oom_killer()
    inbox = _Inbox()
    load = inbox.requests.get()
    if load is _END or load.get("op") != "load":
        return 2
    started = time.perf_counter()
    try:
        llm = _load(load)
    except Exception as exc:
        channel.send({"failed": f"{type(exc).__name__} while loading the model"})
        return 1
    channel.send({"ready": {"load_ms": (time.perf_counter() - started) * 1000}})
    _serve(llm, inbox, channel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
