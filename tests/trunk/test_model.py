import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import SMALL, TINY_MODELS
from trunk.model import POOLED, Trunk, TrunkError


@pytest.fixture(scope="module", params=TINY_MODELS)
def trunk(request):
    return Trunk(request.param, data_config=SMALL)


def test_declared_tap_shapes_match_forward(trunk):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = trunk(x, list(trunk.taps))
    assert list(out) == list(trunk.taps)
    assert list(trunk.taps)[-1] == POOLED
    for name, spec in trunk.taps.items():
        assert tuple(out[name].shape) == (2, *spec.shape), name


def test_tap_layout_is_maps_for_cnns_and_tokens_for_vits(trunk):
    _, height, width = trunk.data_config["input_size"]
    for name, spec in trunk.taps.items():
        if name == POOLED:
            assert spec.shape == (spec.channels,)
        elif trunk.model_name == "test_vit":
            # One class token plus a 2x2 grid of 16-pixel patches at 32x32.
            assert spec.shape == (1 + 2 * 2, spec.channels), name
        else:
            r = spec.reduction
            assert spec.shape == (spec.channels, -(-height // r), -(-width // r)), name


def test_vit_taps_are_tokens_with_the_class_token_from_one_pass():
    trunk = Trunk("test_vit", data_config=SMALL)
    assert trunk.token_prefix == 1
    x = torch.randn(2, 3, 32, 32)
    taps = ["blocks.1", "blocks.3", POOLED]
    passes = []
    handle = trunk.model.patch_embed.register_forward_hook(lambda *a: passes.append(1))
    try:
        with torch.no_grad():
            out = trunk(x, taps)
    finally:
        handle.remove()
    assert passes == [1], "several taps must come from one forward pass"
    with torch.no_grad():
        tokens = trunk.model.patch_embed(x)
        tokens = trunk.model.norm_pre(trunk.model._pos_embed(tokens))
        by_block = {}
        for i, block in enumerate(trunk.model.blocks):
            tokens = block(tokens)
            by_block[f"blocks.{i}"] = tokens
        maps = trunk.model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    for name, nchw in zip(["blocks.1", "blocks.3"], maps):
        assert out[name].shape == (2, 5, 64)
        # Exactly the tokens the next block reads, class token first ...
        torch.testing.assert_close(out[name], by_block[name], atol=1e-6, rtol=0)
        # ... whose spatial part is timm's NCHW map, row-major.
        torch.testing.assert_close(out[name][:, 1:], nchw.flatten(2).transpose(1, 2), atol=1e-6, rtol=0)
    with torch.no_grad():
        ref = trunk.model.forward_head(trunk.model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(out[POOLED], ref)


def test_taps_named_after_feature_info(trunk):
    modules = [info["module"] for info in trunk.model.feature_info]
    assert list(trunk.taps) == [*modules, POOLED]


def test_pooled_equals_timm_pre_logits(trunk):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = trunk.model.forward_head(trunk.model.forward_features(x), pre_logits=True)
        got = trunk(x, [POOLED])[POOLED]
        # Asking for an intermediate too must not change pooled.
        both = trunk(x, [list(trunk.taps)[0], POOLED])[POOLED]
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(both, ref)


def test_forward_returns_only_requested_taps_and_stops_early(trunk):
    first = list(trunk.taps)[0]
    calls = []
    last_stage = trunk.model.feature_info[-1]["module"]
    handle = trunk.model.get_submodule(last_stage).register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            out = trunk(torch.randn(1, 3, 32, 32), [first])
    finally:
        handle.remove()
    assert list(out) == [first]
    assert calls == [], "the trunk ran past the deepest requested tap"


def test_unknown_tap_lists_valid_ones(trunk):
    with pytest.raises(TrunkError, match="no tap 'nope'; valid taps: .*pooled"):
        trunk(torch.randn(1, 3, 32, 32), ["nope"])


def test_trunk_id_is_a_content_hash(tmp_path):
    a = Trunk("test_resnet", data_config=SMALL)
    assert Trunk("test_resnet", data_config=SMALL).trunk_id == a.trunk_id
    assert Trunk("test_resnet", data_config=SMALL, seed=1).trunk_id != a.trunk_id  # other weights
    assert Trunk("test_resnet", data_config={**SMALL, "input_size": [3, 48, 48]}).trunk_id != a.trunk_id
    assert Trunk("test_resnet", data_config={**SMALL, "mean": [0.4, 0.4, 0.4]}).trunk_id != a.trunk_id
    assert Trunk("test_convnext", data_config=SMALL).trunk_id != a.trunk_id


def test_save_load_roundtrip(tmp_path):
    a = Trunk("test_resnet", data_config=SMALL, seed=3)
    a.save(tmp_path / "t")
    b = Trunk.load(tmp_path / "t")
    assert b.trunk_id == a.trunk_id
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a(x)[POOLED], b(x)[POOLED])


def test_weights_file_loads_and_changes_id(tmp_path):
    src = Trunk("test_resnet", data_config=SMALL, seed=5)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    loaded = Trunk("test_resnet", data_config=SMALL, weights=path)
    assert loaded.trunk_id == src.trunk_id != Trunk("test_resnet", data_config=SMALL).trunk_id


def test_bad_weights_are_clear_errors(tmp_path):
    with pytest.raises(TrunkError, match="weights file not found"):
        Trunk("test_resnet", weights=tmp_path / "missing.safetensors")
    wrong = tmp_path / "wrong.safetensors"
    save_file({"foo": torch.zeros(1)}, str(wrong))
    with pytest.raises(TrunkError, match=r"do not fit 'test_resnet': missing \d+ keys"):
        Trunk("test_resnet", weights=wrong)
    pt = tmp_path / "w.pt"
    pt.write_bytes(b"x")
    with pytest.raises(TrunkError, match="must be a .safetensors file"):
        Trunk("test_resnet", weights=pt)


def test_unknown_model_name():
    with pytest.raises(TrunkError, match="unknown timm model 'resnet_does_not_exist'"):
        Trunk("resnet_does_not_exist")


def test_pretrained_offline_is_one_line_error():
    # No network here: the hub cannot be reached, which must be a clear one-line error. A fresh
    # process, because huggingface_hub reads HF_HUB_OFFLINE at import (without it the same error
    # comes after the hub client's retries, which take most of a minute).
    code = (
        "from trunk.model import Trunk, TrunkError\n"
        "try:\n    Trunk('test_resnet', pretrained=True)\n"
        "except TrunkError as e:\n    print('ERR', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    lines = [line for line in out.stdout.splitlines() if line.startswith("ERR")]
    assert len(lines) == 1, out.stdout + out.stderr
    assert "cannot load pretrained weights for 'test_resnet'" in lines[0]


class _Bomb:
    """Unpickling this creates a folder: proof that something unpickled it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_stored_spec_cannot_make_timm_load_a_checkpoint(tmp_path):
    import json
    import pickle

    saved = Trunk("test_resnet", data_config=SMALL).save(tmp_path / "trunk")
    marker = tmp_path / "unpickled"
    (tmp_path / "evil.pth").write_bytes(pickle.dumps(_Bomb(marker)))
    spec = json.loads((saved / "trunk.json").read_text())
    spec["model_kwargs"] = {"checkpoint_path": str(tmp_path / "evil.pth")}
    (saved / "trunk.json").write_text(json.dumps(spec))
    with pytest.raises(TrunkError, match=r"field 'model_kwargs.checkpoint_path': not an architecture argument"):
        Trunk.load(saved)
    assert not marker.exists()
