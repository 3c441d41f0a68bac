"""Circuit breakers whose state is shared by every replica through Redis.

One replica's view of a model is not enough: with four replicas, each would need its own
``minimum_calls`` failures before it stopped calling a dead model, and each would send its own probes
when the wait is over -- four times the load on a model that is trying to come back. A
:class:`SharedBreaker` keeps the state, the sliding window of outcomes and the half-open probe permits
in Redis, and changes them only inside Lua scripts, so every transition is atomic:

* **one state** -- a replica that sees the failure rate cross the threshold opens the breaker for all;
  the others learn it from the answer of their next report or from the background sync (every
  ``sync_interval``, 0.5 s by default). Successes reach the shared window up to one sync late, so
  the failure rate can read a little high for that long -- the price of a Redis-free success path;
* **probes in total** -- when the open wait is over, the first replica to ask moves the breaker to
  half-open, and at most ``half_open_max_calls`` probe permits exist *across replicas*. A permit is a
  lease (``probe_lease`` seconds): a replica that dies holding one blocks the others no longer than that;
* **cheap while closed** -- a closed breaker admits calls from its local copy of the state with no
  Redis round trip; successes are counted locally and sent in one script call per sync (or with the
  next failure), failures are sent at once.

When Redis is unreachable the breaker does not go dark: each replica falls back to its own local
breaker (the :class:`~brownout.policies.breaker.CircuitBreaker` engine it inherits) until a sync
succeeds again. The scripts read time from the injected clock, which must be comparable across
replicas: the default is :data:`~brownout.clock.WALL_CLOCK`. Shared breakers use count windows.

Build them through a :class:`RedisBreakers` registry, which owns the Redis client use and the sync::

    breakers = RedisBreakers(redis, prefix="brownout:breaker")
    breakers.start()
    qwen = breakers.breaker("qwen", BreakerConfig(failure_rate_threshold=0.4))
    await qwen.call(ask_model, prompt)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Final, ParamSpec, TypeVar

from redis.asyncio import Redis

from brownout.background import Periodic, TaskSet
from brownout.clock import WALL_CLOCK, Clock
from brownout.errors import CircuitOpen, ConfigError
from brownout.events import DEFAULT_BUS, BreakerStateChanged, CallRejected, EventBus
from brownout.policies._base import EnteredGuards
from brownout.policies.breaker import BreakerConfig, BreakerMetrics, BreakerState, CircuitBreaker
from brownout.state.redis import _bounded

__all__ = ["RedisBreakers", "SharedBreaker"]

_log = logging.getLogger("brownout.state.breaker")

P = ParamSpec("P")
T = TypeVar("T")

_STATES: Final = {s.value: s for s in BreakerState}
_ADMIT_LOCALLY: Final = frozenset({BreakerState.CLOSED, BreakerState.FORCED_CLOSED, BreakerState.DISABLED})

# KEYS: state hash, window list, probe zset.  Every script returns {state, gen, open_until, ...}.
_PRELUDE: Final = """
local h, w, p = KEYS[1], KEYS[2], KEYS[3]
local now = tonumber(ARGV[1])
local st = redis.call('HMGET', h, 'state', 'gen', 'open_until', 'opens', 'ho_ok')
local state = st[1] or 'closed'
local gen = tonumber(st[2] or '0')
local open_until = tonumber(st[3] or '0')
local opens = tonumber(st[4] or '0')
local ho_ok = tonumber(st[5] or '0')
-- The open wait of brownout.policies.breaker.open_wait: min(cap, wait0 * mult ^ (opens - 1)). Lua cannot
-- call capped_exponential, but it needs no guard: a Lua power past the float range is inf (it never
-- raises), and min(cap, inf) is the cap. last_wait is still written for replicas of older versions.
local function open_(reason, wait0, mult, cap)
  opens = opens + 1
  local wait = math.min(cap, wait0 * mult ^ (opens - 1))
  gen = gen + 1
  state = 'open'
  open_until = now + wait
  redis.call('HSET', h, 'state', 'open', 'gen', gen, 'open_until', tostring(open_until), 'opens', opens,
             'last_wait', tostring(wait), 'ho_ok', 0, 'reason', reason)
  redis.call('HINCRBY', h, 'opened', 1)
  redis.call('DEL', p)
