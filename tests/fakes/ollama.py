"""A loopback fake of the Ollama HTTP API for tests.

`FakeOllama` is an aiohttp server bound to 127.0.0.1 on an OS-chosen port that speaks the
same wire protocol as a real Ollama server (the shapes the official ``ollama`` Python client
0.6.x sends and parses), so production code can be driven through ``ollama.AsyncClient``
pointed at ``fake.url``.

Implemented endpoints: ``POST /api/chat`` (streamed NDJSON and non-streamed JSON),
``POST /api/generate`` (the same, with ``response`` instead of ``message``),
``POST /api/embed``, ``GET /api/tags``, ``GET /api/version``, ``POST /api/show``,
``GET /api/ps`` and ``GET|HEAD /``.

Behaviour copied from real Ollama:

* model names without a tag are matched as ``name:latest`` and listed that way by
  ``/api/tags``; the ``model`` field of a chat/embed answer echoes the request;
* an unknown model answers 404 ``{"error": "model \\"X\\" not found, try pulling it first"}``;
* chatting with an embedding-only model answers 400 ``{"error": "\\"X\\" does not support chat"}``;
* ``stream`` defaults to true when the request omits it;
* a chat without messages just "loads" the model (``done_reason: "load"``, empty content);
* ``options.num_predict`` caps the number of generated chunks (``done_reason: "length"``);
* ``/api/generate`` (Ollama's API reference, docs/api.md "Generate a completion"): the body
  carries ``prompt`` and, for a prompt already in the model's format, ``raw: true`` (no
  template applied, no ``context`` returned); each answer line carries ``response``, the last
  one ``done: true`` with the same counters as a chat. The responder gets the body as sent
  (``prompt``, ``raw``) and answers as the model would;
* ``dimensions`` on ``/api/embed`` truncates the vector and re-normalises it;
* embeddings go on the wire as Ollama's Go server writes them: its ``EmbedResponse`` holds
  ``Embeddings [][]float32`` (ollama/ollama ``api/types.go``), which Go's ``encoding/json``
  writes as the shortest decimal that reads back as the same float32, plain unless below 1e-6
  or from 1e21 (then ``1.5e-7``); a text's vector is worked out once and kept, as the fake
  stands in for a model on another machine and should not load the bot's CPU;
* tool calling: a reply queued with ``queue_tool_call`` streams its text, then a chunk whose
  message carries ``tool_calls: [{"function": {"name", "arguments"}}]`` (arguments an object),
  then the final chunk; ``tools`` sent to a model without the ``tools`` capability answer 400
  ``{"error": "registry.ollama.ai/library/X does not support tools"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import json
import math
import re
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from types import TracebackType
from typing import Any, Self

from aiohttp import web

from tests.fakes.loopback import serve

__all__ = ["DEFAULT_MODELS", "FakeOllama", "Responder", "split_into_chunks"]

DEFAULT_MODELS: tuple[str, ...] = ("llama3.2:3b", "llama-guard3:1b", "nomic-embed-text")

Responder = Callable[[dict[str, Any]], str | Awaitable[str]]
"""Called with the parsed /api/chat or /api/generate body when no reply is queued; returns
the reply text."""

_NS = 1_000_000_000
_MODIFIED_AT = "2025-01-14T09:21:37.482913705+00:00"
_HANG_POLL_SECONDS = 0.01
_CHUNK_RE = re.compile(r"\s*\S+|\s+")
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def split_into_chunks(text: str) -> list[str]:
    """Split text into word-ish chunks that keep their whitespace (``"".join(...) == text``)."""
    return _CHUNK_RE.findall(text)


def normalize_model_name(name: str) -> str:
    """Ollama's name normalisation: a name without a tag means ``name:latest``."""
    base = name.rsplit("/", 1)[-1]
    return name if ":" in base else f"{name}:latest"


def _count_tokens(text: str) -> int:
    return len(_TOKEN_RE.findall(text))


def _compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


