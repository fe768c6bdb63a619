"""Plumbing every layer may use: safe file writes and JSON records, progress, distributed helpers, words."""
