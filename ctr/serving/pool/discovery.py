"""Where the pool's replicas are: CTR_MODEL_URLS parsed into entries, each an IP literal
(itself) or a host name re-resolved to every address it has (a Kubernetes headless Service
gives one A record per ready pod, so scale-out is seen within a refresh).

A name that fails to resolve keeps the addresses it last had: a DNS hiccup must not empty
the pool. IPv4 only (AF_INET): `localhost` would otherwise count one server twice.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlparse

log = logging.getLogger("ctr.pool")

# (host, port) -> addresses
Resolver = Callable[[str, int], Awaitable[list[str]]]


@dataclass(frozen=True, slots=True)
class Entry:
    scheme: str
    host: str
    port: int
    weight: float = 1.0

    @property
    def is_name(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return True
        return False

    def url(self, address: str) -> str:
        host = f"[{address}]" if ":" in address else address
        return f"{self.scheme}://{host}:{self.port}"


def parse_urls(spec: str, weights: Sequence[float] = ()) -> list[Entry]:
    """CTR_MODEL_URLS (comma-separated http://host:port) with CTR_MODEL_WEIGHTS, one per entry."""
    urls = [u.strip() for u in spec.split(",") if u.strip()]
    if len(weights) > len(urls):
        raise ValueError(f"CTR_MODEL_WEIGHTS has {len(weights)} weights for {len(urls)} CTR_MODEL_URLS entries")
    out = []
    for i, raw in enumerate(urls):
        u = urlparse(raw)
        if u.scheme not in ("http", "https") or not u.hostname or u.path not in ("", "/"):
            raise ValueError(f"CTR_MODEL_URLS entry {raw!r} is not http://host:port")
        w = float(weights[i]) if i < len(weights) else 1.0
        if w <= 0:
            raise ValueError(f"CTR_MODEL_WEIGHTS[{i}] must be > 0, got {w}")
        out.append(Entry(u.scheme, u.hostname, u.port or (443 if u.scheme == "https" else 80), w))
    return out


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, family=socket.AF_INET, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


class UrlSource:
    """Resolves the entries to replica URLs with their weights."""

    def __init__(self, entries: Sequence[Entry], resolver: Resolver = system_resolver) -> None:
        if not entries:
            raise ValueError("no model replica URL given")
        self.entries = list(entries)
        self.resolver = resolver
        self._last: dict[Entry, list[str]] = {}

    @property
    def dynamic(self) -> bool:
        """Whether re-resolving can change the answer."""
        return any(e.is_name for e in self.entries)

    async def resolve(self) -> list[tuple[str, float]]:
        out: dict[str, float] = {}
        for e in self.entries:
            if not e.is_name:
                addresses = [e.host]
            else:
                try:
                    addresses = await self.resolver(e.host, e.port)
                    self._last[e] = addresses
                except OSError as exc:
                    addresses = self._last.get(e, [])
                    log.warning("resolving %s failed (%s); keeping %d known addresses", e.host, exc, len(addresses))
            for a in addresses:
                out.setdefault(e.url(a), e.weight)
        return list(out.items())


class FixedSource:
    """A fixed set of replica names (the in-graph CTRModel)."""

    dynamic = False

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)

    async def resolve(self) -> list[tuple[str, float]]:
        return [(n, 1.0) for n in self.names]
