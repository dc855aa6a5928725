"""The InfluxDB boundary: write line protocol over the v1 or v2 HTTP API, and retry.

This is the only module that imports ``urllib3`` and ``influxdb_client``. A writer takes a
body rendered by :func:`twin.points.render` (precision ``ms``) and answers with a
:class:`WriteOutcome`; it never raises for what a server or the network does, so the caller
decides what happens to the MQTT messages behind the batch. :class:`twin.errors.DatabaseError`
is raised only for misconfiguration (a bad URL, credentials in the URL, a missing token) and
by the set-up helpers.

Error classes (INGEST_NOTES, design choice 3):

================================  ============  ===============================================
what came back                    ``status``    what the caller does
================================  ============  ===============================================
2xx                               ``ok``        ack the batch's messages
400, also a *partial write*       ``rejected``  dead-letter and count, then ack. InfluxDB 1.x
                                                has written the valid points of a partial
                                                write; ``rejected_points`` says how many failed
401, 403, 404, 413, other 3xx/4xx ``rejected``  the same: retrying cannot help
429, 5xx                          ``retry``     keep the batch un-acked and retry, honouring
                                                ``Retry-After``
connection refused or reset,      ``retry``     the same (F1, F2)
timeout
================================  ============  ===============================================

Retry policy (:class:`RetryPolicy`, :func:`write_with_retry`): capped exponential backoff with
jitter. The n-th retry waits ``min(max_s, initial_s * multiplier**n)`` times a factor drawn
uniformly from ``[1 - jitter, 1 + jitter]``, and never more than ``max_s`` (once at the cap,
the factor is drawn from ``[1 - jitter, 1]``, so capped waits stay spread). When the server sent
``Retry-After`` (seconds or an HTTP date), that is the wait instead: never earlier than asked,
at most ``jitter`` later (within the ±20 % of F4), capped at ``retry_after_max_s`` and at least
``initial_s`` (so ``Retry-After: 0`` cannot make a busy loop). There is no
attempt limit: the batch is retried until it is accepted or rejected, or until the caller's
``should_stop()`` says so (shutdown) or the optional ``deadline_s`` passes. The last ``retry``
outcome is then returned and the caller leaves the batch un-acked, so the broker keeps it.

Each write has a timeout (``timeout_s``, connect and read together), so a hung server (F2)
costs at most that long per attempt, on one kept-alive connection.
"""

from __future__ import annotations

import email.utils
import json
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from typing import Final, Literal, Protocol, cast
from urllib.parse import urlencode, urlsplit

import urllib3
from influxdb_client.client.influxdb_client import InfluxDBClient
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.domain.write_precision import WritePrecision
from influxdb_client.rest import ApiException
from pydantic import SecretStr

from twin.config import InfluxSettings
from twin.errors import DatabaseError

__all__ = [
    "RetryPolicy",
    "V1Writer",
    "V2Writer",
    "WriteOutcome",
    "WriteStatus",
    "Writer",
    "classify_response",
    "make_writer",
    "parse_retry_after",
    "write_with_retry",
]

WriteStatus = Literal["ok", "rejected", "retry"]

_MESSAGE_MAX: Final = 500
_DROPPED_RE: Final = re.compile(r"dropped=(\d+)")
# The client declares the precision constants as plain strings.
_MS: Final = cast("WritePrecision", WritePrecision.MS)


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    """What became of one write.

    Attributes:
        status: ``ok`` (stored), ``rejected`` (will never be stored: dead-letter it) or
            ``retry`` (not stored this time: keep it and try again).
        http_status: the HTTP status, or ``None`` when no answer came (connection error,
            timeout) or the client does not expose it (a v2 success).
        retry_after_s: the server's ``Retry-After`` in seconds, when it sent one.
        message: the server's error message or the network error, for logs (no secrets).
        rejected_points: for a rejected write, how many points InfluxDB refused when it said
            so (``dropped=N`` of a 1.x partial write); the others were written.
    """

    status: WriteStatus
    http_status: int | None = None
    retry_after_s: float | None = None
    message: str = ""
    rejected_points: int | None = None

    @property
    def partial(self) -> bool:
        """Return whether InfluxDB wrote part of the batch and refused the rest."""
        return self.status == "rejected" and "partial write" in self.message


