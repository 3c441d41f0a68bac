"""Job items shared by several replicas through a Redis stream and its consumer group.

With ``redis.url`` configured and the replicas on one PostgreSQL database, the items of a job are not
run by the replica that holds the job alone: the holder puts them in one Redis stream (one entry per
item: its job and index) and every replica reads from it through one consumer group, so all of them
work on a big job at once. This module is only the stream's side; the rows (inputs, outcomes, the
exactly-once write) stay in :mod:`brownout.durable.jobs`. Redis Streams is the engine:

* **one delivery per entry** -- ``XREADGROUP`` hands each entry to one consumer (a replica), which
  keeps it in its *pending* list until it ``XACK``\\ s it (then the entry is deleted: the stream
  holds only the work not done yet);
* **heartbeats** -- a consumer touches the entries it is running every ``lease / 3`` (``XCLAIM ...
  JUSTID`` to itself resets their idle time), so an item that takes long is not taken from it;
* **leases** -- an entry idle for ``lease`` seconds belongs to a consumer that stopped (``kill -9``,
  a lost machine): any live consumer takes it with ``XAUTOCLAIM`` and runs it;
* **a returning consumer** (the same server started again: the same name) reads its own pending
  entries first, at once, without waiting out the lease; a consumer that stops cleanly sets its
  pending entries' idle time past the lease, so the others take them at once.

An entry may be delivered twice (a consumer that froze past its lease and woke up, Redis restarted
empty and the items put in again): the database's conditional write keeps each item's outcome once,
whatever runs it. Putting a job's items in is once per job -- a marker in a hash, set in the same
script as the entries, so a Redis that comes back empty has lost both and the holder puts the items
still open in again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

__all__ = ["Delivery", "RedisItemQueue"]

_DISPATCH: Final = """
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then
  return -1
end
for i = 3, #ARGV do
  redis.call('XADD', KEYS[1], '*', 'job', ARGV[1], 'idx', ARGV[i])
end
return #ARGV - 2
"""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One stream entry handed to this consumer: the item ``index`` of job ``job_id``."""

    entry: str
    job_id: str
    index: int


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _deliveries(entries: Iterable[Any]) -> tuple[list[Delivery], list[str]]:
    """Entries as deliveries, and the ids of those that cannot be read (deleted meanwhile, foreign)."""
    good: list[Delivery] = []
    bad: list[str] = []
    for entry_id, fields in entries:
        entry = _text(entry_id)
        if not fields:
            bad.append(entry)
            continue
        values = {_text(k): _text(v) for k, v in fields.items()}
        try:
            good.append(Delivery(entry, values["job"], int(values["idx"])))
        except (KeyError, ValueError):
            bad.append(entry)
    return good, bad


