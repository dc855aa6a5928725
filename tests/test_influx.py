"""The InfluxDB boundary: v1 against a real InfluxDB 1.6, v2 against a loopback stub, and retries."""

from __future__ import annotations

import base64
import email.utils
import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import polars as pl
import pytest
from pydantic import SecretStr

from tests.servers import Influxd, free_port
from twin.config import InfluxSettings
from twin.errors import DatabaseError
from twin.io.influx import (
    RetryPolicy,
    V1Writer,
    V2Writer,
    WriteOutcome,
    classify_response,
    make_writer,
    parse_retry_after,
    write_with_retry,
)
from twin.points import MEASUREMENTS, render

TS0 = 1_700_000_000_000
BODY = b"pack_telemetry,pack=P1,site=s voltage_v=3.5 1700000000000\n"


# --------------------------------------------------------------------------- a loopback stub


@dataclass
class Recorded:
    """One request the stub received."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    client_port: int


@dataclass
class Answer:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


class StubInflux:
    """An HTTP server on 127.0.0.1 that records requests and answers from a script, like InfluxDB."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.script: deque[Answer] = deque()
        self.release = threading.Event()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                stub.requests.append(
                    Recorded(
                        self.command,
                        parts.path,
                        parse_qs(parts.query),
                        dict(self.headers.items()),
                        body,
                        int(self.client_address[1]),
                    )
                )
                answer = stub.script.popleft() if stub.script else Answer(204)
                if answer.delay_s:
                    stub.release.wait(answer.delay_s)
                try:
                    self.send_response(answer.status)
                    for name, value in answer.headers.items():
                        self.send_header(name, value)
                    if answer.body:
                        self.send_header("Content-Type", "application/json; charset=utf-8")
                    self.send_header("Content-Length", str(len(answer.body)))
                    self.end_headers()
                    self.wfile.write(answer.body)
                except OSError:  # the client gave up (timeout test)
                    self.close_connection = True

            do_POST = _serve  # noqa: N815 - the stdlib's names
            do_GET = _serve  # noqa: N815

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, name="stub-influx", daemon=True
        )
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def answer(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, delay_s: float = 0) -> None:
        self.script.append(Answer(status, body, headers or {}, delay_s))

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def stub() -> Iterator[StubInflux]:
    server = StubInflux()
    try:
        yield server
    finally:
        server.close()


def v2_error(code: str, message: str) -> bytes:
    return json.dumps({"code": code, "message": message}).encode()


# --------------------------------------------------------------------------- V1 against InfluxDB 1.6


def telemetry_frame(**columns: Any) -> pl.DataFrame:
    schema = {
        "pack": pl.String(),
        "chemistry": pl.String(),
        "life": pl.String(),
        "ts_ms": pl.Int64(),
        **{
            d.source: {float: pl.Float64(), int: pl.Int64(), bool: pl.Boolean()}[d.dtype]
            for d in MEASUREMENTS["pack_telemetry"].fields
        },
    }
    n = len(next(iter(columns.values())))
    data: dict[str, Any] = {name: [None] * n for name in schema}
    data |= {"ts_ms": [TS0 + i for i in range(n)], "chemistry": ["lfp"] * n, "life": ["new"] * n}
    data |= columns
    return pl.DataFrame(data, schema=schema)


def count(influxd: Influxd, db: str, query: str) -> list[list[Any]]:
    result = influxd.query(query, db=db)["results"][0]
    values: list[list[Any]] = result.get("series", [{"values": []}])[0]["values"]
    return values


@pytest.mark.integration
def test_v1_writes_rendered_points(influxd: Influxd, influx_db: str) -> None:
    frame = telemetry_frame(pack=["P1", "P2", "P3"], voltage_v=[350.0, 351.5, None], seq=[1, 2, 3])
    rendered = render(frame, MEASUREMENTS["pack_telemetry"], extra_tags={"site": "nevada"})
    with V1Writer(influxd.url, influx_db, timeout_s=5) as writer:
        assert writer.ping()
        outcome = writer.write(rendered.body)
        assert outcome == WriteOutcome("ok", http_status=204)
        assert writer.write(b"") == WriteOutcome("ok", message="empty body")
    rows = count(influxd, influx_db, 'SELECT "voltage_v", "seq", "pack" FROM "pack_telemetry"')
    assert rows == [[TS0, 350.0, 1, "P1"], [TS0 + 1, 351.5, 2, "P2"], [TS0 + 2, None, 3, "P3"]]


