"""Registered hashing networks: shapes, pretrained loading, errors."""

import logging

import pytest
import torch
from safetensors.torch import save_file

from dmuh.errors import DmuhError
from dmuh.models import HashNetwork, available_models, create_model, register_model
from dmuh.models import registry as model_registry

BITS = 12

# name -> (create_model options, test input size): the smallest size each model handles quickly.
IMAGE_MODELS = {
    "cnnf": ({}, 224),
    "alexnet": ({}, 64),
    "resnet18": ({}, 64),
    "resnet50": ({}, 64),
    "resnet18-32": ({}, 32),
    "resnet50-32": ({}, 32),
    "smallcnn": ({}, 8),
    # Other libraries' networks by name (dmuh.models.external): timm's tiny test networks, a small torchvision one.
    "timm:test_vit": ({"img_size": 32}, 32),
    "timm:test_resnet": ({}, 32),
    "tv:mobilenet_v3_small": ({}, 32),
}
FEATURE_DIMS = {
    "cnnf": 4096,
    "alexnet": 4096,
    "resnet18": 512,
    "resnet50": 2048,
    "resnet18-32": 512,
    "resnet50-32": 2048,
    "smallcnn": 256,
    "timm:test_vit": 64,
    "timm:test_resnet": 96,
    "tv:mobilenet_v3_small": 1024,
}
PREFERRED_INPUT_SIZES = {
    "cnnf": 224,
    "alexnet": 224,
    "resnet18": 224,
    "resnet50": 224,
    "resnet18-32": 32,
    "resnet50-32": 32,
    "smallcnn": 32,
    "timm:test_vit": 32,  # img_size
    "timm:test_resnet": 160,  # timm's pretrained config
    "tv:mobilenet_v3_small": 224,  # the torchvision weights' crop size
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_every_builtin_model_is_registered():
    assert {name for name in IMAGE_MODELS if ":" not in name} | {"mlp"} <= set(available_models())


def test_cnnf_rows_match_table_2_of_the_paper():
    model = create_model("cnnf", bits=BITS).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        rows = model.backbone.forward_rows(x)
        codes = model(x)
    assert {name: tuple(out.shape[1:]) for name, out in rows.items()} == {
        "conv1": (64, 27, 27),
        "conv2": (256, 13, 13),
        "conv3": (256, 13, 13),
        "conv4": (256, 13, 13),
        "conv5": (256, 6, 6),
        "full6": (4096,),
        "full7": (4096,),
    }
    assert codes.shape == (1, BITS)  # full8: the hash layer
    conv1 = model.backbone.conv1
    assert (conv1.kernel_size, conv1.stride, conv1.padding) == ((11, 11), (4, 4), (0, 0))
    assert model.backbone.conv2.kernel_size == (5, 5) and model.backbone.conv2.padding == (2, 2)
    with torch.no_grad():  # other resolutions are pooled to 6x6 before full6
        assert model(torch.randn(1, 3, 128, 128)).shape == (1, BITS)


@pytest.mark.parametrize("name", sorted(IMAGE_MODELS))
def test_image_model_output_and_feature_shapes(name):
    options, size = IMAGE_MODELS[name]
    model = create_model(name, bits=BITS, **options).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        codes = model(x)
        features = model.features(x)
        codes_again, features_again = model(x, return_features=True)
    assert codes.shape == (2, BITS) and codes.dtype == torch.float32
    assert features.shape == (2, FEATURE_DIMS[name]) == (2, model.feature_dim)
    torch.testing.assert_close(codes, codes_again)
    torch.testing.assert_close(features, features_again)
    assert (model.name, model.bits, model.in_channels) == (name, BITS, 3)
    assert model.input_size == PREFERRED_INPUT_SIZES[name]
    assert model.input_shape == (3, model.input_size, model.input_size)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_resnet_small_input_option_equals_the_32_variant():
    model = create_model("resnet18", bits=BITS, small_input=True)
    assert model.input_size == 32 and model.backbone.conv1.kernel_size == (3, 3)
    with pytest.raises(DmuhError, match="fixes small_input"):
        create_model("resnet18-32", bits=BITS, small_input=False)


def test_mlp_on_feature_vectors():
    model = create_model("mlp", bits=BITS, input_dim=20, hidden=(32, 16))
    x = torch.randn(5, 20)
    assert model(x).shape == (5, BITS)
    assert model.features(x).shape == (5, 16) and model.feature_dim == 16
    assert model.input_shape == (20,) and model.input_size is None
    assert create_model("mlp", bits=BITS, input_dim=20, hidden=()).feature_dim == 20
    with pytest.raises(DmuhError, match="in_channels"):
        create_model("mlp", bits=BITS, input_dim=20, in_channels=1)


@pytest.mark.parametrize("name, size", [("smallcnn", 28), ("resnet18-32", 32), ("alexnet", 64), ("cnnf", 224)])
def test_single_channel_input(name, size):
    model = create_model(name, bits=BITS, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, size, size)).shape == (1, BITS)
    assert model.in_channels == 1 and model.input_shape[0] == 1


