"""Hashing methods: one loss module per file, all behind the contract in `base`."""

# Importing a method module registers its names.
from dmuh.methods import (  # noqa: F401,E402  # noqa: F401,E402  # noqa: F401,E402  # noqa: F401,E402  # noqa: F401,E402
    bihalf,
    ce,
    cibhash,
    cosdish,
    csq,
    dcmh,
    ddsh,
    dhn,
    distillhash,
    dmuh,
    dmuh_crossmodal,
    dpn,
    dsdh,
    dsg,  # noqa: F401,E402
    dsh,
    fasth,
    greedyhash,
    greedyhash_unsup,
    hashnet,
    jmlh,
    lfh,
    orthohash,
    regu,
    rph,
    sdh,
    shallow,
    ugach,
)
from dmuh.methods.base import (  # noqa: F401
    METHODS,
    HashingMethod,
    Requirements,
    StepInputs,
    available,
    create_method,
    display_name,
    method_class,
    pairwise_similarity,
    register_method,
)