class RedisItemQueue:
    """The job items' stream (module docstring) as consumer ``consumer`` of its group.

    Keys live under ``prefix``: ``<prefix>:jobs:items`` (the stream), ``<prefix>:jobs`` (the group),
    ``<prefix>:jobs:dispatched`` (the once-per-job markers). Every call raises the client's error when
    Redis cannot answer; the caller decides what to do without it.
    """

    def __init__(self, client: Redis, *, prefix: str, consumer: str) -> None:
        self.client = client
        self.consumer = consumer
        self.stream = f"{prefix}:jobs:items"
        self.group = f"{prefix}:jobs"
        self.marks = f"{prefix}:jobs:dispatched"
        self._dispatch = client.register_script(_DISPATCH)

    @classmethod
    def from_url(cls, url: str, *, prefix: str, consumer: str, block: float) -> RedisItemQueue:
        """A queue on its own client: its reads block up to ``block`` seconds, which the shared
        client's short socket timeout would cut, and they must not hold the shared client's
        connections."""
        client: Redis = Redis.from_url(
            url,
            retry=Retry(NoBackoff(), 0),
            socket_connect_timeout=1.0,
            socket_timeout=block + 2.0,
        )
        return cls(client, prefix=prefix, consumer=consumer)

    async def ensure_group(self) -> None:
        """Create the stream and its group if they are not there (a Redis that came back empty)."""
        try:
            await self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def _group_call(self, call: Any) -> Any:
        """Run ``call()``; when Redis lost the group (restarted empty), create it and run it again."""
        try:
            return await call()
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
        await self.ensure_group()
        return await call()

    # ------------------------------------------------------------------ the holder's side

    async def dispatch(self, job_id: str, indices: Sequence[int], *, stamp: float) -> int | None:
        """Put the items ``indices`` of ``job_id`` in the stream, once per job: how many were put in,
        or None when the job's items were put in before (its marker is there)."""
        await self.ensure_group()
        added = await self._dispatch(keys=[self.stream, self.marks], args=[job_id, repr(stamp), *indices])
        return None if int(added) < 0 else int(added)

    async def dispatched(self, job_id: str) -> bool:
        """Whether ``job_id``'s items were put in (False after Redis came back empty)."""
        return bool(await self.client.hexists(self.marks, job_id))

    async def forget(self, job_id: str) -> None:
        """Drop ``job_id``'s marker (the job ended)."""
        await self.client.hdel(self.marks, job_id)

    # ------------------------------------------------------------------ the consumers' side

    async def read(self, count: int, *, block: float) -> list[Delivery]:
        """Up to ``count`` entries no consumer had yet, waiting up to ``block`` seconds for one."""

        async def call() -> Any:
            return await self.client.xreadgroup(
                self.group, self.consumer, {self.stream: ">"}, count=count, block=max(1, int(block * 1000))
            )

        reply = await self._group_call(call)
        return await self._take(reply)

    async def own_pending(self, count: int) -> list[Delivery]:
        """Entries delivered to this consumer before and not acknowledged: a server that comes back
        under the same name runs them again at once."""

        async def call() -> Any:
            return await self.client.xreadgroup(self.group, self.consumer, {self.stream: "0"}, count=count)

        reply = await self._group_call(call)
        return await self._take(reply)

    async def _take(self, reply: Any) -> list[Delivery]:
        if not reply:
            return []
        # redis-py answers a list of [stream, entries] (RESP2) or a dict (RESP3).
        streams = reply.items() if isinstance(reply, dict) else reply
        out: list[Delivery] = []
        for _name, entries in streams:
            rows = entries[0] if entries and isinstance(entries[0], list) else entries
            good, bad = _deliveries(rows)
            out.extend(good)
            if bad:
                await self.ack(bad)
        return out

    async def reclaim(self, count: int, *, idle: float) -> list[Delivery]:
        """Take up to ``count`` entries idle for ``idle`` seconds or more from other consumers (they
        stopped without finishing them)."""

        async def call() -> Any:
            return await self.client.xautoclaim(
                self.stream, self.group, self.consumer, max(1, int(idle * 1000)), "0-0", count=count
            )

        reply = await self._group_call(call)
        # Entries deleted meanwhile leave the pending lists by themselves in XAUTOCLAIM (Redis 7).
        good, bad = _deliveries(reply[1])
        if bad:
            await self.ack(bad)
        return good

    async def heartbeat(self, entries: Sequence[str]) -> None:
        """Say this consumer still runs ``entries``: their idle time starts again."""
        if entries:
            await self.client.xclaim(self.stream, self.group, self.consumer, 0, list(entries), justid=True)

    async def let_go(self, entries: Sequence[str], *, lease: float) -> None:
        """Hand ``entries`` back (a clean stop): they look idle past ``lease``, so the next consumer's
        reclaim takes them at once."""
        if entries:
            await self.client.xclaim(
                self.stream,
                self.group,
                self.consumer,
                0,
                list(entries),
                idle=int(lease * 1000) + 1000,
                justid=True,
            )

    async def ack(self, entries: Sequence[str]) -> None:
        """``entries`` are done (or need no work): acknowledged and deleted from the stream."""
        if not entries:
            return
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, self.group, *entries)
            pipe.xdel(self.stream, *entries)
            await pipe.execute()

    async def backlog(self) -> tuple[int, int]:
        """Entries in the stream (not yet acknowledged), and those delivered and not acknowledged."""
        length, pending = await asyncio.gather(
            self.client.xlen(self.stream),
            self._group_call(lambda: self.client.xpending(self.stream, self.group)),
        )
        return int(length), int(pending["pending"] if isinstance(pending, dict) else pending[0])

    async def aclose(self) -> None:
        """Close the client."""
        await self.client.aclose()
