"""The input transform of a backbone's pretrained weights (mean, std, interpolation, centre crop):
taken from the pretrained config unless given, recorded in the checkpoint, and applied the same
way by training, `dmuh encode` and `dmuh export-onnx`."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dmuh.cli import main
from dmuh.codes.binary import pack_bits, sign
from dmuh.codes.file import Codes
from dmuh.data import DigitsSource
from dmuh.data.pipeline import InputPipeline
from dmuh.retrieval.encoder import load_encoder
from dmuh.runs.checkpoint import load_state
from dmuh.runs.files import CHECKPOINT, CHECKPOINT_KIND

# timm's test_resnet: its pretrained config says mean = std = 0.5 and crop_pct 0.95; the run
# asks for bicubic and a 0.8 crop, so 8-px digits become 20 px, of which the centre 16 are kept.
NETWORK = ["--model", "timm:test_resnet", "--model-param", "input_size=16"]
NETWORK += ["--model-param", "crop_pct=0.8", "--model-param", "interpolation=bicubic"]


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "timm"
    command = ["train", "--method", "regu", "--data", "digits", "--protocol", "digits", *NETWORK, "--bits", "16"]
    command += ["--batch-size", "64", "--epochs", "1", "--init", "scratch", "--trace-items", "0", "--quiet"]
    assert main(command + ["--eval-every", "-1", "--out", str(out)]) == 0
    return out


def _by_hand(images: np.ndarray) -> torch.Tensor:
    """The transform written out: bicubic to floor(16 / 0.8) = 20 px, centre 16, (x - 0.5) / 0.5."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(20, 20), mode="bicubic", align_corners=False).clamp(0, 255)[..., 2:18, 2:18]
    return (x / 255.0 - 0.5) / 0.5


def test_the_checkpoint_records_the_transform_and_encode_applies_it(timm_run, tmp_path):
    recorded = load_state(timm_run / CHECKPOINT, CHECKPOINT_KIND)["model_config"]
    assert recorded["mean"] == recorded["std"] == [0.5, 0.5, 0.5]  # timm's pretrained config
    assert (recorded["interpolation"], recorded["crop_pct"], recorded["input_size"]) == ("bicubic", 0.8, 16)
    encoder = load_encoder(timm_run)
    images = DigitsSource().decode(np.arange(200))
    with torch.no_grad():
        expected = encoder.method.continuous_codes(encoder.model(_by_hand(images)))
        default = InputPipeline(1, 16)(torch.from_numpy(images).permute(0, 3, 1, 2))  # ImageNet-style defaults
        default = encoder.method.continuous_codes(encoder.model(default))
    assert not torch.allclose(default, expected, atol=1e-3)  # the transform changes the codes
    h, _ = encoder.continuous(torch.from_numpy(images).permute(0, 3, 1, 2))
    torch.testing.assert_close(h, expected, rtol=0, atol=1e-5)
    out = tmp_path / "codes.npz"  # decoded at 8 px as trained (by default at the 16-px input size)
    command = ["encode", "--run", str(timm_run), "--images", "digits", "--image-size", "8", "--out", str(out)]
    assert main(command + ["--quiet"]) == 0
    np.testing.assert_array_equal(Codes.load(out).packed[:200], pack_bits(sign(expected).numpy()))


def test_onnx_export_applies_the_recorded_transform(timm_run, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    out = tmp_path / "model.onnx"
    assert main(["export-onnx", "--run", str(timm_run), "--image-size", "8", "--out", str(out)]) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    images = DigitsSource().decode(np.arange(64))
    pixels = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)
    codes, binary = session.run(["codes", "binary"], {"inputs": pixels})
    encoder = load_encoder(timm_run)
    with torch.no_grad():
        expected = encoder.method.continuous_codes(encoder.model(_by_hand(images)))
    np.testing.assert_allclose(codes, expected.numpy(), atol=1e-4)
    np.testing.assert_array_equal(binary, sign(expected).numpy().astype(np.int8))
