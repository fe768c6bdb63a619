"""Fine-tuning a timm: backbone: the first stages frozen (weights and norm statistics), layer-wise
learning-rate decay over its blocks; through the CLI on digits with timm's tiny test networks."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from dmuh.cli import main
from dmuh.engine.trainer import make_optimizer
from dmuh.errors import ConfigError
from dmuh.methods import create_method
from dmuh.models import create_model
from dmuh.models.finetune import freeze_stages, layer_decay_groups, stage_count
from dmuh.runs.checkpoint import load_state
from dmuh.runs.config import TrainConfig
from dmuh.runs.files import CHECKPOINT, CHECKPOINT_KIND


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_frozen_stages_keep_their_weights_and_norm_statistics():
    model = create_model("timm:test_resnet", bits=8, input_size=32)
    assert stage_count(model) == 5  # stem, layer1..4
    frozen = freeze_stages(model, 2)  # the stem and layer1
    assert frozen and all(name.startswith(("conv1.", "bn1.", "layer1.")) for name in frozen)
    trainable = [name for name, p in model.backbone.named_parameters() if p.requires_grad]
    assert set(trainable).isdisjoint(frozen) and any(name.startswith("layer2.") for name in trainable)
    model.train()
    assert not model.backbone.layer1[0].bn1.training and model.backbone.layer2[0].bn1.training
    before = {key: value.clone() for key, value in model.backbone.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.features(torch.randn(4, 3, 32, 32)).pow(2).mean().backward()
    optimizer.step()
    after = model.backbone.state_dict()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    # Weights and running statistics of the frozen stages stay; the rest trains (timm zero-inits
    # each residual branch's last norm, so only some of layer2's weights get a gradient yet).
    assert not any(key.startswith(("conv1.", "bn1.", "layer1.")) for key in changed), changed
    assert {"layer2.0.downsample.1.weight", "layer2.0.bn1.running_mean", "layer4.0.bn2.weight"} <= changed
    with pytest.raises(ConfigError, match="freeze_stages 9: model 'timm:test_resnet' has 5 stages"):
        freeze_stages(create_model("timm:test_resnet", bits=8), 9)
    with pytest.raises(ConfigError, match="model 'tv:resnet18' has no stages"):
        freeze_stages(create_model("tv:resnet18", bits=8), 1)


def test_layer_decay_scales_each_block_by_the_next_ones_rate():
    model = create_model("timm:test_vit", bits=8, img_size=16)
    groups = layer_decay_groups(model, 0.5, weight_decay=0.05, scale=0.1)
    scale_of = {}
    for group in groups:
        for p in group["params"]:
            scale_of[id(p)] = (group["lr_scale"], group["weight_decay"])
    named = dict(model.backbone.named_parameters())
    blocks = len(model.backbone.blocks)
    for i in range(blocks - 1):
        ratio = (
            scale_of[id(named[f"blocks.{i}.mlp.fc1.weight"])][0]
            / scale_of[id(named[f"blocks.{i + 1}.mlp.fc1.weight"])][0]
        )
        assert ratio == pytest.approx(0.5)
    assert scale_of[id(named[f"blocks.{blocks - 1}.mlp.fc1.weight"])][0] == pytest.approx(0.1)  # the backbone's rate
    assert scale_of[id(named["patch_embed.proj.weight"])][0] == pytest.approx(0.1 * 0.5**blocks)
    assert scale_of[id(named["blocks.0.mlp.fc1.bias"])][1] == 0.0  # no weight decay on biases and norms
    assert scale_of[id(named["blocks.0.mlp.fc1.weight"])][1] == 0.05
    # The optimiser of a run: every trainable parameter once, the hash layer at --lr, frozen ones out.
    freeze_stages(model, 1)
    config = TrainConfig(model="timm:test_vit", layer_decay=0.5, init="scratch", backbone_lr_scale=0.1)
    method = create_method("dpsh", bits=8, num_train=4, num_classes=2)
    optimizer = make_optimizer(config, model, method)
    listed = [id(p) for group in optimizer.param_groups for p in group["params"]]
    wanted = [id(p) for p in list(model.parameters()) + list(method.parameters()) if p.requires_grad]
    assert sorted(listed) == sorted(wanted) and id(named["patch_embed.proj.weight"]) not in listed
    hash_group = next(g for g in optimizer.param_groups if any(p is model.hash_layer.weight for p in g["params"]))
    assert hash_group["lr_scale"] == 1.0


def test_fine_tuning_through_the_cli(tmp_path, capsys):
    source = timm.create_model("test_vit", pretrained=False, img_size=16)
    weights = tmp_path / "model.safetensors"
    save_file({key: value.contiguous() for key, value in source.state_dict().items()}, str(weights))
    command = ["train", "--method", "dpsh", "--data", "digits", "--protocol", "digits", "--bits", "16"]
    command += ["--model", "timm:test_vit", "--model-param", "img_size=16", "--pretrained", str(weights)]
    command += ["--init", "scratch", "--epochs", "1", "--batch-size", "64", "--trace-items", "0", "--quiet"]
    command += ["--eval-every", "-1", "--train-map-items", "0"]
    out = tmp_path / "run"
    assert main(command + ["--layer-decay", "0.65", "--freeze-stages", "2", "--out", str(out)]) == 0
    state = load_state(out / CHECKPOINT, CHECKPOINT_KIND)["model"]
    loaded = source.state_dict()
    stem = loaded["patch_embed.proj.weight"].sum(1, keepdim=True)  # RGB filters summed for gray digits
    assert torch.equal(state["backbone.patch_embed.proj.weight"], stem)  # frozen: the stem and blocks.0
    assert torch.equal(state["backbone.blocks.0.attn.qkv.weight"], loaded["blocks.0.attn.qkv.weight"])
    assert not torch.equal(state["backbone.blocks.1.attn.qkv.weight"], loaded["blocks.1.attn.qkv.weight"])
    capsys.readouterr()
    code = main(
        ["train", "--data", "digits", "--model", "tv:resnet18", "--freeze-stages", "1", "--out", str(tmp_path / "x")]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--freeze-stages 1: needs a timm: backbone" in err
