"""Publish sample prices to Redis and PostgreSQL: ``python -m examples.pricing.seed [--redis-url ...]``."""

from __future__ import annotations

import argparse
import asyncio
import os

from examples.pricing.app import PriceUpdate, PricingService

SAMPLE_PRICES: dict[str, PriceUpdate] = {
    "downtown": PriceUpdate(base_fare=14.00, surge_multiplier=1.8, supply_count=42, demand_count=97),
    "airport": PriceUpdate(base_fare=25.00, surge_multiplier=1.2, supply_count=60, demand_count=71),
    "harbor": PriceUpdate(base_fare=11.50, surge_multiplier=1.0, supply_count=35, demand_count=20),
    "university": PriceUpdate(base_fare=9.75, surge_multiplier=1.4, supply_count=18, demand_count=33),
}
"""Zone -> price of the sample data."""


async def seed(redis_url: str, database_url: str) -> dict[str, dict[str, bool]]:
    """Create the table and publish :data:`SAMPLE_PRICES`; returns where each price was stored."""
    service = PricingService.from_urls(redis_url, database_url)
    try:
        await service.create_schema()
        return {zone: await service.publish(zone, price) for zone, price in SAMPLE_PRICES.items()}
    finally:
        await service.aclose()


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--redis-url", default=os.environ.get("PRICING_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "PRICING_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
        ),
    )
    args = parser.parse_args(argv)
    for zone, stored in asyncio.run(seed(args.redis_url, args.database_url)).items():
        where = ", ".join(name for name, ok in stored.items() if ok) or "nowhere"
        print(f"{zone}: stored in {where}")


if __name__ == "__main__":
    main()