class Writer(Protocol):
    """Writes one line-protocol body; never raises for what the server or network does."""

    def write(self, body: bytes) -> WriteOutcome:
        """Write a body of line protocol with millisecond timestamps."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


# --------------------------------------------------------------------------- classification


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Parse a ``Retry-After`` header: delay-seconds or an HTTP date.

    Args:
        value: the header value, or ``None``.
        now: the current Unix time, for an HTTP date (default: the wall clock).

    Returns:
        Seconds to wait (0 for a date in the past), or ``None`` when absent or unreadable.

    Examples:
        >>> parse_retry_after("7")
        7.0
        >>> parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0)
        10.0
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def _error_message(body: bytes | str | None, fallback: str) -> str:
    """Return the error text of an InfluxDB answer: JSON ``error`` (v1) or ``message`` (v2)."""
    if not body:
        return fallback
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        for key in ("error", "message"):
            if isinstance(data.get(key), str):
                return str(data[key])[:_MESSAGE_MAX]
    return text.strip()[:_MESSAGE_MAX] or fallback


def classify_response(
    http_status: int, body: bytes | str | None, retry_after: str | None, *, now: float | None = None
) -> WriteOutcome:
    """Map an HTTP answer to a write outcome (the table in the module docstring).

    Args:
        http_status: the status code.
        body: the response body (InfluxDB puts a JSON error there).
        retry_after: the ``Retry-After`` header, if any.
        now: the current Unix time, for an HTTP-date ``Retry-After``.

    Returns:
        ``ok`` for 2xx; ``retry`` for 429 and 5xx; ``rejected`` for everything else.
    """
    if 200 <= http_status < 300:
        return WriteOutcome("ok", http_status=http_status)
    message = _error_message(body, f"HTTP {http_status}")
    if http_status == 429 or 500 <= http_status < 600:
        return WriteOutcome(
            "retry", http_status=http_status, retry_after_s=parse_retry_after(retry_after, now=now), message=message
        )
    dropped = _DROPPED_RE.search(message)
    return WriteOutcome(
        "rejected",
        http_status=http_status,
        message=message,
        rejected_points=int(dropped.group(1)) if dropped else None,
    )


def _network_outcome(exc: BaseException) -> WriteOutcome:
    # urllib3 messages name host and port but never credentials: those are only in headers.
    return WriteOutcome("retry", message=f"{type(exc).__name__}: {exc}"[:_MESSAGE_MAX])


def _base_url(url: str) -> tuple[str, str]:
    """Check an InfluxDB URL and return it without a trailing slash, and its scheme."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        msg = f"bad InfluxDB URL {url!r}: {exc}"
        raise DatabaseError(msg) from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        msg = f"InfluxDB URL {url!r} must be http(s)://HOST[:PORT]"
        raise DatabaseError(msg)
    if parts.username or parts.password:
        msg = "credentials do not belong in the InfluxDB URL: pass username/password or a token"
        raise DatabaseError(msg)
    if parts.query or parts.fragment:
        msg = f"InfluxDB URL {url!r} must have no query or fragment"
        raise DatabaseError(msg)
    netloc = parts.hostname if port is None else f"{parts.hostname}:{port}"
    if ":" in parts.hostname:  # an IPv6 literal
        netloc = f"[{parts.hostname}]" + ("" if port is None else f":{port}")
    return f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}", parts.scheme


# --------------------------------------------------------------------------- v1


