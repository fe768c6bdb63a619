"""`dmuh features` end to end: a backbone's features of digits -> `train --data features:` (a shallow
method and an MLP head) -> `encode` of images through the recorded backbone -> `search` with an
image, and the features run's ONNX graph, which takes images."""

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from dmuh.cli import main
from dmuh.codes.file import Codes
from dmuh.data import DigitsSource
from dmuh.retrieval.encoder import load_encoder

BACKBONE = ["--model", "timm:test_resnet", "--model-param", "input_size=16"]


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A user's timm file (random weights, with its classifier head)."""
    torch.manual_seed(0)
    source = timm.create_model("test_resnet", pretrained=False)
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    save_file({key: value.contiguous() for key, value in source.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def features(weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("features") / "feats.npz"
    assert main(["features", *BACKBONE, "--weights", str(weights), "--data", "digits", "--out", str(out)]) == 0
    return out


def train_on(features, out, method, *extra):
    command = ["train", "--method", method, "--data", f"features:{features}", "--protocol", "digits", "--model", "mlp"]
    command += ["--bits", "16", "--epochs", "1", "--batch-size", "64", "--trace-items", "0", "--quiet", *extra]
    assert main(command + ["--out", str(out)]) == 0
    return out


def test_the_features_file_holds_features_labels_ids_and_the_backbone(features, weights, capsys):
    with np.load(features, allow_pickle=False) as arrays:
        assert arrays["features"].shape == (1797, 96) and arrays["features"].dtype == np.float32
        assert arrays["labels"].shape == (1797, 10) and list(arrays["ids"][:2]) == ["digits:0", "digits:1"]
        record = json.loads(str(arrays["backbone"]))
    assert record["model"] == "timm:test_resnet" and record["weights"] == str(weights.resolve())
    assert record["image_size"] == 8 and record["model_config"]["input_size"] == 16
    assert record["model_config"]["mean"] == [0.5, 0.5, 0.5]  # the pretrained config's transform
    code, _, err = run(capsys, "features", *BACKBONE, "--data", "digits", "--out", features)
    assert code == 2 and "already exists; pass --force" in err and err.count("\n") == 1


@pytest.mark.parametrize("method, extra", [("itq", ()), ("dpsh", ("--init", "scratch"))])
def test_a_run_on_features_encodes_and_searches_images(features, tmp_path, capsys, method, extra):
    trained = train_on(features, tmp_path / "run", method, *extra)
    assert (trained / "feature_backbone.json").is_file()
    by_vectors, by_images = tmp_path / "vectors.npz", tmp_path / "images.npz"
    assert main(["encode", "--run", str(trained), "--images", f"features:{features}", "--out", str(by_vectors)]) == 0
    assert main(["encode", "--run", str(trained), "--images", "digits", "--out", str(by_images), "--quiet"]) == 0
    vectors, images = Codes.load(by_vectors), Codes.load(by_images)
    assert images.ids == vectors.ids and np.array_equal(images.packed, vectors.packed)
    index = tmp_path / "digits.dmuhidx"
    assert main(["index", "build", "--codes", str(by_images), "--kind", "flat", "--out", str(index)]) == 0
    query = tmp_path / "query.png"
    Image.fromarray(DigitsSource().decode(np.array([7]))[0, :, :, 0]).save(query)
    capsys.readouterr()
    code, out, err = run(capsys, "search", "--index", index, "--image", query, "--k", "1797", "--json")
    assert code == 0, err
    hits = json.loads(out)["queries"][0]["results"]  # the query's code is its own database code
    assert "digits:7" in [hit["path"] for hit in hits if hit["distance"] == 0]


def test_the_onnx_graph_of_a_features_run_takes_images(features, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    trained = train_on(features, tmp_path / "run", "itq")
    out = tmp_path / "model.onnx"
    assert main(["export-onnx", "--run", str(trained), "--out", str(out)]) == 0
    images = DigitsSource().decode(np.arange(32))
    pixels = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)
    codes, _ = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"inputs": pixels})
    h, _ = load_encoder(trained).continuous(torch.from_numpy(images).permute(0, 3, 1, 2))
    np.testing.assert_allclose(codes, h.numpy(), atol=1e-4)


def test_changed_weights_are_refused_in_one_line(features, weights, tmp_path, capsys):
    trained = train_on(features, tmp_path / "run", "itq")
    moved = tmp_path / "model.safetensors"
    state = {key: value.clone() for key, value in timm.create_model("test_resnet").state_dict().items()}
    save_file(state, str(moved))  # other weights, where the record's file was
    record = json.loads((trained / "feature_backbone.json").read_text())
    record["weights"] = str(moved)
    (trained / "feature_backbone.json").write_text(json.dumps(record))
    code, _, err = run(capsys, "encode", "--run", trained, "--images", "digits", "--out", tmp_path / "c.npz")
    assert code == 2 and err.count("\n") == 1
    assert "does not have the weights the features were made with" in err
