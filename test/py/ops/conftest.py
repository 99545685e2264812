"""Fixtures of the dispatch/combine op tests; helpers live in ops_helpers.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from ops_helpers import extension_or_skip


@pytest.fixture(scope="session")
def compiled() -> SimpleNamespace:
    return extension_or_skip()
