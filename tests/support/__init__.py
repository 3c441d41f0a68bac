"""What the tests share: helpers every folder of ``tests/`` imports, so that no test file imports another.

``tests/`` is on pytest's ``pythonpath`` (``pyproject.toml``), so a test reaches these as
``from support.wait import until``. The fixtures live in ``tests/conftest.py``; the modules here:

* :mod:`support.wait` -- waiting on a condition (:func:`~support.wait.until`) and letting ready tasks run.
* :mod:`support.net` -- a free port of 127.0.0.1, and uvicorn embedded in the test's process.
* :mod:`support.stack` -- ``brownout serve``'s app over ASGI on fake model servers, and its config.
* :mod:`support.live` -- the same app on a real uvicorn (streams, webhooks, browsers).
* :mod:`support.chromium` -- Debian's Chromium for the browser tests (installed once when missing).
* :mod:`support.fuzz` -- the app under the fuzz tests, on uvicorn in a thread of its own.
* :mod:`support.imports` -- reading which modules a module imports, and finding import cycles.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ROOT"]

ROOT = Path(__file__).resolve().parents[2]
"""The repository's root directory (``scripts/``, ``deploy/``, ``examples/`` are under it)."""
