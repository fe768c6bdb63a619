"""Index backends behind one contract, and the index file."""
