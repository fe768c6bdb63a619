"""The one contract every hashing method implements, and the registry that names them.

A method is a small `nn.Module` (like a pytorch-metric-learning loss): the training loop hands it a
`StepInputs` per batch and gets back a dict of named loss terms whose sum is the loss. Anything the
method needs beyond the network lives inside it as components (a `dmuh.methods.components.memory.TrainingMemory`
of training codes, hash centres, a classifier), so its parameters join the optimiser and its
buffers join the checkpoint.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from dmuh.errors import DmuhError
from dmuh.methods.components.params import Param, declared_parameters
from dmuh.utils.registry import Registry


@dataclass(frozen=True)
class Requirements:
    """The contract between a method and everything that runs it: what it needs and what it yields.

    A class declares it once (`requires = Requirements(...)`); `HashingMethod.requirements()` gives
    the one for an instance. The loop, preflight, builder, run layout, studies, retrieval and the
    CLI read a method's capabilities only through it.
    """

    # The loop keeps a momentum copy theta_m <- alpha theta_m + (1 - alpha) theta_h (Eq. 5) when
    # this is a number (alpha), and passes its outputs as StepInputs.momentum_outputs.
    momentum: Optional[float] = None
    # How the momentum copy runs and learns (docs/method.md, "open readings"): its dropout
    # ("off", "own" masks, or the hashing network's "shared" masks), and when Eq. 5 is applied
    # ("step": after every optimiser step, "epoch": once at the end of each epoch).
    momentum_dropout: str = "off"
    momentum_update: str = "step"
    # Augmented views of each batch the loop passes: 2 gives StepInputs.view_outputs, both views
    # drawn with `view_augment` (contrastive methods); 1 is the run's --augment.
    views: int = 1
    view_augment: str = "simclr"
    # Learns from image-text pairs (`dmuh.data.paired`): the loop passes StepInputs.text and hands
    # the training texts over once (`set_train_text`); the method holds the text network
    # (`encode_text`), the loop's network is the image network. See `dmuh.methods.components.crossmodal`.
    text: bool = False
    features: bool = False  # the loop passes backbone features (StepInputs.features)
    # Wants the fixed representation of every training item before the first step
    # (`set_reference_features`): the data's vectors, or the backbone's features of the images.
    reference_features: bool = False
    # False: learns without labels: the loop builds it with no label column ((n, 0) training labels,
    # (B, 0) step labels), so no label of a training or database item reaches it, and `--init
    # auto` does not warm up on labels for it. Labels are read only to evaluate.
    labels: bool = True
    # Trains its backbone end to end on images (DDSH, CIBHash): refused on `features:` data, whose
    # "backbone" is a vector model, since its reference results and defaults are those of an image network.
    images: bool = False
    # Maps a fixed representation given as data (`features:` vectors) to codes, and its search
    # needs a query's representation (rank-preserving hashing's decoder re-ranking).
    vectors: bool = False
    # Fitted once in closed form on features (`dmuh.methods.shallow.ShallowMethod.train_with`):
    # no loss terms, no gradient.
    shallow: bool = False
    # Yields a trained `dmuh.models.decoder.FeatureDecoder` of its codes (`method.decoder`), which
    # `dmuh index build` keeps in the index for `dmuh search --rerank decoder`.
    decoder: bool = False
    # Which network's codes are the retrieval codes: "hashing" (phi_h, the paper's) or "momentum".
    retrieval_network: str = "hashing"
    # Puts a term on the linear hash layer's own weight W (bits, feature_dim) (deep SDH's
    # orthogonality ||W W^T - I||^2): the loop passes that parameter as StepInputs.hash_weight, so
    # the term's gradient reaches it.
    hash_weight: bool = False
    # Chooses which training items each epoch runs over (`epoch_items(epoch)`: ADSH's sampled
    # query points): the loop's shuffled order and its number of steps cover those items only.
    epoch_items: bool = False
    # Holds learned codes of the training items (`database_codes()`: ADSH's V) that retrieval uses
    # for the database items that are training items; the network encodes the queries and the rest.
    database_codes: bool = False

    @property
    def uses_momentum(self) -> bool:
        return self.momentum is not None


@dataclass
class StepInputs:
    """What the training loop knows about one batch."""

    outputs: torch.Tensor  # (B, bits) raw hash-layer outputs z of the hashing network
    labels: torch.Tensor  # (B, C) float multi-hot
    indices: torch.Tensor  # (B,) positions in the training split (for memories)
    momentum_outputs: Optional[torch.Tensor] = None  # (B, bits) raw outputs of the momentum copy
    features: Optional[torch.Tensor] = None  # (B, D) backbone features, for methods that ask
    # (B, bits) raw outputs of a second augmented view of the same items (Requirements.views = 2);
    # `outputs` is then the first view's.
    view_outputs: Optional[torch.Tensor] = None
    # (B, V) text vectors of the batch's items (Requirements.text, on paired data); the
    # method runs its own text network on them.
    text: Optional[torch.Tensor] = None
    # The hashing network's linear hash-layer weight (bits, feature_dim), the parameter itself
    # (Requirements.hash_weight).
    hash_weight: Optional[torch.Tensor] = None
    # Under torchrun: the whole global batch of all ranks (detached). A method that keeps a memory
    # of training outputs writes it from `shared()`, so every rank holds the same memory.
    shared_indices: Optional[torch.Tensor] = None
    shared_outputs: Optional[torch.Tensor] = None
    shared_momentum_outputs: Optional[torch.Tensor] = None

    def shared(self):
        """(indices, outputs, momentum_outputs) of the global batch: all ranks', or this batch's."""
        if self.shared_indices is None:
            return (
                self.indices,
                self.outputs.detach(),
                None if self.momentum_outputs is None else self.momentum_outputs.detach(),
            )
        return self.shared_indices, self.shared_outputs, self.shared_momentum_outputs


# The keyword `create_method` names the registered entry with; the method never sees it.
SPEC_NAME = "_registered_as"
SIZES = ("bits", "num_train", "num_classes")


def _registered_name(cls, given: Dict[str, Any]) -> Optional[str]:
    """The name a directly built `cls` is registered under: of its entries whose fixed
    hyper-parameters are all among `given`, the most specific, then the one written first."""
    entries = [
        entry
        for entry in reversed(list(METHODS.entries.values()))
        if entry.factory is cls and all(key in given and given[key] == value for key, value in entry.fixed.items())
    ]
    return max(entries, key=lambda entry: len(entry.fixed)).name if entries else None


def _recording_spec(init):
    """Wrap a method class's __init__ so that the outermost call sets `name` and `params` first:
    `create_method` names the entry, a direct call is matched to one (`_registered_name`); the
    params are the hyper-parameters given, less the entry's fixed ones. `spec()` is then complete."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        name = kwargs.pop(SPEC_NAME, None)
        if type(self).__init__ is __init__ and "params" not in self.__dict__:  # the outermost __init__
            binding = signature.bind(self, *args, **kwargs)
            bound = binding.arguments
            given = {key: value for key, value in list(bound.items())[1:] if key not in SIZES}
            for key, parameter in signature.parameters.items():
                if parameter.kind is inspect.Parameter.VAR_KEYWORD and key in given:
                    given.update(given.pop(key))
                elif parameter.kind is inspect.Parameter.VAR_POSITIONAL:
                    given.pop(key, None)
            name = name or _registered_name(type(self), given)
            fixed = METHODS.entries[name].fixed if name in METHODS.entries else {}
            object.__setattr__(self, "params", {key: value for key, value in given.items() if key not in fixed})
            if name is not None:
                object.__setattr__(self, "name", name)
            # The declared hyper-parameters, checked (and read: "1" -> 1.0) before __init__ runs.
            for key, parameter in declared_parameters(type(self)).items():
                if key in bound:
                    bound[key] = parameter.check(key, bound[key])
            args, kwargs = binding.args[1:], binding.kwargs
        init(self, *args, **kwargs)

    return __init__


