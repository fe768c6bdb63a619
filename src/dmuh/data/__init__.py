"""Data sources (images or features with multi-hot labels), the evaluation protocols that split them,
and image files to encode or search with (`dmuh.data.images`)."""

from dmuh.data import paired_files  # noqa: F401,E402  (registers the .mat and folder readers)
from dmuh.data.images import (  # noqa: F401
    ImageFiles,
    list_image_files,
    match_channels,
    open_images,
    read_image,
)
from dmuh.data.paired import PairedSource, Vocabulary, open_paired  # noqa: F401,E402  (registers paired:)
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
