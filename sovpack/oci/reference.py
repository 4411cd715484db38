"""REGISTRY/REPOSITORY[:TAG][@sha256:DIGEST]: where an artifact lives in an OCI registry."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from sovpack.errors import UsageError

_HOST = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?::[0-9]{1,5})?$")
_REPOSITORY = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")

SHAPE = "REGISTRY/REPOSITORY[:TAG][@sha256:DIGEST], e.g. registry.example.mil:5000/models/mistral-7b:3"


@dataclass(frozen=True)
class Reference:
    registry: str  # host[:port], as in the URL
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    @property
    def manifest_reference(self) -> str:
        """What follows /manifests/ in the URL: the digest when there is one (it pins the content), else the tag."""
        return self.digest or self.tag or ""

    def with_tag(self, tag: str) -> Reference:
        return Reference(self.registry, self.repository, _check_tag(tag, str(self)), None)

    @property
    def host(self) -> str:
        host = self.registry.rsplit(":", 1)[0] if not self.registry.endswith("]") else self.registry
        return host.strip("[]")

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_reference(text: str, *, need_tag_or_digest: bool) -> Reference:
    """Parse a reference given on the command line; a usage error names what is wrong with it."""
    rest, _, digest = text.partition("@")
    if digest and not _DIGEST.match(digest):
        raise UsageError(f"{text!r}: the digest after @ must be sha256: and 64 lowercase hex digits ({SHAPE})")
    registry, slash, path = rest.partition("/")
    if not slash or not path:
        raise UsageError(f"{text!r} names no repository: give {SHAPE}")
    if not _HOST.match(registry):
        raise UsageError(f"{text!r}: {registry!r} is not a registry host[:port] ({SHAPE})")
    repository, tag = path, None
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        repository, _, tag = path.rpartition(":")
        _check_tag(tag, text)
    if not _REPOSITORY.match(repository) or len(repository) > 255:
        raise UsageError(
            f"{text!r}: {repository!r} is not a repository name (lowercase letters, digits, '.', '_', '-', separated by '/')"
        )
    if need_tag_or_digest and not tag and not digest:
        raise UsageError(f"{text!r} names no tag or digest: give {SHAPE}")
    return Reference(registry, repository, tag, digest or None)


def _check_tag(tag: str, text: str) -> str:
    if not _TAG.match(tag):
        raise UsageError(f"{text!r}: tag {tag!r} is not a valid tag (up to 128 of A-Z a-z 0-9 _ . -, not starting with . or -)")
    return tag
