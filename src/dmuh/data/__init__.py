"""Data sources (images or features with multi-hot labels) and the evaluation protocols that split them."""

from dmuh.data.protocols import Split, available_protocols, make_split  # noqa: F401
from dmuh.data.sources import (  # noqa: F401
    IMAGE_EXTENSIONS,
    CifarBatchesSource,
    DigitsSource,
    FeatureSource,
    IdxSource,
    ImageFolderSource,
    ListFileSource,
    Source,
    open_source,
    read_idx,
    to_multi_hot,
)
