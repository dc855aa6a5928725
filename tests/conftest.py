"""Shared fixtures: a real Mosquitto and a real InfluxDB on loopback, started and stopped here."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import Influxd, Mosquitto

_counter = itertools.count()


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A Mosquitto broker shared by the session; tests use their own site id to stay apart."""
    with Mosquitto(workdir=tmp_path_factory.mktemp("mosquitto")).start() as broker:
        yield broker


@pytest.fixture(scope="session")
def influxd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Influxd]:
    """An InfluxDB 1.x server shared by the session; tests use their own database."""
    with Influxd(workdir=tmp_path_factory.mktemp("influxd")).start() as server:
        yield server


@pytest.fixture
def unique_site(request: pytest.FixtureRequest) -> str:
    """A site id no other test uses (so topics never collide on the shared broker)."""
    name = "".join(c if c.isalnum() else "_" for c in request.node.name)[:40]
    return f"t{os.getpid()}_{next(_counter)}_{name}"


@pytest.fixture
def influx_db(influxd: Influxd, unique_site: str) -> str:
    """A fresh database on the shared InfluxDB, named after the test."""
    influxd.query(f'CREATE DATABASE "{unique_site}"')
    return unique_site


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A temporary folder for a test's files."""
    return tmp_path
