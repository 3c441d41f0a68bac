"""Singleflight across replicas: one computation per key among every process that shares a Redis.

:class:`brownout.policies.singleflight.Singleflight` coalesces the callers of one process. When
several replicas of a service see the same stampede, each would still compute once; with
:class:`RedisSingleflight` only one of them does, and the others take its result::

    flight: RedisSingleflight[dict[str, float]] = RedisSingleflight(redis_client, name="predict")
    prediction = await flight.do(key, lambda: model.predict(features))

How it works, per key:

1. The callers of one process coalesce in a local :class:`Singleflight` first, so only one
   coroutine per process and key talks to Redis.
2. That coroutine tries to take the key's lock (``SET NX PX lock_ttl``) with a token of its own. The
   winner computes; while it does, a watchdog extends the lock every ``lock_ttl / 2`` if the lock is
   still its own, so a slow but live holder keeps it.
3. The winner stores the outcome -- the value (``encode``-d) or the error (``{"error": type,
   "message": ...}``) -- under a result key named after its token, kept ``result_ttl`` seconds, and
   releases the lock only if it still holds it; both in one Lua script, so nobody ever sees the lock
   gone without the result there.
4. The others poll every ``poll_interval`` (one small Lua script per poll and process): the holder's
   result, if there is one, is returned (an error as :class:`RemoteComputationFailed`); while the
   lock is held they keep waiting (following a new holder if it changed hands); when the lock is gone
   without a result -- its holder died and the lock expired -- the poller takes the lock itself and
   computes. A dead holder therefore blocks the others at most ``lock_ttl`` (plus one poll).

Results are keyed by the holder's token, not by the key alone: a caller never mistakes the result of
an earlier computation for the one it waits for, and, as with the local singleflight, a call that
comes after a computation finished computes again (caching results is the cache's job).

Each caller's wait is bounded by its own deadline (:func:`brownout.policies.deadline.remaining`):
when it passes the caller gets :class:`~brownout.errors.DeadlineExceeded` while the computation, or
the wait for another replica's, goes on for the callers that remain.

Redis is an optimisation here, never a dependency: when a Redis command fails the process computes on
its own (still coalescing its own callers) and does not try Redis again for ``redis_backoff``
seconds. A Redis that hangs rather than refuses is bounded by the client's ``socket_timeout``; give
the client one.

Waiters poll rather than subscribe: one script per ``poll_interval`` per waiting process is cheap, it
needs no connection held per key, and it survives a Redis restart without a resubscription dance.
"""

from __future__ import annotations

import asyncio
import functools
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import redis.asyncio
from redis.exceptions import RedisError

from brownout.background import STOP, Periodic
from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.errors import ConfigError, DeadlineExceeded, RemoteComputationFailed
from brownout.policies.deadline import remaining
from brownout.policies.singleflight import Singleflight

# RemoteComputationFailed is defined in brownout.errors (caught by class without Redis) and re-exported here.
__all__ = ["RedisSingleflight", "RedisSingleflightStats", "RemoteComputationFailed"]

V = TypeVar("V")

# What a failing or unreachable Redis raises: redis-py's own errors, and socket errors (OSError covers
# ConnectionError and TimeoutError) that may slip through it.
_REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError)

_RESULT, _HELD, _ACQUIRED = 0, 1, 2

# KEYS: lock, result key of the holder waited for. ARGV: that holder's token ('' when none is known
# yet), our token, lock ttl in ms. One atomic step: the holder's result if it is there; else who holds
# the lock; else take the lock. Atomic, so a lock seen gone without a result really means its holder
# died (the holder stores its result and releases in one script).
_STEP = """
if ARGV[1] ~= '' then
  local result = redis.call('GET', KEYS[2])
  if result then return {0, result} end
end
local holder = redis.call('GET', KEYS[1])
if holder then return {1, holder} end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return {2, ARGV[2]}
"""

