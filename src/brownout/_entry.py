"""The ``brownout`` console script's front door.

``pip install brownout`` is the toolkit alone (pydantic, nothing else); the command line belongs to the
server and needs the ``server`` extra (typer, rich, FastAPI, ...). Without it, ``brownout`` says so in
one line and exits 2 instead of showing an import traceback. This module imports nothing of the extra
before that check, so it works on a bare toolkit install.
"""

from __future__ import annotations

import sys

__all__ = ["MISSING_SERVER_EXTRA", "main"]

MISSING_SERVER_EXTRA = "the brownout command needs the server extra: pip install 'brownout[server]'"
"""What ``brownout`` prints (on stderr) when a package of the ``server`` extra is not installed."""

# Import names of the server extra's packages (and of the embedded model's server). A missing module
# outside this set is a real bug or another extra (the benchmarks' peers, the drills' charts): its
# traceback is left alone rather than blamed on the server extra.
_SERVER_MODULES = frozenset(
    {
        "typer",
        "click",
        "rich",
        "fastapi",
        "starlette",
        "uvicorn",
        "httpx",
        "httpcore",
        "yaml",
        "prometheus_client",
        "json_repair",
        "sqlalchemy",
        "aiosqlite",
        "asyncpg",
        "redis",
        "xllamacpp",
        "websockets",
        "jsonschema_rs",
        "sniffio",
        "httptools",
        "psutil",
    }
)


def _missing_server_module(error: ModuleNotFoundError) -> bool:
    return (error.name or "").partition(".")[0] in _SERVER_MODULES


def main() -> None:
    """Run the command line, or explain in one line that the ``server`` extra is missing (exit 2)."""
    try:
        from brownout.cli import main as cli_main

        cli_main()
    except ModuleNotFoundError as e:
        # A command imports its heavier parts when it runs (``serve`` loads FastAPI then), so a
        # missing package can surface here as well as at the import above.
        if not _missing_server_module(e):
            raise
        print(MISSING_SERVER_EXTRA, file=sys.stderr)
        raise SystemExit(2) from None
