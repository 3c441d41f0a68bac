"""The pricing example (``examples/pricing``) on real Redis and PostgreSQL servers, over HTTP.

Each test has private servers of its own, stops or freezes them, and checks what ``GET /pricing/{zone}``
answers and how it labels the answer. Waiting for the background health check polls in short steps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from brownout.chaos.servers import PostgresServer, RedisServer
from examples.pricing.app import PricingSettings, create_app
from examples.pricing.seed import SAMPLE_PRICES, seed

pytestmark = pytest.mark.timeout(60)


@asynccontextmanager
async def pricing_client(
    redis: RedisServer, postgres: PostgresServer, settings: PricingSettings
) -> AsyncIterator[httpx.AsyncClient]:
    """The example app, its lifespan running, behind an HTTP client."""
    app = create_app(redis.url, postgres.url, settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://pricing") as client,
    ):
        yield client


async def price(client: httpx.AsyncClient, zone: str) -> dict[str, Any]:
    response = await client.get(f"/pricing/{zone}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def redis_status_becomes(client: httpx.AsyncClient, wanted: str, within: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + within
    while (status := (await client.get("/health")).json()["redis"]) != wanted:
        assert loop.time() < give_up, f"Redis status stayed {status!r}, expected {wanted!r}"
        await asyncio.sleep(0.02)


async def test_every_tier_answers_in_turn_with_its_freshness_label(
    make_redis_server: Callable[..., RedisServer], make_postgres_server: Callable[..., PostgresServer]
) -> None:
    redis, postgres = make_redis_server(), make_postgres_server()
    stored = await seed(redis.url, postgres.url)
    assert stored == {zone: {"database": True, "redis": True} for zone in SAMPLE_PRICES}
    downtown = SAMPLE_PRICES["downtown"]

    async with pricing_client(redis, postgres, PricingSettings(health_interval=0.05)) as client:
        # All healthy: Redis answers, real-time, nothing to explain.
        body = await price(client, "downtown")
        assert (body["source"], body["freshness"], body["confidence"]) == ("redis", "real_time", "high")
        assert (body["fallback_reason"], body["warning"]) == (None, None)
        assert body["data"]["base_fare"] == downtown.base_fare
        assert body["data"]["fare"] == round(downtown.base_fare * downtown.surge_multiplier, 2)

        # Redis down: PostgreSQL answers, stale, and the reason names Redis's failure.
        redis.stop()
        body = await price(client, "downtown")
        assert (body["source"], body["freshness"], body["confidence"]) == ("database", "stale", "medium")
        assert body["fallback_reason"].startswith("redis: ")
        assert "miss" not in body["fallback_reason"]
        assert body["data"]["base_fare"] == downtown.base_fare
        assert body["data"]["updated_at"] is not None

        # Both down: the last price this process served, very stale, with its age.
        postgres.stop()
        body = await price(client, "downtown")
        assert (body["source"], body["freshness"], body["confidence"]) == ("memory", "very_stale", "low")
        assert "redis: " in body["fallback_reason"]
        assert "; database: " in body["fallback_reason"]
        assert body["age_s"] >= 0
        assert body["warning"].startswith("last known price")
        assert body["data"]["base_fare"] == downtown.base_fare

        # Both down and a zone this process never served (even a seeded one): the flagged default.
        for zone in ("suburbs", "harbor"):
            body = await price(client, zone)
            assert (body["source"], body["freshness"], body["confidence"]) == ("default", "default", "low")
            assert body["data"]["zone"] == zone
            assert (body["data"]["base_fare"], body["data"]["surge_multiplier"]) == (12.5, 1.0)
            assert body["warning"].startswith("default pricing")

        # PostgreSQL back first: stale again, from the database.
        postgres.start()
        body = await price(client, "harbor")
        assert (body["source"], body["freshness"]) == ("database", "stale")
        assert body["data"]["base_fare"] == SAMPLE_PRICES["harbor"].base_fare

        # Redis back: the health detector's check ends fallback mode. A restarted Redis is empty, so
        # the database answers ("redis: miss") until the pricing engine publishes again.
        redis.start()
        await redis_status_becomes(client, "healthy")
        body = await price(client, "downtown")
        assert (body["source"], body["fallback_reason"]) == ("database", "redis: miss")
        update = {"base_fare": 15.0, "surge_multiplier": 2.0, "supply_count": 10, "demand_count": 50}
        response = await client.put("/pricing/downtown", json=update)
        assert response.json() == {"database": True, "redis": True}
        body = await price(client, "downtown")
        assert (body["source"], body["freshness"], body["confidence"]) == ("redis", "real_time", "high")
        assert body["fallback_reason"] is None
        assert (body["data"]["base_fare"], body["data"]["fare"]) == (15.0, 30.0)

        served = (await client.get("/health")).json()["served"]
        assert served == {"redis": 2, "database": 3, "memory": 1, "default": 2}


async def test_hanging_redis_is_cut_off_by_the_tier_timeout_then_by_the_degraded_one(
    make_redis_server: Callable[..., RedisServer], make_postgres_server: Callable[..., PostgresServer]
) -> None:
    redis, postgres = make_redis_server(), make_postgres_server()
    await seed(redis.url, postgres.url)
    # A check every second, each failing after 0.3 s: the detector says "degraded" for about a second
    # after the first failed check, long enough to read once under the degraded budget.
    settings = PricingSettings(redis_timeout=0.3, health_interval=1.0, health_check_timeout=0.3)
    async with pricing_client(redis, postgres, settings) as client:
        assert (await price(client, "airport"))["source"] == "redis"
        redis.pause()
        try:
            body = await price(client, "airport")
            assert (body["source"], body["freshness"]) == ("database", "stale")
            assert body["fallback_reason"] == "redis: DeadlineExceeded: deadline of 0.3s exceeded"

            await redis_status_becomes(client, "degraded")
            body = await price(client, "airport")
            assert body["source"] == "database"
            assert body["fallback_reason"] == "redis: DeadlineExceeded: deadline of 0.1s exceeded"
        finally:
            redis.resume()
        await redis_status_becomes(client, "healthy")
        assert (await price(client, "airport"))["source"] == "redis"


async def test_bad_input_gets_a_4xx_with_a_reason(
    make_redis_server: Callable[..., RedisServer], make_postgres_server: Callable[..., PostgresServer]
) -> None:
    redis, postgres = make_redis_server(), make_postgres_server()
    async with pricing_client(redis, postgres, PricingSettings()) as client:
        response = await client.get("/pricing/not a zone!")
        assert response.status_code == 422
        assert "pattern" in response.text
        response = await client.put(
            "/pricing/z1",
            json={"base_fare": -1, "surge_multiplier": 1.0, "supply_count": 0, "demand_count": 0},
        )
        assert response.status_code == 422
        assert "base_fare" in response.text
