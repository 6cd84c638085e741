"""Headless Chromium for the page tests (pagedserve.bench.browser); `needs_chromium` skips a test where
Debian's chromium and chromium-driver are missing (.ci/run installs them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagedserve.bench.browser import (  # noqa: F401  (re-exported for the tests)
    CHROMEDRIVER,
    CHROMIUM,
    chromium_available,
    console_errors,
    headless_chromium,
    wait_for,
)

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"  # screenshots; not committed

needs_chromium = pytest.mark.skipif(not chromium_available(),
                                    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