def test_smallcnn_takes_any_size_from_8_px():
    model = create_model("smallcnn", bits=BITS, in_channels=1, input_size=8).eval()
    assert model.input_size == 8
    with torch.no_grad():
        for size in (8, 13, 28, 32):
            assert model(torch.randn(3, 1, size, size)).shape == (3, BITS)


def test_channels_last_and_bf16_autocast():
    for name, size in [("smallcnn", 16), ("cnnf", 224)]:
        model = create_model(name, bits=BITS).eval().to(memory_format=torch.channels_last)
        x = torch.randn(2, 3, size, size).to(memory_format=torch.channels_last)
        with torch.no_grad():
            reference = model(x.contiguous())
            torch.testing.assert_close(model(x), reference, rtol=1e-4, atol=1e-4)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low_precision = model(x)
        assert low_precision.shape == (2, BITS) and torch.isfinite(low_precision).all()
        assert all(p.dtype == torch.float32 for p in model.parameters())


def test_hash_layer_initialisation():
    model = create_model("smallcnn", bits=256)
    assert model.hash_layer.bias.abs().max() == 0
    assert 0.005 < model.hash_layer.weight.std().item() < 0.015
    default = create_model("smallcnn", bits=256, hash_init_std=None)
    assert default.hash_layer.bias.abs().max() > 0


def _same_outputs(model_a, model_b, x):
    model_a.eval(), model_b.eval()
    with torch.no_grad():
        torch.testing.assert_close(model_a.features(x), model_b.features(x))


# AlexNet and CNN-F weights are ~230 MB, so each is saved in one format only.
@pytest.mark.parametrize(
    "name, size, suffix, head_key",
    [
        ("resnet18", 32, ".pth", "fc.weight"),
        ("resnet18", 32, ".safetensors", "fc.weight"),
        ("alexnet", 64, ".pth", "classifier.6.weight"),
        ("cnnf", 224, ".safetensors", None),  # CNN-F's full8 is the hash layer: no head key exists
    ],
)
def test_pretrained_round_trip(tmp_path, name, size, suffix, head_key):
    source = create_model(name, bits=BITS)
    state = {key: value.contiguous() for key, value in source.backbone.state_dict().items()}
    if head_key:
        state[head_key] = torch.randn(1000, 7)  # a classification head is ignored, whatever its shape
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    loaded = create_model(name, bits=BITS, pretrained=path)
    _same_outputs(source, loaded, torch.randn(2, 3, size, size))


def test_pretrained_wrapped_checkpoint(tmp_path):
    source = create_model("smallcnn", bits=BITS)
    state = {f"module.{key}": value for key, value in source.backbone.state_dict().items()}
    path = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": state, "epoch": 3}, path)
    _same_outputs(source, create_model("smallcnn", bits=BITS, pretrained=path), torch.randn(2, 3, 16, 16))