class V1Writer:
    """Write to InfluxDB 1.x (or the v1 compatibility API of 2.x/3.x) through ``POST /write``.

    One urllib3 pool keeps the connection alive between batches. Credentials travel only in
    a Basic ``Authorization`` header, never as ``u=``/``p=`` in the query string (S4). Bodies
    are sent uncompressed: on loopback gzip does not pay (INGEST_NOTES, finding 2).

    Args:
        url: ``http(s)://HOST:PORT``, optionally with a path prefix.
        database: the database.
        retention_policy: the retention policy (``rp=``); the database default when ``None``.
        username: the user, when InfluxDB has auth enabled.
        password: the password.
        timeout_s: the limit for one request, connect and read together.

    Raises:
        DatabaseError: a bad URL, credentials in it, no database, a password without a user,
            or a timeout that is not positive.
    """

    def __init__(
        self,
        url: str,
        database: str,
        *,
        retention_policy: str | None = None,
        username: str | None = None,
        password: SecretStr | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        """Check the settings and prepare the connection pool (no request is made)."""
        self._base, _ = _base_url(url)
        if not database:
            msg = "InfluxDB database name is empty"
            raise DatabaseError(msg)
        if password is not None and not username:
            msg = "an InfluxDB password was given without a username"
            raise DatabaseError(msg)
        if not timeout_s > 0:
            msg = f"InfluxDB timeout must be positive, not {timeout_s}"
            raise DatabaseError(msg)
        self.database = database
        params = {"db": database, "precision": "ms"}
        if retention_policy:
            params["rp"] = retention_policy
        self._write_url = f"{self._base}/write?{urlencode(params)}"
        self._headers = {"Content-Type": "text/plain; charset=utf-8"}
        if username:
            secret = password.get_secret_value() if password is not None else ""
            self._headers.update(urllib3.util.make_headers(basic_auth=f"{username}:{secret}"))
        self._pool = urllib3.PoolManager(
            num_pools=1,
            maxsize=1,
            block=False,
            retries=False,
            timeout=urllib3.Timeout(total=timeout_s),
        )

    def __repr__(self) -> str:
        """Show where the writer writes, never the credentials."""
        return f"V1Writer({self._base!r}, database={self.database!r})"

    def _request(self, method: str, url: str, body: bytes | None = None) -> urllib3.BaseHTTPResponse:
        return self._pool.request(
            method, url, body=body, headers=self._headers, retries=False, redirect=False, preload_content=True
        )

    def write(self, body: bytes) -> WriteOutcome:
        """Write line protocol with millisecond timestamps; an empty body is a no-op.

        Returns:
            The outcome; see the module docstring for the mapping.
        """
        if not body:
            return WriteOutcome("ok", message="empty body")
        try:
            response = self._request("POST", self._write_url, body)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            return _network_outcome(exc)
        return classify_response(response.status, response.data, response.headers.get("Retry-After"))

    def ping(self) -> bool:
        """Return whether the server answers ``GET /ping`` with 204."""
        try:
            return self._request("GET", f"{self._base}/ping").status == 204
        except (urllib3.exceptions.HTTPError, OSError):
            return False

    def create_database(self) -> None:
        """Create the database if it does not exist (``CREATE DATABASE`` is idempotent).

        Raises:
            DatabaseError: the server cannot be reached or refused the query.
        """
        name = self.database.replace("\\", "\\\\").replace('"', '\\"')
        query = 'CREATE DATABASE "' + name + '"'
        url = f"{self._base}/query?{urlencode({'q': query})}"
        try:
            response = self._request("POST", url)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            msg = f"cannot reach InfluxDB at {self._base}: {type(exc).__name__}"
            raise DatabaseError(msg) from exc
        error = _query_error(response.data)
        if response.status != 200 or error:
            msg = f"InfluxDB refused CREATE DATABASE {self.database!r}: HTTP {response.status} {error}".rstrip()
            raise DatabaseError(msg)

    def close(self) -> None:
        """Close the pooled connections."""
        self._pool.clear()

    def __enter__(self) -> V1Writer:
        """Return the writer."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the writer."""
        self.close()


def _query_error(body: bytes) -> str:
    """Return the error of a 1.x ``/query`` answer (top level or per statement), or ``""``."""
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        return body.decode("utf-8", "replace")[:_MESSAGE_MAX]
    if not isinstance(data, dict):
        return ""
    errors = [str(data["error"])] if "error" in data else []
    errors += [str(r["error"]) for r in data.get("results", []) if isinstance(r, dict) and "error" in r]
    return "; ".join(errors)[:_MESSAGE_MAX]


# --------------------------------------------------------------------------- v2


class V2Writer:
    """Write to InfluxDB 2.x, 3.x or Cloud through ``/api/v2/write`` with influxdb-client.

    Uses the client's synchronous write API (no batching thread, no hidden buffer: the
    caller's queue is the buffer), no client-side retries, and no gzip. The token travels
    only in the ``Authorization: Token`` header.

    Args:
        url: ``http(s)://HOST:PORT``.
        bucket: the bucket.
        org: the organisation (name or id).
        token: the API token.
        timeout_s: the limit for one request.

    Raises:
        DatabaseError: a bad URL, credentials in it, an empty bucket, org or token.
    """

    def __init__(self, url: str, bucket: str, org: str, token: SecretStr, timeout_s: float = 10.0) -> None:
        """Check the settings and create the client (no request is made)."""
        self._base, _ = _base_url(url)
        if not bucket or not org:
            msg = "InfluxDB v2 needs a bucket and an org"
            raise DatabaseError(msg)
        if not token.get_secret_value():
            msg = "InfluxDB v2 needs a token"
            raise DatabaseError(msg)
        if not timeout_s > 0:
            msg = f"InfluxDB timeout must be positive, not {timeout_s}"
            raise DatabaseError(msg)
        self.bucket = bucket
        self.org = org
        self._client = InfluxDBClient(
            url=self._base,
            token=token.get_secret_value(),
            org=org,
            timeout=max(1, round(timeout_s * 1000)),
            retries=False,
            enable_gzip=False,
        )
        self._api = self._client.write_api(write_options=SYNCHRONOUS)

    def __repr__(self) -> str:
        """Show where the writer writes, never the token."""
        return f"V2Writer({self._base!r}, bucket={self.bucket!r}, org={self.org!r})"

    def write(self, body: bytes) -> WriteOutcome:
        """Write line protocol with millisecond timestamps; an empty body is a no-op.

        Returns:
            The outcome; see the module docstring for the mapping. A success carries no
            HTTP status: the client does not expose it.
        """
        if not body:
            return WriteOutcome("ok", message="empty body")
        try:
            self._api.write(bucket=self.bucket, org=self.org, record=body, write_precision=_MS)
        except ApiException as exc:
            retry_after = exc.headers.get("Retry-After") if exc.headers else None
            return classify_response(int(exc.status or 0), exc.body, retry_after)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            return _network_outcome(exc)
        return WriteOutcome("ok")

    def close(self) -> None:
        """Close the client and its connections."""
        self._api.close()  # type: ignore[no-untyped-call]
        self._client.close()  # type: ignore[no-untyped-call]

    def __enter__(self) -> V2Writer:
        """Return the writer."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the writer."""
        self.close()


def make_writer(settings: InfluxSettings) -> Writer:
    """Create the writer the settings ask for (v1 ``/write`` or v2 ``/api/v2/write``).

    Raises:
        DatabaseError: no URL, or v2 without a token or org.
    """
    if settings.url is None:
        msg = "no InfluxDB URL is configured (influx.url)"
        raise DatabaseError(msg)
    if settings.api == "v1":
        return V1Writer(
            settings.url,
            settings.database,
            retention_policy=settings.retention_policy,
            username=settings.username,
            password=settings.password,
            timeout_s=settings.timeout_s,
        )
    if settings.token is None or not settings.org:
        msg = "InfluxDB api v2 needs influx.org and a token (MGTWIN_INFLUX__TOKEN or MGTWIN_INFLUX__TOKEN_FILE)"
        raise DatabaseError(msg)
    return V2Writer(
        settings.url, settings.bucket or settings.database, settings.org, settings.token, timeout_s=settings.timeout_s
    )


# --------------------------------------------------------------------------- retries


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Capped exponential backoff with jitter, and how far to honour ``Retry-After``.

    Args:
        initial_s: the first backoff, and the least wait after any retryable answer.
        max_s: the cap of the exponential backoff.
        multiplier: the growth factor per retry.
        jitter: the relative spread of a backoff (``0.2`` = ±20 %); a ``Retry-After`` wait is
            only ever lengthened, by up to this fraction.
        deadline_s: give up (return the last ``retry`` outcome) when the next wait would end
            after this many seconds from the first attempt; ``None`` retries until stopped.
        retry_after_max_s: the longest ``Retry-After`` honoured.

    Raises:
        ValueError: a parameter out of range.

    Examples:
        >>> policy = RetryPolicy(initial_s=0.5, max_s=30, jitter=0.2)
        >>> [policy.backoff_s(n, 0.5) for n in range(8)]
        [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
        >>> policy.delay_s(0, 7.0, 1.0)  # Retry-After: 7, the longest jitter
        8.4
    """

    initial_s: float = 0.5
    max_s: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.2
    deadline_s: float | None = None
    retry_after_max_s: float = 300.0

    def __post_init__(self) -> None:
        """Check the ranges."""
        if not (0 < self.initial_s <= self.max_s and self.multiplier >= 1 and 0 <= self.jitter < 1):
            msg = f"bad retry policy {self}: need 0 < initial_s <= max_s, multiplier >= 1, 0 <= jitter < 1"
            raise ValueError(msg)
        if (self.deadline_s is not None and self.deadline_s <= 0) or self.retry_after_max_s < 0:
            msg = f"bad retry policy {self}: deadline_s and retry_after_max_s must be positive"
            raise ValueError(msg)

    def backoff_s(self, attempt: int, u: float) -> float:
        """Return the backoff before retry ``attempt`` (0 for the first) for ``u`` uniform in [0, 1)."""
        growth = math.log(self.max_s / self.initial_s)
        if self.multiplier == 1 or attempt * math.log(self.multiplier) < growth:
            base = self.initial_s * self.multiplier**attempt
        else:  # past the cap (and clear of float overflow after days of retrying)
            base = self.max_s
        if base >= self.max_s:
            # At the cap the spread goes below it only: clipping the upper half to the cap would
            # send half of the clients back in step (every one of them at exactly max_s).
            return float(self.max_s * (1 - self.jitter * abs(2 * u - 1)))
        return float(min(self.max_s, base * (1 + self.jitter * (2 * u - 1))))

    def delay_s(self, attempt: int, retry_after_s: float | None, u: float) -> float:
        """Return the wait before retry ``attempt``: ``Retry-After`` when given, else the backoff."""
        if retry_after_s is None:
            return self.backoff_s(attempt, u)
        wait = max(self.initial_s, min(retry_after_s, self.retry_after_max_s))
        return float(wait * (1 + self.jitter * u))


def _never() -> bool:
    return False


def write_with_retry(
    writer: Writer,
    body: bytes,
    *,
    policy: RetryPolicy | None = None,
    should_stop: Callable[[], bool] = _never,
    sleep: Callable[[float], object] = time.sleep,
    on_retry: Callable[[WriteOutcome, float], None] | None = None,
    uniform: Callable[[], float] = random.random,
    monotonic: Callable[[], float] = time.monotonic,
) -> WriteOutcome:
    """Write a body until it is stored or rejected, backing off between attempts.

    Args:
        writer: where to write.
        body: the line protocol.
        policy: the backoff; :class:`RetryPolicy` defaults when ``None``.
        should_stop: checked after every failed attempt and every wait; ``True`` ends the
            retries (shutdown).
        sleep: waits the given seconds. ``threading.Event().wait`` makes the wait end early
            on shutdown; tests pass a recorder.
        on_retry: called with the outcome and the chosen wait before each wait (for counters
            and for logging a transition once).
        uniform: random numbers in [0, 1) for the jitter.
        monotonic: the clock for ``policy.deadline_s``.

    Returns:
        The ``ok`` or ``rejected`` outcome, or the last ``retry`` outcome when stopped or out
        of time (then the caller must leave the batch un-acked).
    """
    policy = policy or RetryPolicy()
    started = monotonic()
    attempt = 0
    while True:
        outcome = writer.write(body)
        if outcome.status != "retry" or should_stop():
            return outcome
        wait = policy.delay_s(attempt, outcome.retry_after_s, uniform())
        if policy.deadline_s is not None and monotonic() - started + wait > policy.deadline_s:
            return outcome
        if on_retry is not None:
            on_retry(outcome, wait)
        sleep(wait)
        if should_stop():
            return outcome
        attempt += 1
