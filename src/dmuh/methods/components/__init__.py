"""Pieces methods are built from: memories, reference representations, discrete solvers, shared math."""
