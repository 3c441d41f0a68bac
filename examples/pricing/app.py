"""Dynamic pricing that keeps answering while Redis and PostgreSQL fail.

``GET /pricing/{zone}`` reads the zone's price from the first place that can answer, and says where
it came from:

=================  =============  ============================================================
``source``         ``freshness``  when
=================  =============  ============================================================
``redis``          ``real_time``  Redis answered (100 ms budget while it is degraded)
``database``       ``stale``      Redis is down, slow or empty for the zone; PostgreSQL answered
``memory``         ``very_stale`` both are down; the last price this process served for the zone
``default``        ``default``    both are down and the zone was never served: a flagged default
=================  =============  ============================================================

``fallback_reason`` says why each earlier tier did not answer. The reading is done by
:class:`brownout.state.tiered.TieredReader`; a :class:`brownout.state.redis.RedisHealthDetector`
checks Redis in the background (PING/SET/GET; slower than 100 ms is degraded; 3 failures in a row is
fallback mode, in which Redis is not even tried) and brings it back once a check succeeds.

``PUT /pricing/{zone}`` is the pricing engine's side: it stores a price in PostgreSQL (the record)
and in Redis (the real-time copy, expiring after ``price_ttl`` so that an old price is never served
as real-time). Run it with ``uvicorn --factory examples.pricing.app:create_app`` (see README.md).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import FastAPI, HTTPException, Path
from pydantic import BaseModel, ConfigDict, Field, computed_field
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from sqlalchemy import Column, DateTime, Float, Integer, MetaData, String, Table, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from brownout.state.redis import RedisHealthDetector
from brownout.state.tiered import DEFAULT_SOURCE, MEMORY_SOURCE, Tier, TieredReader

__all__ = [
    "Price",
    "PriceUpdate",
    "PricingAnswer",
    "PricingService",
    "PricingSettings",
    "create_app",
    "prices",
]

_log = logging.getLogger("examples.pricing")

ZONE_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
"""Zone ids: letters, digits, ``_`` and ``-``, at most 64 characters."""

Zone = Annotated[str, Path(pattern=ZONE_PATTERN, description="zone id")]

metadata = MetaData()

prices = Table(
    "prices",
    metadata,
    Column("zone", String(64), primary_key=True),
    Column("base_fare", Float, nullable=False),
    Column("surge_multiplier", Float, nullable=False),
    Column("supply_count", Integer, nullable=False),
    Column("demand_count", Integer, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
"""The ``prices`` table (created at start): the record of every zone's latest price."""


class PriceUpdate(BaseModel):
    """A new price for a zone, as the pricing engine publishes it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_fare: float = Field(gt=0, description="Fare before surge.")
    surge_multiplier: float = Field(ge=1, le=10, description="1.0 = no surge.")
    supply_count: int = Field(ge=0, description="Drivers available in the zone.")
    demand_count: int = Field(ge=0, description="Ride requests in the zone.")


class Price(PriceUpdate):
    """A zone's price; ``updated_at`` is None only for the default price."""

    zone: str
    updated_at: datetime | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def fare(self) -> float:
        """What a rider pays: base fare times surge."""
        return round(self.base_fare * self.surge_multiplier, 2)


class PricingAnswer(BaseModel):
    """The answer of ``GET /pricing/{zone}``: the price and how much to trust it."""

    data: Price
    source: str = Field(description="redis, database, memory or default")
    freshness: str = Field(description="real_time, stale, very_stale or default")
    fallback_reason: str | None = Field(description="why each earlier source did not answer")
    confidence: Literal["high", "medium", "low"]
    age_s: float | None = Field(description="age of a remembered (memory) price, in seconds")
    warning: str | None = None


@dataclass(frozen=True, slots=True)
class PricingSettings:
    """Knobs of the example (where its default numbers come from: docs/origins.md)."""

    redis_timeout: float = 0.5
    """Seconds a Redis read may take while Redis is healthy."""
    degraded_redis_timeout: float = 0.1
    """Seconds a Redis read may take while the detector says degraded (soon giving way to the database)."""
    database_timeout: float = 2.0
    """Seconds a PostgreSQL read may take."""
    health_interval: float = 5.0
    """Seconds between background Redis checks (a check is what ends fallback mode)."""
    health_check_timeout: float = 0.5
    """Seconds one check (PING, SET, GET) may take before it counts as a failure."""
    price_ttl: float = 300.0
    """Seconds a published price stays in Redis: after that it is no longer real-time."""
    default_base_fare: float = 12.50
    """The flagged default price's base fare."""


class RedisFallbackMode(ConnectionError):
    """Redis is not tried: the health detector is in fallback mode."""


def _redis_key(zone: str) -> str:
    return f"pricing:{zone}"


