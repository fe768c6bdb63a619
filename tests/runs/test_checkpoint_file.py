"""Checkpoint files from which no code can run (dmuh.runs.checkpoint): exact round trips, byte-identical
files, every damage refused in one line, and an old pickled checkpoint.pt that would run code refused
by every command that reads a run."""

import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dmuh.cli import main
from dmuh.errors import DmuhError
from dmuh.models import create_model
from dmuh.runs.checkpoint import encode_state, file_kind, load_state, load_weights, save_state
from dmuh.runs.config import TrainConfig
from dmuh.runs.layout import CHECKPOINT, CONFIG, LEGACY_CHECKPOINT, load_checkpoint, load_init


def sgd_state():
    """A network and an SGD-with-momentum optimiser after one step, as a checkpoint holds them."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.SGD(
        [
            {"params": model[0].parameters(), "lr_scale": 0.1},
            {"params": list(model[1].parameters()) + list(model[2].parameters())},
        ],
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-4,
    )
    model(torch.randn(8, 4)).square().mean().backward()
    optimizer.step()
    state = {
        "epoch": 3,
        "config": {
            "method": "dmuh",
            "bits": 16,
            "lr": 0.1,
            "model_params": {"input_size": 8},
            "pretrained": None,
            "amp": False,
        },
        "model_config": {"name": "mlp", "bits": 16},
        "momentum": None,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
    }
    return model, optimizer, state


def assert_same(a, b, where="state"):
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict)), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where  # the same keys (int keys stay int), in the same order
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}/{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def one_line(error: DmuhError, path) -> str:
    text = str(error)
    assert "\n" not in text and str(path) in text, text
    return text


def test_a_real_optimizer_state_round_trips_with_its_integer_keys(tmp_path):
    model, optimizer, state = sgd_state()
    path = tmp_path / "checkpoint.safetensors"
    save_state(path, state, "checkpoint")
    loaded = load_state(path, "checkpoint")
    assert_same(state, loaded)
    assert list(loaded["optimizer"]["state"]) == [0, 1, 2, 3, 4, 5]
    assert isinstance(loaded["optimizer"]["param_groups"][0]["params"][0], int)
    # The optimiser resumes exactly: the next step is the same from the original and the loaded state.
    twin = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    twin.load_state_dict(loaded["model"])
    twin_optimizer = torch.optim.SGD(
        [
            {"params": twin[0].parameters(), "lr_scale": 0.1},
            {"params": list(twin[1].parameters()) + list(twin[2].parameters())},
        ],
        lr=0.5,
        momentum=0.0,
    )
    twin_optimizer.load_state_dict(loaded["optimizer"])
    inputs = torch.randn(8, 4)
    for net, opt in ((model, optimizer), (twin, twin_optimizer)):
        opt.zero_grad()
        net(inputs).square().mean().backward()
        opt.step()
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_odd_values_and_tensors_round_trip(tmp_path):
    base = torch.arange(12, dtype=torch.float32)
    state = {
        "floats": [float("nan"), float("inf"), float("-inf"), -0.0, 1e-310, 0.1],
        "tuple": (1, ("a", None), []),
        "ints": {0: "zero", -1: 1, 10**30: True},
        "mixed": {"$dollar": 1, 2: (3,)},
        "text": 'é"\\\n{"$tensor": "x"}',
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "step": torch.tensor(7),
        "flags": torch.tensor([True, False]),
        "shared": [base[:6], base[6:], base],
        "transposed": base.view(3, 4).t(),
        "empty": torch.zeros(0, 3),
        "half": torch.ones(2, dtype=torch.bfloat16),
        "grad": torch.ones(2, requires_grad=True),
        "n": np.int64(4),
    }
    path = tmp_path / "odd.safetensors"
    save_state(path, state, "test")
    loaded = load_state(path, "test")
    expected = {**state, "grad": state["grad"].detach(), "n": 4, "transposed": state["transposed"].contiguous()}
    assert_same(expected, loaded)
    assert loaded["step"].dim() == 0 and loaded["step"].dtype == torch.int64
    assert loaded["flags"].dtype == torch.bool and loaded["scalar"].dtype == torch.float64
    assert math.copysign(1.0, loaded["floats"][3]) == -1.0
    with pytest.raises(DmuhError, match="cannot store a set"):
        save_state(tmp_path / "bad.safetensors", {"x": {1, 2}}, "test")


def test_identical_states_give_identical_bytes(tmp_path):
    first, second = sgd_state()[2], sgd_state()[2]
    save_state(tmp_path / "a.safetensors", first, "checkpoint")
    save_state(tmp_path / "b.safetensors", second, "checkpoint")
    data = (tmp_path / "a.safetensors").read_bytes()
    assert data == (tmp_path / "b.safetensors").read_bytes() == encode_state(first, "checkpoint")
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary left behind
    # Any tool that reads safetensors sees the tensors by their path in the tree.
    assert "optimizer/state/0/momentum_buffer" in load_file(str(tmp_path / "a.safetensors"))


def test_every_bit_flip_is_refused(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    save_state(path, sgd_state()[2], "checkpoint")
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    text = data[:header_end]
    special = [
        text.index(b'"dmuh.sha256":"') + 20,
        text.index(b'"dmuh.tree":"') + 30,
        text.index(b'"dmuh.kind"') + 14,
        text.index(b'"format"') + 12,
        text.index(b'"data_offsets":[') + 17,
        text.index(b'"shape":[') + 9,
        text.index(b'"dtype":"') + 10,
        header_end - 1,
    ]
    positions = sorted(
        {
            0,
            1,
            7,
            *special,
            *np.linspace(8, header_end - 1, 10).astype(int).tolist(),
            *np.linspace(header_end, len(data) - 1, 10).astype(int).tolist(),
        }
    )
    assert len(positions) >= 28
    damaged = tmp_path / "damaged.safetensors"
    for n, position in enumerate(positions):
        for bit in (n % 8, (n + 3) % 8):
            flipped = bytearray(data)
            flipped[position] ^= 1 << bit
            damaged.write_bytes(bytes(flipped))
            with pytest.raises(DmuhError) as caught:
                load_state(damaged, "checkpoint")
            one_line(caught.value, damaged)
    damaged.write_bytes(data)
    load_state(damaged, "checkpoint")  # the undamaged bytes load


def test_truncated_foreign_and_wrong_files_are_refused_in_one_line(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    save_state(path, sgd_state()[2], "checkpoint")
    data = path.read_bytes()
    cases = {
        "truncated": data[: len(data) - 5],
        "header-cut": data[:100],
        "empty": b"",
        "short": data[:6],
        "text": b"epoch: 3\nmodel: none\n" * 4,
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DmuhError, match="truncated|not a safetensors file|damaged") as caught:
            load_state(tmp_path / name, "checkpoint")
        one_line(caught.value, tmp_path / name)
    torch.save({"model": {}}, tmp_path / "pickle")
    with pytest.raises(DmuhError, match="not a safetensors file"):
        load_state(tmp_path / "pickle", "checkpoint")
    with pytest.raises(DmuhError, match="holds a 'checkpoint' state, not a 'backbone' one"):
        load_state(path, "backbone")
    save_file({"w": torch.ones(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(DmuhError, match="without dmuh metadata"):
        load_state(tmp_path / "foreign.safetensors", "checkpoint")
    newer = encode_state({"epoch": 1}, "checkpoint").replace(b'"dmuh.version":"1"', b'"dmuh.version":"9"')
    (tmp_path / "newer").write_bytes(newer)
    with pytest.raises(DmuhError, match="version 9 is newer than this dmuh reads"):
        load_state(tmp_path / "newer", "checkpoint")
    with pytest.raises(DmuhError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nothing" / CHECKPOINT)


def test_backbone_files_carry_the_checksum_and_foreign_ones_still_load(tmp_path):
    source = create_model("smallcnn", bits=8)
    state = {k: v.float() for k, v in source.backbone.state_dict().items()}
    ours, foreign = tmp_path / "backbone.safetensors", tmp_path / "torchvision.safetensors"
    save_state(ours, state, "backbone")
    save_file(state, str(foreign))
    assert file_kind(ours) == "backbone" and file_kind(foreign) is None
    assert list(load_file(str(ours))) == sorted(state)  # still a plain state dict to other tools
    for path in (ours, foreign):
        assert_same({k: v for k, v in sorted(state.items())}, dict(sorted(load_weights(path, "backbone").items())))
        model = create_model("smallcnn", bits=8)
        assert "initialised" in load_init(str(path), model, split=None)
        torch.testing.assert_close(model.backbone.state_dict(), source.backbone.state_dict(), rtol=0, atol=0)
    data = bytearray(ours.read_bytes())
    data[-3] ^= 0x10
    ours.write_bytes(bytes(data))
    with pytest.raises(DmuhError, match="checksum mismatch"):
        load_init(str(ours), create_model("smallcnn", bits=8), split=None)


# -- old pickled checkpoints: converted once, never loaded in place ---------------------------------


class RunsCode:
    """Unpickling this runs a shell command that creates `marker` (what a hostile checkpoint does)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def run_with_checkpoint(tmp_path, checkpoint) -> "os.PathLike":
    run = tmp_path / "run"
    run.mkdir()
    TrainConfig(
        data="digits",
        protocol="digits",
        model="smallcnn",
        model_params={"input_size": 8},
        method="dmuh",
        bits=8,
        epochs=1,
        batch_size=64,
        out=str(run),
    ).save(run / CONFIG)
    torch.save(checkpoint, run / LEGACY_CHECKPOINT)
    return run


