"""The options of the studies that the command line names (`dmuh inspect`'s splits, readings, sort keys
and defaults): a module without torch, so that `dmuh --help` answers before it is loaded."""

SPLITS = ("train", "query", "database")
READINGS = ("auto", "eval", "training")
SORT_KEYS = ("uncertainty", "loss")
DEFAULT_PASSES = 8
DEFAULT_TOP = 10
