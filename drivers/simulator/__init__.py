"""Simulated building devices: deterministic signals from a seed, for the demo and for tests."""
