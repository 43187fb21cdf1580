"""Shared fixtures: one real local stack per test session, on its own ports and folder.

The stack fixture never touches a developer's running stack: it picks free loopback
ports and keeps its state under a temporary folder, and it stops everything it
started when the session ends.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from playwright.async_api import Playwright, async_playwright

from alerts.testing import ConsoleServer
from cityops.settings import Settings
from cityops.stack import Stack
from tests.support import free_port, isolated_settings

ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture(scope="session")
def stack_settings() -> Iterator[Settings]:
    # Not pytest's tmp_path: its folders are 0700 and the servers drop to their own users.
    state = Path(tempfile.mkdtemp(prefix="cityops-test-", dir=os.environ.get("CITYOPS_TEST_TMP")))
    state.chmod(0o755)
    yield isolated_settings(state)
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def stack(stack_settings: Settings) -> Iterator[Stack]:
    """The real servers, started once per session and stopped after."""
    st = Stack(stack_settings)
    try:
        st.up()
        yield st
    finally:
        st.down()


@pytest.fixture(scope="session")
def settings(stack: Stack) -> Settings:
    """Settings pointing at the running session stack."""
    return stack.settings


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="module")
async def console(settings: Settings) -> AsyncIterator[ConsoleServer]:
    """The console on the session stack, one per test module (a module that needs other
    settings, e.g. its own rules file, defines its own ``console``)."""
    srv = ConsoleServer(settings, free_port())
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture(scope="module")
async def playwright() -> AsyncIterator[Playwright]:
    """Playwright for the browser test modules (Chromium itself: tests/browser.py)."""
    async with async_playwright() as p:
        yield p
