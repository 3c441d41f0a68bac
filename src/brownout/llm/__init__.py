"""Model clients and the pieces around them: OpenAI-compatible HTTP client with per-endpoint breakers,
supervised local llama.cpp servers, the JSON hard guard, and the generic pipeline engine."""
