"""A loopback fake of Fal's queue API, served over TLS, for the real `fal-client`.

`fal_client` always speaks https to `FAL_QUEUE_RUN_HOST` (read when it is imported), so the fake
serves TLS on 127.0.0.1 with a self-signed certificate made for the test session
(`make_certificate`); the client trusts it through `SSL_CERT_FILE`, which httpx honours.

The wire protocol, as the client sends and parses it:

* ``POST /{owner}/{alias}[/{path}]`` with the JSON arguments and ``Authorization: Key …`` →
  ``{request_id, response_url, status_url, cancel_url, queue_position, status: IN_QUEUE}``;
  the URLs name the app without its path (``/fal-ai/flux/requests/{id}``), as Fal's do;
* ``GET …/requests/{id}/status?logs=true`` → ``IN_QUEUE`` with ``queue_position``, then
  ``IN_PROGRESS`` with ``logs``, then ``COMPLETED`` (one step per poll);
* ``GET …/requests/{id}`` → the result: ``{images: [{url, width, height, content_type}], seed,
  has_nsfw_concepts, timings, prompt}``; ``PUT …/requests/{id}/cancel`` cancels;
* ``GET /files/{name}`` → the image bytes (a real PNG), as Fal's CDN serves them, without auth.

Errors: a wrong key answers 401 ``{"detail": …}``; `fail_submit`/`fail_result` make a 500 with
``x-fal-request-id`` (so the client does not retry it); `hang` keeps a request queued forever,
`hang_running` keeps it IN_PROGRESS forever (Fal's cancel only removes queued requests, so a
running one is billed: fal.ai/docs/model-endpoints/queue, "Cancelling a request");
`complete_with_error` ends a request COMPLETED with `error` and `error_type` (a runner that
failed); a status poll answers 202 while the request is queued or running and 200 once it is
completed; a cancel answers 202 CANCELLATION_REQUESTED, or 400 ALREADY_COMPLETED for a finished
request (fal.ai/docs/inference-api/queue/cancel);
`exhausted_balance` answers the submit with 403 ``{"detail": "User is locked. Reason: Exhausted
balance…"}`` as Fal does for an account out of credit.
`drop_accepted` (a count) queues a submit and then breaks its connection before answering, as
a reset or an ingress error after Fal's queue took the request does: the client retries the POST
by itself (fal_client.client._should_retry: any httpx.TransportError) and Fal runs both.
Fal's platform API, ``GET /v1/models/requests/by-endpoint`` (fal.ai/docs/platform-apis/v1/models/
requests/by-endpoint): ``endpoint_id`` repeated or comma-separated, ``start``/``end`` (ISO 8601,
end exclusive, on the end time), ``limit`` (at most 100), ``cursor`` (base64 of the page number),
``expand=payloads`` for ``json_input``/``json_output``; answers ``{items, next_cursor, has_more}``
with ``request_id, endpoint_id, sent_at, started_at, ended_at, status_code, duration``. A request
runs to its end whether or not anyone polls it (Fal's queue does); a request cancelled while
queued never ran and is not listed; `store_payloads = False` leaves the payloads out, as an
account with payload storage off does.
It remembers what it was asked: `submissions` (with the ``X-Fal-Request-Timeout`` header, the
client's `start_timeout`), `polls`, `cancels`, `downloads`.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import ssl
import struct
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.fakes.loopback import serve

_SIZES = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}


def make_png(width: int = 8, height: int = 8, *, black: bool = False) -> bytes:
    """A real PNG (an RGB gradient, or all black), built by hand: no imaging library needed."""
    rows = b"".join(
        b"\x00"
        + b"".join(
            bytes((0, 0, 0) if black else (x * 32 % 256, y * 32 % 256, 128)) for x in range(width)
        )
        for y in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


BLACK_PNG = make_png(black=True)  # what Fal's safety checker sends for a flagged picture


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA) and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-fal test CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "fake-fal.pem", directory / "fake-fal.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@dataclass
class _Request:
    id: str
    app: str  # owner/alias
    endpoint: str  # owner/alias[/path], as submitted
    arguments: dict[str, Any]
    steps: list[dict[str, Any]]
    polls: int = 0
    cancelled: bool = False
    sent_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))


@dataclass
class FakeFal:
    cert: Path
    key_file: Path
    key: str = "test-key"
    # behaviour, reset between tests by `reset()`
    queue_positions: list[int] = field(default_factory=lambda: [2, 1])
    progress_logs: list[str] = field(default_factory=lambda: ["step 1/4", "step 4/4"])
    nsfw: bool = False
    hang: bool = False
    hang_running: bool = False
    complete_with_error: bool = False
    exhausted_balance: bool = False
    fail_submit: int | None = None
    fail_result: int | None = None
    fail_download: int | None = None
    drop_accepted: int = 0
    store_payloads: bool = True
    png: bytes = field(default_factory=make_png)
    # memory
    submissions: list[dict[str, Any]] = field(default_factory=list)
    polls: list[str] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)
    downloads: list[str] = field(default_factory=list)
    _requests: dict[str, _Request] = field(default_factory=dict)
    _flagged: dict[str, bool] = field(default_factory=dict)
    _runner: web.AppRunner | None = None
    port: int = 0

    def reset(self) -> None:
        fresh = FakeFal(self.cert, self.key_file)
        for name in (
            "key", "queue_positions", "progress_logs", "nsfw", "hang", "hang_running",
            "complete_with_error",
            "exhausted_balance", "fail_submit",
            "fail_result", "fail_download", "drop_accepted", "store_payloads", "submissions",
            "polls", "cancels", "downloads",
            "_requests", "_flagged",
        ):  # fmt: skip
            setattr(self, name, getattr(fresh, name))

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/files/{name}", self._file)
        app.router.add_get("/v1/models/requests/by-endpoint", self._listed)
        app.router.add_get("/{owner}/{alias}/requests/{rid}/status", self._status)
        app.router.add_put("/{owner}/{alias}/requests/{rid}/cancel", self._cancel)
        app.router.add_get("/{owner}/{alias}/requests/{rid}", self._result)
        app.router.add_post("/{endpoint:.+}", self._submit)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key_file)
        self._runner, self.port = await serve(app, ssl_context=context)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- handlers --------------------------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Key {self.key}"

    @staticmethod
    def _unauthorized() -> web.Response:
        return web.json_response({"detail": "No user found for Key ID and Secret"}, status=401)

    def _urls(self, rid: str, app: str) -> dict[str, str]:
        base = f"https://{self.host}/{app}/requests/{rid}"
        return {
            "request_id": rid,
            "response_url": base,
            "status_url": f"{base}/status",
            "cancel_url": f"{base}/cancel",
        }

    async def _submit(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        endpoint = request.match_info["endpoint"]
        arguments = await request.json()
        timeout = request.headers.get("X-Fal-Request-Timeout")
        self.submissions.append(
            {"endpoint": endpoint, "arguments": arguments, "start_timeout": timeout}
        )
        if self.exhausted_balance:
            detail = "User is locked. Reason: Exhausted balance. Top up your balance at fal.ai."
            return web.json_response({"detail": detail}, status=403)
        if self.fail_submit is not None:
            return _server_error(self.fail_submit)
        rid = str(uuid.uuid4())
        app = "/".join(endpoint.split("/")[:2])
        steps: list[dict[str, Any]] = [
            {"status": "IN_QUEUE", "queue_position": p} for p in self.queue_positions
        ]
        for i in range(len(self.progress_logs)):
            steps.append({"status": "IN_PROGRESS", "log_count": i + 1})
        steps.append({"status": "COMPLETED"})
        self._requests[rid] = _Request(rid, app, endpoint, arguments, steps)
        if self.drop_accepted > 0:  # queued at Fal, but the answer never reaches the client
            self.drop_accepted -= 1
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError("dropped after queueing")
        first = self.queue_positions[0] if self.queue_positions else 0
        body = {"status": "IN_QUEUE", "queue_position": first, **self._urls(rid, app)}
        return web.json_response(body, headers={"x-fal-request-id": rid})

    def _logs(self, count: int) -> list[dict[str, Any]]:
        now = dt.datetime.now(dt.UTC).isoformat()
        return [
            {"message": m, "level": "INFO", "source": "user", "timestamp": now}
            for m in self.progress_logs[:count]
        ]

    async def _status(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        found = self._requests.get(request.match_info["rid"])
        if found is None:
            return web.json_response({"detail": "Request not found"}, status=404)
        self.polls.append(found.id)
        with_logs = request.query.get("logs", "").lower() in ("true", "1")
        if self.hang:
            step: dict[str, Any] = {"status": "IN_QUEUE", "queue_position": 5}
        elif self.hang_running:
            step = {"status": "IN_PROGRESS", "log_count": 1}
        else:
            step = found.steps[min(found.polls, len(found.steps) - 1)]
            found.polls += 1
        body: dict[str, Any] = {**self._urls(found.id, found.app), "status": step["status"]}
        if step["status"] == "IN_QUEUE":
            body["queue_position"] = step["queue_position"]
        elif step["status"] == "IN_PROGRESS":
            body["logs"] = self._logs(step["log_count"]) if with_logs else None
        else:
            body["logs"] = self._logs(len(self.progress_logs)) if with_logs else None
            body["metrics"] = {"inference_time": 0.42}
            if self.complete_with_error:
                body["error"] = "The runner crashed while generating."
                body["error_type"] = "runner_error"
        # Fal answers 202 while a request is queued or running, 200 once it is completed.
        return web.json_response(body, status=200 if step["status"] == "COMPLETED" else 202)

    async def _result(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        found = self._requests.get(request.match_info["rid"])
        if found is None:
            return web.json_response({"detail": "Request not found"}, status=404)
        if self.fail_result is not None:
            return _server_error(self.fail_result, found.id)
        if (
            self.hang or self.hang_running or found.polls < len(found.steps)
        ):  # COMPLETED not yet reported
            return web.json_response({"detail": "Request is still in progress"}, status=400)
        width, height = _SIZES[found.arguments.get("image_size", "landscape_4_3")]
        seed = found.arguments.get("seed", 1234)
        # With the safety checker on (Fal's default), a flagged picture is replaced by a black
        # one and flagged; with it off nothing is checked (fal.ai/models/fal-ai/flux/dev/api,
        # enable_safety_checker, has_nsfw_concepts).
        checked = found.arguments.get("enable_safety_checker", True)
        flagged = self.nsfw and checked
        self._flagged[found.id] = flagged
        return web.json_response(
            {
                "images": [
                    {
                        "url": f"https://{self.host}/files/{found.id}.png",
                        "width": width,
                        "height": height,
                        "content_type": "image/png",
                    }
                ],
                "timings": {"inference": 0.42},
                "seed": seed,
                "has_nsfw_concepts": [flagged],
                "prompt": found.arguments.get("prompt", ""),
            },
            headers={"x-fal-request-id": found.id},
        )

    def _output(self, found: _Request) -> dict[str, Any]:
        width, height = _SIZES[found.arguments.get("image_size", "landscape_4_3")]
        return {
            "images": [{"url": f"https://{self.host}/files/{found.id}.png", "width": width,
                        "height": height, "content_type": "image/png"}],
            "seed": found.arguments.get("seed", 1234),
            "has_nsfw_concepts": [self.nsfw and found.arguments.get("enable_safety_checker", True)],
        }  # fmt: skip

    def _never_ran(self, found: _Request) -> bool:
        """Cancelled while still queued: Fal never ran it, so it neither bills nor lists it."""
        queued = found.polls < len(self.queue_positions) or self.hang
        return found.cancelled and queued and not self.hang_running

    async def _listed(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        endpoints = {
            e for value in request.query.getall("endpoint_id", []) for e in value.split(",")
        }
        if not endpoints:
            return web.json_response({"detail": "endpoint_id is required"}, status=422)
        now = dt.datetime.now(dt.UTC)
        start = _when(request.query.get("start")) or now - dt.timedelta(hours=24)
        end = _when(request.query.get("end")) or now
        limit = min(int(request.query.get("limit", "50")), 100)
        page = int(base64.b64decode(request.query.get("cursor", "MQ==")).decode())
        payloads = "payloads" in request.query.getall("expand", []) and self.store_payloads
        ran = [
            r for r in self._requests.values()
            if r.endpoint in endpoints and not self._never_ran(r)
            and start <= r.sent_at < end
        ]  # fmt: skip
        items = []
        for found in sorted(ran, key=lambda r: r.sent_at)[(page - 1) * limit : page * limit]:
            item: dict[str, Any] = {
                "request_id": found.id,
                "endpoint_id": found.endpoint,
                "sent_at": found.sent_at.isoformat().replace("+00:00", "Z"),
                "started_at": found.sent_at.isoformat(),  # the fake runs in no time
                "ended_at": found.sent_at.isoformat(),
                "status_code": 500 if self.complete_with_error else 200,
                "duration": 0.0,
            }
            if payloads:
                item["json_input"] = found.arguments
                item["json_output"] = self._output(found)
            items.append(item)
        more = page * limit < len(ran)
        cursor = base64.b64encode(str(page + 1).encode()).decode() if more else None
        return web.json_response({"items": items, "next_cursor": cursor, "has_more": more})

    async def _cancel(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        found = self._requests.get(request.match_info["rid"])
        if found is None:
            return web.json_response({"detail": "Request not found"}, status=404)
        self.cancels.append(found.id)
        if not self.hang and found.polls >= len(found.steps):
            return web.json_response({"status": "ALREADY_COMPLETED"}, status=400)
        found.cancelled = True
        return web.json_response({"status": "CANCELLATION_REQUESTED"}, status=202)

    async def _file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.downloads.append(name)
        if self.fail_download is not None:
            return web.Response(status=self.fail_download, text="gone")
        if name.removesuffix(".png") not in self._requests:
            return web.Response(status=404, text="not found")
        black = self._flagged.get(name.removesuffix(".png"), False)
        return web.Response(body=BLACK_PNG if black else self.png, content_type="image/png")


def _when(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def _server_error(status: int, rid: str | None = None) -> web.Response:
    # x-fal-request-id marks it as Fal's own answer, which the client does not retry
    headers = {"x-fal-request-id": rid or str(uuid.uuid4())}
    return web.json_response({"detail": "Internal Server Error"}, status=status, headers=headers)
