"""Subjects a trusted reverse proxy already authenticated (Ditto's ``x-ditto-pre-authenticated``).

Anyone can send the header, so it counts only when pre-authentication is enabled *and* the
connection comes from a trusted network (the proxy); otherwise it is ignored with a warning
and the request must authenticate by other means.

>>> PreAuth(enabled=True).subjects("nginx:alice, idp:ops", "127.0.0.1")
('nginx:alice', 'idp:ops')
>>> PreAuth(enabled=True).subjects("nginx:alice", "192.0.2.7") is None
True
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence

from twinstore.model.errors import AuthenticationError

__all__ = ["PREAUTH_HEADER", "PreAuth"]

log = logging.getLogger("twinstore.auth")

PREAUTH_HEADER = "x-ditto-pre-authenticated"


class PreAuth:
    """Reads the pre-authenticated subjects header from trusted client addresses."""

    def __init__(
        self, *, enabled: bool = False, trusted: Sequence[str] = ("127.0.0.1/32", "::1/128")
    ) -> None:
        self.enabled = enabled
        self.trusted = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in trusted)

    def is_trusted(self, client_host: str | None) -> bool:
        if client_host is None:
            return False
        try:
            address = ipaddress.ip_address(client_host.split("%")[0])
        except ValueError:  # e.g. a unix socket or a test client's made-up name
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.trusted)

    def subjects(self, header: str | None, client_host: str | None) -> tuple[str, ...] | None:
        """The header's subjects, or None when it is absent or not to be trusted."""
        if header is None:
            return None
        if not self.enabled or not self.is_trusted(client_host):
            log.warning(
                "ignored pre-authenticated header",
                extra={"client": client_host, "reason": "untrusted client" if self.enabled else "disabled"},
            )
            return None
        subjects = tuple(s.strip() for s in header.split(","))
        for subject in subjects:
            issuer, sep, name = subject.partition(":")
            if not sep or not issuer or not name:
                raise AuthenticationError(
                    f"The header '{PREAUTH_HEADER}' holds the invalid subject {subject!r}; "
                    "subjects are '<issuer>:<name>' separated by commas."
                )
        return tuple(dict.fromkeys(subjects))
