"""Test helpers that build small local models (no downloads)."""