@pytest.mark.integration
def test_v1_type_conflict_is_rejected_and_the_valid_points_kept(influxd: Influxd, influx_db: str) -> None:
    """F3: a 400 is not retried, and InfluxDB 1.x has written the valid points of the batch."""
    with V1Writer(influxd.url, influx_db, timeout_s=5) as writer:
        # Field types are fixed per shard in 1.x: the integer goes into the same shard (week).
        assert writer.write(f"pack_telemetry,pack=P0,site=nevada voltage_v=1i {TS0 - 1000}\n".encode()).status == "ok"
        frame = telemetry_frame(pack=["P1", "P2"], voltage_v=[3.5, None], current_a=[None, 12.5])
        rendered = render(frame, MEASUREMENTS["pack_telemetry"], extra_tags={"site": "nevada"})
        assert rendered.lines == 2
        outcome = writer.write(rendered.body)
    assert (outcome.status, outcome.http_status, outcome.partial, outcome.rejected_points) == ("rejected", 400, True, 1)
    assert "field type conflict" in outcome.message
    assert outcome.retry_after_s is None
    rows = count(influxd, influx_db, 'SELECT "current_a", "pack" FROM "pack_telemetry" WHERE "pack" = \'P2\'')
    assert rows == [[TS0 + 1, 12.5, "P2"]]
    assert count(influxd, influx_db, 'SELECT * FROM "pack_telemetry" WHERE "pack" = \'P1\'') == []


@pytest.mark.integration
def test_v1_unknown_database_is_rejected(influxd: Influxd) -> None:
    with V1Writer(influxd.url, "no_such_database_here", timeout_s=5) as writer:
        outcome = writer.write(BODY)
    assert (outcome.status, outcome.http_status) == ("rejected", 404)
    assert "database not found" in outcome.message


@pytest.mark.integration
def test_v2_writer_against_influxdb_16_is_rejected(influxd: Influxd) -> None:
    """INGEST_NOTES finding 1: 1.6.7 has no /api/v2/write; the writer says so instead of retrying."""
    with V2Writer(influxd.url, "microgrid", "org", SecretStr("token"), timeout_s=5) as writer:
        outcome = writer.write(BODY)
    assert (outcome.status, outcome.http_status) == ("rejected", 404)


@pytest.mark.integration
def test_v1_auth_uses_basic_header_and_maps_401_403(tmp_path: Path) -> None:
    """S4: credentials in a Basic header; no credentials -> 401, a read-only user -> 403, both rejected."""
    with Influxd(workdir=tmp_path / "influxd", auth_enabled=True).start() as server:
        server.query("CREATE USER admin WITH PASSWORD 'adm1n pw' WITH ALL PRIVILEGES")
        admin = V1Writer(server.url, "secured", username="admin", password=SecretStr("adm1n pw"), timeout_s=5)
        anonymous = V1Writer(server.url, "secured", timeout_s=5)
        wrong = V1Writer(server.url, "secured", username="admin", password=SecretStr("nope"), timeout_s=5)
        try:
            with pytest.raises(DatabaseError, match="HTTP 401"):
                anonymous.create_database()
            admin.create_database()
            server.query("CREATE USER reader WITH PASSWORD 'r'", auth=("admin", "adm1n pw"))
            server.query('GRANT READ ON "secured" TO "reader"', auth=("admin", "adm1n pw"))
            reader = V1Writer(server.url, "secured", username="reader", password=SecretStr("r"), timeout_s=5)
            assert admin.write(BODY).status == "ok"
            assert (anonymous.write(BODY).status, anonymous.write(BODY).http_status) == ("rejected", 401)
            assert wrong.write(BODY).http_status == 401
            outcome = reader.write(BODY)
            assert (outcome.status, outcome.http_status) == ("rejected", 403)
            reader.close()
        finally:
            for writer in (admin, anonymous, wrong):
                writer.close()
        stored = server.query(
            'SELECT count("voltage_v") FROM "pack_telemetry"', db="secured", auth=("admin", "adm1n pw")
        )
        assert stored["results"][0]["series"][0]["values"][0][1] == 1


def test_v1_connection_refused_is_retry() -> None:
    with V1Writer(f"http://127.0.0.1:{free_port()}", "db", timeout_s=2) as writer:
        outcome = writer.write(BODY)
        assert not writer.ping()
    assert (outcome.status, outcome.http_status) == ("retry", None)
    assert "Connection" in outcome.message or "refused" in outcome.message


