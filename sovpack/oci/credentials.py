"""Registry credentials: --username with --password-file, else the usual container auth files.

Auth files are searched in the order the containers tools (skopeo, podman) and docker use:
$REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers/auth.json, ~/.config/containers/auth.json, then
$DOCKER_CONFIG/config.json or ~/.docker/config.json. The first file holding an `auths` entry for the
registry wins; credential helpers (`credsStore`, `credHelpers`) are not run.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from pathlib import Path

from sovpack.errors import UsageError


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = ""
    origin: str = ""  # where they came from, for messages: never the password

    def __repr__(self) -> str:
        return f"Credentials({self.username!r}, origin={self.origin!r})"


def auth_files() -> list[Path]:
    home = Path.home()
    files = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(Path(os.environ["REGISTRY_AUTH_FILE"]))
    if os.environ.get("XDG_RUNTIME_DIR"):
        files.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    files.append(home / ".config" / "containers" / "auth.json")
    files.append(
        Path(os.environ["DOCKER_CONFIG"]) / "config.json" if os.environ.get("DOCKER_CONFIG") else home / ".docker" / "config.json"
    )
    return files


def resolve_credentials(registry: str, username: str | None, password_file: Path | None) -> Credentials | None:
    """The credentials for `registry` (host[:port]); None when none are configured (anonymous access)."""
    if username is not None or password_file is not None:
        if username is None or password_file is None:
            raise UsageError("give --username and --password-file together")
        try:
            password = password_file.read_text().splitlines()[0] if password_file.stat().st_size else ""
        except OSError as e:
            raise UsageError(f"cannot read --password-file {password_file}: {e.strerror}") from None
        return Credentials(username, password, f"--username {username} with --password-file {password_file}")
    for path in auth_files():
        found = _from_auth_file(path, registry)
        if found is not None:
            return found
    return None


def _from_auth_file(path: Path, registry: str) -> Credentials | None:
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read the container auth file {path}: {e}") from None
    auths = doc.get("auths") if isinstance(doc, dict) else None
    if not isinstance(auths, dict):
        return None
    for key, entry in auths.items():
        if _registry_of(key) != registry or not isinstance(entry, dict):
            continue
        if isinstance(entry.get("username"), str):
            return Credentials(entry["username"], str(entry.get("password", "")), f"{path} ({key})")
        if isinstance(entry.get("auth"), str):
            try:
                user, sep, password = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                user, sep = "", ""
            if not sep:
                raise UsageError(f"the 'auth' of {key!r} in {path} is not base64 of USER:PASSWORD")
            return Credentials(user, password, f"{path} ({key})")
    return None


def _registry_of(key: str) -> str:
    """auths keys are host[:port], or a URL (docker's older `https://host/v1/`)."""
    return key.split("://", 1)[-1].split("/", 1)[0]