# KEYS: lock. ARGV: token, ttl ms. Extend the lock only while it is still ours.
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: lock, result key. ARGV: token, payload, result ttl ms. Store the outcome, then release the
# lock if it is still ours (it is not when it expired and another replica took over).
_FINISH = """
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""

# KEYS: lock. ARGV: token. Compare-and-delete: release the lock only if it is still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True, slots=True)
class RedisSingleflightStats:
    """Counters of a :class:`RedisSingleflight` since it was made.

    ``calls`` counts every call of this process; ``computations`` the runs of ``fn`` here (as lock
    holder, as taker-over, or alone while Redis failed); ``remote_waits`` the flights of this process
    that waited for another holder; ``takeovers`` the locks taken from a holder that died;
    ``redis_errors`` the Redis commands that failed.
    """

    calls: int
    computations: int
    remote_waits: int
    takeovers: int
    redis_errors: int


def _text(raw: object) -> str:
    # The client may or may not have decode_responses set.
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class RedisSingleflight(Generic[V]):
    """Coalesces concurrent calls per key into one computation across every process sharing Redis."""

    __slots__ = (
        "_client",
        "_clock",
        "_computations",
        "_decode",
        "_encode",
        "_extend",
        "_finish",
        "_local",
        "_lock_ttl",
        "_lock_ttl_ms",
        "_poll_interval",
        "_prefix",
        "_redis_backoff",
        "_redis_errors",
        "_release",
        "_remote_waits",
        "_result_ttl_ms",
        "_skip_until",
        "_step",
        "_takeovers",
        "name",
    )

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        name: str = "singleflight",
        prefix: str = "brownout:sf:",
        lock_ttl: float = 30.0,
        result_ttl: float = 60.0,
        poll_interval: float = 0.05,
        redis_backoff: float = 1.0,
        encode: Callable[[Any], str] = json.dumps,
        decode: Callable[[str], Any] = json.loads,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        """Share computations through ``client``.

        Replicas coalesce with each other when they use the same ``prefix`` and ``name``. A lock
        lives ``lock_ttl`` seconds unless its live holder extends it; a stored result lives
        ``result_ttl`` seconds (long enough for every waiter's next poll). ``encode``/``decode`` turn
        values into text and back (JSON by default). After a Redis error the instance computes
        locally for ``redis_backoff`` seconds before trying Redis again.
        """
        for field, value in (
            ("lock_ttl", lock_ttl),
            ("result_ttl", result_ttl),
            ("poll_interval", poll_interval),
        ):
            if not value > 0:
                raise ConfigError(field, f"must be greater than 0, got {value!r}")
        if not redis_backoff >= 0:
            raise ConfigError("redis_backoff", f"must be at least 0, got {redis_backoff!r}")
        self.name = name
        """Names this instance in its Redis keys, errors and reprs."""
        self._client = client
        # A hash tag ({...}) puts every key of one flight in one Redis Cluster slot, as scripts need.
        self._prefix = f"{prefix}{{{name}:"
        self._lock_ttl = lock_ttl
        self._lock_ttl_ms = max(1, round(lock_ttl * 1000))
        self._result_ttl_ms = max(1, round(result_ttl * 1000))
        self._poll_interval = poll_interval
        self._redis_backoff = redis_backoff
        self._encode = encode
        self._decode = decode
        self._clock = clock
        self._local: Singleflight[str, V] = Singleflight(name)
        # register_script: EVALSHA, reloading the script when Redis lost it (a restart).
        self._step = client.register_script(_STEP)
        self._extend = client.register_script(_EXTEND)
        self._finish = client.register_script(_FINISH)
        self._release = client.register_script(_RELEASE)
        self._skip_until = float("-inf")
        self._computations = 0
        self._remote_waits = 0
        self._takeovers = 0
        self._redis_errors = 0

    async def do(self, key: str, fn: Callable[[], Awaitable[V]]) -> V:
        """Return ``await fn()``, sharing one run of it among all concurrent callers for ``key`` in
        every replica.

        The value comes from this process's run of ``fn`` or another replica's (decoded). An error
        of a local run is raised as it is; another replica's as :class:`RemoteComputationFailed`.
        Raises :class:`DeadlineExceeded` when the caller's deadline passes first; cancelling a
        caller cancels only its wait.
        """
        left = remaining()
        if left is None:
            return await self._local.do(key, functools.partial(self._across, key, fn))
        if left <= 0:
            raise DeadlineExceeded(0.0, policy=self.name)
        return await self._until(left, self._local.start(key, functools.partial(self._across, key, fn)))

    async def _until(self, left: float, flight: asyncio.Future[V]) -> V:
        # The caller's own future, resolved by the flight or by its deadline, whichever comes first;
        # leaving early must not cancel the flight the other callers share.
        waiter: asyncio.Future[V] = flight.get_loop().create_future()

        def relay(done: asyncio.Future[V]) -> None:
            if waiter.done():
                return
            if done.cancelled():
                waiter.cancel()
            elif (error := done.exception()) is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(done.result())

        def expire() -> None:
            if not waiter.done():
                waiter.set_exception(DeadlineExceeded(left, policy=self.name))

        flight.add_done_callback(relay)
        timer = self._clock.call_later(left, expire)
        try:
            return await waiter
        finally:
            timer.cancel()
            flight.remove_done_callback(relay)

    async def _across(self, key: str, fn: Callable[[], Awaitable[V]]) -> V:
        """The one flight of this process for ``key``: take the lock and compute, or wait for the holder."""
        if self._clock.now() < self._skip_until:
            return await self._alone(fn)
        base = self._prefix + key + "}"
        lock = base + ":lock"
        token = uuid.uuid4().hex
        holder = ""
        waited = False
        while True:
            try:
                status, raw = await self._step(
                    keys=[lock, f"{base}:result:{holder}"], args=[holder, token, self._lock_ttl_ms]
                )
            except _REDIS_ERRORS:
                self._failed()
                return await self._alone(fn)
            if status == _ACQUIRED:
                if waited:
                    self._takeovers += 1
                return await self._hold(key, base, lock, token, fn)
            if status == _RESULT:
                return self._unpack(key, _text(raw))
            if not waited:
                waited = True
                self._remote_waits += 1
            holder = _text(raw)
            await self._clock.sleep(self._poll_interval)

    async def _hold(self, key: str, base: str, lock: str, token: str, fn: Callable[[], Awaitable[V]]) -> V:
        """Compute as the lock's holder, keep the lock alive meanwhile, then hand the outcome over."""
        self._computations += 1
        watchdog = Periodic(
            f"{self.name}-lock-watchdog",
            functools.partial(self._keep, lock, token),
            self._lock_ttl / 2,
            clock=self._clock,
            immediately=False,
        )
        watchdog.start()
        try:
            value = await fn()
        except Exception as error:
            await watchdog.stop()
            failure = {"error": type(error).__name__, "message": str(error)}
            await self._hand_over(base, lock, token, "e" + json.dumps(failure))
            raise
        except BaseException:
            # Cancelled (shutting down): no outcome to share; free the lock for another replica.
            await watchdog.stop()
            await self._let_go(lock, token)
            raise
        await watchdog.stop()
        try:
            payload = "v" + self._encode(value)
        except Exception as error:  # the value is ours to return; waiters elsewhere learn why not theirs
            failure = {
                "error": type(error).__name__,
                "message": f"the result for {key!r} could not be encoded: {error}",
            }
            payload = "e" + json.dumps(failure)
        await self._hand_over(base, lock, token, payload)
        return value

    async def _keep(self, lock: str, token: str) -> object:
        """The watchdog's round, every ``lock_ttl / 2``: extend the lock while it is still ours."""
        try:
            held = await self._extend(keys=[lock], args=[token, self._lock_ttl_ms])
        except _REDIS_ERRORS:
            self._redis_errors += 1  # try again next time; the lock may outlive a short outage
            return None
        # Lost it (expired during a stall, or Redis restarted): nothing left to guard.
        return None if held else STOP

    async def _hand_over(self, base: str, lock: str, token: str, payload: str) -> None:
        try:
            await self._finish(
                keys=[lock, f"{base}:result:{token}"], args=[token, payload, self._result_ttl_ms]
            )
        except _REDIS_ERRORS:
            # Waiters elsewhere will see the lock expire without a result and compute themselves.
            self._failed()

    async def _let_go(self, lock: str, token: str) -> None:
        try:
            await self._release(keys=[lock], args=[token])
        except _REDIS_ERRORS:
            self._failed()

    async def _alone(self, fn: Callable[[], Awaitable[V]]) -> V:
        self._computations += 1
        return await fn()

    def _failed(self) -> None:
        self._redis_errors += 1
        self._skip_until = self._clock.now() + self._redis_backoff

    def _unpack(self, key: str, payload: str) -> V:
        if payload.startswith("v"):
            value: V = self._decode(payload[1:])
            return value
        failure = json.loads(payload[1:])
        raise RemoteComputationFailed(self.name, key, str(failure["error"]), str(failure["message"]))

    def __contains__(self, key: str) -> bool:
        """Whether this process runs or awaits a flight for ``key`` now (its own callers join it);
        another replica's flight is not known here without asking Redis."""
        return key in self._local

    @property
    def stats(self) -> RedisSingleflightStats:
        """A snapshot of the counters."""
        return RedisSingleflightStats(
            self._local.stats.calls,
            self._computations,
            self._remote_waits,
            self._takeovers,
            self._redis_errors,
        )

    def __repr__(self) -> str:
        return f"RedisSingleflight({self.name!r}, in_flight={self._local.in_flight})"