end
"""

_RECORD: Final = (
    _PRELUDE
    + """
-- ARGV: now, gen, successes, outcome (-1 none; bits: 1 failed, 2 slow), probe id, window size,
--       minimum calls, failure threshold, slow threshold (-1 none), success threshold, open wait,
--       multiplier, wait cap
local cgen, oks, outcome, probe = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local size, minc, fth, sth = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local succ, wait0, mult, cap = tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[13])
if probe ~= '' then redis.call('ZREM', p, probe) end
if cgen == gen then
  if state == 'half_open' then
    if outcome > 0 then
      open_('probe failed', wait0, mult, cap)
    elseif outcome == 0 then
      ho_ok = ho_ok + 1
      if ho_ok >= succ then
        gen = gen + 1
        state = 'closed'
        redis.call('HSET', h, 'state', 'closed', 'gen', gen, 'opens', 0, 'ho_ok', 0,
                   'reason', ho_ok .. ' probes succeeded')
        redis.call('DEL', w, p)
      else
        redis.call('HSET', h, 'ho_ok', ho_ok)
      end
    end
  elseif state == 'closed' or state == 'forced_closed' then
    local n = math.min(oks, size)
    for i = 1, n do redis.call('LPUSH', w, '0') end
    if outcome >= 0 then redis.call('LPUSH', w, tostring(outcome)) end
    redis.call('LTRIM', w, 0, size - 1)
    if state == 'closed' and (outcome > 0) then
      local calls, fails, slows = 0, 0, 0
      for _, v in ipairs(redis.call('LRANGE', w, 0, -1)) do
        calls = calls + 1
        local o = tonumber(v)
        if o % 2 == 1 then fails = fails + 1 end
        if o >= 2 then slows = slows + 1 end
      end
      if calls >= minc then
        if fails > 0 and fails / calls >= fth then
          open_('failure rate ' .. fails .. '/' .. calls, wait0, mult, cap)
        elseif sth >= 0 and slows > 0 and slows / calls >= sth then
          open_('slow-call rate ' .. slows .. '/' .. calls, wait0, mult, cap)
        end
      end
    end
  end
end
return {state, gen, tostring(open_until)}
"""
)

_ACQUIRE: Final = (
    _PRELUDE
    + """
-- ARGV: now, max probes, lease, probe id, half-open retry after, open wait (forced open retry after)
local maxp, lease, probe = tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
if state == 'open' then
  if now < open_until then return {state, gen, tostring(open_until), 0, tostring(open_until - now)} end
  gen = gen + 1
  state = 'half_open'
  redis.call('HSET', h, 'state', 'half_open', 'gen', gen, 'ho_ok', 0, 'reason', 'open wait elapsed')
  redis.call('DEL', p)
end
if state == 'half_open' then
  redis.call('ZREMRANGEBYSCORE', p, '-inf', now)
  if redis.call('ZCARD', p) < maxp then
    redis.call('ZADD', p, tostring(now + lease), probe)
    return {state, gen, tostring(open_until), 1, '0'}
  end
  return {state, gen, tostring(open_until), 0, ARGV[5]}
end
if state == 'forced_open' then return {state, gen, tostring(open_until), 0, ARGV[6]} end
return {state, gen, tostring(open_until), 1, '0'}
"""
)

_SET: Final = (
    _PRELUDE
    + """
