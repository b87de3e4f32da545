"""Judges: did a response comply with a harmful request? One module per kind, and a registry by name."""
