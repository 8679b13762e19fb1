"""Secrets at rest: small values (an endpoint's worker secret, later cloud credentials) encrypted with Fernet.

The key lives in its own file, ``<data-dir>/secrets/endpoint-secrets.key`` (created on first use: the
folder 0700, the file 0600), never in the database, so a copied database or backup of it alone reveals no
secret. Losing the key makes the stored secrets unreadable: the endpoints holding them start ``Failed`` with
that reason and an administrator deploys them again. Values are decrypted only where a backend is built.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
from collections.abc import Mapping
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

log = logging.getLogger(__name__)

KEY_FILE = Path("secrets") / "endpoint-secrets.key"
"""Where the key lives, relative to the data dir."""


class SecretsError(RuntimeError):
    """Stored secrets cannot be read (the key file is missing, changed or damaged)."""


class SecretBox:
    def __init__(self, key_file: Path) -> None:
        self.key_file = key_file
        self._lock = threading.Lock()
        self._fernet: Fernet | None = None

    def seal(self, values: Mapping[str, str]) -> str:
        """``values`` as one token (JSON inside, so the fields stay together)."""
        return self._key().encrypt(json.dumps(dict(values)).encode()).decode("ascii")

    def open(self, token: str) -> dict[str, str]:
        try:
            data = json.loads(self._key().decrypt(token.encode("ascii")))
        except (InvalidToken, ValueError) as exc:
            raise SecretsError(f"the stored secrets cannot be decrypted with the key in {self.key_file} (was the "
                               "key file replaced?); deploy the endpoint again") from exc
        if not isinstance(data, dict):
            raise SecretsError("the stored secrets are not a JSON object")
        return {str(k): str(v) for k, v in data.items()}

    def _key(self) -> Fernet:
        with self._lock:
            if self._fernet is None:
                self._fernet = Fernet(self._load_or_create())
            return self._fernet

    def _load_or_create(self) -> bytes:
        folder = self.key_file.parent
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)  # mkdir's mode is masked by the umask, and the folder may predate us
        try:
            fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return self._read_existing()
        key = Fernet.generate_key()
        with os.fdopen(fd, "wb") as out:
            out.write(key)
        log.info("created the key for secrets at rest: %s (back it up with the database)", self.key_file)
        return key

    def _read_existing(self) -> bytes:
        mode = stat.S_IMODE(self.key_file.stat().st_mode)
        if mode & 0o077:
            log.warning("%s was readable by others (mode %o); made it owner-only", self.key_file, mode)
            os.chmod(self.key_file, 0o600)
        key = self.key_file.read_bytes().strip()
        try:
            Fernet(key)
        except ValueError as exc:
            raise SecretsError(f"{self.key_file} does not hold a Fernet key") from exc
        return key
