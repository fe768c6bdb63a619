"""`timm:NAME` and `tv:NAME` backbones: built offline, weights from local timm / torchvision files,
one-line errors, and one epoch on digits through the CLI."""

import socket
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from dmuh.cli import main
from dmuh.errors import ConfigError, DmuhError
from dmuh.models import create_model
from dmuh.models.registry import checkpoint_model_config
from dmuh.runs.config import TrainConfig
from dmuh.runs.layout import load_init

BITS = 8


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _timm_source(arch, **options):
    """The timm model a user's file comes from, with its classifier head."""
    return timm.create_model(arch, pretrained=False, **options).eval()


def _timm_features(model, x):
    return model.forward_head(model.forward_features(x), pre_logits=True)


def _save_safetensors(model, path):
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("arch, options, size", [("test_vit", {"img_size": 32}, 32), ("test_resnet", {}, 48)])
def test_timm_safetensors_round_trip(tmp_path, arch, options, size):
    source = _timm_source(arch, **options)
    path = _save_safetensors(source, tmp_path / "model.safetensors")
    loaded = create_model(f"timm:{arch}", bits=BITS, pretrained=path, **options).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(loaded.features(x), _timm_features(source, x), rtol=0, atol=0)
    assert loaded.feature_dim == source.num_features
    # The head the file holds (head.* / fc.*) is dropped by the model's pretrained_cfg rule.
    assert loaded.backbone.ignored_pretrained_keys == (f"{source.pretrained_cfg['classifier']}.",)


