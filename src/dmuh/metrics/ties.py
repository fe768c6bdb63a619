"""The tie policies of ranked retrieval metrics (`dmuh.metrics.ranking` computes them); a module of its
own so that the command line names them without loading torch."""

TIES = ("expected", "index", "optimistic", "pessimistic")
# The one default tie policy of every MAP dmuh reports (training log, compare, evaluate, demo):
# the expectation over random orders within a distance, so it does not depend on database order.
DEFAULT_TIES = "expected"
