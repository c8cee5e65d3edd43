"""Signed request ids: the gateway issues one with every /predict answer, and /feedback
accepts only ids it issued.

An id is `<payload>.<tag>`, both URL-safe base64 without padding: the payload is the
compact JSON `[arm, model_version, issued_at, nonce, unit, rollout, ads]` (unit: the user's
hash sub-bucket, the canary gates' variance unit; rollout: the id of the rollout whose split
chose the arm, "" outside one; ads: a hash of the served ad ids, `ads_digest`), the tag the
first 16 bytes of HMAC-SHA256(key, payload). The arm travels in the id, so feedback is
attributed to the arm that answered without a lookup, and with several gateway processes
any of them can verify an id another issued, as long as they share the key
(`request_id_key`).

What the answer served (its ad ids and scores) is not in the id: it would grow with the ads
(2 bytes a score is 270 characters for 100 ads, 2.7 kB for 1,000). `Signer` hands it to a
`Receipts` keeper instead (`ctr.serving.canary.served`: Redis, for CTR_FEEDBACK_MAX_AGE_S),
under `record_key(nonce, ads)`, which only the signed id names.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import math
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import orjson

from ctr.settings import MIN_REQUEST_ID_KEY_BYTES as MIN_KEY_BYTES
from ctr.settings import short_key_message

log = logging.getLogger(__name__)
TAG_BYTES = 16  # HMAC-SHA256 truncated to 128 bits (RFC 2104 allows down to half the output)
NONCE_BYTES = 8  # two requests in the same millisecond get different ids
MAX_CHARS = 512
PATTERN = "^[A-Za-z0-9_-]+\\.[A-Za-z0-9_-]+$"  # what issue() makes (verify() refuses anything else)
KEY_FILE = "request-id.key"


@dataclass(frozen=True, slots=True)
class Claims:
    arm: str
    model_version: str
    issued_at: float  # unix seconds
    unit: int = 0  # the user's hash sub-bucket (the canary gates' variance unit); 0 in older ids
    rollout: str = ""  # the rollout whose split chose the arm; "" outside one (and in older ids)
    ads: str = ""  # ads_digest of the served ad ids; "" in older ids
    nonce: str = ""

    @property
    def fallback(self) -> bool:
        """Whether the fallback table answered (its scores say nothing of either arm's model)."""
        return self.model_version.startswith("fallback:")

    @property
    def record(self) -> str:
        """The key of what this answer served (`Receipts`); "" for ids that name no ads."""
        return record_key(self.nonce, self.ads) if self.ads else ""


class Receipts(Protocol):
    """Keeps what each answer served, for /feedback (`ctr.serving.canary.served.ServedLog`)."""

    def remember(self, key: str, ad_ids: Sequence[str], scores: Sequence[float], issued_at: float) -> None: ...


def ads_digest(ad_ids: Sequence[str]) -> str:
    """A hash of the served ad ids, in order (blake2b, 64 bits): binds an id to its ad list."""
    return _b64(hashlib.blake2b("\n".join(ad_ids).encode(), digest_size=8).digest())


def record_key(nonce: str, ads: str) -> str:
    return f"{nonce}.{ads}"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _tag(key: bytes, payload: str) -> bytes:
    return hmac.new(key, payload.encode(), hashlib.sha256).digest()[:TAG_BYTES]


class Signer:
    """Issues the one id of a request, at the edge, when its arm and model version are known:
    the same id goes to the logs, the response and (through /feedback) the canary's join.
    With `receipts`, what the answer served is kept under the id's record key."""

    def __init__(self, key: bytes, clock: Callable[[], float] = time.time, receipts: Receipts | None = None) -> None:
        self.key, self.clock, self.receipts = key, clock, receipts

    def issue(
        self,
        arm: str,
        model_version: str,
        unit: int = 0,
        rollout: str = "",
        ad_ids: Sequence[str] = (),
        scores: Sequence[float] = (),
    ) -> str:
        nonce, now = _b64(os.urandom(NONCE_BYTES)), self.clock()
        ads = ads_digest(ad_ids) if ad_ids else ""
        rid = issue(arm, model_version, self.key, now, unit, rollout, ads, nonce)
        if self.receipts is not None and ad_ids:
            self.receipts.remember(record_key(nonce, ads), ad_ids, scores, round(now, 3))
        return rid


def issue(
    arm: str,
    model_version: str,
    key: bytes,
    now: float,
    unit: int = 0,
    rollout: str = "",
    ads: str = "",
    nonce: str | None = None,
) -> str:
    """A request id carrying `arm`, `model_version`, `now` (unix seconds), the user's `unit`
    (so feedback adds to the user's sub-bucket without naming the user), the `rollout` whose
    split chose the arm and the served `ads` (`ads_digest`), signed with `key`."""
    nonce = nonce or _b64(os.urandom(NONCE_BYTES))
    payload = _b64(orjson.dumps([arm, model_version, round(now, 3), nonce, unit, rollout, ads]))
    return f"{payload}.{_b64(_tag(key, payload))}"


def verify(request_id: str, key: bytes) -> Claims | None:
    """The claims of an id signed with `key`; None for anything else (forged, altered, malformed)."""
    if not isinstance(request_id, str) or len(request_id) > MAX_CHARS or request_id.count(".") != 1:
        return None
    payload, tag = request_id.split(".")
    try:
        if not hmac.compare_digest(_unb64(tag), _tag(key, payload)):
            return None
        arm, version, issued_at, nonce, *rest = orjson.loads(_unb64(payload))
    except (binascii.Error, ValueError, TypeError, orjson.JSONDecodeError):
        return None
    if len(rest) not in (0, 1, 3):  # older ids: no unit, or no rollout and ads
        return None
    unit = rest[0] if rest else 0
    rollout, ads = rest[1:] if len(rest) == 3 else ("", "")
    if not isinstance(unit, int) or isinstance(unit, bool) or not 0 <= unit < 1 << 16:
        return None
    if not all(isinstance(v, str) for v in (arm, version, nonce, rollout, ads)):
        return None
    if not isinstance(issued_at, int | float) or isinstance(issued_at, bool) or not math.isfinite(issued_at):
        return None
    return Claims(arm, version, float(issued_at), unit, rollout, ads, nonce)


def resolve_key(explicit: str, admin_token: str, data_dir: Path) -> bytes:
    """The signing key: CTR_REQUEST_ID_KEY when set; else derived from CTR_ADMIN_TOKEN (every
    process and replica given the token agrees); else a random key kept in
    `<data_dir>/request-id.key`, made once and shared by the processes of one machine."""
    if explicit:
        key = explicit.encode()
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(short_key_message(len(key)))
        return key
    if admin_token:
        return hmac.new(admin_token.encode(), b"ctr-serve request id key v1", hashlib.sha256).digest()
    path = data_dir / KEY_FILE
    if not path.exists():
        # written aside, then linked into place: a process never reads a half-written key
        tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_bytes(32).hex())
        try:
            os.link(tmp, path)
            log.info("made a request id signing key in %s (set CTR_REQUEST_ID_KEY to share one across machines)", path)
        except FileExistsError:
            pass  # another process made it first: use theirs
        finally:
            tmp.unlink()
    key = bytes.fromhex(path.read_text().strip())
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"{path} holds a key of {len(key)} bytes; delete it to make a new one")
    return key
