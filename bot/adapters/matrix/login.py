"""Logging in to Matrix: one device, its access token and (with encryption) its key store,
kept together.

    MATRIX_ACCESS_TOKEN set  → that token (whoami names its device)
    a saved token            → reused (`restore_login`); the password only when the homeserver
                               answers M_UNKNOWN_TOKEN
    otherwise                → password login, with the saved device id when its keys are here

With encryption, the keys for a device live in `{store}/{user}_{device}.db`. When that file is
missing, the saved device cannot be used again (other clients hold its old keys): the bot logs
in as a new device and logs the old token out, which removes the old device from the account.
"""

from __future__ import annotations

import logging
from pathlib import Path

from nio import AsyncClient, LoginResponse, WhoamiError, WhoamiResponse

from bot.adapters.matrix.state import MatrixState
from bot.config import Settings
from bot.errors import ConfigError

log = logging.getLogger(__name__)

UNKNOWN_TOKEN = "M_UNKNOWN_TOKEN"  # noqa: S105 (an error code, not a secret)


class Login:
    def __init__(
        self, client: AsyncClient, settings: Settings, state: MatrixState, store: Path | None
    ) -> None:
        self.client = client
        self.settings = settings
        assert settings.matrix_user_id
        self.user_id = settings.matrix_user_id  # nio's client.user_id is empty until a login
        self.state = state
        self.store = store  # the crypto store directory (encryption only)

    async def login(self) -> None:
        """Log in at start: the configured token, the saved one, or the password."""
        configured = self.settings.matrix_access_token
        if configured is not None:
            await self._configured(configured.get_secret_value())
            return
        saved = await self.state.load()
        device = saved.device_id if self._keys_here(saved.device_id) else None
        if saved.device_id and device is None:
            log.warning(
                "no key store for Matrix device %s: logging in as a new device", saved.device_id
            )
        if device and saved.access_token and await self._restore(device, saved.access_token):
            return
        await self.password_login(device, old_token=saved.access_token)

    async def password_login(self, device_id: str | None, *, old_token: str | None) -> None:
        """A new access token from the password (for `device_id`, or a new device)."""
        if self.settings.matrix_password is None:
            raise ConfigError(
                "Matrix refused the access token and MATRIX_PASSWORD is not set to log in again."
            )
        self.client.device_id = device_id
        response = await self.client.login(
            self.settings.matrix_password.get_secret_value(),
            device_name=self.settings.matrix_device_name,
        )
        if not isinstance(response, LoginResponse):
            log.error("Matrix login failed: %s", getattr(response, "status_code", ""))
            raise ConfigError("Matrix login failed; check MATRIX_USER_ID and MATRIX_PASSWORD.")
        if old_token and response.device_id != device_id:
            await self._logout(old_token)  # the old device: its token (and keys) are done with
        await self.state.save_login(response.device_id, response.access_token)
        log.info(
            "logged in to Matrix as %s (new token, device %s)",
            self.user_id,
            response.device_id,
        )

    async def relogin(self) -> None:
        """The homeserver refused the token at runtime: log in again on the same device."""
        device = self.client.device_id if self._keys_here(self.client.device_id) else None
        await self.password_login(device, old_token=self.client.access_token)

    async def _configured(self, token: str) -> None:
        self.client.access_token = token
        whoami = await self.client.whoami()
        if not isinstance(whoami, WhoamiResponse) or not whoami.device_id:
            log.error("Matrix access token refused: %s", getattr(whoami, "status_code", ""))
            raise ConfigError("Matrix refused MATRIX_ACCESS_TOKEN; check it in the settings.")
        if not self._keys_here(whoami.device_id):
            raise ConfigError(
                f"No end-to-end key store for device {whoami.device_id} in {self.store}: "
                "restore the store, or log in with MATRIX_PASSWORD as a new device."
            )
        self.client.restore_login(self.user_id, whoami.device_id, token)
        await self.state.save_login(whoami.device_id, None)
        log.info("logged in to Matrix as %s (device %s)", self.user_id, whoami.device_id)

    async def _restore(self, device_id: str, token: str) -> bool:
        """Reuse the saved token; False when the homeserver no longer knows it."""
        self.client.access_token = token
        whoami = await self.client.whoami()
        if isinstance(whoami, WhoamiResponse) and whoami.device_id == device_id:
            self.client.restore_login(self.user_id, device_id, token)
            log.info("Matrix login restored (device %s)", device_id)
            return True
        if isinstance(whoami, WhoamiError) and whoami.status_code == UNKNOWN_TOKEN:
            log.warning("the saved Matrix access token was refused; logging in with the password")
            return False
        log.error("Matrix whoami failed: %s", getattr(whoami, "status_code", ""))
        raise ConfigError("The Matrix homeserver did not confirm the saved login.")

    def _keys_here(self, device_id: str | None) -> bool:
        """Without encryption any device will do; with it, only one whose keys are on disk."""
        if device_id is None or self.store is None:
            return device_id is not None
        return (self.store / f"{self.user_id}_{device_id}.db").exists()

    async def _logout(self, token: str) -> None:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        try:
            response = await self.client.send("POST", "/_matrix/client/v3/logout", "{}", headers)
            log.info("logged out the previous Matrix token: HTTP %s", response.status)
        except Exception:
            log.warning("logging out the previous Matrix token failed", exc_info=True)
