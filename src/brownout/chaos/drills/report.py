"""The drill report: Markdown, a PNG timeline per scenario (matplotlib), and JSON.

:func:`write_report` writes into a directory:

* ``report.json`` -- :func:`report_json`: ``{"scenarios": [{"name", "passed", "sent", "failed",
  "lost_writes", ...}], "passed": ..., "generated_at": ...}``;
* ``report.md`` -- a summary table, then per scenario its verdict, figures, checks, the timeline and
  the scenario itself in the scenario template;
* ``<name>.png`` -- the timeline of each scenario that ran: requests per second by outcome, the
  richest mode the server could serve, and each breaker's state (plus the database for data drills),
  with the fault and restore marked.

The PNGs need matplotlib (``pip install -e '.[drill]'``); without it the report is written without
charts and says so.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from brownout.chaos.drills.catalog import OUTCOMES, scenario
from brownout.chaos.drills.measure import ScenarioResult, best_mode

__all__ = ["COLOURS", "render_timeline", "report_json", "report_markdown", "write_report"]

COLOURS = {
    "full": "#2e7d32",
    "downshifted": "#f9a825",
    "fallback": "#ef6c00",
    "rejected": "#6a1b9a",
    "failed": "#c62828",
}
"""The colour of each outcome in the charts."""

_STATE_COLOURS = {
    "closed": "#a5d6a7",
    "half_open": "#fff176",
    "open": "#e57373",
    "forced_open": "#e57373",
    "unhealthy": "#e57373",
    "healthy": "#a5d6a7",
    "restarting": "#fff176",
    "unknown": "#e0e0e0",
}
_NOISY = frozenset({"ModeDownshifted"})  # one per degraded answer: the chart shows them
_MAX_EVENTS = 40
_MARKED = frozenset(
    {"RecoveryActionRun", "LoopBlocked", "ResourceAlert", "SystemModeChanged", "ModelServerRestarted"}
)
_MODE_LEVEL = {"emergency": 0, "fallback": 1, "fast": 2, "balanced": 3, "creative": 4}


def report_json(results: Sequence[ScenarioResult]) -> dict[str, Any]:
    """The JSON report: every scenario's figures, and whether every scenario that ran passed."""
    ran = [r for r in results if r.passed is not None]
    return {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "passed": bool(ran) and all(r.passed for r in ran) and not any(r.status == "error" for r in results),
        "summary": {
            status: sum(r.status == status for r in results)
            for status in ("passed", "failed", "error", "waiting")
        },
        "scenarios": [r.figures() for r in results],
    }


