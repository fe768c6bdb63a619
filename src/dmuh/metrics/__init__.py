"""Retrieval metrics (MAP, precision, recall) and the statistics of seed-to-seed comparisons."""