def test_v1_request_shape_keep_alive_and_no_credentials_in_the_url(stub: StubInflux) -> None:
    stub.answer(204)
    stub.answer(204)
    stub.answer(429, v2_error("too many requests", "slow down"), {"Retry-After": "3"})
    stub.answer(500, b'{"error":"timeout"}')
    writer = V1Writer(
        stub.url + "/influx/", "microgrid", retention_policy="autogen", username="ingest",
        password=SecretStr("s3cr3t"), timeout_s=5,
    )  # fmt: skip
    try:
        outcomes = [writer.write(BODY) for _ in range(4)]
        assert "s3cr3t" not in repr(writer)
    finally:
        writer.close()
    assert [o.status for o in outcomes] == ["ok", "ok", "retry", "retry"]
    assert (outcomes[2].retry_after_s, outcomes[2].message) == (3.0, "slow down")
    assert (outcomes[3].http_status, outcomes[3].message) == (500, "timeout")
    first = stub.requests[0]
    assert (first.method, first.path) == ("POST", "/influx/write")
    assert first.query == {"db": ["microgrid"], "precision": ["ms"], "rp": ["autogen"]}
    assert first.headers["Authorization"] == "Basic " + base64.b64encode(b"ingest:s3cr3t").decode()
    assert first.body == BODY
    assert "gzip" not in first.headers.get("Content-Encoding", "")
    assert all("u" not in r.query and "p" not in r.query for r in stub.requests)
    # Keep-alive: the four requests came over one connection.
    assert len(stub.requests) == 4
    assert len({r.client_port for r in stub.requests}) == 1


# --------------------------------------------------------------------------- V2 against the stub


def test_v2_request_shape_and_outcomes(stub: StubInflux) -> None:
    retry_at = email.utils.formatdate(time.time() + 30, usegmt=True)
    stub.answer(204)
    stub.answer(400, v2_error("invalid", "unable to parse 'bad line': missing fields"))
    stub.answer(401, v2_error("unauthorized", "unauthorized access"))
    stub.answer(429, v2_error("too many requests", "over quota"), {"Retry-After": "7"})
    stub.answer(503, v2_error("unavailable", "service unavailable"), {"Retry-After": retry_at})
    with V2Writer(stub.url, "microgrid", "my org", SecretStr("t0ken-xyz"), timeout_s=5) as writer:
        outcomes = [writer.write(BODY) for _ in range(5)]
        assert "t0ken" not in repr(writer)

    assert outcomes[0] == WriteOutcome("ok")
    assert (outcomes[1].status, outcomes[1].http_status) == ("rejected", 400)
    assert outcomes[1].message == "unable to parse 'bad line': missing fields"
    assert (outcomes[2].status, outcomes[2].http_status, outcomes[2].message) == (
        "rejected",
        401,
        "unauthorized access",
    )
    assert (outcomes[3].status, outcomes[3].http_status, outcomes[3].retry_after_s) == ("retry", 429, 7.0)
    assert (outcomes[4].status, outcomes[4].http_status) == ("retry", 503)
    assert outcomes[4].retry_after_s is not None
    assert 27 <= outcomes[4].retry_after_s <= 30

    assert len(stub.requests) == 5
    for request in stub.requests:
        assert (request.method, request.path) == ("POST", "/api/v2/write")
        assert request.query == {"org": ["my org"], "bucket": ["microgrid"], "precision": ["ms"]}
        assert request.headers["Authorization"] == "Token t0ken-xyz"
        assert request.headers["Content-Type"].startswith("text/plain")
        assert request.body == BODY
        assert "t0ken" not in request.path


def test_v2_connection_refused_is_retry() -> None:
    with V2Writer(f"http://127.0.0.1:{free_port()}", "b", "o", SecretStr("t"), timeout_s=2) as writer:
        outcome = writer.write(BODY)
    assert (outcome.status, outcome.http_status) == ("retry", None)


@pytest.mark.parametrize("api", ["v1", "v2"])
def test_hung_server_gives_retry_within_the_timeout(stub: StubInflux, api: str) -> None:
    """F2: a server that never answers costs one timeout, then a retry outcome."""
    stub.answer(204, delay_s=10)
    timeout_s = 1.0
    writer = (
        V1Writer(stub.url, "db", timeout_s=timeout_s)
        if api == "v1"
        else V2Writer(stub.url, "b", "o", SecretStr("t"), timeout_s=timeout_s)
    )
    try:
        started = time.monotonic()
        outcome = writer.write(BODY)
        elapsed = time.monotonic() - started
    finally:
        writer.close()
    assert (outcome.status, outcome.http_status) == ("retry", None)
    assert "timed out" in outcome.message.lower() or "timeout" in outcome.message.lower()
    assert timeout_s * 0.9 <= elapsed <= timeout_s + 1


