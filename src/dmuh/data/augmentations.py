"""The names of the training augmentations (`dmuh.data.pipeline` applies them); a module of its own so
that the configuration schema and `dmuh --help` name them without loading torch."""

AUGMENTATIONS = ("none", "flip", "flip-crop", "simclr")
