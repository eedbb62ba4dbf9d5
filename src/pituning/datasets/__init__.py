"""Builders of real task suites from data that installs offline (no hub downloads)."""
