"""The head bank: every head of a release run together on shared trunk features.

Linear heads that read the same tap are the common case (most heads sit on ``pooled``),
and N separate ``(B, D) x (D, C_i)`` products waste the time it takes to launch and read
the features N times. So at construction every :class:`~heads.modules.LinearHead` on one
tap is folded into one ``(sum C_i, D)`` weight matrix: a single matmul, then a split.
Any other module (MLP, branch, ...) runs on its own.

The bank is for inference: it is put in eval mode (dropout is the identity there, which is
what makes a LinearHead exactly its ``fc``) and the fused matrices are copies taken when
the bank is built, so build a new bank after changing a head's weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from heads.modules import LinearHead
from heads.spec import NAME_RE
from heads.store import LoadedHead


class HeadBankError(ValueError):
    """A bank cannot be built or fed; the message names the head or the tap."""


class _FusedLinear(nn.Module):
    """Several linear heads on one tap as one matrix; outputs are split back per head."""

    def __init__(self, names: list[str], layers: list[nn.Linear]) -> None:
        super().__init__()
        widths = {layer.in_features for layer in layers}
        if len(widths) != 1:
            raise HeadBankError(f"linear heads {', '.join(names)} read one tap but expect widths {sorted(widths)}")
        self.names = list(names)
        self.sizes = [layer.out_features for layer in layers]
        weight = torch.cat([layer.weight.detach() for layer in layers], dim=0)
        bias = torch.cat([
            layer.bias.detach() if layer.bias is not None else torch.zeros(layer.out_features, dtype=layer.weight.dtype)
            for layer in layers
        ])
        # Buffers, not parameters: they follow .to(device) but are not trained.
        self.register_buffer("weight", weight.clone())
        self.register_buffer("bias", bias.clone())

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = nn.functional.linear(x, self.weight, self.bias)
        return dict(zip(self.names, torch.split(logits, self.sizes, dim=-1)))


def _key(kind: str, name: str) -> str:
    return f"{kind}_{name}"


class HeadBank(nn.Module):
    """Many heads on shared trunk features, linear heads on one tap fused.

    Args:
        heads: ``{head name: LoadedHead}``; the key is the name used for outputs (and
            for the ``<head>_label`` / ``<head>_score`` columns), so it must match
            ``[a-z0-9_]+``. Each head's ``tap`` and ``classes`` come from its meta.

    Attributes:
        names: head names, sorted.
        taps: the distinct taps the heads read, sorted (what to ask the trunk for).
        classes: ``{head name: class names}``; output index i means ``classes[name][i]``.
    """

    def __init__(self, heads: Mapping[str, LoadedHead]) -> None:
        super().__init__()
        if not heads:
            raise HeadBankError("a head bank needs at least one head")
        self.names: list[str] = sorted(heads)
        self.classes: dict[str, list[str]] = {}
        self.head_taps: dict[str, str] = {}
        linear_by_tap: dict[str, list[str]] = {}
        self.singles = nn.ModuleDict()
        for name in self.names:
            head = heads[name]
            if not NAME_RE.match(name):
                raise HeadBankError(f"head name '{name}' must match [a-z0-9_]+")
            if not isinstance(head, LoadedHead):
                raise HeadBankError(f"head '{name}': expected a heads.store.LoadedHead, got {type(head).__name__}")
            classes = head.classes
            if not classes:
                raise HeadBankError(f"head '{name}': field 'classes' is empty")
            self.classes[name] = classes
            self.head_taps[name] = head.tap
            # Exact type only: a subclass may override forward, so only LinearHead itself
            # is known to be `fc` in eval mode.
            if type(head.module) is LinearHead:
                if head.module.fc.out_features != len(classes):
                    raise HeadBankError(f"head '{name}': {head.module.fc.out_features} outputs "
                                        f"but {len(classes)} classes")
                linear_by_tap.setdefault(head.tap, []).append(name)
            else:
                self.singles[_key("head", name)] = head.module
        # ModuleDict keys are prefixed: a head may be called `items` or `keys`, and tap
        # names such as `stages.2` contain dots, which module names may not.
        self.fused_taps: list[str] = sorted(linear_by_tap)
        self.fused = nn.ModuleDict({
            _key("tap", str(i)): _FusedLinear(linear_by_tap[tap], [heads[n].module.fc for n in linear_by_tap[tap]])
            for i, tap in enumerate(self.fused_taps)
        })
        self.taps: list[str] = sorted(set(self.head_taps.values()))
        self.eval()

    def _feature(self, features: Mapping[str, torch.Tensor], tap: str) -> torch.Tensor:
        try:
            return features[tap]
        except KeyError:
            raise HeadBankError(f"features lack tap '{tap}' (have: {', '.join(features) or 'none'}); "
                                f"ask the trunk for bank.taps = {self.taps}") from None

    def forward(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Logits of every head.

        Args:
            features: ``{tap: tensor}`` as returned by ``Trunk.forward(x, bank.taps)``.

        Returns:
            ``{head name: (B, num_classes) logits}`` in sorted name order.
        """
        out: dict[str, torch.Tensor] = {}
        for i, tap in enumerate(self.fused_taps):
            out.update(self.fused[_key("tap", str(i))](self._feature(features, tap)))
        for name in self.names:
            key = _key("head", name)
            if key in self.singles:
                out[name] = self.singles[key](self._feature(features, self.head_taps[name]))
        return {name: out[name] for name in self.names}

    @torch.no_grad()
    def predict(self, features: Mapping[str, torch.Tensor]) -> dict[str, tuple[list[str], torch.Tensor]]:
        """Top-1 label and its softmax probability for every head.

        Args:
            features: ``{tap: tensor}`` as for :meth:`forward`.

        Returns:
            ``{head name: (labels, scores)}``: ``labels`` one class name per image,
            ``scores`` a float32 CPU tensor of the winning class's probability.
        """
        result: dict[str, tuple[list[str], torch.Tensor]] = {}
        for name, logits in self.forward(features).items():
            # Softmax in float32 even if the trunk ran in half precision.
            score, index = torch.softmax(logits.float(), dim=-1).max(dim=-1)
            classes = self.classes[name]
            result[name] = ([classes[i] for i in index.cpu().tolist()], score.cpu())
        return result
