"""Debian's Chromium for the dashboard's browser tests: found, or installed once when missing.

``scripts/chromium install`` installs the package (as the Redis and PostgreSQL fixtures install their
servers; ``.ci/run`` runs it first), so a CI machine of this kind runs the browser tests. Only where it
cannot be installed (no root, no apt) and outside CI (``CI`` unset) is a browser test skipped, saying
why. ``BROWNOUT_CHROMIUM`` points at another binary.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from support import ROOT

__all__ = ["QUIET_FLAGS", "chromium_or_skip", "find_chromium"]

QUIET_FLAGS: tuple[str, ...] = (
    "--no-sandbox",  # the tests run as root here
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    # Without these Chromium keeps calling out (updates, sync, safe browsing), which this machine's
    # closed network refuses, many connections at a time.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--mute-audio",
)
"""Switches every test launch uses: headless as root, and no calls out of the machine."""


def find_chromium() -> str:
    """The Chromium binary; installs Debian's package once (scripts/chromium install) when missing."""

    def lookup() -> str | None:
        override = os.environ.get("BROWNOUT_CHROMIUM")
        if override and os.access(override, os.X_OK):
            return override
        for name in ("chromium", "chromium-browser"):
            found = shutil.which(name)
            if found:
                return found
        return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None

    found = lookup()
    if found is None:
        subprocess.run([str(ROOT / "scripts" / "chromium"), "install"], check=True, timeout=900)
        found = lookup()
    assert found is not None, "Chromium is missing and scripts/chromium install did not bring it"
    return found


def chromium_or_skip() -> str:
    """:func:`find_chromium`, or skip the test when Chromium can be neither found nor installed here.

    On CI (``CI`` set) a missing browser fails the test instead: CI machines can install it.
    """
    try:
        return find_chromium()
    except (subprocess.CalledProcessError, OSError, AssertionError) as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"Chromium is not installed and scripts/chromium install could not install it ({e})")
