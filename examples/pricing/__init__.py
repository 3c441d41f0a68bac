"""A dynamic pricing service: tiered reads with freshness labels on Redis and PostgreSQL."""