def test_write_with_retry_honours_retry_after_from_the_stub(stub: StubInflux) -> None:
    """F4: Retry-After from 429 and 503 is honoured within +20 %, then the write goes through."""
    stub.answer(429, v2_error("too many requests", "slow"), {"Retry-After": "2"})
    stub.answer(503, v2_error("unavailable", "busy"), {"Retry-After": "5"})
    stub.answer(204)
    waits: list[float] = []
    with V2Writer(stub.url, "b", "o", SecretStr("t"), timeout_s=5) as writer:
        outcome = write_with_retry(writer, BODY, policy=RetryPolicy(), sleep=waits.append, uniform=lambda: 0.99)
    assert outcome.status == "ok"
    assert len(stub.requests) == 3
    assert 2 <= waits[0] <= 2 * 1.2
    assert 5 <= waits[1] <= 5 * 1.2


# --------------------------------------------------------------------------- write_with_retry


class ScriptedWriter:
    """A fake writer that returns outcomes from a list (repeating the last one)."""

    def __init__(self, *outcomes: WriteOutcome) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0

    def write(self, body: bytes) -> WriteOutcome:
        self.calls += 1
        return self.outcomes[min(self.calls, len(self.outcomes)) - 1]

    def close(self) -> None:
        return


RETRY = WriteOutcome("retry", http_status=503, message="busy")
OK = WriteOutcome("ok", http_status=204)


def stop_after(n: int) -> Callable[[], bool]:
    calls = itertools.count(1)
    return lambda: next(calls) > n


def test_backoff_is_exponential_capped_and_jittered_within_bounds() -> None:
    policy = RetryPolicy(initial_s=0.5, max_s=30.0, multiplier=2.0, jitter=0.2)
    draws = itertools.cycle([0.0, 0.999999, 0.5, 0.25, 0.75])
    waits: list[float] = []
    writer = ScriptedWriter(RETRY)
    outcome = write_with_retry(
        writer, BODY, policy=policy, sleep=waits.append, uniform=lambda: next(draws), should_stop=stop_after(2 * 15)
    )
    assert outcome == RETRY
    assert len(waits) == 15
    for n, wait in enumerate(waits):
        base = min(30.0, 0.5 * 2**n)
        assert base * 0.8 <= wait <= min(30.0, base * 1.2), (n, wait)
    assert max(waits) <= 30.0
    assert waits[-1] >= 30.0 * 0.8
    assert len(set(waits[8:])) > 1  # jittered even at the cap: clients do not retry in step
    # The middle of the jitter gives the plain sequence.
    assert [policy.backoff_s(n, 0.5) for n in range(8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert policy.backoff_s(100_000, 0.5) == 30.0  # no overflow after days of retrying


def test_retry_after_is_honoured_within_20_percent_and_capped() -> None:
    waits: list[float] = []
    writer = ScriptedWriter(
        WriteOutcome("retry", http_status=429, retry_after_s=7.0),
        WriteOutcome("retry", http_status=503, retry_after_s=7.0),
        WriteOutcome("retry", http_status=503, retry_after_s=10_000.0),
        WriteOutcome("retry", http_status=503, retry_after_s=0.0),
        OK,
    )
    draws = iter([0.0, 0.999999, 0.5, 0.5])
    outcome = write_with_retry(
        writer, BODY, policy=RetryPolicy(retry_after_max_s=120), sleep=waits.append, uniform=lambda: next(draws)
    )
    assert outcome == OK
    assert 7.0 <= waits[0] <= 8.4
    assert 7.0 <= waits[1] <= 8.4
    assert waits[1] == pytest.approx(7.0 * 1.2, rel=1e-3)
    assert waits[2] == pytest.approx(120 * 1.1)  # capped at retry_after_max_s
    assert waits[3] == pytest.approx(0.5 * 1.1)  # "retry now" still waits the initial backoff


@pytest.mark.parametrize("final", [OK, WriteOutcome("rejected", http_status=400, message="bad")])
def test_ok_and_rejected_are_not_retried(final: WriteOutcome) -> None:
    writer = ScriptedWriter(final)
    waits: list[float] = []
    assert write_with_retry(writer, BODY, sleep=waits.append) == final
    assert (writer.calls, waits) == (1, [])


def test_rejected_after_retries_is_returned() -> None:
    rejected = WriteOutcome("rejected", http_status=413, message="too large")
    writer = ScriptedWriter(RETRY, RETRY, rejected)
    retries: list[tuple[WriteOutcome, float]] = []
    waits: list[float] = []
    outcome = write_with_retry(
        writer, BODY, sleep=waits.append, on_retry=lambda o, w: retries.append((o, w)), uniform=lambda: 0.5
    )
    assert outcome == rejected
    assert writer.calls == 3
    assert retries == [(RETRY, 0.5), (RETRY, 1.0)]
    assert waits == [0.5, 1.0]


def test_should_stop_ends_the_retries_and_returns_the_last_retry() -> None:
    writer = ScriptedWriter(RETRY)
    waits: list[float] = []
    stop = threading.Event()

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 3:
            stop.set()  # e.g. SIGTERM during the third wait

    outcome = write_with_retry(writer, BODY, sleep=sleep, should_stop=stop.is_set)
    assert outcome == RETRY
    assert (writer.calls, len(waits)) == (3, 3)  # no write after the stop

    stop.set()
    writer = ScriptedWriter(RETRY)
    assert write_with_retry(writer, BODY, sleep=waits.append, should_stop=stop.is_set) == RETRY
    assert writer.calls == 1


def test_deadline_gives_up_with_the_last_retry() -> None:
    clock = [0.0]

    def sleep(seconds: float) -> None:
        clock[0] += seconds

    writer = ScriptedWriter(RETRY)
    policy = RetryPolicy(initial_s=1, max_s=4, jitter=0, deadline_s=10)
    outcome = write_with_retry(writer, BODY, policy=policy, sleep=sleep, monotonic=lambda: clock[0])
    assert outcome == RETRY
    assert clock[0] == 1 + 2 + 4  # the next wait (4 s) would end after 10 s
    assert writer.calls == 4


def test_retry_policy_validates() -> None:
    for bad in (
        {"initial_s": 0},
        {"initial_s": 5, "max_s": 1},
        {"jitter": 1.0},
        {"multiplier": 0.5},
        {"deadline_s": 0},
    ):
        with pytest.raises(ValueError, match="bad retry policy"):
            RetryPolicy(**bad)


# --------------------------------------------------------------------------- classification and set-up


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, "ok"),
        (204, "ok"),
        (302, "rejected"),
        (400, "rejected"),
        (401, "rejected"),
        (403, "rejected"),
        (404, "rejected"),
        (413, "rejected"),
        (422, "rejected"),
        (429, "retry"),
        (500, "retry"),
        (502, "retry"),
        (503, "retry"),
        (504, "retry"),
    ],
)
def test_error_classes(status: int, expected: str) -> None:
    outcome = classify_response(status, b"", None)
    assert (outcome.status, outcome.http_status) == (expected, status)