def _fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def report_markdown(results: Sequence[ScenarioResult], charts: dict[str, str] | None = None) -> str:
    """The Markdown report; ``charts`` maps scenario names to their PNG file names."""
    charts = charts or {}
    data = report_json(results)
    summary = data["summary"]
    lines = [
        "# brownout drill report",
        "",
        f"Generated {data['generated_at']}: {len(results)} scenarios -- {summary['passed']} passed, "
        f"{summary['failed']} failed, {summary['error']} errors, {summary['waiting']} waiting.",
        "",
        "| scenario | verdict | sent | full | downshifted | fallback | rejected | failed | detection | "
        "recovery | lost writes | computations |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        f = r.figures()
        lines.append(
            f"| [{r.name}](#{r.name}) | {r.status.upper()} | {f['sent']} | {f['full']} | "
            f"{f['downshifted']} | "
            f"{f['fallback']} | {f['rejected']} | {f['failed']} | {_fmt_s(r.detection_s)} | "
            f"{_fmt_s(r.recovery_s)} | {'-' if f['lost_writes'] is None else f['lost_writes']} | "
            f"{'-' if r.computations is None else r.computations} |"
        )
    for r in results:
        f = r.figures()
        lines += ["", f'<a id="{r.name}"></a>', "", f"## {r.title} (`{r.name}`) -- {r.status.upper()}", ""]
        if r.status == "waiting":
            lines += ["Not run: it waits on", "", *(f"- {w}" for w in r.waits_on)]
        if r.error:
            lines += [f"Error: `{r.error}`", ""]
        if r.status in ("passed", "failed", "error") and r.samples:
            lines += [
                f"Load: {r.rate:g} requests/s in `{r.mode}` mode; drill took {r.duration_s:.1f} s.",
                "",
                "| figure | value |",
                "|---|---|",
                *(f"| {k} | {f[k]} |" for k in ("sent", *OUTCOMES)),
                f"| detection | {_fmt_s(r.detection_s)} (budget {_fmt_s(r.detection_budget_s)}) |",
                f"| recovery | {_fmt_s(r.recovery_s)} (budget {_fmt_s(r.recovery_budget_s)}) |",
            ]
            if r.writes is not None:
                w = r.writes
                lines.append(
                    f"| writes | {w.acknowledged} acknowledged, {w.found} in the database, "
                    f"{w.spooled} spooled, {w.lost_count} lost |"
                )
            if r.computations is not None:
                lines.append(f"| computations | {r.computations} |")
            lines += [f"| {k} | {v} |" for k, v in r.extra.items()]
        shown = [e for e in r.events if e.kind == "event" and e.name not in _NOISY]
        if shown:
            lines += [
                "",
                "<details><summary>Server events (live stream)</summary>",
                "",
                "| t (s) | event |",
                "|---:|---|",
            ]
            lines += [f"| {e.t - r.t0:.2f} | {e.summary} |" for e in shown[:_MAX_EVENTS]]
            if len(shown) > _MAX_EVENTS:
                lines.append(f"| | ... {len(shown) - _MAX_EVENTS} more |")
            lines += ["", "</details>"]
        if r.checks:
            lines += ["", "Checks:", ""]
            lines += [f"- [{'x' if c.passed else ' '}] {c.name} -- {c.detail}" for c in r.checks]
        if r.name in charts:
            lines += ["", f"![timeline of {r.name}]({charts[r.name]})"]
        try:
            template = scenario(r.name).to_markdown()
        except KeyError:
            template = ""
        if template:
            lines += [
                "",
                "<details><summary>The scenario</summary>",
                "",
                template,
                "</details>",
            ]
    return "\n".join(lines) + "\n"


def render_timeline(result: ScenarioResult, path: Path) -> Path:
    """Draw ``result``'s timeline into the PNG ``path`` (module docstring); needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never a window, whatever the environment says
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    t0 = result.t0
    samples = result.samples
    health = [h for h in result.health if h.t >= t0 - 0.5]
    end = max([s.done - t0 for s in samples] + [h.t - t0 for h in health] + [1.0])
    width = 0.5 if end <= 60 else 1.0
    nbins = int(end / width) + 1
    edges = [i * width for i in range(nbins + 1)]

    fig, (ax_rate, ax_mode, ax_state) = plt.subplots(
        3, 1, figsize=(10, 7.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.4, 1.6]}
    )
    fig.suptitle(f"{result.title} ({result.name}): {result.status.upper()}", fontsize=12)

    bottom = [0.0] * nbins
    for outcome in OUTCOMES:
        counts = [0] * nbins
        for s in samples:
            if s.outcome == outcome:
                i = min(nbins - 1, max(0, int((s.done - t0) / width)))
                counts[i] += 1
        if not any(counts):
            continue
        rates = [c / width for c in counts]
        ax_rate.bar(
            edges[:-1], rates, width=width, bottom=bottom, align="edge", color=COLOURS[outcome], label=outcome
        )
        bottom = [b + r for b, r in zip(bottom, rates, strict=True)]
    ax_rate.set_ylabel("answers / s")
    ax_rate.legend(loc="upper right", fontsize=8, ncols=5)
    ax_rate.grid(axis="y", alpha=0.3)

    if health:
        xs = [h.t - t0 for h in health]
        levels = [_MODE_LEVEL.get(best_mode(h), float("nan")) for h in health]
        ax_mode.step(xs, levels, where="post", color="#1565c0")
        if any(h.queue_size for h in health):
            twin = ax_mode.twinx()
            twin.plot(xs, [h.queue_size for h in health], color="#6a1b9a", alpha=0.6, lw=1)
            twin.set_ylabel("queue", fontsize=8)
    marked = [e for e in result.events if e.name in _MARKED and e.t >= t0]
    if marked:
        # Operations events (recovery actions, loop blocks, resource alerts, system mode changes).
        ax_mode.plot(
            [e.t - t0 for e in marked], [4.35] * len(marked), "v", color="#424242", ms=5, label="ops event"
        )
        ax_mode.legend(loc="lower left", fontsize=7)
    ax_mode.set_yticks(list(_MODE_LEVEL.values()), list(_MODE_LEVEL))
    ax_mode.set_ylim(-0.5, 4.5)
    ax_mode.set_ylabel("mode")
    ax_mode.grid(axis="y", alpha=0.3)

    rows = _state_rows(result)
    for i, (_, spans) in enumerate(rows):
        for start, stop, state in spans:
            ax_state.broken_barh(
                [(start - t0, max(stop - start, 0.01))],
                (i - 0.4, 0.8),
                color=_STATE_COLOURS.get(state, "#e0e0e0"),
            )
    ax_state.set_yticks(range(len(rows)), [label for label, _ in rows])
    ax_state.set_ylim(-0.6, max(len(rows), 1) - 0.4)
    ax_state.set_xlabel("seconds since the load started")
    handles = [Rectangle((0, 0), 1, 1, color=_STATE_COLOURS[k]) for k in ("closed", "half_open", "open")]
    ax_state.legend(
        handles,
        ["closed / healthy", "half-open / restarting / pending", "open / down"],
        loc="upper right",
        fontsize=7,
        ncols=3,
    )

    marks = sorted(result.marks)
    for ax in (ax_rate, ax_mode, ax_state):
        for t, _label in marks:
            ax.axvline(t - t0, color="#424242", ls="--", lw=1)
        if len(marks) >= 2:
            ax.axvspan(marks[0][0] - t0, marks[1][0] - t0, color="#ffcdd2", alpha=0.25, lw=0)
    for t, label in marks:
        ax_rate.annotate(label, (t - t0, 1.0), xycoords=("data", "axes fraction"), fontsize=8, rotation=90,
                         va="top", ha="right")  # fmt: skip
    ax_state.set_xlim(0, end)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _state_rows(result: ScenarioResult) -> list[tuple[str, list[tuple[float, float, str]]]]:
    """Per role (breaker state, or the model server's state when it is not running) and, for data
    drills, the database: spans of constant state from the health samples."""
    health = [h for h in result.health if h.reachable]
    if not health:
        return []
    rows: list[tuple[str, list[tuple[float, float, str]]]] = []

    def spans(states: list[tuple[float, str]]) -> list[tuple[float, float, str]]:
        out: list[tuple[float, float, str]] = []
        for (t, state), nxt in zip(states, [*states[1:], (states[-1][0] + 0.1, "")], strict=True):
            if out and out[-1][2] == state:
                out[-1] = (out[-1][0], nxt[0], state)
            else:
                out.append((t, nxt[0], state))
        return out

    for role in ("qwen", "mistral", "llama"):
        states = []
        for h in health:
            server = h.servers.get(role)
            if server is not None and server.get("state") not in (None, "running"):
                states.append((h.t, "restarting"))
            else:
                state = h.breakers.get(role, "unknown")
                if state == "closed" and not h.available.get(role, True):
                    state = "unhealthy"  # breaker closed but the health probe failed
                states.append((h.t, state))
        rows.append((role, spans(states)))
    if result.kind == "data" or any(not h.database_ok or h.spool_pending for h in health):
        states = [(h.t, "healthy" if h.database_ok and h.spool_pending == 0 else "unhealthy") for h in health]
        rows.append(("database", spans(states)))
    if any(h.redis_status not in ("", "not configured") for h in health):
        redis = {"healthy": "healthy", "degraded": "half_open"}
        rows.append(("redis", spans([(h.t, redis.get(h.redis_status, "unhealthy")) for h in health])))
    if any(h.events_pending for h in health):
        rows.append(
            ("events", spans([(h.t, "half_open" if h.events_pending else "healthy") for h in health]))
        )
    return rows


def write_report(results: Sequence[ScenarioResult], directory: Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and a PNG per scenario that ran into ``directory``.

    Returns the paths written, by name (``json``, ``markdown``, and each scenario's name).
    """
    directory.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    charts: dict[str, str] = {}
    chart_error = ""
    for r in results:
        if not r.samples and not r.health:
            continue
        try:
            written[r.name] = render_timeline(r, directory / f"{r.name}.png")
            charts[r.name] = f"{r.name}.png"
        except ImportError as e:
            chart_error = f"charts not drawn: {e} (pip install -e '.[drill]')"
            break
    data = report_json(results)
    if chart_error:
        data["charts"] = chart_error
    written["json"] = directory / "report.json"
    written["json"].write_text(json.dumps(data, indent=2) + "\n")
    markdown = report_markdown(results, charts)
    if chart_error:
        markdown += f"\n_{chart_error}_\n"
    written["markdown"] = directory / "report.md"
    written["markdown"].write_text(markdown)
    return written