class PricingService:
    """Reads and publishes prices on Redis and PostgreSQL; see the module docstring."""

    def __init__(self, redis: Redis, engine: AsyncEngine, settings: PricingSettings | None = None) -> None:
        self.settings = settings or PricingSettings()
        self.redis = redis
        self.engine = engine
        self.detector = RedisHealthDetector(
            redis,
            name="pricing-redis",
            interval=self.settings.health_interval,
            check_timeout=self.settings.health_check_timeout,
        )
        self.reader: TieredReader[Price] = TieredReader(
            "pricing",
            [
                Tier("redis", self._from_redis, "real_time", self._redis_timeout),
                Tier("database", self._from_database, "stale", self.settings.database_timeout),
            ],
            default=self._default,
        )
        self._schema_ready = False

    @classmethod
    def from_urls(
        cls, redis_url: str, database_url: str, settings: PricingSettings | None = None
    ) -> PricingService:
        """Build the clients: redis-py without retries (the tier timeouts bound every read), asyncpg."""
        redis: Redis = Redis.from_url(
            redis_url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=1.0, socket_timeout=1.0
        )
        engine = create_async_engine(database_url, pool_pre_ping=True)
        return cls(redis, engine, settings)

    async def start(self) -> None:
        """Create the table if PostgreSQL is up (else on first use) and start the Redis checks."""
        # The service must start without its database too: reads then fall through to the next tier.
        with contextlib.suppress(Exception):
            await self.create_schema()
        self.detector.start()

    async def aclose(self) -> None:
        """Stop the checks and close both clients."""
        await self.detector.aclose()
        await self.redis.aclose()
        await self.engine.dispose()

    async def create_schema(self) -> None:
        """Create the ``prices`` table if it does not exist."""
        async with self.engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        self._schema_ready = True

    # -- the tiers ----------------------------------------------------------------------------------

    def _redis_timeout(self) -> float:
        degraded = self.detector.status == "degraded"
        return self.settings.degraded_redis_timeout if degraded else self.settings.redis_timeout

    async def _from_redis(self, zone: str) -> Price | None:
        detector = self.detector
        if detector.fallback:
            raise RedisFallbackMode(f"fallback mode after {detector.last_error}")
        try:
            raw = await self.redis.get(_redis_key(zone))
        except Exception as e:
            detector.record_failure(e)  # real traffic counts toward fallback mode, not only checks
            raise
        if detector.consecutive_failures:
            detector.record_success()
        return None if raw is None else Price.model_validate_json(raw)

    async def _from_database(self, zone: str) -> Price | None:
        if not self._schema_ready:
            await self.create_schema()
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(prices).where(prices.c.zone == zone))).mappings().first()
        return None if row is None else Price.model_validate(dict(row))

    def _default(self, zone: str) -> Price:
        base = self.settings.default_base_fare
        return Price(zone=zone, base_fare=base, surge_multiplier=1.0, supply_count=0, demand_count=0)

    # -- the API ------------------------------------------------------------------------------------

    async def get(self, zone: str) -> PricingAnswer:
        """The zone's price from the first tier that answers, labelled with its source and freshness."""
        answer = await self.reader.read(zone)
        warning = None
        if answer.source == DEFAULT_SOURCE:
            warning = "default pricing: Redis and the database are unavailable and this zone was never seen"
        elif answer.source == MEMORY_SOURCE:
            warning = "last known price: Redis and the database are unavailable"
        age = None if answer.age is None else round(answer.age, 3)
        return PricingAnswer(
            data=answer.value,
            source=answer.source,
            freshness=answer.freshness,
            fallback_reason=answer.fallback_reason,
            confidence=answer.confidence,
            age_s=age,
            warning=warning,
        )

    async def publish(self, zone: str, update: PriceUpdate) -> dict[str, bool]:
        """Store a new price in PostgreSQL and Redis; says which of the two took it."""
        price = Price(zone=zone, updated_at=datetime.now(UTC), **update.model_dump())
        stored = {"database": True, "redis": True}
        row = price.model_dump(exclude={"fare"})
        try:
            if not self._schema_ready:
                await self.create_schema()
            stmt = insert(prices).values(**row)
            newer = {name: stmt.excluded[name] for name in row if name != "zone"}
            stmt = stmt.on_conflict_do_update(index_elements=["zone"], set_=newer)
            async with self.engine.begin() as conn:
                await conn.execute(stmt)
        except Exception as e:
            _log.warning("price of %s not stored in PostgreSQL: %s", zone, e)
            stored["database"] = False
        try:
            # One SET with an expiry: the real-time copy disappears rather than grow old.
            ttl_ms = math.ceil(self.settings.price_ttl * 1000)
            await self.redis.set(_redis_key(zone), price.model_dump_json(exclude={"fare"}), px=ttl_ms)
        except Exception as e:
            _log.warning("price of %s not stored in Redis: %s", zone, e)
            self.detector.record_failure(e)
            stored["redis"] = False
        return stored

    def health(self) -> dict[str, object]:
        """Redis's status as the detector sees it, and how many answers each source served."""
        return {
            "redis": self.detector.status,
            "redis_failures": self.detector.consecutive_failures,
            "served": self.reader.stats().served,
        }


def create_app(
    redis_url: str | None = None, database_url: str | None = None, settings: PricingSettings | None = None
) -> FastAPI:
    """The pricing API; URLs default to ``$PRICING_REDIS_URL`` and ``$PRICING_DATABASE_URL``."""
    redis_url = redis_url or os.environ.get("PRICING_REDIS_URL", "redis://127.0.0.1:6379/0")
    database_url = database_url or os.environ.get(
        "PRICING_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
    )
    service = PricingService.from_urls(redis_url, database_url, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.aclose()

    app = FastAPI(title="pricing (brownout example)", lifespan=lifespan)
    app.state.service = service

    @app.get("/pricing/{zone}")
    async def get_price(zone: Zone) -> PricingAnswer:
        """The zone's price, labelled with where it came from and how fresh it is."""
        return await service.get(zone)

    @app.put("/pricing/{zone}")
    async def put_price(zone: Zone, update: PriceUpdate) -> dict[str, bool]:
        """Publish a price (PostgreSQL and Redis); 503 when neither took it."""
        stored = await service.publish(zone, update)
        if not any(stored.values()):
            raise HTTPException(503, "neither PostgreSQL nor Redis accepted the price")
        return stored

    @app.get("/health")
    async def health() -> dict[str, object]:
        """Redis's status and the answers served per source."""
        return service.health()

    return app
