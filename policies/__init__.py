"""Ditto's policy model and decision point (pure Python, no I/O); arrives with issue 3."""