class HashingMethod(nn.Module):
    """Base class: everything the training loop reads of a method is declared here.

    A method is built from its size alone: `bits`, `num_train` (training items, for memories of
    training codes) and `num_classes`; the training labels are handed over separately
    (`set_train_labels`), so a checkpoint rebuilds the method from its recorded spec without them.
    Subclasses implement `forward` and may override the hooks below.
    """

    name: str = ""
    # What the method needs of the loop and what it yields, declared once per class; `requirements()`
    # resolves it for an instance (DMUH's momentum copy is a hyper-parameter).
    requires: Requirements = Requirements()
    # {name: Param}: the hyper-parameters declared with what they admit (`dmuh.methods.components.params`),
    # checked before __init__ runs; a subclass adds to its bases'. The defaults are __init__'s.
    hyper_parameters: Dict[str, Param] = {}
    # Old checkpoints' state-dict keys -> today's, for methods whose state moved into components.
    legacy_state_keys: Dict[str, str] = {}
    # Hyper-parameters whose default changed since checkpoints recorded a `method_spec`: the value
    # such a checkpoint was trained with, applied when it is rebuilt or resumed without that key.
    legacy_defaults: Dict[str, Any] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _recording_spec(cls.__dict__["__init__"])

    @_recording_spec
    def __init__(self, bits: int, num_train: int, num_classes: int):
        # `name` and `params` (what `spec()` records) are set before the subclass's own __init__
        # runs (`_recording_spec`): the registered name and the hyper-parameters it was given.
        super().__init__()
        self.bits = int(bits)
        self.num_train = int(num_train)
        self.num_classes = int(num_classes)
        # Per-step numbers for the log (e.g. mean uncertainty), as 0-d tensors: read once per epoch.
        self.step_stats: Dict[str, torch.Tensor] = {}
        # One-line remarks the loop prints at the start of training (e.g. CSQ's fallback centres).
        self.notes: List[str] = []

    def requirements(self) -> Requirements:
        """This instance's contract: the class's `requires`, unless its hyper-parameters change it."""
        return self.requires

    def spec(self) -> Dict[str, Any]:
        """What `create_method(**spec)` needs to rebuild this method (its state comes from a checkpoint)."""
        return {
            "name": self.name,
            "bits": self.bits,
            "num_train": self.num_train,
            "num_classes": self.num_classes,
            "params": dict(self.params),
        }

    def set_train_labels(self, labels: torch.Tensor) -> None:
        """The (num_train, num_classes) multi-hot labels of the training split, for the components that keep them."""
        if tuple(labels.shape) != (self.num_train, self.num_classes):
            raise DmuhError(
                f"method {self.name!r}: training labels of shape {tuple(labels.shape)}, "
                f"built for {(self.num_train, self.num_classes)}"
            )
        for module in self.modules():
            if module is not self and hasattr(module, "set_labels"):
                module.set_labels(labels)

    def set_reference_features(self, features: torch.Tensor) -> None:
        """The (num_train, D) reference representation of the training split, once, before the
        first step of a new run (a resumed run has it from its checkpoint). Methods with
        `Requirements.reference_features` override it."""

    def set_train_text(self, text: torch.Tensor) -> None:
        """The (num_train, V) text vectors of the training split, on every start of a run (new or
        resumed: they are data, not state). Methods with `Requirements.text` may keep them."""

    def on_step_end(self) -> None:
        """Hook after every optimiser step (a cross-modal method's momentum copy of its text network)."""

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """Continuous codes of (n, V) text vectors; only methods with `Requirements.text` have a text network."""
        raise DmuhError(f"method {self.name!r} has no text network: it hashes images only")

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def train_with(self, trainer):
        """How the loop fits this method: gradient epochs (the default). `ShallowMethod` fits in closed form."""
        return trainer.gradient_epochs()

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        """Hook for schedules inside the loss (HashNet's continuation, DSDH's code update)."""

    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        """Hook after an epoch's last step, before it is evaluated and checkpointed (ADSH's update
        of its database codes)."""

    def epoch_items(self, epoch: int) -> torch.Tensor:
        """Positions in the training split that epoch `epoch` runs over (`Requirements.epoch_items`)."""
        return torch.arange(self.num_train)

    def database_codes(self) -> Optional[torch.Tensor]:
        """(num_train, bits) codes of the training items for retrieval (`Requirements.database_codes`),
        or None: the network encodes the database."""
        return None

    def continuous_codes(self, outputs: torch.Tensor) -> torch.Tensor:
        """Map raw outputs to the real-valued codes whose sign is the binary code."""
        return outputs

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        state_dict = {self.legacy_state_keys.get(key, key): value for key, value in state_dict.items()}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def pairwise_similarity(labels_a: torch.Tensor, labels_b: torch.Tensor) -> torch.Tensor:
    """S_ij = 1 when items share at least one label (single- and multi-label alike)."""
    return (labels_a @ labels_b.t() > 0).to(labels_a.dtype)