-- ARGV: now, new state, reason, open until (for 'open')
local new, reason = ARGV[2], ARGV[3]
if new == 'open' then
  local until_ = tonumber(ARGV[4])
  if state == 'open' and open_until >= until_ then return {state, gen, tostring(open_until)} end
  if state ~= 'closed' and state ~= 'open' and state ~= 'half_open' then
    return {state, gen, tostring(open_until)}
  end
  if state ~= 'open' then gen = gen + 1; redis.call('HINCRBY', h, 'opened', 1) end
  open_until = until_
  redis.call('HSET', h, 'state', 'open', 'gen', gen, 'open_until', tostring(open_until), 'reason', reason)
  redis.call('DEL', p)
  return {'open', gen, tostring(open_until)}
end
gen = gen + 1
redis.call('HSET', h, 'state', new, 'gen', gen, 'ho_ok', 0, 'reason', reason)
if new == 'closed' then
  redis.call('HSET', h, 'opens', 0)
  redis.call('DEL', w)
end
redis.call('DEL', p)
return {new, gen, tostring(open_until)}
"""
)


class SharedBreaker(CircuitBreaker):
    """A circuit breaker whose state lives in Redis; see the module docstring. Made by :class:`RedisBreakers`.

    The same forms as :class:`~brownout.policies.breaker.CircuitBreaker`: ``await breaker.call(fn)``,
    ``@breaker``, ``breaker.wrap(fn)``, ``async with breaker.guard() as g:``. While Redis is unreachable
    it is that local breaker.
    """

    __slots__ = (
        "_keys",
        "_owner",
        "_pending_gen",
        "_sgen",
        "_shared_counts",
        "_shared_rejected",
        "_sopen_until",
        "_sprobes",
        "_sstate",
        "_unsent_ok",
    )

    def __init__(
        self,
        owner: RedisBreakers,
        name: str,
        config: BreakerConfig | None = None,
    ) -> None:
        cfg = config or BreakerConfig()
        if cfg.window_type != "count":
            raise ConfigError("window_type", "a shared breaker keeps a count window; use window_type='count'")
        super().__init__(name, cfg, clock=owner.clock, events=owner.events)
        self._owner = owner
        base = f"{owner.prefix}:{name}"
        self._keys = (base, f"{base}:window", f"{base}:probes")
        self._sstate = BreakerState.CLOSED
        self._sgen = 0
        self._sopen_until = 0.0
        self._sprobes = 0
        self._shared_counts = (0, 0, 0)
        self._shared_rejected = 0
        self._unsent_ok = 0
        self._pending_gen = 0

    # ------------------------------------------------------------------ reading state

    @property
    def shared(self) -> bool:
        """True while the state is Redis's (False: Redis unreachable, this replica's own breaker)."""
        return self._owner.ok

    @property
    def state(self) -> BreakerState:
        """The shared state as last seen (an open breaker whose wait is over reports half-open)."""
        if not self._owner.ok:
            return super().state
        state = self._sstate
        if state is BreakerState.OPEN and self._clock.now() >= self._sopen_until:
            return BreakerState.HALF_OPEN
        return state

    @property
    def available(self) -> bool:
        """True when a call made now would likely be permitted (the probe count is as last synced)."""
        if not self._owner.ok:
            return super().available
        state = self.state
        if state is BreakerState.HALF_OPEN:
            return self._sstate is BreakerState.OPEN or self._sprobes < self.config.half_open_max_calls
        return state is not BreakerState.OPEN and state is not BreakerState.FORCED_OPEN

    def retry_after(self) -> float:
        """Seconds until the breaker may let a call through (0 when it would now)."""
        if not self._owner.ok:
            return super().retry_after()
        state = self.state
        if state is BreakerState.OPEN:
            return max(0.0, self._sopen_until - self._clock.now())
        if state is BreakerState.FORCED_OPEN:
            return self.config.open_wait
        if state is BreakerState.HALF_OPEN and not self.available:
            return self.config.half_open_retry_after
        return 0.0

    def metrics(self) -> BreakerMetrics:
        """The shared window as last synced, with this replica's rejections."""
        if not self._owner.ok:
            return super().metrics()
        calls, failures, slows = self._shared_counts
        return BreakerMetrics(
            name=self.name,
            state=self.state,
            calls=calls,
            failures=failures,
            slow_calls=slows,
            failure_rate=failures / calls if calls else 0.0,
            slow_call_rate=slows / calls if calls else 0.0,
            rejected=self._shared_rejected + self._rejected,
            opened=self._opened,
            retry_after=self.retry_after(),
        )

    # ------------------------------------------------------------------ operator controls

    def reset(self) -> None:
        """Close the breaker for every replica (and this replica's local one)."""
        super().reset()
        self._set_everywhere("closed", "reset")

    def force_open(self) -> None:
        """Reject every call on every replica until :meth:`reset`."""
        super().force_open()
        self._set_everywhere("forced_open", "forced open")

    def force_closed(self) -> None:
        """Run every call on every replica, never opening, until :meth:`reset`."""
        super().force_closed()
        self._set_everywhere("forced_closed", "forced closed")

    def disable(self) -> None:
        """Run every call and record nothing, on every replica, until :meth:`reset`."""
        super().disable()
        self._set_everywhere("disabled", "disabled")

    def open_for(self, seconds: float, reason: str = "held open") -> None:
        """Open for ``seconds`` on every replica (a dependency's own ``Retry-After``)."""
        super().open_for(seconds, reason)
        self._set_everywhere("open", reason, until=self._clock.now() + seconds)

    def _set_everywhere(self, state: str, reason: str, *, until: float = 0.0) -> None:
        # This replica obeys at once (an operator who forces a breaker open expects the very next call
        # to be refused here); Redis, and through it the other replicas, follow when the write lands,
        # and its reply (a newer generation) is adopted over this provisional view.
        self._adopt(state, self._sgen, until, reason)
        self._owner._schedule_set(self, state, reason, until=until)

    # ------------------------------------------------------------------ the engine

    async def call(self, fn: Callable[..., Awaitable[Any]], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``await fn(*args, **kwargs)`` if the shared breaker permits, recording the outcome."""
        owner = self._owner
        if not owner.ok:
            return await super().call(fn, *args, **kwargs)
        gen, probe = await self._acquire_shared()
        if gen < 0:  # Redis failed while asking: this call is judged by the local breaker
            return await super().call(fn, *args, **kwargs)
        clock = self._clock
        start = clock.now() if self._timed else 0.0
        try:
            result = await fn(*args, **kwargs)
        except BaseException as e:
            if (
                isinstance(e, self._ignore)
                or not isinstance(e, self._record)
                or isinstance(e, asyncio.CancelledError)
            ):
                if probe:
                    await owner._report(self, gen, -1, probe)  # gives the probe permit back
                raise
            slow = 2 if self._timed and clock.now() - start >= self._slow_after else 0
            await owner._report(self, gen, 1 | slow, probe)
            raise
        outcome = 2 if self._timed and clock.now() - start >= self._slow_after else 0
        predicate = self._failure_result
        if predicate is not None and predicate(result):
            outcome |= 1
        if outcome == 0 and not probe:
            # The common case: a success while closed is counted here and sent with the next sync.
            if gen != self._pending_gen:
                self._pending_gen, self._unsent_ok = gen, 0
            self._unsent_ok += 1
            return result
        await owner._report(self, gen, outcome, probe)
        return result

    def wrap(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        """Return ``fn`` protected by this breaker (the decorator form)."""
        call = self.call

        @functools.wraps(fn)
        async def protected(*args: P.args, **kwargs: P.kwargs) -> T:
            outcome: T = await call(fn, *args, **kwargs)
            return outcome

        return protected

    def guard(self) -> _SharedGuard:  # type: ignore[override]
        """A one-call permit as an async context manager, with ``record_result`` for result checks."""
        return _SharedGuard(self)

    async def __aenter__(self) -> Any:
        guard = _SharedGuard(self)
        await guard.__aenter__()
        _entered.push(guard)
        return guard

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await _entered.pop().__aexit__(exc_type, exc, tb)

    async def _acquire_shared(self) -> tuple[int, str]:
        """(generation, probe id) of a permit; raises CircuitOpen; (-1, "") when Redis failed."""
        state = self._sstate
        if state in _ADMIT_LOCALLY:
            return self._sgen, ""
        now = self._clock.now()
        if state is BreakerState.OPEN and now < self._sopen_until:
            self._reject_shared(state.value, self._sopen_until - now)
        if state is BreakerState.FORCED_OPEN:
            self._reject_shared(state.value, self.config.open_wait)
        probe = uuid.uuid4().hex
        reply = await self._owner._acquire(self, probe)
        if reply is None:
            return -1, ""
        granted, retry_after = reply
        if not granted:
            self._reject_shared(self._sstate.value, retry_after)
        return self._sgen, (probe if self._sstate is BreakerState.HALF_OPEN else "")

    def _reject_shared(self, state: str, retry_after: float) -> None:
        self._shared_rejected += 1
        if self._events.active:
            self._events.emit(CallRejected(self.name, self._clock.now(), "breaker", state, retry_after))
        raise CircuitOpen(self.name, state, retry_after=retry_after)

    def _adopt(
        self, state_name: str, gen: int, open_until: float, reason: str, *, authoritative: bool = False
    ) -> None:
        """Take the state Redis holds (emitting a transition event when it changed here).

        Script replies can arrive out of order (concurrent reports): one older than the state already
        adopted (a lower generation) is ignored. A full sync is ``authoritative`` -- it also takes a
        lower generation, which is what a Redis that lost its data (a restart) holds.
        """
        if gen < self._sgen and not authoritative:
            return
        new = _STATES.get(state_name, BreakerState.CLOSED)
        old = self._sstate
        self._sopen_until = open_until
        if gen != self._sgen:
            self._sgen = gen
            if new is BreakerState.OPEN and old is not BreakerState.OPEN:
                self._opened += 1
        self._sstate = new
        if new is not old and self._events.active:
            self._events.emit(BreakerStateChanged(self.name, self._clock.now(), old.value, new.value, reason))

    def __repr__(self) -> str:
        where = "redis" if self._owner.ok else "local"
        return f"SharedBreaker({self.name!r}, state={self.state.value}, {where})"


class _SharedGuard:
    """The permit of one call through ``async with shared_breaker.guard() as g:``."""

    __slots__ = ("_breaker", "_done", "_gen", "_local", "_probe", "_start")

    def __init__(self, breaker: SharedBreaker) -> None:
        self._breaker = breaker
        self._done = False
        self._local: Any = None

    async def __aenter__(self) -> _SharedGuard:
        b = self._breaker
        self._gen, self._probe = (-1, "") if not b._owner.ok else await b._acquire_shared()
        if self._gen < 0:
            self._local = CircuitBreaker.guard(b)
            await self._local.__aenter__()
        self._start = b._clock.now()
        return self

    def record_result(self, result: Any) -> None:
        """Judge a returned value now (``failure_result``); the block's exit records nothing more."""
        if self._local is not None:
            self._local.record_result(result)
            self._done = True
            return
        b = self._breaker
        predicate = b._failure_result
        failed = predicate is not None and predicate(result)
        self._finish(1 if failed else 0)

    def _finish(self, outcome: int) -> None:
        self._done = True
        b = self._breaker
        if b._timed and outcome >= 0 and b._clock.now() - self._start >= b._slow_after:
            outcome |= 2
        if outcome == 0 and not self._probe:
            if self._gen != b._pending_gen:
                b._pending_gen, b._unsent_ok = self._gen, 0
            b._unsent_ok += 1
            return
        b._owner._spawn_report(b, self._gen, outcome, self._probe)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._local is not None:
            if not self._done:
                await self._local.__aexit__(exc_type, exc, tb)
            return
        if self._done:
            return
        b = self._breaker
        if exc is None:
            self._finish(0)
        elif (
            isinstance(exc, b._ignore)
            or not isinstance(exc, b._record)
            or isinstance(exc, asyncio.CancelledError)
        ):
            self._done = True
            if self._probe:
                b._owner._spawn_report(b, self._gen, -1, self._probe)
        else:
            self._finish(1)


_entered: EnteredGuards[_SharedGuard] = EnteredGuards("brownout_shared_breaker_entered")


class RedisBreakers:
    """Makes :class:`SharedBreaker` instances on one Redis and keeps them in sync.

    ``prefix`` namespaces the keys (replicas of one service must share it), ``sync_interval`` is how
    often states are read back and pending successes sent, ``probe_lease`` how long a half-open probe
    permit lasts if its replica never reports, ``timeout`` bounds every Redis operation (on expiry, or
    any Redis error, the breakers fall back to local operation until a sync succeeds).
    """

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str = "brownout:breaker",
        sync_interval: float = 0.5,
        probe_lease: float = 30.0,
        timeout: float = 0.2,
        clock: Clock = WALL_CLOCK,
        events: EventBus = DEFAULT_BUS,
    ) -> None:
        if not prefix:
            raise ConfigError("prefix", "must not be empty")
        if not sync_interval > 0:
            raise ConfigError("sync_interval", f"must be greater than 0, got {sync_interval}")
        if not probe_lease > 0:
            raise ConfigError("probe_lease", f"must be greater than 0, got {probe_lease}")
        self.redis = redis
        self.prefix = prefix
        self.sync_interval = sync_interval
        self.probe_lease = probe_lease
        self.timeout = timeout
        self.clock = clock
        self.events = events
        self._breakers: dict[str, SharedBreaker] = {}
        self._record = redis.register_script(_RECORD)
        self._acquire_script = redis.register_script(_ACQUIRE)
        self._set = redis.register_script(_SET)
        self._ok = True
        self.errors = 0
        self.last_error: str | None = None
        self._syncing = Periodic(
            "brownout-breaker-sync", self.sync, lambda: self.sync_interval, clock=clock, logger=_log
        )
        self._background = TaskSet("shared breakers", logger=_log)  # outcomes and changes on their way

    @property
    def ok(self) -> bool:
        """True while Redis answers (the breakers share state); False: each replica on its own."""
        return self._ok

    def breaker(self, name: str, config: BreakerConfig | None = None) -> SharedBreaker:
        """The shared breaker ``name`` (made on first use with ``config``)."""
        existing = self._breakers.get(name)
        if existing is not None:
            return existing
        made = SharedBreaker(self, name, config)
        self._breakers[name] = made
        return made

    def all(self) -> dict[str, SharedBreaker]:
        """Every breaker made so far, by name."""
        return dict(self._breakers)

    # ------------------------------------------------------------------ Redis operations

    def _failed(self, error: BaseException) -> None:
        self.errors += 1
        self.last_error = f"{type(error).__name__}: {error}"
        if self._ok:
            _log.warning("shared breakers fall back to local state: Redis failed (%s)", self.last_error)
        self._ok = False

    async def _run(self, script: Any, breaker: SharedBreaker, args: list[Any]) -> list[Any] | None:
        try:
            reply: list[Any] = await _bounded(
                script(keys=list(breaker._keys), args=args),
                self.timeout,
                self.clock,
                self.events,
                breaker.name,
            )
        except Exception as e:
            self._failed(e)
            return None
        return reply

    def _record_args(self, b: SharedBreaker, gen: int, oks: int, outcome: int, probe: str) -> list[Any]:
        cfg = b.config
        slow = cfg.slow_call_rate_threshold
        return [
            repr(self.clock.now()),
            gen,
            oks,
            outcome,
            probe,
            cfg.window_size,
            cfg.minimum_calls,
            repr(cfg.failure_rate_threshold),
            repr(slow) if slow is not None else "-1",
            cfg.success_threshold,
            repr(cfg.open_wait),
            repr(cfg.open_wait_multiplier),
            repr(cfg.open_wait_cap),
        ]

    async def _report(self, b: SharedBreaker, gen: int, outcome: int, probe: str) -> bool:
        """Send one outcome (with the successes counted so far) and adopt the state it leaves.

        False when Redis failed (the breakers are then local until a sync succeeds)."""
        oks = b._unsent_ok if b._pending_gen == gen else 0
        b._unsent_ok = 0
        reply = await self._run(self._record, b, self._record_args(b, gen, oks, outcome, probe))
        if reply is None:
            return False
        b._adopt(_text(reply[0]), int(reply[1]), float(_text(reply[2])), "shared state")
        return True

    def _spawn_report(self, b: SharedBreaker, gen: int, outcome: int, probe: str) -> None:
        self._background.spawn(self._report(b, gen, outcome, probe))

    async def _acquire(self, b: SharedBreaker, probe: str) -> tuple[bool, float] | None:
        cfg = b.config
        args = [
            repr(self.clock.now()),
            cfg.half_open_max_calls,
            repr(self.probe_lease),
            probe,
            repr(cfg.half_open_retry_after),
            repr(cfg.open_wait),
        ]
        reply = await self._run(self._acquire_script, b, args)
        if reply is None:
            return None
        b._adopt(_text(reply[0]), int(reply[1]), float(_text(reply[2])), "shared state")
        return bool(int(reply[3])), float(_text(reply[4]))

    def _schedule_set(self, b: SharedBreaker, state: str, reason: str, *, until: float = 0.0) -> None:
        async def apply() -> None:
            reply = await self._run(self._set, b, [repr(self.clock.now()), state, reason, repr(until)])
            if reply is not None:
                b._adopt(_text(reply[0]), int(reply[1]), float(_text(reply[2])), reason)

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a synchronous caller at start-up): the local breaker took the change
        self._background.spawn(apply())

    async def sync(self) -> bool:
        """Send pending successes and read every breaker's state back; True when Redis answered."""
        breakers = list(self._breakers.values())
        try:
            for b in breakers:
                if b._unsent_ok and b._pending_gen == b._sgen and not await self._report(b, b._sgen, -1, ""):
                    return False
            if breakers:
                pipe = self.redis.pipeline(transaction=False)
                for b in breakers:
                    pipe.hmget(b._keys[0], "state", "gen", "open_until", "reason")
                    pipe.lrange(b._keys[1], 0, -1)
                    pipe.zcount(b._keys[2], repr(self.clock.now()), "+inf")
                replies = await _bounded(pipe.execute(), self.timeout, self.clock, self.events, self.prefix)
            else:
                await _bounded(self.redis.ping(), self.timeout, self.clock, self.events, self.prefix)
                replies = []
        except Exception as e:
            self._failed(e)
            return False
        for i, b in enumerate(breakers):
            (state, gen, open_until, reason), window, probes = replies[3 * i : 3 * i + 3]
            b._adopt(
                _text(state) if state is not None else "closed",
                int(gen or 0),
                float(_text(open_until) if open_until is not None else 0.0),
                _text(reason) if reason is not None else "shared state",
                authoritative=True,
            )
            b._sprobes = int(probes)
            outcomes = [int(_text(v)) for v in window]
            b._shared_counts = (
                len(outcomes),
                sum(1 for o in outcomes if o & 1),
                sum(1 for o in outcomes if o & 2),
            )
        if not self._ok:
            _log.warning("shared breakers use Redis again")
        self._ok = True
        return True

    def start(self) -> None:
        """Start the background sync (needs a running loop); a second call does nothing."""
        self._syncing.start()

    async def aclose(self) -> None:
        """Stop the sync after sending what is pending (best effort)."""
        await self._syncing.stop()
        await self._background.wait()
        with contextlib.suppress(Exception):
            await self.sync()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