@pytest.fixture
def hostile_run(tmp_path):
    marker = tmp_path / "marker"
    run = run_with_checkpoint(tmp_path, {"epoch": 1, "model": {"w": torch.ones(2)}, "config": RunsCode(marker)})
    # The file is truly hostile: an unrestricted unpickler runs its code.
    torch.load(run / LEGACY_CHECKPOINT, weights_only=False)
    assert marker.exists()
    marker.unlink()
    return run, marker


@pytest.mark.parametrize("command", ["evaluate", "encode", "export-onnx", "train", "convert-checkpoint"])
def test_a_pickle_that_would_run_code_is_refused_by_every_command(hostile_run, tmp_path, capsys, command):
    run, marker = hostile_run
    argv = {
        "evaluate": ["evaluate", "--run", str(run)],
        "encode": ["encode", "--run", str(run), "--images", "digits", "--out", str(tmp_path / "codes.npz")],
        "export-onnx": ["export-onnx", "--run", str(run), "--out", str(tmp_path / "net.onnx")],
        "train": ["train", "--resume", "--out", str(run), "--quiet"],
        "convert-checkpoint": ["convert-checkpoint", "--run", str(run)],
    }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"dmuh {command}: error: "), err
    if command == "convert-checkpoint":
        assert "refused: torch's allow-list unpickler" in err and "posix.system" in err
    else:
        assert (
            f"{run / LEGACY_CHECKPOINT} is an old-format checkpoint (a pickle); convert it once with: "
            f"dmuh convert-checkpoint --run {run}" in err
        )
    assert not marker.exists()  # no code ran
    assert not (run / CHECKPOINT).exists()


