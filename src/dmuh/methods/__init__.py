"""Hashing methods: one loss module per file, all behind the contract in `base`."""

from dmuh.methods.base import (  # noqa: F401
    METHODS,
    HashingMethod,
    StepInputs,
    available,
    create_method,
    display_name,
    method_class,
    pairwise_similarity,
    register_method,
)

# Importing a method module registers its names.
from dmuh.methods import regu, dmuh, hashnet, dhn, dsh, csq, greedyhash, dsdh, orthohash, shallow  # noqa: F401,E402
from dmuh.methods import ddsh, cosdish, sdh, lfh, fasth  # noqa: F401,E402
from dmuh.methods import dsg  # noqa: F401,E402
from dmuh.methods import greedyhash_unsup, bihalf, cibhash  # noqa: F401,E402
from dmuh.methods import distillhash, rph  # noqa: F401,E402
from dmuh.methods import dcmh, dmuh_crossmodal, ugach  # noqa: F401,E402
