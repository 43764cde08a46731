"""Quantized trunks (trunk.quantize): taps, identity, safetensors-only storage, refusals, branch heads.

Tiny timm models with random weights; calibration and test images are random pixels. The
closeness checks are mechanism checks (int8 of a tiny model stays near its fp32 self), not
accuracy claims.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.conftest import SMALL
from trunk.model import POOLED, SPEC_FILE, WEIGHTS_FILE, Trunk, TrunkError
from trunk.quantize import QuantizedTrunk, flatten_state, quantize_trunk, unflatten_state
from trunk.speed import compare_trunks, trunk_size, weight_bytes

pytestmark = pytest.mark.usefixtures("one_thread")


def pixels(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min())


@pytest.fixture(scope="module")
def source():
    return Trunk("test_resnet", data_config=SMALL)


@pytest.fixture(scope="module")
def static(source):
    return quantize_trunk(source, "static", calibration=pixels(16))


@pytest.fixture(scope="module")
def reduced(source, static):
    """One trunk per scheme: static/weight_only/16-bit on a ResNet, dynamic on a ConvNeXt (it has Linear layers)."""
    convnext = Trunk("test_convnext", data_config=SMALL)
    out = {"static": static, "dynamic": quantize_trunk(convnext, "dynamic")}
    for scheme in ("weight_only", "float16", "bfloat16"):
        out[scheme] = quantize_trunk(source, scheme)
    return out


def test_static_int8_taps_keep_their_shapes_and_stay_close_to_fp32(source, static):
    x = pixels(4, seed=1)
    with torch.no_grad():
        ref, out = source(x, list(source.taps)), static(x, list(source.taps))
    assert list(out) == list(source.taps)
    for name, spec in source.taps.items():
        assert out[name].shape == (4, *spec.shape) and out[name].dtype == torch.float32
        assert not torch.equal(out[name], ref[name])  # really another network
        assert cosine(out[name], ref[name]) > 0.9, name
    # The float reference is the source's, weight for weight: branch heads copy it.
    assert all(torch.equal(a, b) for a, b in zip(static.model.state_dict().values(), source.model.state_dict().values()))
    assert static.reduction["units"] == ["conv1+bn1+act1", "layer1", "layer2", "layer3", "layer4"]


@pytest.mark.parametrize("scheme", ["static", "dynamic", "weight_only", "float16", "bfloat16"])
def test_save_load_round_trip_is_exact_and_stores_no_pickle(reduced, scheme, tmp_path):
    trunk = reduced[scheme]
    x = pixels(3, seed=2)
    trunk.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([SPEC_FILE, WEIGHTS_FILE])
    spec = json.loads((tmp_path / SPEC_FILE).read_text())
    assert spec["reduction"]["scheme"] == scheme and spec["trunk_id"] == trunk.trunk_id
    with safe_open(str(tmp_path / WEIGHTS_FILE), framework="pt") as f:  # plain tensors only, nothing to unpickle
        assert f.metadata()["trunk_id"] == trunk.trunk_id
        assert all(not f.get_tensor(k).is_quantized for k in f.keys())
    back = Trunk.load(tmp_path)
    assert isinstance(back, QuantizedTrunk) and back.trunk_id == trunk.trunk_id
    with torch.no_grad():
        a, b = trunk(x, list(trunk.taps)), back(x, list(trunk.taps))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_every_scheme_has_its_own_trunk_id_and_reports_its_serving_bytes(source, reduced):
    ids = {scheme: t.trunk_id for scheme, t in reduced.items()}
    assert len(set(ids.values())) == len(ids) and source.trunk_id not in ids.values()
    assert all(t.reduction["source_trunk_id"] != t.trunk_id for t in reduced.values())
    fp32 = weight_bytes(source)
    assert weight_bytes(reduced["static"]) < fp32 / 3  # int8 values count 1 byte each
    assert weight_bytes(reduced["float16"]) < 0.51 * fp32
    assert weight_bytes(reduced["weight_only"]) == fp32  # dequantized at load: no smaller in memory...
    assert reduced["weight_only"].stored_weight_bytes() < fp32 / 3  # ...but a quarter on disk
    size = trunk_size(reduced["static"])
    assert size["gflops"] == trunk_size(source)["gflops"] and size["params"] == trunk_size(source)["params"]


def test_compare_trunks_times_a_quantized_trunk_against_its_source(source, static):
    out = compare_trunks(source, static, pixels(2), repeats=1, warmup=0, warmup_s=0.0)
    assert out["flops_ratio"] == 1.0 and out["teacher_params"] == out["student_params"]  # the float architecture's
    assert out["student_ms_per_image"] > 0


def test_a_tampered_int8_weight_fails_the_trunk_id_check(static, tmp_path):
    static.save(tmp_path)
    path = tmp_path / WEIGHTS_FILE
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.startswith("serving.") and k.endswith("::int_repr"))
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] += 1
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(TrunkError, match="field 'trunk_id' says .* but the weights hash to"):
        Trunk.load(tmp_path)


def test_a_wrong_layout_is_one_line_naming_the_file(static, tmp_path):
    static.save(tmp_path)
    path = tmp_path / WEIGHTS_FILE
    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata={"trunk_id": static.trunk_id})
    with pytest.raises(TrunkError, match=r"trunk\.safetensors: metadata 'layout' is missing or not JSON"):
        Trunk.load(tmp_path)


def test_flattened_state_rebuilds_quantized_tensors_tuples_and_dtypes():
    w = torch.quantize_per_channel(torch.randn(4, 3), torch.rand(4) + 0.1, torch.zeros(4, dtype=torch.long), 0,
                                   torch.qint8)
    a = torch.quantize_per_tensor(torch.randn(5), 0.05, 3, torch.quint8)
    state = {"w": w, "a": a, "packed": (w, None), "dtype": torch.qint8, "plain": torch.ones(2)}
    tensors, layout = flatten_state(state)
    assert all(isinstance(t, torch.Tensor) and not t.is_quantized for t in tensors.values())
    back = unflatten_state(tensors, json.loads(json.dumps(layout)))
    assert torch.equal(back["w"].int_repr(), w.int_repr()) and back["w"].q_per_channel_axis() == 0
    assert torch.equal(back["w"].q_per_channel_scales(), w.q_per_channel_scales())
    assert (back["a"].q_scale(), back["a"].q_zero_point(), back["a"].dtype) == (0.05, 3, torch.quint8)
    assert back["packed"][1] is None and back["dtype"] is torch.qint8 and torch.equal(back["plain"], torch.ones(2))
    with pytest.raises(TrunkError, match="tensors not in the layout"):
        unflatten_state({**tensors, "stray": torch.zeros(1)}, layout)


def test_refusals_name_the_family_the_scheme_and_what_to_use(source, static):
    vit = Trunk("test_vit")
    with pytest.raises(TrunkError, match=r"^trunk 'test_vit': static int8 quantization is refused for "
                                         r"VisionTransformer trunks: .*use dynamic"):
        quantize_trunk(vit, "static", calibration=pixels(2, size=vit.data_config["input_size"][1]))
    with pytest.raises(TrunkError, match=r"^trunk 'test_resnet': dynamic int8 quantizes Linear layers only and "
                                         r"ResNet has none; use static"):
        quantize_trunk(source, "dynamic")
    with pytest.raises(TrunkError, match="unknown quantization scheme 'int4'; valid: static, dynamic"):
        quantize_trunk(source, "int4")
    with pytest.raises(TrunkError, match="needs calibration images"):
        quantize_trunk(source, "static")
    with pytest.raises(TrunkError, match=r"calibration images must be \(N, 3, 32, 32\)"):
        quantize_trunk(source, "static", calibration=pixels(2, size=16))
    with pytest.raises(TrunkError, match=f"already reduced \\(static\\); quantize its source trunk {source.trunk_id}"):
        quantize_trunk(static, "weight_only")


def test_dynamic_int8_is_the_vit_scheme_and_keeps_token_taps(one_thread):
    vit = Trunk("test_vit")
    q = quantize_trunk(vit, "dynamic")
    x = pixels(2, size=vit.data_config["input_size"][1])
    with torch.no_grad():
        ref, out = vit(x, ["blocks.2", POOLED]), q(x, ["blocks.2", POOLED])
    assert out["blocks.2"].shape == (2, *vit.tap("blocks.2").shape)
    assert cosine(out[POOLED], ref[POOLED]) > 0.9


def test_a_plain_trunk_saves_as_before(source, tmp_path):
    source.save(tmp_path)
    assert "reduction" not in json.loads((tmp_path / SPEC_FILE).read_text())
    with safe_open(str(tmp_path / WEIGHTS_FILE), framework="pt") as f:
        assert f.metadata() == {"trunk_id": source.trunk_id} and set(f.keys()) == set(source.model.state_dict())
    assert type(Trunk.load(tmp_path)) is Trunk


def test_a_branch_head_forks_from_the_quantized_taps_with_the_fp32_suffix(source, static, tmp_path):
    from demo.shapes import generate_shapes
    from heads.branch import BranchHead, branch_kwargs
    from heads.training.branch_train import fit_branch_head
    from tests.heads.training.test_branch_train import head_spec

    from_float = BranchHead(source.tap("layer2").channels, 3, **branch_kwargs(source, "layer2")).init_from_trunk(source)
    from_int8 = BranchHead(static.tap("layer2").channels, 3, **branch_kwargs(static, "layer2")).init_from_trunk(static)
    from_int8.eval()
    assert all(torch.equal(a, b) for a, b in zip(from_float.suffix.state_dict().values(),
                                                  from_int8.suffix.state_dict().values()))
    x = pixels(4, seed=3)
    with torch.no_grad():  # the fp32 suffix on the int8 tap continues to (nearly) the trunk's own pooled vector
        assert cosine(from_int8.features(static(x, ["layer2"])["layer2"]), source(x, [POOLED])[POOLED]) > 0.9

    shapes = generate_shapes(tmp_path / "shapes", n_images=24, n_holdout=0, size=32)
    spec, data = head_spec(tmp_path, shapes.manifests["texture"])
    result = fit_branch_head(spec, data, static, out_dir=tmp_path / "out", augment_ops=None)
    assert result.trunk_id == static.trunk_id and 0.0 <= result.metrics["val_accuracy"] <= 1.0
    assert result.metrics["train_skipped"] == 0
