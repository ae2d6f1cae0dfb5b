"""Object-store errors: which are the user's (a missing bucket, wrong credentials), which are
transient (timeouts, 5xx, throttling: retried with backoff), and neither (bad bytes)."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from stkd_dist.errors import StoreError
from stkd_dist.location.urls import PathInput, url

T = TypeVar("T")


_TRANSIENT_WORDS = (
    "timeout",
    "timed out",
    "throttl",
    "slowdown",
    "slow down",
    "internalerror",
    "internal error",
    "serviceunavailable",
    "service unavailable",
    "bad gateway",
    "gateway timeout",
    "connection reset",
    "connection aborted",
    "temporarily",
    "requestlimitexceeded",
)
# an HTTP 5xx named as a status (not any "50x" inside a key or a temporary name)
_STATUS_5XX = re.compile(
    r"(?:status|http|code|error)\W{0,3}5\d\d\b|\b5\d\d (?:server|service|internal)"
)


def is_transient(error: BaseException) -> bool:
    """A network or service hiccup worth retrying (timeouts, 5xx, throttling), not bad data."""
    if isinstance(error, TimeoutError | ConnectionError):
        return True
    status = getattr(error, "response", None)
    if isinstance(status, dict):  # botocore's ClientError
        code = status.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(code, int) and code >= 500:
            return True
    text = f"{type(error).__name__} {error}".lower()
    return any(w in text for w in _TRANSIENT_WORDS) or _STATUS_5XX.search(text) is not None


def storage_error(error: BaseException, where: str) -> StoreError | None:
    """The one-line user error for a missing bucket, missing credentials or a denied request;
    None when ``error`` is none of these."""
    text = f"{type(error).__name__}: {error}"
    low = text.lower()
    if "nosuchbucket" in low or "bucket does not exist" in low or "bucket not found" in low:
        return StoreError("the bucket does not exist (create it, or fix the URL)", where=where)
    if "nocredentials" in low or "unable to locate credentials" in low:
        return StoreError(
            "no object-store credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "GOOGLE_APPLICATION_CREDENTIALS, or storage.options)",
            where=where,
        )
    if (
        isinstance(error, PermissionError)
        or "invalidaccesskeyid" in low
        or "signaturedoesnotmatch" in low
        or "accessdenied" in low
        or "forbidden" in low
    ):
        return StoreError(
            f"access denied: the credentials are wrong or lack permission ({_short(text)})",
            where=where,
        )
    return None


def _short(text: str, limit: int = 160) -> str:
    line = text.strip().splitlines()[0] if text.strip() else text
    return line if len(line) <= limit else line[: limit - 1] + "…"


def retrying(fn: Callable[[], T], where: str, attempts: int = 5, base_delay: float = 0.2) -> T:
    """Run ``fn``, retrying transient errors with exponential backoff; storage errors become
    one-line :class:`StoreError` naming ``where``."""
    for attempt in range(attempts):
        try:
            return fn()
        except StoreError:
            raise
        except Exception as e:
            known = storage_error(e, where)
            if known is not None:
                raise known from e
            if not is_transient(e) or attempt == attempts - 1:
                if is_transient(e):
                    raise StoreError(
                        f"storage unavailable after {attempts} attempts ({_short(str(e))})",
                        where=where,
                    ) from e
                raise
            time.sleep(base_delay * 2**attempt)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def storage_errors(where: PathInput) -> Iterator[None]:
    """Context turning missing-bucket / credential / permission errors into a :class:`StoreError`."""
    text = where if isinstance(where, str) else url(where)
    try:
        yield
    except StoreError:
        raise
    except Exception as e:
        known = storage_error(e, text)
        if known is not None:
            raise known from e
        raise
