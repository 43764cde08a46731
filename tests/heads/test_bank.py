"""HeadBank: fused, grouped and shared heads give what each head gives alone; labels map to class names."""

from __future__ import annotations

import pytest
import torch

import heads.bank as bank_module
from heads.bank import HeadBank, HeadBankError, quantize_rows
from heads.branch import BranchHead, branch_kwargs
from heads.modules import LinearHead, MLPHead
from heads.store import LoadedHead, load_head, save_head


def make_head(name: str, module: torch.nn.Module, tap: str, n_classes: int) -> LoadedHead:
    classes = [f"{name}_c{i}" for i in range(n_classes)]
    return LoadedHead(module=module.eval(), meta={"name": name, "tap": tap, "classes": classes})


def random_bank_heads(seed: int = 0) -> dict[str, LoadedHead]:
    torch.manual_seed(seed)
    heads = {
        "colour": make_head("colour", LinearHead(16, 3, dropout=0.5), "pooled", 3),
        "shape": make_head("shape", LinearHead(16, 5), "pooled", 5),
        "binary": make_head("binary", LinearHead(16, 2), "pooled", 2),
        "count": make_head("count", MLPHead(16, 4, hidden=8, dropout=0.3), "pooled", 4),
        "early": make_head("early", LinearHead(8, 7), "stages.1", 7),
        # a head name that is also a ModuleDict method, and a tap name with a dot
        "items": make_head("items", MLPHead(8, 3, hidden=4), "stages.1", 3),
    }
    for head in heads.values():
        for p in head.module.parameters():
            torch.nn.init.normal_(p, std=0.5)
    return heads


def test_bank_names_taps_and_fusion_layout():
    heads = random_bank_heads()
    bank = HeadBank(heads)
    assert bank.names == ["binary", "colour", "count", "early", "items", "shape"]
    assert bank.taps == ["pooled", "stages.1"]
    assert not bank.training
    # Three linear heads on pooled share one matrix; each MLP is a group of one (other hidden, tap).
    assert bank.fused_taps == ["pooled", "stages.1"]
    assert tuple(bank.fused["tap_0"].weight.shape) == (2 + 3 + 5, 16)
    assert bank.group_keys == [("pooled", 16, 8, "none"), ("stages.1", 8, 4, "none")]
    assert [g.names for g in bank.grouped.values()] == [["count"], ["items"]]
    assert list(bank.singles) == []


def test_fused_outputs_equal_each_head_alone():
    heads = random_bank_heads(seed=1)
    bank = HeadBank(heads)
    torch.manual_seed(2)
    features = {"pooled": torch.randn(11, 16), "stages.1": torch.randn(11, 8), "unused": torch.randn(11, 3)}
    with torch.inference_mode():
        fused = bank(features)
        assert list(fused) == bank.names
        for name, head in heads.items():
            alone = head.module(features[head.tap])
            assert fused[name].shape == alone.shape == (11, len(head.classes))
            torch.testing.assert_close(fused[name], alone, atol=1e-5, rtol=0)


def test_predict_maps_labels_to_class_names():
    heads = random_bank_heads(seed=3)
    bank = HeadBank(heads)
    features = {"pooled": torch.randn(9, 16), "stages.1": torch.randn(9, 8)}
    predictions = bank.predict(features)
    assert list(predictions) == bank.names
    for name, (labels, scores) in predictions.items():
        head = heads[name]
        with torch.no_grad():
            probs = torch.softmax(head.module(features[head.tap]), dim=-1)
        assert labels == [head.classes[i] for i in probs.argmax(-1).tolist()]
        assert scores.dtype == torch.float32 and scores.shape == (9,)
        torch.testing.assert_close(scores, probs.max(-1).values, atol=1e-5, rtol=0)
        assert all(lab.startswith(f"{name}_c") for lab in labels)


