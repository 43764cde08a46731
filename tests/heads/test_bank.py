"""HeadBank: fused linear heads give what each head gives alone; labels map to class names."""

from __future__ import annotations

import pytest
import torch

from heads.bank import HeadBank, HeadBankError
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
    # Three linear heads on pooled share one matrix; the MLPs run alone.
    assert bank.fused_taps == ["pooled", "stages.1"]
    assert tuple(bank.fused["tap_0"].weight.shape) == (2 + 3 + 5, 16)
    assert list(bank.singles) == ["head_count", "head_items"]


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
