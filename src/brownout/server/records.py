"""Served briefs made durable before they are acknowledged: the database, with a local spool in front.

:class:`BriefRecords` writes each served brief to the database (:class:`~brownout.durable.store.BriefStore`,
with failover hosts); when that fails or takes longer than ``database.write_timeout``, the write goes
to the local spool (:class:`~brownout.durable.spool.Spool`) and a replayer moves it into the database
once it takes writes again. While anything waits in the spool, new writes queue behind it so the
database receives them in order. A watch checks the database every ``database.check_interval`` while
writes are spooled (or the database is known down) and wakes the replayer the moment it is back.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, datetime
from typing import Any, cast

from brownout.background import Periodic
from brownout.briefs.answer import BriefAnswer
from brownout.briefs.service import BriefService
from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.config import DatabaseSection
from brownout.durable.outbox import EventOutbox
from brownout.durable.spool import Spool, SpoolReplayer, default_data_fault, error_summary
from brownout.durable.store import BriefPayload, BriefRecord, BriefStore
from brownout.errors import ServiceUnavailable
from brownout.events import DEFAULT_BUS, EventBus
from brownout.policies.deadline import deadline

__all__ = ["REPLAY_BATCH", "BriefRecords"]

_log = logging.getLogger("brownout.server")

REPLAY_BATCH = 500
"""Spooled brief writes replayed per database transaction."""


class BriefRecords:
    """The store, the spool and its replayer of ``brownout serve`` (see the module docstring).

    Built from the ``database`` config section; ``outbox``, when Redis events are configured, is told
    of every stored brief. :meth:`open` (after the spool is owned) opens the database and starts the
    replayer and the watch; :meth:`aclose` stops them and closes the spool and the store.
    """

    def __init__(
        self,
        section: DatabaseSection,
        *,
        outbox: EventOutbox | None = None,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus = DEFAULT_BUS,
    ) -> None:
        self.section = section
        self.clock = clock
        self.outbox = outbox
        self.store = BriefStore(
            [section.url, *section.failover_urls],
            connect_timeout=section.connect_timeout,
            recheck_interval=section.check_interval,
            clock=clock,
        )
        """The database."""
        self.spool = Spool(
            section.spool_path,
            name="briefs-spool",
            clock=clock,
            events=events,
            alert_pending=section.spool_alert,
        )
        """The local spool in front of the database."""
        # Batches of REPLAY_BATCH in one transaction each (500: measured ~5,900 writes/s into local
        # PostgreSQL against ~4,800 at 100, see benchmarks/); while the database stays down, retries
        # back off to check_interval * 5 at most, and the watch wakes the replayer as soon as it is back.
        self.replayer = SpoolReplayer(
            self.spool,
            self._save,
            batch_sink=self._save_batch,
            batch=REPLAY_BATCH,
            interval=section.check_interval,
            max_interval=section.check_interval * 5,
        )
        """Moves spooled writes into the database (running from :meth:`open` to :meth:`aclose`)."""
        self.ok = False
        """Whether the database took the last write or check (``/health`` says it is unhealthy when not)."""
        self.error: str | None = None
        """Why the database is not ok: the driver's error class and short message, never the SQL."""
        self._schema_ready = False
        self._watch = Periodic(
            "brownout-db-watch", self._check_database, section.check_interval, clock=clock, immediately=False
        )

    async def open(self) -> None:
        """Open the database (the service answers without one: then ``ok`` is False and the watch
        creates the schema once it is reachable) and start the replayer and the watch."""
        try:
            await self.store.init()
            self._schema_ready = True
            self.ok, self.error = True, None
        except Exception as e:  # the service answers without a database; /health says so
            self.ok, self.error = False, error_summary(e)
            _log.error("database unavailable at start: %s", self.error)
        self.replayer.start()
        self._watch.start()

    async def _check_database(self) -> None:
        """The watch's round, every check_interval: while writes are spooled (or the database is known
        down), check it, and wake the replayer the moment some host takes writes again (reconnecting or
        failing over)."""
        if self.spool.pending == 0 and self.ok:
            return
        try:
            if self._schema_ready:
                await self.store.ping()
            else:  # the database was down at start: create or migrate the schema now
                await self.store.init()
                self._schema_ready = True
        except Exception as e:
            self.ok, self.error = False, error_summary(e)
            return
        if not self.ok:
            _log.warning("database reachable again (%s)", self.store.writable_host)
        self.ok, self.error = True, None
        if self.spool.pending:
            self.replayer.wake()

    async def record(self, text: str, response: BriefAnswer) -> None:
        """Persist a served brief before it is acknowledged: in the database, or else in the spool.

        While anything waits in the spool, new writes queue behind it so the database receives them
        in order. Raises ServiceUnavailable only when neither the database nor the spool took the
        write -- then the request must not be acknowledged.
        """
        payload: BriefPayload = {
            "request_id": response["request_id"],
            "text": text,
            "requested_mode": response["requested_mode"],
            "served_mode": response["served_mode"],
            "degraded": bool(response["degraded"]),
            # The answer as sent: to the store it is JSON like any other.
            "response": cast(dict[str, Any], response),
            "created_at": datetime.now(UTC).isoformat(),
            "cache_key": BriefService.cache_key(text.strip(), response["requested_mode"]),
        }
        if self.spool.pending == 0:
            try:
                async with deadline(self.section.write_timeout, clock=self.clock):
                    await self.store.save(BriefRecord.from_payload(payload))
                self.ok, self.error = True, None
                self._brief_created(payload)
                return
            except Exception as e:
                summary = error_summary(e)
                # A write refused for its data says nothing about the database's health.
                if not default_data_fault(e):
                    self.ok, self.error = False, summary
                _log.error("database write of %s failed, spooling it: %s", payload["request_id"], summary)
        try:
            await self.spool.append(payload["request_id"], "brief", payload)
        except Exception as e:
            _log.error("could not spool brief %s: %s", payload["request_id"], e)
            raise ServiceUnavailable(
                "The brief could not be stored (database and local spool both unavailable)",
                retry_after=30.0,
                policy="store",
            ) from e
        self.replayer.wake()
        self._brief_created(payload)

    def _brief_created(self, payload: BriefPayload) -> None:
        """Tell the event stream that a brief was stored (or spooled): ``brief_created``, keyed by
        request id (sent once)."""
        if self.outbox is not None:
            self.outbox.emit(
                "brief_created",
                {
                    "request_id": payload["request_id"],
                    "requested_mode": payload["requested_mode"],
                    "served_mode": payload["served_mode"],
                    "degraded": payload["degraded"],
                },
            )

    async def _save(self, key: str, kind: str, payload: dict[str, Any]) -> None:
        """The spool's sink: one idempotent write of a brief record (by request_id).

        The spool hands back what :meth:`record` wrote (a :class:`BriefPayload`), decoded from JSON.
        """
        await self.store.save(BriefRecord.from_payload(cast(BriefPayload, payload)))

    async def _save_batch(self, entries: list[tuple[str, str, dict[str, Any]]]) -> None:
        """The spool's batch sink: up to REPLAY_BATCH records in one transaction, idempotent by request_id."""
        await self.store.save_many(
            [BriefRecord.from_payload(cast(BriefPayload, payload)) for _, _, payload in entries]
        )
        self.ok, self.error = True, None

    async def aclose(self) -> None:
        """Stop the watch and the replayer, then close the spool and the store; safe to call twice."""
        await self._watch.stop()
        await self.replayer.aclose()
        with contextlib.suppress(Exception):
            await self.spool.aclose()
        with contextlib.suppress(Exception):
            await self.store.aclose()
