"""Example services built on brownout (run them from the repository root)."""