def test_small_stem_resnet_loads_all_but_conv1_and_says_so(tmp_path, caplog):
    source = create_model("resnet18", bits=BITS)
    path = tmp_path / "resnet18.pth"
    torch.save(source.backbone.state_dict(), path)
    with caplog.at_level(logging.WARNING, logger="dmuh.models"):
        loaded = create_model("resnet18-32", bits=BITS, pretrained=path)
    assert "conv1.weight" in caplog.text
    torch.testing.assert_close(loaded.backbone.layer1[0].conv1.weight, source.backbone.layer1[0].conv1.weight)
    torch.testing.assert_close(loaded.backbone.bn1.weight, source.backbone.bn1.weight)


def test_rgb_weights_adapt_to_other_channel_counts(tmp_path):
    source = create_model("smallcnn", bits=BITS).eval()
    path = tmp_path / "smallcnn.pth"
    torch.save(source.backbone.state_dict(), path)
    gray = create_model("smallcnn", bits=BITS, in_channels=1, pretrained=path).eval()
    # Summed RGB filters on a gray image equal the RGB filters on that image repeated 3 times.
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(gray.features(x), source.features(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-4)
    six = create_model("smallcnn", bits=BITS, in_channels=6, pretrained=path).eval()
    with torch.no_grad():  # tiled twice and halved: the same response to a 6-channel copy
        torch.testing.assert_close(six.features(x.repeat(1, 6, 1, 1)), gray.features(x), rtol=1e-4, atol=1e-4)


def test_missing_weights_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(DmuhError, match="nope.pth"):
        create_model("smallcnn", bits=BITS, pretrained=missing)


def test_mismatching_keys_and_shapes(tmp_path):
    state = create_model("resnet18", bits=BITS).backbone.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["layer4.1.bn2.bias"]
    path = tmp_path / "resnet.pth"
    torch.save(state, path)
    with pytest.raises(DmuhError, match="missing keys layer4.1.bn2.bias.*unexpected keys extra.weight"):
        create_model("resnet18", bits=BITS, pretrained=path)
    # resnet18 weights are not resnet50 weights: many missing keys and shape mismatches.
    with pytest.raises(DmuhError, match=r"resnet.pth do not fit model 'resnet50'.*\(\+\d+ more\)"):
        create_model("resnet50", bits=BITS, pretrained=path)


def test_unreadable_weights_file(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(DmuhError, match="broken.safetensors"):
        create_model("smallcnn", bits=BITS, pretrained=path)


def test_bad_names_and_options():
    with pytest.raises(DmuhError, match=r"unknown model 'vgg99'; available: .*cnnf"):
        create_model("vgg99", bits=BITS)
    with pytest.raises(DmuhError, match="has no option 'depth'"):
        create_model("smallcnn", bits=BITS, depth=3)
    with pytest.raises(DmuhError, match="bits"):
        create_model("smallcnn", bits=0)
    with pytest.raises(DmuhError, match="downloaded"):
        create_model("smallcnn", bits=BITS, pretrained=True)


def test_register_a_custom_model(monkeypatch):
    # A private copy of the registry, so the test model does not leak into other tests.
    monkeypatch.setattr(model_registry.MODELS, "entries", dict(model_registry.MODELS.entries))

    class Flatten(torch.nn.Module):
        feature_dim, input_size, in_channels = 48, 4, 3

        def forward(self, x):
            return torch.flatten(x, 1)

    register_model("test-flatten")(lambda: Flatten())
    model = create_model("test-flatten", bits=BITS)
    assert isinstance(model, HashNetwork) and model(torch.randn(2, 3, 4, 4)).shape == (2, BITS)
    assert model.config == {"name": "test-flatten", "bits": BITS, "hash_init_std": 0.01, "hash_norm": "none"}
    with pytest.raises(ValueError, match="twice"):
        register_model("test-flatten")(lambda: Flatten())


def test_hash_norm_batchnorm_centres_each_bit():
    model = create_model("mlp", bits=4, input_dim=3, hash_norm="batchnorm")
    z = model(torch.randn(16, 3) + 5.0)  # a large common input component
    torch.testing.assert_close(z.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    with pytest.raises(DmuhError, match="hash_norm 'layer'"):
        create_model("mlp", bits=4, input_dim=3, hash_norm="layer")