METHODS = Registry("method", option_word="parameter")


def register_method(name: str, display_name: Optional[str] = None, **fixed):
    """Class decorator: `@register_method("dmuh-wo-u", uncertainty_term=False)` registers a variant;
    `display_name` is how tables write it (the paper's spelling)."""
    return METHODS.register(name, display_name=display_name, **fixed)


def available() -> list:
    """Names of every registered method."""
    return METHODS.names()


def method_class(name: str):
    return METHODS.entry(name).factory


def display_name(name: str) -> str:
    return METHODS.display_name(name)


def create_method(
    name: str,
    bits: int,
    num_train: Optional[int] = None,
    num_classes: Optional[int] = None,
    train_labels: Optional[torch.Tensor] = None,
    **params,
) -> HashingMethod:
    """Create a registered method of the given size; unknown or fixed hyper-parameters are an error
    naming them. `train_labels` (num_train, num_classes), when given, sets the size and is handed
    to the method (`set_train_labels`)."""
    if train_labels is not None:
        num_train, num_classes = train_labels.shape
    if num_train is None or num_classes is None:
        raise TypeError("create_method needs num_train and num_classes (or train_labels)")
    sizes = {"bits": bits, "num_train": num_train, "num_classes": num_classes, SPEC_NAME: name}
    method = METHODS.create(name, sizes, params)
    if train_labels is not None:
        method.set_train_labels(train_labels)
    return method