@lru_cache(maxsize=4096)
def _embedding(text: str, full: int, dim: int | None) -> tuple[str, tuple[float, ...]]:
    """A text's unit vector: the JSON array the server writes, and the floats it reads as."""
    values: list[float] = []
    counter = 0
    while len(values) < full:
        digest = hashlib.blake2b(f"{counter}\x00{text}".encode(), digest_size=64).digest()
        values.extend(v / 2_147_483_648.0 - 1.0 for v in struct.unpack("<16I", digest))
        counter += 1
    values = values[: min(full, dim) if dim else full]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    words = [_go_float32(v / norm) for v in values]
    return "[" + ",".join(words) + "]", tuple(float(w) for w in words)


def _go_float32(value: float) -> str:
    """`value` as a float32 the way Go's encoding/json writes one: the fewest significant
    digits that read back as the same float32; plain, or `1.5e-7` below 1e-6 and from 1e21."""
    single = struct.unpack("<f", struct.pack("<f", value))[0]
    for digits in range(1, 10):
        text = f"{single:.{digits}g}"
        if struct.unpack("<f", struct.pack("<f", float(text)))[0] == single:
            break
    number = Decimal(text)
    if single != 0 and (abs(single) < 1e-6 or abs(single) >= 1e21):
        return f"{number:e}"
    return f"{number:f}"


def _now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class _ModelInfo:
    family: str
    parameter_size: str
    quantization_level: str
    size: int
    capabilities: tuple[str, ...]
    context_length: int
    embedding_length: int
    parameter_count: int

    @property
    def can_chat(self) -> bool:
        return "completion" in self.capabilities


_KNOWN_MODELS: dict[str, _ModelInfo] = {
    "llama3.2:3b": _ModelInfo(
        family="llama",
        parameter_size="3.2B",
        quantization_level="Q4_K_M",
        size=2_019_393_189,
        capabilities=("completion", "tools"),
        context_length=131_072,
        embedding_length=3072,
        parameter_count=3_212_749_888,
    ),
    "llama3.2:1b": _ModelInfo(
        family="llama",
        parameter_size="1.2B",
        quantization_level="Q8_0",
        size=1_321_098_329,
        capabilities=("completion", "tools"),
        context_length=131_072,
        embedding_length=2048,
        parameter_count=1_235_814_432,
    ),
    "llama-guard3:1b": _ModelInfo(
        family="llama",
        parameter_size="1.5B",
        quantization_level="Q8_0",
        size=1_600_354_816,
        capabilities=("completion",),
        context_length=131_072,
        embedding_length=2048,
        parameter_count=1_498_482_688,
    ),
    "nomic-embed-text:latest": _ModelInfo(
        family="nomic-bert",
        parameter_size="137M",
        quantization_level="F16",
        size=274_302_450,
        capabilities=("embedding",),
        context_length=2048,
        embedding_length=768,
        parameter_count=136_727_040,
    ),
}


def _model_info(name: str) -> _ModelInfo:
    normalized = normalize_model_name(name)
    if normalized in _KNOWN_MODELS:
        return _KNOWN_MODELS[normalized]
    base = normalized.rsplit("/", 1)[-1]
    family_match = re.match(r"[a-z]+", base)
    family = family_match.group(0) if family_match else "llama"
    size_match = re.search(r":(\d+(?:\.\d+)?)([bm])\b", base)
    params = 1_000_000_000.0
    if size_match:
        params = float(size_match.group(1)) * (1e9 if size_match.group(2) == "b" else 1e6)
    if "embed" in base:
        return _ModelInfo(
            family="bert",
            parameter_size=f"{params / 1e6:.0f}M",
            quantization_level="F16",
            size=int(params * 2),
            capabilities=("embedding",),
            context_length=512,
            embedding_length=768,
            parameter_count=int(params),
        )
    return _ModelInfo(
        family=family,
        parameter_size=f"{params / 1e9:.1f}B",
        quantization_level="Q4_K_M",
        size=int(params * 0.62),
        capabilities=("completion",),
        context_length=8192,
        embedding_length=4096,
        parameter_count=int(params),
    )


def _model_details(info: _ModelInfo) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "gguf",
        "family": info.family,
        "families": [info.family],
        "parameter_size": info.parameter_size,
        "quantization_level": info.quantization_level,
    }


def _digest(name: str) -> str:
    return hashlib.sha256(normalize_model_name(name).encode()).hexdigest()


