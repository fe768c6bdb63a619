"""Hashing methods: one loss module per file, all behind the contract in `base`."""

# Importing a method module registers its names.
from dmuh.methods import (  # noqa: F401,E402  # noqa: F401,E402  # noqa: F401,E402  # noqa: F401,E402  # noqa: F401,E402
    adsh,  # noqa: F401,E402
    bihalf,
    cibhash,
    cnnh,  # noqa: F401,E402
    cosdish,
    csq,
    dbdh,
    dch,
    dcmh,
    ddsh,
    deep_sdh,  # noqa: F401,E402
    dhn,
    distillhash,
    dmuh,
    dmuh_crossmodal,
    dsdh,
    dsg,  # noqa: F401,E402
    dsh,
    dshsd,
    dtsh,
    fasth,
    greedyhash,
    greedyhash_unsup,
    hashnet,
    idhn,
    isdh,
    lcdsh,
    lfh,
    orthohash,
    pcdh,
    regu,
    rph,
    sdh,
    shallow,
    ssdh,
    tbh,
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
