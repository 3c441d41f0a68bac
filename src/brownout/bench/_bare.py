"""The ``bare-fastapi`` target of ``brownout bench http``: FastAPI returning a fixed brief.

It validates the same request model as brownout's endpoint and returns the same JSON document --
the least work a FastAPI service answering this request does -- so the comparison isolates what
brownout's cached path costs. Run: ``python -m brownout.bench._bare --port N --answer FILE``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from brownout.server.app import BriefRequest


def make_app(answer: dict[str, Any]) -> FastAPI:
    """A FastAPI app whose ``POST /v1/briefs`` returns ``answer``."""
    app = FastAPI()

    @app.post("/v1/briefs")
    async def briefs(body: BriefRequest) -> dict[str, Any]:
        return answer

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    """Serve the bare app on 127.0.0.1."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--answer", type=Path, required=True)
    args = parser.parse_args()
    answer = json.loads(args.answer.read_text())
    uvicorn.run(make_app(answer), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
