"""A checkpoint's fields checked before use (issue 31, classes 2 and 3): a re-signed checkpoint
with NaN weights, a negative epoch, weights that are not tensors, sparse tensors, an optimiser
state of the wrong shape on resume: each a one-line refusal, never numbers or an internal error."""

import pytest
import torch

from dmuh.cli import main
from dmuh.engine.trainer import train
from dmuh.errors import DmuhError
from dmuh.runs.checkpoint import load_state, save_state, tensor_problem
from dmuh.runs.config import TrainConfig
from dmuh.runs.layout import CHECKPOINT, CHECKPOINT_KIND, load_checkpoint

TINY = dict(data="digits", protocol="per-class", protocol_params={"query_per_class": 5, "train_per_class": 20},
            model="smallcnn", model_params={"input_size": 8, "width": 8}, bits=8, epochs=1, batch_size=50,
            init="scratch", trace_items=4, train_map_items=50, device="cpu")  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fields") / "run"
    train(TrainConfig(**TINY, out=str(out)), progress=False, echo=lambda line: None)
    return out


@pytest.fixture()
def copy(run, tmp_path):
    import shutil

    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def rewrite(run_dir, change):
    """Change the checkpoint's state and write it back with a valid checksum (a re-signed file)."""
    path = run_dir / CHECKPOINT
    state = load_state(path, CHECKPOINT_KIND)
    change(state)
    save_state(path, state, CHECKPOINT_KIND)
    return path


def first_weight(state):
    return next(key for key, value in state["model"].items() if value.is_floating_point())


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s["model"][first_weight(s)].view(-1).__setitem__(0, float("nan")), "holds NaN or infinite values"),
        (lambda s: s["model"][first_weight(s)].view(-1).__setitem__(0, float("inf")), "holds NaN or infinite values"),
        (lambda s: s.__setitem__("epoch", -1), "field 'epoch' must be an integer from 0"),
        (lambda s: s.__setitem__("epoch", True), "field 'epoch' must be an integer"),
        (lambda s: s.__setitem__("epoch", "3"), "field 'epoch' must be an integer"),
        (lambda s: s.__setitem__("epoch", 10**30), "field 'epoch' must be an integer"),
        (lambda s: s.__setitem__("model", [1, 2]), "field 'model' must be a dict of tensors"),
        (lambda s: s["model"].__setitem__("x", 3), "field 'model' must be a dict of tensors"),
        (lambda s: s.__setitem__("optimizer", "adam"), "field 'optimizer' is not an optimiser state"),
    ],
)
def test_a_resigned_checkpoint_with_a_bad_field_is_refused(copy, change, message):
    path = rewrite(copy, change)
    with pytest.raises(DmuhError, match=message):
        load_checkpoint(path)


def test_evaluate_refuses_nan_weights_in_one_line(copy, capsys):
    rewrite(copy, lambda s: s["model"][first_weight(s)].view(-1).__setitem__(0, float("nan")))
    assert main(["evaluate", "--run", str(copy), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds NaN or infinite values" in err, err


def test_resume_refuses_an_optimiser_state_of_the_wrong_shape(copy, capsys):
    def wrong_shape(state):
        for slot in state["optimizer"]["state"].values():
            for name, value in slot.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    slot[name] = torch.zeros(value.numel() + 1)
                    return

    rewrite(copy, wrong_shape)
    code = main(["train", "--resume", "--out", str(copy), "--epochs", "2", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "optimizer state" in err and "internal error" not in err


def test_sparse_tensors_are_named_as_not_dense():
    sparse = torch.sparse_coo_tensor(torch.tensor([[0]]), torch.tensor([1.0]), (2**40,))
    assert tensor_problem({"model": {"w": sparse}}) == "model.w is sparse_coo, not a dense tensor"
    assert tensor_problem({"model": {"w": torch.ones(2)}}) is None
    assert tensor_problem([torch.tensor([float("nan")])], "x") == "x[0] holds NaN or infinite values"


def test_a_legacy_checkpoint_with_a_sparse_tensor_is_refused(tmp_path):
    from dmuh.runs.legacy import read_legacy_checkpoint

    sparse = torch.sparse_coo_tensor(torch.tensor([[0]]), torch.tensor([1.0]), (2**40,))
    torch.save({"model": {"w": sparse}, "epoch": 1}, tmp_path / "checkpoint.pt")
    with pytest.raises(DmuhError, match="model.w is sparse_coo, not a dense tensor"):
        read_legacy_checkpoint(tmp_path / "checkpoint.pt")


@pytest.mark.parametrize("field, value", [("bits", "16"), ("method", "regu")])
def test_a_checkpoint_of_another_run_is_refused(copy, capsys, field, value):
    """config.yaml and the checkpoint disagree on the network: evaluating would score another model."""
    config = copy / "config.yaml"
    config.write_text("\n".join(f"{field}: {value}" if line.startswith(f"{field}:") else line
                                for line in config.read_text().splitlines()) + "\n")  # fmt: skip
    assert main(["evaluate", "--run", str(copy), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"trained with {field}" in err and "different runs" in err, err
