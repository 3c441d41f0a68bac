"""Seed 002's dynamic pricing service: tiered reads with freshness labels on Redis and PostgreSQL."""