def test_bank_from_saved_heads_follows_dtype_moves(tmp_path):
    heads = random_bank_heads(seed=4)
    for name, head in heads.items():
        target = f"heads.modules.{type(head.module).__name__}"
        kwargs = {"hidden": head.module.net[0].out_features} if isinstance(head.module, MLPHead) else {}
        in_features = 8 if head.tap == "stages.1" else 16
        save_head(tmp_path / name, head.module, {**head.meta, "target": target, "kwargs": kwargs,
                                                 "in_features": in_features, "num_classes": len(head.classes),
                                                 "trunk_id": "t0"})
    bank = HeadBank({name: load_head(tmp_path / name) for name in heads}).to(torch.float64)
    features = {"pooled": torch.randn(4, 16, dtype=torch.float64), "stages.1": torch.randn(4, 8, dtype=torch.float64)}
    out = bank(features)
    assert all(t.dtype == torch.float64 for t in out.values())
    torch.testing.assert_close(out["shape"], heads["shape"].module.double()(features["pooled"]))


def test_bank_errors_name_the_head_or_tap():
    heads = random_bank_heads()
    with pytest.raises(HeadBankError, match="features lack tap 'stages.1'"):
        HeadBank(heads)({"pooled": torch.randn(2, 16)})
    bad = make_head("shape", LinearHead(16, 5), "pooled", 4)
    with pytest.raises(HeadBankError, match="head 'shape': 5 outputs but 4 classes"):
        HeadBank({"shape": bad})
    with pytest.raises(HeadBankError, match="head name 'Bad-Name'"):
        HeadBank({"Bad-Name": heads["shape"]})
    with pytest.raises(HeadBankError, match="at least one head"):
        HeadBank({})