def _schema_example(schema: Any, text: str, root: dict[str, Any], depth: int = 0) -> Any:
    """A minimal instance of a JSON schema; string slots are filled with ``text``."""
    if not isinstance(schema, dict) or depth > 20:
        return text
    if "$ref" in schema:
        ref = str(schema["$ref"])
        target: Any = root
        for part in ref.removeprefix("#/").split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        return _schema_example(target, text, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    if "default" in schema:
        return schema["default"]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return _schema_example(schema[key][0], text, root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        props: dict[str, Any] = schema.get("properties", {})
        return {k: _schema_example(v, text, root, depth + 1) for k, v in props.items()}
    if kind == "array":
        count = int(schema.get("minItems", 0))
        return [_schema_example(schema.get("items", {}), text, root, depth + 1)] * count
    if kind == "integer":
        return int(schema.get("minimum", 0))
    if kind == "number":
        return float(schema.get("minimum", 0.0))
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    return text


@dataclass(frozen=True)
class _Reply:
    text: str
    chunks: tuple[str, ...]
    tool_calls: tuple[dict[str, Any], ...] = ()


class FakeOllama:
    """In-process fake Ollama server on loopback.

    Public knobs (all may be changed while the server runs):

    * ``models``: names the server "has" (default ``DEFAULT_MODELS``);
    * ``responder(body) -> str``: reply text when nothing is queued (may be async);
    * ``token_delay`` / ``first_token_delay``: seconds between / before streamed chunks;
    * ``hang``: when true, /api/chat requests wait (until ``hang`` is cleared or ``stop()``);
    * ``embed_dim``: embedding dimension (default 768);
    * ``version``: what ``GET /api/version`` reports.

    Memory: ``requests`` (every request as ``(path, parsed JSON body)``), ``peers`` (the client
    address each request with a valid body came from: one TCP connection, one address),
    ``chat_requests()``, ``embed_requests()``; counters ``active`` / ``max_active`` (in-flight
    /api/chat and /api/embed requests).
    """

    def __init__(
        self,
        models: list[str] | None = None,
        *,
        embed_dim: int = 768,
        token_delay: float = 0.0,
        first_token_delay: float = 0.0,
        responder: Responder | None = None,
        version: str = "0.6.5",
    ) -> None:
        self.models: list[str] = list(DEFAULT_MODELS) if models is None else list(models)
        self.embed_dim = embed_dim
        self.token_delay = token_delay
        self.first_token_delay = first_token_delay
        self.responder: Responder = responder if responder is not None else self.echo_responder
        self.version = version
        self.hang = False
        self.url = ""
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.peers: list[Any] = []  # the client's (host, port) of each request with a body
        self.active = 0
        self.max_active = 0
        self._replies: deque[_Reply] = deque()
        self._failures: deque[tuple[int, str]] = deque()
        self._break_after: int | None = None
        self._error_after: tuple[int, str] | None = None
        self._loaded: dict[str, datetime] = {}
        self._runner: web.AppRunner | None = None
        self._stop_event: asyncio.Event | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> str:
        """Start serving on 127.0.0.1 with an OS-chosen port; returns the base URL."""
        if self._runner is not None:
            return self.url
        app = web.Application()
        app.router.add_post("/api/chat", self._handle_chat)
        app.router.add_post("/api/generate", self._handle_generate)
        app.router.add_post("/api/embed", self._handle_embed)
        app.router.add_get("/api/tags", self._handle_tags)
        app.router.add_get("/api/version", self._handle_version)
        app.router.add_post("/api/show", self._handle_show)
        app.router.add_get("/api/ps", self._handle_ps)
        app.router.add_get("/", self._handle_root)  # also answers HEAD
        self._stop_event = asyncio.Event()
        self._runner, port = await serve(app, shutdown_timeout=2.0)
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        """Stop serving; hanging or slow requests are released and their connections closed."""
        if self._stop_event is not None:
            self._stop_event.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------------ scripting

    def queue_reply(self, text: str, *, chunks: list[str] | None = None) -> None:
        """Queue the next chat reply (FIFO). ``chunks`` fixes the streamed deltas exactly."""
        if chunks is None:
            parts = tuple(split_into_chunks(text))
        else:
            if "".join(chunks) != text:
                raise ValueError("chunks must join to text")
            parts = tuple(chunks)
        self._replies.append(_Reply(text, parts))

    def queue_tool_call(self, name: str, arguments: dict[str, Any], *, text: str = "") -> None:
        """Queue a reply (FIFO) in which the model calls the tool ``name`` with ``arguments``,
        after saying ``text`` (usually nothing)."""
        self.queue_tool_calls([(name, arguments)], text=text)

    def queue_tool_calls(self, calls: list[tuple[str, dict[str, Any]]], *, text: str = "") -> None:
        """Queue a reply calling several tools at once, in order."""
        wire = tuple({"function": {"name": n, "arguments": dict(a)}} for n, a in calls)
        self._replies.append(_Reply(text, tuple(split_into_chunks(text)), wire))

    @staticmethod
    def offered_tools(body: dict[str, Any]) -> list[str]:
        """The names of the tools a recorded /api/chat request offered the model."""
        return [t["function"]["name"] for t in body.get("tools") or [] if "function" in t]

    def fail_next(self, status: int = 500, error: str = "boom", count: int = 1) -> None:
        """Answer the next ``count`` /api/chat or /api/embed requests with ``{"error": error}``."""
        for _ in range(count):
            self._failures.append((status, error))

    def break_stream_after(self, n_chunks: int) -> None:
        """The next streamed chat sends ``n_chunks`` content chunks, then drops the connection."""
        self._break_after = n_chunks

    def error_stream_after(self, n_chunks: int, error: str = "boom") -> None:
        """The next streamed chat sends ``n_chunks`` chunks, then an ``{"error": ...}`` line
        (Ollama's way of reporting mid-stream failures; the client raises ResponseError)."""
        self._error_after = (n_chunks, error)

    def reset(self) -> None:
        """Forget recorded requests, queued replies, injected failures and counters."""
        self.requests.clear()
        self.peers.clear()
        self._replies.clear()
        self._failures.clear()
        self._break_after = None
        self._error_after = None
        self._loaded.clear()
        self.max_active = self.active

    @property
    def pending_replies(self) -> int:
        return len(self._replies)

    def chat_requests(self) -> list[dict[str, Any]]:
        return [body for path, body in self.requests if path == "/api/chat"]

    def generate_requests(self) -> list[dict[str, Any]]:
        return [body for path, body in self.requests if path == "/api/generate"]

    def embed_requests(self) -> list[dict[str, Any]]:
        return [body for path, body in self.requests if path == "/api/embed"]

    @staticmethod
    def echo_responder(body: dict[str, Any]) -> str:
        """Default responder: ``"echo: <content of the last user message>"``."""
        for message in reversed(body.get("messages") or []):
            if isinstance(message, dict) and message.get("role") == "user":
                return f"echo: {message.get('content') or ''}"
        return "echo: "

    def embedding_for(self, text: str, dim: int | None = None) -> list[float]:
        """The deterministic unit vector the server returns for ``text``, as the client reads it."""
        return list(_embedding(text, self.embed_dim, dim)[1])

    # ------------------------------------------------------------------ helpers

    def _find_model(self, name: str) -> str | None:
        wanted = normalize_model_name(name)
        for model in self.models:
            if normalize_model_name(model) == wanted:
                return model
        return None

    def _enter(self) -> None:
        self.active += 1
        self.max_active = max(self.max_active, self.active)

    def _exit(self) -> None:
        self.active -= 1

    @property
    def _stopping(self) -> bool:
        return self._stop_event is not None and self._stop_event.is_set()

    async def _sleep(self, seconds: float) -> bool:
        """Sleep; returns False if the server is stopping (the caller should give up)."""
        if self._stop_event is None:
            return True
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_event.wait(), seconds)
        return not self._stopping

    @staticmethod
    def _error(status: int, error: str) -> web.Response:
        return web.json_response({"error": error}, status=status, dumps=_compact)

    async def _read_body(self, request: web.Request, path: str) -> dict[str, Any] | web.Response:
        raw = await request.read()
        if not raw:
            self.requests.append((path, {}))
            return self._error(400, "missing request body")
        try:
            body = json.loads(raw)
        except ValueError as exc:
            self.requests.append((path, {}))
            return self._error(400, str(exc))
        if not isinstance(body, dict):
            self.requests.append((path, {}))
            return self._error(400, "invalid request body")
        self.requests.append((path, body))
        self.peers.append(
            request.transport.get_extra_info("peername") if request.transport else None
        )
        return body

    def _check_model(self, body: dict[str, Any]) -> tuple[str, _ModelInfo] | web.Response:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            return self._error(400, "model is required")
        if self._find_model(name) is None:
            return self._error(404, f'model "{name}" not found, try pulling it first')
        return name, _model_info(name)

    def _load_duration(self, name: str) -> int:
        key = normalize_model_name(name)
        cold = key not in self._loaded
        self._loaded[key] = datetime.now(UTC) + timedelta(minutes=5)
        return 1_532_487_125 if cold else 18_431_250

    async def _reply_for(self, body: dict[str, Any]) -> _Reply:
        if self._replies:
            return self._replies.popleft()
        produced = self.responder(body)
        text = await produced if inspect.isawaitable(produced) else produced
        text = self._apply_format(str(text), body.get("format"))
        return _Reply(text, tuple(split_into_chunks(text)))

    @staticmethod
    def _apply_format(text: str, fmt: Any) -> str:
        if fmt in (None, ""):
            return text
        try:
            json.loads(text)
        except ValueError:
            pass
        else:
            return text
        if isinstance(fmt, dict):
            return _compact(_schema_example(fmt, text, fmt))
        return _compact({"response": text})

    # ------------------------------------------------------------------ handlers

    async def _handle_root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def _handle_version(self, request: web.Request) -> web.Response:
        self.requests.append(("/api/version", {}))
        return web.json_response({"version": self.version}, dumps=_compact)

    async def _handle_tags(self, request: web.Request) -> web.Response:
        self.requests.append(("/api/tags", {}))
        models = []
        for model in self.models:
            info = _model_info(model)
            name = normalize_model_name(model)
            models.append(
                {
                    "name": name,
                    "model": name,
                    "modified_at": _MODIFIED_AT,
                    "size": info.size,
                    "digest": _digest(model),
                    "details": _model_details(info),
                }
            )
        return web.json_response({"models": models}, dumps=_compact)

    async def _handle_ps(self, request: web.Request) -> web.Response:
        self.requests.append(("/api/ps", {}))
        models = []
        for key, expires in self._loaded.items():
            if self._find_model(key) is None:
                continue
            info = _model_info(key)
            models.append(
                {
                    "name": key,
                    "model": key,
                    "size": info.size + 400_000_000,
                    "digest": _digest(key),
                    "details": _model_details(info),
                    "expires_at": expires.isoformat(),
                    "size_vram": info.size + 400_000_000,
                    "context_length": min(info.context_length, 4096),
                }
            )
        return web.json_response({"models": models}, dumps=_compact)

    async def _handle_show(self, request: web.Request) -> web.Response:
        body = await self._read_body(request, "/api/show")
        if isinstance(body, web.Response):
            return body
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            return self._error(400, "model is required")
        if self._find_model(name) is None:
            return self._error(404, f"model '{name}' not found")
        info = _model_info(name)
        arch = info.family.replace("-", "_")
        template = "{{ .Prompt }}" if not info.can_chat else "{{- range .Messages }}{{ end }}"
        return web.json_response(
            {
                "license": "",
                "modelfile": f'# Modelfile generated by "ollama show"\nFROM {name}\n',
                "parameters": 'stop                           "<|eot_id|>"'
                if info.can_chat
                else "",
                "template": template,
                "details": _model_details(info),
                "model_info": {
                    "general.architecture": arch,
                    "general.parameter_count": info.parameter_count,
                    f"{arch}.context_length": info.context_length,
                    f"{arch}.embedding_length": info.embedding_length,
                },
                "capabilities": list(info.capabilities),
                "modified_at": _MODIFIED_AT,
            },
            dumps=_compact,
        )

    async def _handle_embed(self, request: web.Request) -> web.StreamResponse:
        body = await self._read_body(request, "/api/embed")
        if isinstance(body, web.Response):
            return body
        self._enter()
        try:
            if self._failures:
                return self._error(*self._failures.popleft())
            checked = self._check_model(body)
            if isinstance(checked, web.Response):
                return checked
            name, _info = checked
            raw_input = body.get("input")
            if isinstance(raw_input, str):
                texts = [raw_input] if raw_input else []
            elif isinstance(raw_input, list) and all(isinstance(t, str) for t in raw_input):
                texts = list(raw_input)
            elif raw_input is None:
                texts = []
            else:
                return self._error(400, f"invalid input type: {raw_input!r}")
            dimensions = body.get("dimensions")
            dim = dimensions if isinstance(dimensions, int) and dimensions > 0 else None
            load = self._load_duration(name)
            prompt_tokens = sum(_count_tokens(t) + 2 for t in texts)
            arrays = ",".join(_embedding(t, self.embed_dim, dim)[0] for t in texts)
            timing = {
                "total_duration": load + 4_118_500 + prompt_tokens * 310_250,
                "load_duration": load,
                "prompt_eval_count": prompt_tokens,
            }  # in the order Ollama writes them, after model and embeddings
            body = (
                f'{_compact({"model": name})[:-1]},"embeddings":[{arrays}],{_compact(timing)[1:]}'
            )
            return web.Response(text=body, content_type="application/json")
        finally:
            self._exit()

    async def _handle_generate(self, request: web.Request) -> web.StreamResponse:
        body = await self._read_body(request, "/api/generate")
        if isinstance(body, web.Response):
            return body
        self._enter()
        try:
            return await self._generate(request, body)
        finally:
            self._exit()

    async def _generate(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        if self._failures:
            return self._error(*self._failures.popleft())
        checked = self._check_model(body)
        if isinstance(checked, web.Response):
            return checked
        name, info = checked
        if not info.can_chat:
            return self._error(400, f'"{name}" does not support generate')
        while self.hang:
            if not await self._sleep(_HANG_POLL_SECONDS):
                return self._error(503, "server is shutting down")
        if request.transport is None or request.transport.is_closing():
            return self._error(499, "client disconnected")
        load = self._load_duration(name)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:  # an empty prompt only loads the model
            return web.json_response(
                {
                    "model": name,
                    "created_at": _now_rfc3339(),
                    "response": "",
                    "done": True,
                    "done_reason": "load",
                },
                dumps=_compact,
            )
        reply = await self._reply_for(body)
        chunks = list(reply.chunks)
        options = body.get("options") or {}
        num_predict = options.get("num_predict") if isinstance(options, dict) else None
        done_reason = "stop"
        if isinstance(num_predict, int) and 0 < num_predict < len(chunks):
            chunks, done_reason = chunks[:num_predict], "length"
        prompt_tokens = _count_tokens(prompt)
        eval_count = max(1, len(chunks))
        prompt_eval_duration = 23_814_000 + prompt_tokens * 1_207_300
        eval_duration = eval_count * 14_582_600
        final: dict[str, Any] = {
            "model": name,
            "created_at": _now_rfc3339(),
            "response": "",
            "done": True,
            "done_reason": done_reason,
            "total_duration": load + prompt_eval_duration + eval_duration + 2_904_417,
            "load_duration": load,
            "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": prompt_eval_duration,
            "eval_count": eval_count,
            "eval_duration": eval_duration,
        }
        if body.get("stream", True) is False:
            final["response"] = "".join(chunks)
            return web.json_response(final, dumps=_compact)
        response = web.StreamResponse(status=200)
        response.content_type = "application/x-ndjson"
        await response.prepare(request)
        for chunk in chunks:
            line = {"model": name, "created_at": _now_rfc3339(), "response": chunk, "done": False}
            await response.write((_compact(line) + "\n").encode())
        await response.write((_compact(final) + "\n").encode())
        return response

    async def _handle_chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._read_body(request, "/api/chat")
        if isinstance(body, web.Response):
            return body
        self._enter()
        try:
            return await self._chat(request, body)
        finally:
            self._exit()

    async def _chat(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        if self._failures:
            return self._error(*self._failures.popleft())
        checked = self._check_model(body)
        if isinstance(checked, web.Response):
            return checked
        name, info = checked
        if not info.can_chat:
            return self._error(400, f'"{name}" does not support chat')
        if body.get("tools") and "tools" not in info.capabilities:
            base = normalize_model_name(name)
            return self._error(400, f"registry.ollama.ai/library/{base} does not support tools")
        if self.hang:
            while self.hang:
                if not await self._sleep(_HANG_POLL_SECONDS):
                    return self._error(503, "server is shutting down")
            # Let a client that gave up while we hung finish closing its connection.
            await self._sleep(_HANG_POLL_SECONDS)
        if request.transport is None or request.transport.is_closing():
            # The client gave up (e.g. timed out while we hung): don't consume a queued reply.
            return self._error(499, "client disconnected")

        messages = body.get("messages") or []
        load = self._load_duration(name)
        if not messages:
            return web.json_response(
                {
                    "model": name,
                    "created_at": _now_rfc3339(),
                    "message": {"role": "assistant", "content": ""},
                    "done_reason": "load",
                    "done": True,
                },
                dumps=_compact,
            )

        reply = await self._reply_for(body)
        chunks = list(reply.chunks)
        done_reason = "stop"
        options = body.get("options") or {}
        num_predict = options.get("num_predict") if isinstance(options, dict) else None
        if isinstance(num_predict, int) and 0 < num_predict < len(chunks):
            chunks = chunks[:num_predict]
            done_reason = "length"

        prompt_tokens = sum(
            _count_tokens(str(m.get("content") or "")) + 5 for m in messages if isinstance(m, dict)
        )
        eval_count = max(1, len(chunks))
        prompt_eval_duration = 23_814_000 + prompt_tokens * 1_207_300
        eval_duration = eval_count * 14_582_600
        stream = body.get("stream", True) is not False
        if stream:
            eval_duration += int(self.token_delay * _NS) * max(0, len(chunks) - 1)
        total = load + prompt_eval_duration + eval_duration + 2_904_417
        if stream:
            total += int(self.first_token_delay * _NS)
        final = {
            "model": name,
            "created_at": "",
            "message": {"role": "assistant", "content": ""},
            "done_reason": done_reason,
            "done": True,
            "total_duration": total,
            "load_duration": load,
            "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": prompt_eval_duration,
            "eval_count": eval_count,
            "eval_duration": eval_duration,
        }

        if not stream:
            final["created_at"] = _now_rfc3339()
            final["message"] = {"role": "assistant", "content": "".join(chunks)}
            if reply.tool_calls:
                final["message"]["tool_calls"] = list(reply.tool_calls)
            return web.json_response(final, dumps=_compact)
        return await self._stream_chat(request, name, chunks, final, reply.tool_calls)

    async def _stream_chat(
        self,
        request: web.Request,
        name: str,
        chunks: list[str],
        final: dict[str, Any],
        tool_calls: tuple[dict[str, Any], ...] = (),
    ) -> web.StreamResponse:
        break_after, self._break_after = self._break_after, None
        error_after, self._error_after = self._error_after, None
        response = web.StreamResponse(status=200)
        response.content_type = "application/x-ndjson"

        async def send(obj: dict[str, Any]) -> None:
            # Like Ollama (Go's net/http), headers go out together with the first line.
            if not response.prepared:
                await response.prepare(request)
            await response.write((_compact(obj) + "\n").encode())

        def drop_connection() -> web.StreamResponse:
            # close() flushes what was written, then closes without the terminating chunk.
            if request.transport is not None:
                request.transport.close()
            return response

        try:
            if not await self._sleep(self.first_token_delay):
                return drop_connection()
            for index, chunk in enumerate(chunks):
                if break_after is not None and index >= break_after:
                    break
                if error_after is not None and index >= error_after[0]:
                    break
                if index > 0 and not await self._sleep(self.token_delay):
                    return drop_connection()
                await send(
                    {
                        "model": name,
                        "created_at": _now_rfc3339(),
                        "message": {"role": "assistant", "content": chunk},
                        "done": False,
                    }
                )
            if break_after is not None:
                if not response.prepared:
                    await response.prepare(request)
                return drop_connection()
            if error_after is not None:
                await send({"error": error_after[1]})
                return response
            if tool_calls:  # Ollama streams the calls in a chunk of their own, before the last
                message = {"role": "assistant", "content": "", "tool_calls": list(tool_calls)}
                await send(
                    {
                        "model": name,
                        "created_at": _now_rfc3339(),
                        "message": message,
                        "done": False,
                    }
                )
            final["created_at"] = _now_rfc3339()
            await send(final)
        except ConnectionError:
            # The client went away mid-stream; nothing left to do.
            pass
        return response
