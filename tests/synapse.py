"""A real Synapse homeserver for tests, on 127.0.0.1 with SQLite.

`Synapse(directory).start()` generates a config (registration open without verification, no
federation listener, cheap password hashing), runs `python -m synapse.app.homeserver` as a
subprocess on a free loopback port and waits until `/_matrix/client/versions` answers.
`stop()` terminates it. `register()` makes a user through the ordinary client API
(matrix-nio's `register`, the `m.login.dummy` flow).

Messages are rate limited as on a stock homeserver (`rc_message`: 0.2/s, burst 10), because
that is what the bot meets in the wild; each test keeps to a few messages per user. The limits
on registering, logging in, joining and inviting are relaxed: every test registers fresh users
and rooms, which a real deployment does not. `admin()` calls Synapse's admin API as a server
admin (made with the registration shared secret); a test about something other than rate limits
that needs more messages may lift them for its users with `POST
/_synapse/admin/v1/users/{user}/override_ratelimit`, saying why.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.fakes.loopback import free_port

SERVER_NAME = "localhost"
_START_TIMEOUT = 60.0
_RELAXED = {"per_second": 1000, "burst_count": 1000}
STOCK_RC_MESSAGE = {"per_second": 0.2, "burst_count": 10}  # Synapse's default, stated for tests


@dataclass(frozen=True)
class MatrixUser:
    user_id: str
    localpart: str
    password: str
    access_token: str
    device_id: str


def available() -> bool:
    try:
        import synapse.app.homeserver  # noqa: F401
    except ImportError:
        return False
    return True


class Synapse:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = directory / "homeserver.yaml"
        self.log_path = directory / "synapse.out"
        self._process: subprocess.Popen[bytes] | None = None
        self._admin_token: str | None = None

    def _generate(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "synapse.app.homeserver",
                "--server-name",
                SERVER_NAME,
                "--config-path",
                str(self.config_path),
                "--data-directory",
                str(self.directory),
                "--generate-config",
                "--report-stats=no",
            ],
            check=True,
            capture_output=True,
            cwd=self.directory,
        )
        config: dict[str, Any] = yaml.safe_load(self.config_path.read_text())
        log_config = self.directory / "log.yaml"
        log_config.write_text(
            yaml.safe_dump(
                {
                    "version": 1,
                    "formatters": {"plain": {"format": "%(asctime)s %(name)s %(message)s"}},
                    "handlers": {
                        "file": {
                            "class": "logging.FileHandler",
                            "formatter": "plain",
                            "filename": str(self.directory / "homeserver.log"),
                        }
                    },
                    "root": {"level": "WARNING", "handlers": ["file"]},
                    "disable_existing_loggers": False,
                }
            )
        )
        config.update(
            {
                "listeners": [
                    {
                        "port": self.port,
                        "bind_addresses": ["127.0.0.1"],
                        "type": "http",
                        "tls": False,
                        "x_forwarded": False,
                        "resources": [{"names": ["client"], "compress": False}],
                    }
                ],
                "log_config": str(log_config),
                "enable_registration": True,
                "enable_registration_without_verification": True,
                "bcrypt_rounds": 4,
                "trusted_key_servers": [],
                "suppress_key_server_warning": True,
                "federation_domain_whitelist": [],
                "presence": {"enabled": False},
                "url_preview_enabled": False,
                "report_stats": False,
                "rc_message": STOCK_RC_MESSAGE,
                "rc_registration": _RELAXED,
                "rc_login": {"address": _RELAXED, "account": _RELAXED, "failed_attempts": _RELAXED},
                "rc_joins": {"local": _RELAXED, "remote": _RELAXED},
                "rc_joins_per_room": _RELAXED,
                "rc_invites": {
                    "per_room": _RELAXED,
                    "per_user": _RELAXED,
                    "per_issuer": _RELAXED,
                },
                "rc_admin_redaction": _RELAXED,
                "rc_3pid_validation": _RELAXED,
                "rc_presence": {"per_user": _RELAXED},
                "rc_delayed_event_mgmt": _RELAXED,
            }
        )
        self.config_path.write_text(yaml.safe_dump(config))

    def start(self) -> None:
        self._generate()
        with self.log_path.open("wb") as out:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "synapse.app.homeserver", "-c", str(self.config_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
            )
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"Synapse exited at start:\n{self._tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/_matrix/client/versions", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Synapse did not answer within {_START_TIMEOUT}s:\n{self._tail()}")

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def _tail(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-4000:]

    async def register(self, prefix: str) -> MatrixUser:
        """A new user `@{prefix}_xxxx:localhost` with a logged-in device."""
        from nio import AsyncClient, RegisterResponse

        localpart = f"{prefix}_{uuid.uuid4().hex[:8]}"
        password = uuid.uuid4().hex
        client = AsyncClient(self.url, localpart)
        try:
            response = await client.register(localpart, password, device_name="test")
        finally:
            await client.close()
        if not isinstance(response, RegisterResponse):
            raise RuntimeError(f"registration of {localpart} failed: {response}")
        return MatrixUser(
            response.user_id, localpart, password, response.access_token, response.device_id
        )

    async def admin_token(self) -> str:
        """An access token of a server admin, registered once with the shared secret."""
        if self._admin_token is None:
            config = yaml.safe_load(self.config_path.read_text())
            secret = str(config["registration_shared_secret"]).encode()
            url = f"{self.url}/_synapse/admin/v1/register"
            async with httpx.AsyncClient() as http:
                nonce = (await http.get(url)).json()["nonce"]
                name, password = f"admin_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
                message = b"\x00".join([nonce.encode(), name.encode(), password.encode(), b"admin"])
                mac = hmac.new(secret, message, hashlib.sha1).hexdigest()
                body = {
                    "nonce": nonce,
                    "username": name,
                    "password": password,
                    "admin": True,
                    "mac": mac,
                }
                response = await http.post(url, json=body)
                response.raise_for_status()
                self._admin_token = str(response.json()["access_token"])
        return self._admin_token

    async def admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """Call Synapse's admin API (`/_synapse/admin/...`) as the server admin."""
        headers = {"Authorization": f"Bearer {await self.admin_token()}"}
        async with httpx.AsyncClient() as http:
            response = await http.request(method, f"{self.url}{path}", json=body, headers=headers)
        response.raise_for_status()
        return response.json()