def test_timm_weights_adapt_to_one_channel(tmp_path):
    source = _timm_source("test_vit", img_size=32)
    path = _save_safetensors(source, tmp_path / "model.safetensors")
    gray = create_model("timm:test_vit", bits=BITS, in_channels=1, img_size=32, pretrained=path).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():  # summed RGB filters on a gray image = RGB filters on its 3-channel copy
        torch.testing.assert_close(gray.features(x), _timm_features(source, x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch, head", [("resnet18", "fc"), ("mobilenet_v3_small", "classifier.3")])
def test_torchvision_pth_round_trip(tmp_path, arch, head):
    source = torchvision.models.get_model(arch, weights=None).eval()
    path = tmp_path / f"{arch}.pth"
    torch.save(source.state_dict(), path)
    loaded = create_model(f"tv:{arch}", bits=BITS, pretrained=path).eval()
    assert loaded.backbone.ignored_pretrained_keys == (f"{head}.",)
    parent, _, child = head.rpartition(".")
    setattr(source.get_submodule(parent) if parent else source, child, torch.nn.Identity())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.features(x), source(x), rtol=0, atol=0)


def test_mismatched_files_give_one_line_naming_the_file_and_keys(tmp_path):
    vit = _save_safetensors(_timm_source("test_vit", img_size=32), tmp_path / "vit.safetensors")
    with pytest.raises(DmuhError, match=r"vit.safetensors do not fit model 'timm:test_resnet': missing keys") as error:
        create_model("timm:test_resnet", bits=BITS, pretrained=vit)
    assert "\n" not in str(error.value)
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["layer4.1.bn2.bias"]
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    with pytest.raises(DmuhError, match="resnet18.pth.*missing keys layer4.1.bn2.bias.*unexpected keys extra.weight"):
        create_model("tv:resnet18", bits=BITS, pretrained=path)


def test_options_pass_through_and_the_checkpoint_config_rebuilds_it():
    model = create_model("timm:test_vit", bits=BITS, img_size=32, drop_path_rate=0.1)
    assert model.input_size == 32 and model.backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    rebuilt = create_model(**model.config)
    assert rebuilt.config == model.config and rebuilt.input_size == 32
    vit = create_model("tv:vit_b_32", bits=BITS, image_size=32)  # torchvision's ViT option
    assert (vit.input_size, vit.feature_dim) == (32, 768)


def test_input_size_comes_from_the_pretrained_config_unless_given():
    assert create_model("timm:test_resnet", bits=BITS).input_size == 160  # timm's data config
    assert create_model("tv:mobilenet_v3_small", bits=BITS).input_size == 224  # the weights' crop size
    assert create_model("tv:inception_v3", bits=BITS, init_weights=False).input_size == 299
    small = create_model("tv:resnet18", bits=BITS, in_channels=1, input_size=16).eval()
    assert small.input_shape == (1, 16, 16) and small.config["input_size"] == 16
    with torch.no_grad():
        assert small(torch.randn(2, 1, 16, 16)).shape == (2, BITS)
    # test_vit interpolates its position embedding to any size, unless told not to.
    assert create_model("timm:test_vit", bits=BITS, input_size=32).input_size == 32
    with pytest.raises(DmuhError, match="does not run at input_size 32.*img_size"):
        create_model("timm:test_vit", bits=BITS, input_size=32, dynamic_img_size=False)


def test_the_input_transform_comes_from_the_pretrained_config_unless_given():
    tv = create_model("tv:resnet18", bits=BITS)  # torchvision's weights transforms: resize 256, crop 224
    assert tv.input_transform == {
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "interpolation": "bilinear",
        "crop_pct": 0.875,
    }
    given = create_model("timm:test_vit", bits=BITS, mean=0.4, crop_pct=1, interpolation="bilinear")
    assert given.input_transform == {
        "mean": [0.4],
        "std": [0.5, 0.5, 0.5],
        "interpolation": "bilinear",
        "crop_pct": 1.0,
    }
    rebuilt = create_model(**given.config)
    assert rebuilt.input_transform == given.input_transform and rebuilt.config == given.config
    assert create_model("smallcnn", bits=BITS).input_transform is None  # the pipeline's defaults
    assert create_model("smallcnn", bits=BITS, std=[0.3]).config["std"] == [0.3]
    with pytest.raises(DmuhError, match="'timm:test_vit': std must be one or a list of positive numbers"):
        create_model("timm:test_vit", bits=BITS, std=[0.5, 0])
    with pytest.raises(DmuhError, match="interpolation must be one of bilinear, bicubic, nearest, got 'area'"):
        create_model("tv:resnet18", bits=BITS, interpolation="area")
    # A checkpoint of a timm: network from before the transform was recorded: trained with ImageNet's.
    old = {key: value for key, value in create_model("timm:test_vit", bits=BITS).config.items() if key != "mean"}
    old.pop("std"), old.pop("interpolation"), old.pop("crop_pct")
    legacy = create_model(**checkpoint_model_config(old)).input_transform
    assert legacy == {
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "interpolation": "bilinear",
        "crop_pct": 1.0,
    }


def test_inception_side_heads_are_off(tmp_path):
    model = create_model("tv:inception_v3", bits=BITS, init_weights=False).train()
    assert model(torch.randn(2, 3, 80, 80)).shape == (2, BITS)  # a tensor, not InceptionOutputs
    assert set(model.backbone.ignored_pretrained_keys) == {"fc.", "AuxLogits."}


def test_unknown_names_and_refused_options_are_one_line_errors():
    with pytest.raises(DmuhError, match=r"unknown model 'timm:test_vitt' \(did you mean 'timm:test_vit'\?\)"):
        create_model("timm:test_vitt", bits=BITS)
    with pytest.raises(DmuhError, match=r"unknown model 'tv:resnet19' \(did you mean 'tv:resnet18'\?\)"):
        create_model("tv:resnet19", bits=BITS)
    with pytest.raises(DmuhError, match=r"unknown model 'vit_b_16' \(did you mean 'tv:vit_b_16'\?\)"):
        create_model("vit_b_16", bits=BITS)
    with pytest.raises(DmuhError, match="'timm:test_vit'.*unexpected keyword argument 'depht'"):
        create_model("timm:test_vit", bits=BITS, depht=2)
    with pytest.raises(DmuhError, match="option 'num_classes' cannot be given"):
        create_model("tv:resnet18", bits=BITS, num_classes=10)
    with pytest.raises(DmuhError, match="no linear classifier head"):
        create_model("tv:squeezenet1_0", bits=BITS)


def test_a_pretrained_tag_picks_the_config_and_a_missing_file_says_where_to_get_it(tmp_path):
    tagged = create_model("timm:test_vit.r160_in1k", bits=BITS)
    assert tagged.input_size == 160 and tagged.config["input_size"] == 160
    with pytest.raises(DmuhError, match=r"nothing is downloaded.*huggingface.co/timm/test_vit.r160_in1k"):
        create_model("timm:test_vit", bits=BITS, pretrained=True)
    with pytest.raises(
        DmuhError,
        match=r"nope.pth; nothing is downloaded: put the weights of tv:resnet18 there, fetched elsewhere "
        r"\(https://download.pytorch.org/models/resnet18-",
    ):
        create_model("tv:resnet18", bits=BITS, pretrained=tmp_path / "nope.pth")
    with pytest.raises(DmuhError, match="unknown model 'timm:test_vit.bogus'"):
        create_model("timm:test_vit.bogus", bits=BITS)


def test_nothing_is_downloaded(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert create_model("timm:test_convnext", bits=BITS).feature_dim > 0
    assert create_model("tv:mobilenet_v3_small", bits=BITS).feature_dim == 1024


def test_the_config_accepts_the_names():
    config = TrainConfig(model="timm:test_vit", model_params={"img_size": 16, "drop_path_rate": 0.1})
    assert config.model == "timm:test_vit"


def test_init_file_drops_the_head_by_the_pretrained_rule(tmp_path):
    source = _timm_source("test_resnet")
    weights = _save_safetensors(source, tmp_path / "model.safetensors")  # with fc.* (the head)
    model = create_model("timm:test_resnet", bits=BITS).eval()
    assert load_init(str(weights), model, split=None) == f"backbone initialised from {weights}"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.features(x), _timm_features(source, x), rtol=0, atol=0)
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match=r"init weights .*bad.pth do not fit model 'timm:test_resnet': missing keys"):
        load_init(str(tmp_path / "bad.pth"), model, split=None)


