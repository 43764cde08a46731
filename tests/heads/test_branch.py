"""Branch heads on timm's tiny models: exact fork, rebuild from the spec, freezing, cost, errors."""

from __future__ import annotations

import functools

import pytest
import timm
import torch
from safetensors import safe_open

from heads.branch import (
    BranchHead,
    branch_input,
    branch_input_shape,
    branch_kwargs,
    branch_taps,
    check_branch_tap,
    register_suffix,
)
from heads.training.cost import measure_cost
from heads.modules import LinearHead
from heads.store import WEIGHTS_FILE, load_head, save_head
from trunk.model import POOLED, Trunk

MODELS = ["test_resnet", "test_convnext", "test_efficientnet", "test_vit"]
DATA = {"input_size": [3, 32, 32], "crop_pct": 1.0}
TARGET = "heads.branch.BranchHead"


@functools.lru_cache(maxsize=None)
def trunk_for(model_name: str) -> Trunk:
    return Trunk(model_name, data_config=DATA, seed=1)


# Parametrized from the trunks themselves, so a new branchable tap is tested when it appears.
CASES = [(m, tap) for m in MODELS for tap in branch_taps(trunk_for(m))]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models on a shared CPU run faster on one thread."""


def make_branch(trunk: Trunk, tap: str, num_classes: int = 3, **kwargs) -> BranchHead:
    return BranchHead(trunk.tap(tap).channels, num_classes, **branch_kwargs(trunk, tap, **kwargs))


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_branch_taps_are_every_tap_but_the_last():
    expected = {
        "test_resnet": ["act1", "layer1", "layer2", "layer3"],
        "test_convnext": ["stages.0", "stages.1", "stages.2"],
        "test_efficientnet": ["blocks.0", "blocks.1", "blocks.2", "blocks.3"],
        "test_vit": ["blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4"],
    }
    assert {m: branch_taps(trunk_for(m)) for m in MODELS} == expected


@pytest.mark.parametrize("model_name, tap", CASES)
def test_initialised_branch_reproduces_the_trunks_pooled_output(model_name, tap):
    trunk = trunk_for(model_name)
    x = images()
    with torch.no_grad():
        pooled = trunk(x, [POOLED])[POOLED]
        inputs = branch_input(trunk, x, tap)
        fresh = make_branch(trunk, tap).eval()
        head = make_branch(trunk, tap).init_from_trunk(trunk).eval()
        features = head.features(inputs)
        logits = head(inputs)
    assert tuple(inputs.shape[1:]) == branch_input_shape(trunk, tap)
    assert features.shape == pooled.shape
    torch.testing.assert_close(features, pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, head.fc(pooled), atol=1e-5, rtol=0)
    # Not vacuous: the same architecture with its own random weights gives other features.
    assert not torch.allclose(fresh.features(inputs), pooled, atol=1e-3)


@pytest.mark.parametrize("model_name, tap", CASES)
def test_save_load_round_trip_rebuilds_without_the_trunk(tmp_path, model_name, tap):
    trunk = trunk_for(model_name)
    x = branch_input(trunk, images(4, seed=1), tap)
    head = make_branch(trunk, tap, freeze_blocks=1, dropout=0.1).init_from_trunk(trunk).train()
    # One training step so the weights are neither the trunk's nor a fresh init.
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=0.1)
    torch.nn.functional.cross_entropy(head(x), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    head.eval()
    kwargs = branch_kwargs(trunk, tap, freeze_blocks=1, dropout=0.1)
    meta = {"name": "shape", "tap": tap, "target": TARGET, "kwargs": kwargs,
            "in_features": trunk.tap(tap).channels, "num_classes": 3, "classes": ["a", "b", "c"],
            "trunk_id": trunk.trunk_id}
    save_head(tmp_path, head, meta)
    loaded = load_head(tmp_path).module
    assert isinstance(loaded, BranchHead) and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), head(x))
    with safe_open(str(tmp_path / WEIGHTS_FILE), framework="pt") as f:
        assert set(f.keys()) == set(head.state_dict())
        # Only the suffix and the classifier are stored: none of the shared prefix.
        assert all(k.startswith(("suffix.", "fc.")) for k in f.keys())


@pytest.mark.parametrize("model_name", MODELS)
def test_frozen_blocks_get_no_gradient_and_stay_in_eval_mode(model_name):
    trunk = trunk_for(model_name)
    tap = branch_taps(trunk)[0]
    head = make_branch(trunk, tap, freeze_blocks=2).init_from_trunk(trunk).train()
    blocks = list(head.suffix.blocks)
    frozen, trained = torch.nn.ModuleList(blocks[:2]).eval(), [*blocks[2:], head.suffix.post, head.fc]
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    x = branch_input(trunk, images(4), tap)
    head(x).sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in frozen.parameters())
    assert all(not m.training for block in blocks[:2] for m in block.modules())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for part in trained for p in part.parameters())
    # Frozen batch-norm statistics are not updated by a training-mode forward pass.
    assert all(torch.equal(before[k], v) for k, v in frozen.state_dict().items())
    head.eval().train()
    assert all(not m.training for block in blocks[:2] for m in block.modules()) and head.fc.training


@pytest.mark.parametrize("model_name", MODELS)
def test_cost_counts_the_copied_layers(model_name):
    trunk = trunk_for(model_name)
    tap = branch_taps(trunk)[-1]
    head = make_branch(trunk, tap).init_from_trunk(trunk)
    branch = measure_cost(head, branch_input_shape(trunk, tap), batch_size=2, repeats=1)
    linear = measure_cost(LinearHead(trunk.tap(POOLED).channels, 3), trunk.tap(POOLED).channels,
                          batch_size=2, repeats=1)
    assert branch["params"] == sum(p.numel() for p in head.parameters())
    assert branch["added_gflops"] > linear["added_gflops"] > 0


@pytest.mark.parametrize("model_name", MODELS)
def test_unknown_tap_is_a_one_line_error_listing_valid_taps(model_name):
    trunk = trunk_for(model_name)
    valid = branch_taps(trunk)
    last = [info["module"] for info in trunk.model.feature_info][-1]
    for bad in ("nope", last, POOLED):
        with pytest.raises(ValueError) as info:
            check_branch_tap(trunk, bad)
        message = str(info.value)
        assert "\n" not in message and f"'{bad}'" in message and ", ".join(valid) in message
        with pytest.raises(ValueError, match=f"valid branch taps: {', '.join(valid)}$"):
            BranchHead(8, 3, model_name=model_name, tap=bad)


def test_vit_branches_run_off_one_trunk_pass():
    # Every ViT branch reads its tap straight from one trunk call asking for all of them.
    trunk = trunk_for("test_vit")
    taps = branch_taps(trunk)
    x = images(3, seed=2)
    with torch.no_grad():
        out = trunk(x, [*taps, POOLED])
        for tap in taps:
            assert branch_input_shape(trunk, tap) == trunk.tap(tap).shape == (1 + 2 * 2, 64)
            torch.testing.assert_close(branch_input(trunk, x, tap), out[tap], atol=0, rtol=0)
            head = make_branch(trunk, tap).init_from_trunk(trunk).eval()
            torch.testing.assert_close(head.features(out[tap]), out[POOLED], atol=1e-5, rtol=0)


def test_vit_branch_refuses_a_map_without_its_class_token():
    trunk = trunk_for("test_vit")
    head = make_branch(trunk, "blocks.2").init_from_trunk(trunk).eval()
    # timm's own NCHW map of the same block: the class token is gone.
    nchw = trunk.model.forward_intermediates(images(), indices=[2], intermediates_only=True)[0]
    with pytest.raises(ValueError, match="prefix token"):
        head(nchw)


def test_wrong_arguments_are_clear_errors():
    trunk = trunk_for("test_resnet")
    with pytest.raises(ValueError, match="tap 'layer2' of 'test_resnet' has 48 channels, got in_features=7"):
        BranchHead(7, 3, model_name="test_resnet", tap="layer2")
    with pytest.raises(ValueError, match="freeze_blocks=3: the branch at 'layer2' has 2 blocks"):
        make_branch(trunk, "layer2", freeze_blocks=3)
    with pytest.raises(ValueError, match="module.tap is set by the platform"):
        branch_kwargs(trunk, "layer2", tap="layer1")
    with pytest.raises(ValueError, match="trunk is 'test_resnet'"):
        BranchHead(24, 3, model_name="test_convnext", tap="stages.0").init_from_trunk(trunk)


def test_suffix_registry_refuses_duplicates_and_names_supported_families():
    with pytest.raises(ValueError, match="already registered"):
        register_suffix(timm.models.resnet.ResNet)(lambda model, tap: None)
    with pytest.raises(ValueError, match="do not support ByobNet models; supported: .*ResNet"):
        BranchHead(8, 3, model_name="test_byobnet", tap="stages.0")