def test_partial_write_is_parsed() -> None:
    body = b'{"error":"partial write: field type conflict: input field \\"v\\" is type float dropped=3"}'
    outcome = classify_response(400, body, None)
    assert (outcome.partial, outcome.rejected_points) == (True, 3)
    assert classify_response(400, b"not json at all", None).message == "not json at all"
    assert classify_response(404, b"", None).message == "HTTP 404"


def test_parse_retry_after() -> None:
    now = 1_445_412_470.0
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=now) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now=now) == 0.0
    for bad in (None, "", "soon", "-5", "nan", "inf"):
        assert parse_retry_after(bad) is None


def test_make_writer_picks_the_api_and_refuses_misconfiguration() -> None:
    v1 = make_writer(InfluxSettings(url="http://127.0.0.1:8086", database="microgrid"))
    v2 = make_writer(InfluxSettings(url="http://127.0.0.1:8086", api="v2", org="o", token=SecretStr("t")))
    try:
        assert isinstance(v1, V1Writer)
        assert isinstance(v2, V2Writer)
        assert v2.bucket == "microgrid"
    finally:
        v1.close()
        v2.close()
    with pytest.raises(DatabaseError, match="no InfluxDB URL"):
        make_writer(InfluxSettings())
    with pytest.raises(DatabaseError, match="token"):
        make_writer(InfluxSettings(url="http://127.0.0.1:8086", api="v2", org="o"))
    with pytest.raises(DatabaseError, match="credentials"):
        V1Writer("http://user@127.0.0.1:8086", "db")
    with pytest.raises(DatabaseError, match="http"):
        V1Writer("ftp://127.0.0.1", "db")
    with pytest.raises(DatabaseError, match="without a username"):
        V1Writer("http://127.0.0.1:8086", "db", password=SecretStr("x"))
