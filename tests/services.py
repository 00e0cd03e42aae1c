"""The PostgreSQL server .ci/run starts, as throw-away databases for the tests that need one."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest


@contextmanager
def postgres_databases(prefix: str = "ctlab_test") -> Iterator[Callable[[], str]]:
    """Yield a maker of fresh databases on CTLAB_TEST_POSTGRES_URI (each a URI); drop them all on exit.

    Skips without a server, and fails instead when CTLAB_REQUIRE_SERVICES says .ci/run should have started one.
    """
    import psycopg

    server = os.environ.get("CTLAB_TEST_POSTGRES_URI")
    if not server:
        if os.environ.get("CTLAB_REQUIRE_SERVICES"):
            pytest.fail("CTLAB_REQUIRE_SERVICES is set but CTLAB_TEST_POSTGRES_URI is not: the server did not start")
        pytest.skip("CTLAB_TEST_POSTGRES_URI is not set (bash .ci/postgres.sh starts a server and prints it)")
    admin = server.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    created: list[str] = []

    def create() -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        created.append(name)
        return f"{server}/{name}"

    try:
        yield create
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            for name in created:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