def test_a_missing_weights_file_says_where_to_put_it_and_where_to_get_it(tmp_path, capsys):
    wanted = tmp_path / "weights" / "model.safetensors"
    base = ["train", "--data", "digits", "--model", "timm:test_vit", "--out", str(tmp_path / "run")]
    for flag in ("--pretrained", "--init"):
        assert main(base + [flag, str(wanted)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        assert (
            f"{flag[2:]} {wanted}: no such" in err
            and "file; nothing is downloaded: put the weights of timm:test_vit there, fetched elsewhere "
            "(model.safetensors of https://huggingface.co/timm/test_vit.r160_in1k)"
            in err
        ), err


def _dmuh(*args):
    """`python -m dmuh ARGS` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "dmuh", *map(str, args)], capture_output=True, text=True, timeout=300)


TRAIN = "train --data digits --protocol digits --bits 16 --batch-size 64 --epochs 1 --init scratch --quiet".split()


def test_timm_backbone_with_a_weights_file_through_the_cli(tmp_path):
    weights = _save_safetensors(_timm_source("test_vit", img_size=16), tmp_path / "model.safetensors")
    out = tmp_path / "run"
    model = ["--model", "timm:test_vit", "--model-param", "img_size=16"]
    result = _dmuh(*TRAIN, *model, "--pretrained", weights, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "model: timm:test_vit" in (out / "config.yaml").read_text()
    codes = tmp_path / "codes.npz"  # the checkpoint rebuilds the backbone from its recorded config
    result = _dmuh("encode", "--run", out, "--images", "digits", "--out", codes, "--quiet")
    assert result.returncode == 0, result.stderr
    with np.load(codes) as encoded:
        assert len(encoded["ids"]) == 1797
    # A file of another network: one line naming the file and the first keys, no traceback.
    result = _dmuh(*TRAIN, "--model", "timm:test_resnet", "--pretrained", weights, "--out", tmp_path / "bad")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "model.safetensors do not fit model 'timm:test_resnet': missing keys" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_torchvision_backbone_through_the_cli(tmp_path):
    out = tmp_path / "run"
    result = _dmuh(*TRAIN, "--model", "tv:resnet18", "--model-param", "input_size=16", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "model: tv:resnet18" in (out / "config.yaml").read_text()
    result = _dmuh(*TRAIN, "--model", "tv:resnet19", "--out", tmp_path / "typo")
    assert result.returncode != 0 and "did you mean 'tv:resnet18'" in result.stderr
