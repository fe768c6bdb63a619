"""Studies of trained runs: evaluate, compare, the paper's figures, inspect, the paper's numbers."""
