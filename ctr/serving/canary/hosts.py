"""Which hosts a rollout's replica URLs may name (CTR_CANARY_ALLOWED_HOSTS).

The gateway sends its internal token (`X-CTR-Internal-Token`, ctr/api/internal.py) on every
call to a model replica, probes included. A rollout's URLs come from `POST
/admin/canary/start` and, through the shared state, from Redis: without a check, anyone who
can start a rollout (or write to that Redis) could point a pool at a host of theirs and
receive the token. So a URL is accepted at start, and a pool is built, only for an http(s)
URL whose host is loopback, a host of the operator's own settings (CTR_MODEL_URLS,
CTR_CANARY_URLS, CTR_CANARY_BASELINE_URLS), or matches a CTR_CANARY_ALLOWED_HOSTS pattern
(`fnmatch`, case-insensitive: `ctr-model-canary`, `*.ml.svc.cluster.local`).
"""

from __future__ import annotations

import fnmatch
import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

from ctr.settings import Settings

LOOPBACK_NAMES = ("localhost",)


def _host(url: str) -> str | None:
    try:
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https"):
            return None
        return (parts.hostname or "").lower() or None
    except ValueError:
        return None


def _loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HostPolicy:
    def __init__(self, patterns: Iterable[str] = (), loopback: bool = True) -> None:
        self.patterns = tuple(sorted({p.strip().lower() for p in patterns if p.strip()}))
        self.loopback = loopback

    @classmethod
    def from_settings(cls, settings: Settings) -> HostPolicy:
        configured = ",".join((settings.model_urls, settings.canary_urls, settings.canary_baseline_urls))
        own = [h for u in configured.split(",") if u.strip() and (h := _host(u)) is not None]
        return cls([*settings.canary_allowed_hosts.split(","), *own])

    def allows(self, url: str) -> bool:
        host = _host(url)
        if host is None:
            return False
        return (self.loopback and _loopback(host)) or any(fnmatch.fnmatchcase(host, p) for p in self.patterns)

    def refused(self, urls: Iterable[str]) -> list[str]:
        return [u for u in urls if not self.allows(u)]

    def check(self, urls: Iterable[str]) -> None:
        """ValueError naming every URL whose host is not allowed."""
        bad = self.refused(urls)
        if bad:
            allowed = ", ".join((*(["loopback"] if self.loopback else []), *self.patterns))
            raise ValueError(
                f"replica URLs must be http(s) on an allowed host ({allowed}; CTR_CANARY_ALLOWED_HOSTS adds more): "
                f"refused {', '.join(bad)}"
            )