def test_a_pickle_renamed_to_safetensors_is_refused(hostile_run, capsys):
    run, marker = hostile_run
    os.replace(run / LEGACY_CHECKPOINT, run / CHECKPOINT)
    assert main(["evaluate", "--run", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a safetensors file" in err and len(err.splitlines()) == 1 and not marker.exists()


def test_convert_checkpoint_keeps_the_old_file_and_replaces_only_with_force(tmp_path, capsys):
    old = {
        "epoch": 2,
        "model": {"backbone.0.weight": torch.randn(3, 2), "hash_layer.weight": torch.randn(4, 3)},
        "method": {"memory": torch.zeros(5, 4)},
        "optimizer": {"state": {0: {"momentum_buffer": torch.ones(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
    }
    run = run_with_checkpoint(tmp_path, old)
    assert main(["convert-checkpoint", "--run", str(run / LEGACY_CHECKPOINT)]) == 0
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1 and str(run / CHECKPOINT) in out and "epoch 2" in out
    assert (run / LEGACY_CHECKPOINT).is_file()
    assert_same(old, load_checkpoint(run / CHECKPOINT))  # the tree as is, int keys and all
    assert main(["convert-checkpoint", "--run", str(run)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main(["convert-checkpoint", "--run", str(run), "--force"]) == 0
    (run / LEGACY_CHECKPOINT).unlink()
    assert main(["convert-checkpoint", "--run", str(run)]) == 2
    assert "no checkpoint.pt to convert; it already holds checkpoint.safetensors" in capsys.readouterr().err
