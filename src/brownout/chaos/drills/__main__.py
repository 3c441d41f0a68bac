"""``python -m brownout.chaos.drills NAME ...|all [--report DIR] [--json]``: ``brownout drill``."""

from __future__ import annotations

import sys

from brownout.cli import app

app(["drill", *sys.argv[1:]], prog_name="python -m brownout.chaos.drills")
