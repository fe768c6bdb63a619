"""The names of the files in a run directory (one place; `dmuh.runs.layout` reads and writes them)."""

CONFIG = "config.yaml"
SPLIT = "split.json"
LOG = "log.csv"
CHECKPOINT = "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"  # a pickle (torch.save), before dmuh.runs.checkpoint; converted, never loaded
CHECKPOINT_KIND = "checkpoint"
BACKBONE_KIND = "backbone"
TRACE = "uncertainty_trace.npz"
BACKBONE = "backbone.safetensors"
EVAL = "eval.json"
LABEL_NOISE = "label_noise.json"
VOCABULARY = "vocabulary.json"  # the words of a cross-modal run's text vectors (dmuh.data.paired.Vocabulary)
FEATURE_BACKBONE = "feature_backbone.json"  # the backbone of the features a run trained on (dmuh.retrieval.backbone)