# -- MLP groups, branch prefixes, weight precision ---------------------------------------------
class TwiceMLP(MLPHead):
    """A subclass may override forward: the bank must run it on its own, not grouped."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def make_branch(trunk, tap: str, n_classes: int, freeze_blocks: int, seed: int) -> BranchHead:
    """A branch initialised from the trunk, its unfrozen layers 'fine-tuned' (perturbed) by seed."""
    head = BranchHead(trunk.tap(tap).channels, n_classes,
                      **branch_kwargs(trunk, tap, freeze_blocks=freeze_blocks)).init_from_trunk(trunk)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return head.eval()


@pytest.fixture(scope="module")
def mixed_heads(tiny_trunk):
    """Linear, MLP (several class counts, two hidden sizes, a subclass) and branch heads on four taps."""
    torch.manual_seed(7)
    width = tiny_trunk.tap("pooled").channels
    heads = {
        "lin_a": make_head("lin_a", LinearHead(width, 3), "pooled", 3),
        "lin_b": make_head("lin_b", LinearHead(width, 11), "pooled", 11),
        # "extra": a vector tap next to the trunk's (features are whatever the caller hands in)
        "lin_extra": make_head("lin_extra", LinearHead(16, 4), "extra", 4),
        "mlp_extra": make_head("mlp_extra", MLPHead(16, 6, hidden=8), "extra", 6),
        "twice": make_head("twice", TwiceMLP(width, 5, hidden=8), "pooled", 5),
    }
    # Class counts 2, 3 | 5, 9 | 40 (two buckets would pad more than 2x), hidden 8; two of hidden 6.
    for i, n in enumerate([2, 3, 5, 9, 40]):
        heads[f"mlp_h8_{i}"] = make_head(f"mlp_h8_{i}", MLPHead(width, n, hidden=8, dropout=0.5), "pooled", n)
    for i, n in enumerate([7, 7]):
        heads[f"mlp_h6_{i}"] = make_head(f"mlp_h6_{i}", MLPHead(width, n, hidden=6), "pooled", n)
    for p in (p for h in heads.values() for p in h.module.parameters()):
        torch.nn.init.normal_(p, std=0.5)
    # Branches on layer2: two share entry + layer3 (frozen), one shares them and freezes layer4 too,
    # one freezes nothing; one on layer2 whose frozen layer3 differs; one on layer1.
    specs = {"br_f1_a": ("layer2", 1), "br_f1_b": ("layer2", 1), "br_f2": ("layer2", 2), "br_f0": ("layer2", 0),
             "br_other": ("layer2", 1), "br_l1": ("layer1", 1)}
    for i, (name, (tap, freeze)) in enumerate(specs.items()):
        heads[name] = make_head(name, make_branch(tiny_trunk, tap, 3 + i, freeze, seed=i), tap, 3 + i)
    with torch.no_grad():
        heads["br_other"].module.suffix.blocks[0][0].conv1.weight.mul_(1.5)
    return heads


def trunk_features(trunk, taps, n: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        features = trunk(x, [t for t in taps if t != "extra"])
    return {**features, "extra": torch.randn(n, 16, generator=torch.Generator().manual_seed(seed + 1))}


@pytest.mark.usefixtures("one_thread")
def test_mixed_bank_equals_each_head_alone(tiny_trunk, mixed_heads):
    bank = HeadBank(mixed_heads)
    assert bank.taps == ["extra", "layer1", "layer2", "pooled"]
    assert list(bank.singles) == ["head_twice"]
    # One group per (tap, width, hidden); the hidden-8 group cut into three padded buckets.
    assert [g.names for g in bank.grouped.values()] == [["mlp_extra"], ["mlp_h6_0", "mlp_h6_1"],
                                                        [f"mlp_h8_{i}" for i in range(5)]]
    assert bank.grouped["group_2"].buckets == [(0, 2, 3), (2, 4, 9), (4, 5, 40)]
    assert tuple(bank.grouped["group_2"].w1.shape) == (96, 5 * 8)  # stored (D, G*H) in float32
    # layer2 tree: entry is shared by all four, layer3 by the three whose copies are equal.
    tree = bank.branches["tap_1"]
    assert bank.branch_taps == ["layer1", "layer2"] and tree.names == ["br_f0", "br_f1_a", "br_f1_b", "br_f2",
                                                                       "br_other"]
    assert len(tree.stages) == 1 + 2 + 1  # entry; layer3 shared + layer3 of br_other; br_f2's layer4
    assert tree.starts[1][0] == tree.starts[2][0] == tree.parents[tree.starts[3][0]]
    features = trunk_features(tiny_trunk, bank.taps)
    with torch.inference_mode():
        out = bank(features)
        assert list(out) == bank.names
        for name, head in mixed_heads.items():
            alone = head.module(features[head.tap])
            assert out[name].shape == alone.shape == (6, len(head.classes))
            torch.testing.assert_close(out[name], alone, atol=1e-5, rtol=1e-5)


def test_default_bank_is_today_bit_for_bit(mixed_heads, tiny_trunk):
    bank = HeadBank(mixed_heads)
    assert bank.weight_dtype is None
    assert all(b.dtype == torch.float32 for b in bank.buffers() if b.is_floating_point())
    features = trunk_features(tiny_trunk, bank.taps, seed=1)
    names = ["lin_a", "lin_b"]
    weight = torch.cat([mixed_heads[n].module.fc.weight for n in names])
    bias = torch.cat([mixed_heads[n].module.fc.bias for n in names])
    with torch.inference_mode():
        out = bank(features)
        today = torch.split(torch.nn.functional.linear(features["pooled"], weight, bias), [3, 11], dim=-1)
        assert out["lin_extra"].equal(mixed_heads["lin_extra"].module.fc(features["extra"]))
        assert all(torch.equal(out[n], t) for n, t in zip(names, today))
        explicit = HeadBank(mixed_heads, weight_dtype="float32")(features)
        assert all(torch.equal(out[n], explicit[n]) for n in bank.names)


def test_bf16_bank_agrees_with_fp32_on_top1():
    # 1000-class heads on a 512-wide tap, as in a large release.
    torch.manual_seed(3)
    heads = {f"lin_{i}": make_head(f"lin_{i}", LinearHead(512, 1000), "pooled", 1000) for i in range(4)}
    heads.update({f"mlp_{i}": make_head(f"mlp_{i}", MLPHead(512, 1000, hidden=64), "pooled", 1000)
                  for i in range(4)})
    features = {"pooled": torch.randn(256, 512, generator=torch.Generator().manual_seed(4))}
    full, half = HeadBank(heads), HeadBank(heads, weight_dtype=torch.bfloat16)
    assert half.weight_dtype is torch.bfloat16 and half.fused["tap_0"].weight.dtype == torch.bfloat16
    with torch.inference_mode():
        ref, low = full(features), half(features)
    for name in heads:
        assert low[name].dtype == torch.float32
        # bf16 keeps 8 significant bits, so every rounding is off by at most 2^-9 relative. A
        # linear head rounds input, weight and result (about 3 * 2^-9 of a logit's scale at
        # most, observed about half that); an MLP does so twice, through both layers. 2^-6 =
        # 8 * 2^-9 covers both with room, and is still far below a real bug's error.
        err = (low[name] - ref[name]).abs().max().item()
        assert err <= 2 ** -6 * ref[name].abs().max().item()
        # A label can only change where the fp32 top two are nearer than twice that error: a
        # small share of rows with 1000 classes (observed 0.4-2% over seeds), never a clear winner.
        top = ref[name].topk(2, dim=-1).values
        changed = low[name].argmax(-1) != ref[name].argmax(-1)
        assert changed.float().mean().item() <= 0.05
        assert bool((top[changed, 0] - top[changed, 1] <= 2 * err).all())


def test_reduced_bank_errors_and_moves(mixed_heads):
    with pytest.raises(HeadBankError, match="weight_dtype must be one of float32, bfloat16, float16, int8 or None"):
        HeadBank(mixed_heads, weight_dtype="int4")
    bank = HeadBank(mixed_heads, weight_dtype="float16")
    assert bank.grouped["group_0"].w1.dtype == torch.float16
    # Branch heads (and other singles) keep their own weights.
    assert bank.branches["tap_0"].heads[0].fc.weight.dtype == torch.float32


def int8_error_bound(x: torch.Tensor, weight: torch.Tensor, activations: bool) -> torch.Tensor:
    """Largest |int8 logit - float32 logit| per (row, output): weight rounding, plus activation rounding.

    Weights round to within half their row's step (absmax / 127). The quantized engine also
    rounds the batch's activations to 7 bits over [min(x, 0), max(x, 0)] (``reduce_range``).
    """
    w_half = weight.abs().amax(dim=1) / 127 / 2
    x_half = (x.max().clamp(min=0) - x.min().clamp(max=0)) / 127 / 2 if activations else torch.tensor(0.0)
    bound = x.abs() @ w_half[None, :].expand(x.shape[1], -1) + x_half * weight.abs().sum(dim=1) \
        + x.shape[1] * w_half * x_half
    return bound * 1.01 + 1e-5


def int8_heads(seed: int, width: int = 256, n_classes: int = 500) -> dict[str, LoadedHead]:
    torch.manual_seed(seed)
    heads = {f"lin_{i}": make_head(f"lin_{i}", LinearHead(width, n_classes), "pooled", n_classes) for i in range(3)}
    heads.update({f"mlp_{i}": make_head(f"mlp_{i}", MLPHead(width, n_classes, hidden=32), "pooled", n_classes)
                  for i in range(3)})
    return heads


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("engine", [True, False], ids=["quantized-engine", "dequantized"])
def test_int8_bank_stays_within_its_rounding_and_agrees_on_top1(engine, monkeypatch):
    if not engine:  # the GPU / no-engine route: int8 weights dequantized per chunk
        monkeypatch.setattr(bank_module, "_int8_engine", lambda: None)
    elif bank_module._int8_engine() is None:
        pytest.skip("this torch has no quantized CPU engine")
    heads = int8_heads(seed=5)
    x = torch.relu(torch.randn(128, 256, generator=torch.Generator().manual_seed(6)))
    full, low = HeadBank(heads), HeadBank(heads, weight_dtype="int8")
    assert low.weight_dtype is torch.int8 and low.fused["tap_0"].int8.packed == engine
    with torch.inference_mode():
        ref, out = full({"pooled": x}), low({"pooled": x})
    for name, head in heads.items():
        assert out[name].dtype == torch.float32 and out[name].shape == ref[name].shape
        err = (out[name] - ref[name]).abs()
        if name.startswith("lin_"):
            bound = int8_error_bound(x, head.module.fc.weight.detach(), activations=engine)
            assert bool((err <= bound).all()), float((err - bound).max())
            # A label can change only where the fp32 top two are nearer than twice the bound.
            top = ref[name].topk(2, dim=-1)
            changed = out[name].argmax(-1) != top.indices[:, 0]
            margin = top.values[:, 0] - top.values[:, 1]
            assert bool((margin[changed] <= 2 * bound.max(dim=1).values[changed]).all())
        else:  # two rounded layers: a few percent of the logits' scale, not a wrong-matrix error
            assert err.max().item() <= 0.05 * ref[name].abs().max().item()
        assert (out[name].argmax(-1) == ref[name].argmax(-1)).float().mean().item() >= 0.9
    # A quarter of float32's bytes, plus a float scale per row.
    assert low.weight_bytes() < 0.27 * full.weight_bytes()


def test_int8_scales_are_per_row_so_tiny_rows_keep_their_precision():
    gen = torch.Generator().manual_seed(8)
    tiny, huge = LinearHead(64, 4), LinearHead(64, 4)
    with torch.no_grad():
        tiny.fc.weight.copy_(1e-4 * torch.randn(4, 64, generator=gen))
        huge.fc.weight.copy_(1e3 * torch.randn(4, 64, generator=gen))
        tiny.fc.bias.zero_()
        huge.fc.bias.zero_()
    heads = {"tiny": make_head("tiny", tiny, "pooled", 4), "huge": make_head("huge", huge, "pooled", 4)}
    bank = HeadBank(heads, weight_dtype="int8")
    matrix = bank.fused["tap_0"].int8
    weight = torch.cat([huge.fc.weight, tiny.fc.weight]).detach()  # sorted names: huge, tiny
    # One symmetric scale per output row: absmax / 127, so each row uses all of -127..127.
    torch.testing.assert_close(matrix.scale, weight.abs().amax(dim=1) / 127)
    q = matrix.weight_int8()
    assert q.dtype == torch.int8 and tuple(q.shape) == (8, 64)
    assert (q.abs().amax(dim=1) == 127).all()
    assert bool(((q.float() * matrix.scale[:, None] - weight).abs() <= matrix.scale[:, None] / 2 + 1e-12).all())
    q2, s2 = quantize_rows(weight)
    assert torch.equal(q2, q) and torch.equal(s2, matrix.scale)
    x = torch.randn(16, 64, generator=gen)
    with torch.inference_mode():
        out = bank({"pooled": x})
    ref = x @ tiny.fc.weight.detach().t()
    # One scale for the whole matrix would round every tiny weight to 0 (1e-4 << 1e3 / 127).
    assert (out["tiny"] - ref).abs().max().item() <= 0.03 * ref.abs().max().item()
    assert bool((torch.round(tiny.fc.weight / (weight.abs().max() / 127)) == 0).all())


def test_int8_bank_moves_pickles_and_keeps_its_outputs():
    import pickle

    heads = int8_heads(seed=9, width=32, n_classes=20)
    bank = HeadBank(heads, weight_dtype="int8")
    x = {"pooled": torch.randn(5, 32, generator=torch.Generator().manual_seed(10))}
    with torch.inference_mode():
        before = bank(x)
        state = bank.state_dict()
        assert state["fused.tap_0.int8.q"].dtype == torch.int8 and tuple(state["fused.tap_0.int8.q"].shape) == (60, 32)
        moved = pickle.loads(pickle.dumps(bank.cpu()))  # what the Ray backend does with a bank
        after = moved(x)
        half = bank({"pooled": x["pooled"].half()}) if bank_module._int8_engine() else None
    assert all(torch.equal(before[n], after[n]) for n in before)
    if half is not None:  # logits come back in the features' dtype
        assert all(v.dtype == torch.float16 for v in half.values())
