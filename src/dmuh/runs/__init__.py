"""A run on disk: its configuration schema, folder layout, log and checkpoint files."""
