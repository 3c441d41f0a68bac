"""``python -m brownout.chaos.drills NAME ...|all [--report DIR] [--json]``: ``brownout drill``."""

from __future__ import annotations

import typer

from brownout.chaos.drills.command import drill

app = typer.Typer(add_completion=False)
app.command()(drill)
app(prog_name="python -m brownout.chaos.drills")
