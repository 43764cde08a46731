"""The head bank: every head of a release run together on shared trunk features.

Hundreds of heads run as a few kernels, not hundreds:

- every :class:`~heads.modules.LinearHead` on one tap is folded into one ``(sum C_i, D)``
  weight matrix: a single matmul, then a split;
- :class:`~heads.modules.MLPHead` modules on one tap with the same ``(in_features, hidden)``
  form a group: their first layers read the same input, so they are one fused
  ``(sum H, D)`` linear; after the GELU their second layers run as batched matrix
  products (``torch.baddbmm``) over heads, outputs padded to the largest class count of
  a bucket of similar class counts (so padding never more than doubles a bucket's work),
  then cut back per head;
- :class:`~heads.branch.BranchHead` modules forking at one tap whose frozen prefix
  stages (:meth:`~heads.branch.BranchHead.prefix_stages`) are identical, module for
  module and tensor for tensor, run that prefix once and continue each from its output;
- any other module runs on its own.

Weight precision (``weight_dtype``). 256 heads of 1000 classes on a 2048-wide tap are
2 GB of float32 weights, read once per batch: at small batches the heads' time is the
memory bandwidth it takes to stream them, not their multiply-adds. ``weight_dtype=
torch.bfloat16`` stores the fused and grouped matrices in bfloat16 (half the bytes) and
computes in it: on CPUs with AVX512-BF16/AMX, oneDNN multiplies bf16 and accumulates in
fp32, rounding only the result. Logits come back in the features' dtype. ``None`` (the
default) keeps the heads' own dtype and gives today's outputs bit for bit. Branch and
other single modules always keep their own weights.

The bank is for inference: it is put in eval mode (dropout is the identity there, which is
what makes a LinearHead exactly its ``fc`` and an MLPHead its two layers and GELU) and the
fused matrices are copies taken when the bank is built, so build a new bank after
changing a head's weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from heads.branch import BranchHead
from heads.modules import LinearHead, MLPHead
from heads.spec import NAME_RE
from heads.store import LoadedHead

# Accepted weight_dtype spellings; None keeps the heads' own dtype.
WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# A new layer-2 bucket starts when a head has more than this many times the bucket's smallest class count.
_PAD_FACTOR = 2


class HeadBankError(ValueError):
    """A bank cannot be built or fed; the message names the head or the tap."""


def resolve_weight_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """``None``, a torch dtype or its name (``"bfloat16"``) as the bank's weight dtype."""
    if value is None:
        return None
    if isinstance(value, str) and value in WEIGHT_DTYPES:
        return WEIGHT_DTYPES[value]
    if isinstance(value, torch.dtype) and value in WEIGHT_DTYPES.values():
        return value
    raise HeadBankError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)} or None, got {value!r}")


def _bias(layer: nn.Linear) -> torch.Tensor:
    if layer.bias is not None:
        return layer.bias.detach()
    return torch.zeros(layer.out_features, dtype=layer.weight.dtype, device=layer.weight.device)


class _Reduced(nn.Module):
    """A fused module whose buffers may be stored in a reduced dtype (``cast``: inputs follow them)."""

    cast = False

    def _in(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return x.to(like.dtype) if self.cast else x

    def _out(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return y.to(x.dtype) if self.cast else y

    def reduce(self, dtype: torch.dtype | None) -> _Reduced:
        if dtype is not None:
            self.to(dtype)
            self.cast = True
        return self


class _FusedLinear(_Reduced):
    """Several linear heads on one tap as one matrix; outputs are split back per head."""

    def __init__(self, names: list[str], layers: list[nn.Linear]) -> None:
        super().__init__()
        widths = {layer.in_features for layer in layers}
        if len(widths) != 1:
            raise HeadBankError(f"linear heads {', '.join(names)} read one tap but expect widths {sorted(widths)}")
        self.names = list(names)
        self.sizes = [layer.out_features for layer in layers]
        weight = torch.cat([layer.weight.detach() for layer in layers], dim=0)
        bias = torch.cat([_bias(layer) for layer in layers])
        # Buffers, not parameters: they follow .to(device) but are not trained.
        self.register_buffer("weight", weight.clone())
        self.register_buffer("bias", bias.clone())

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self._out(nn.functional.linear(self._in(x, self.weight), self.weight, self.bias), x)
        return dict(zip(self.names, torch.split(logits, self.sizes, dim=-1)))


def _mlp_layers(module: nn.Module) -> tuple[nn.Linear, nn.GELU, nn.Linear] | None:
    """An MLPHead's two linears and GELU, or None when its ``net`` is not the stock one."""
    net = getattr(module, "net", None)
    kinds = (nn.Linear, nn.GELU, nn.Dropout, nn.Linear)
    if not isinstance(net, nn.Sequential) or len(net) != 4 or not all(type(m) is k for m, k in zip(net, kinds)):
        return None
    return net[0], net[1], net[3]


class _GroupedMLP(_Reduced):
    """MLP heads on one tap with one (in_features, hidden, GELU): one fused layer 1, batched layer 2.

    Heads are ordered by class count and cut into buckets whose largest count is at most
    :data:`_PAD_FACTOR` times the smallest; each bucket's second layers are one
    ``(g, B, H) x (g, H, C_max)`` batched product over zero-padded weights. Padded
    columns are computed and dropped: every output column depends only on its own weights.
    """

    def __init__(self, names: list[str], modules: list[nn.Module], approximate: str) -> None:
        super().__init__()
        layers = [_mlp_layers(m) for m in modules]
        order = sorted(range(len(names)), key=lambda i: (layers[i][2].out_features, names[i]))
        self.names = [names[i] for i in order]
        firsts = [layers[i][0] for i in order]
        seconds = [layers[i][2] for i in order]
        self.hidden = firsts[0].out_features
        self.approximate = approximate
        self.sizes = [layer.out_features for layer in seconds]
        # Layer 1 stored (D, G*H): in float32 a small batch reads that layout about 1.6x faster
        # than the (G*H, D) rows nn.Linear keeps (bandwidth-bound; measured on x86 with MKL);
        # reduce() lays bf16/fp16 weights back as rows, which oneDNN reads faster.
        self.register_buffer("w1", torch.cat([f.weight.detach() for f in firsts], dim=0).t().contiguous())
        self.w1_columns = True
        self.register_buffer("b1", torch.cat([_bias(f) for f in firsts]).clone())
        # buckets: (first head, end head, padded class count); weights w2_<k> (g, H, C), b2_<k> (g, 1, C).
        self.buckets: list[tuple[int, int, int]] = []
        start = 0
        for i in range(1, len(seconds) + 1):
            if i == len(seconds) or self.sizes[i] > _PAD_FACTOR * self.sizes[start]:
                width = self.sizes[i - 1]
                w2 = torch.zeros(i - start, self.hidden, width, dtype=seconds[start].weight.dtype)
                b2 = torch.zeros(i - start, 1, width, dtype=seconds[start].weight.dtype)
                for j, layer in enumerate(seconds[start:i]):
                    w2[j, :, :layer.out_features] = layer.weight.detach().t()
                    b2[j, 0, :layer.out_features] = _bias(layer)
                self.register_buffer(f"w2_{len(self.buckets)}", w2)
                self.register_buffer(f"b2_{len(self.buckets)}", b2)
                self.buckets.append((start, i, width))
                start = i

    def reduce(self, dtype: torch.dtype | None) -> _Reduced:
        super().reduce(dtype)
        if dtype is not None and dtype != torch.float32 and self.w1_columns:
            self.w1 = self.w1.t().contiguous()
            self.w1_columns = False
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        xin = self._in(x, self.w1)
        if self.w1_columns:
            first = torch.addmm(self.b1, xin.reshape(-1, xin.shape[-1]), self.w1).reshape(*xin.shape[:-1], -1)
        else:
            first = nn.functional.linear(xin, self.w1, self.b1)
        hidden = nn.functional.gelu(first, approximate=self.approximate)
        batch = hidden.shape[:-1]
        # (..., G*H) -> (G, N, H): one batch entry per head.
        per_head = hidden.reshape(-1, len(self.names), self.hidden).transpose(0, 1)
        out: dict[str, torch.Tensor] = {}
        for k, (start, end, _) in enumerate(self.buckets):
            logits = torch.baddbmm(getattr(self, f"b2_{k}"), per_head[start:end], getattr(self, f"w2_{k}"))
            for j in range(end - start):
                size = self.sizes[start + j]
                out[self.names[start + j]] = self._out(logits[j, :, :size].reshape(*batch, size), x)
        return out


def _same_stage(a: nn.Module, b: nn.Module) -> bool:
    """Whether two modules compute the same function: same structure, equal tensors."""
    if a is b:
        return True
    if type(a) is not type(b) or repr(a) != repr(b):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


class _BranchTree(nn.Module):
    """Branch heads forking at one tap; identical frozen prefix stages run once for all of them.

    The prefixes form a tree: node ``i`` runs ``stages[i]`` on its parent's output (the
    tap's features for parent -1). A head joins an existing node when its stage at that
    depth is :func:`_same_stage` as the node's, else it starts a new one; it then
    continues with :meth:`BranchHead.forward_from` from its last node.
    """

    def __init__(self, names: list[str], heads: list[BranchHead]) -> None:
        super().__init__()
        self.names = list(names)
        self.heads = nn.ModuleList(heads)
        self.stages = nn.ModuleList()
        self.parents: list[int] = []
        children: dict[int, list[int]] = {}
        # per head: (node it continues from, stages already run)
        self.starts: list[tuple[int, int]] = []
        for head in heads:
            node = -1
            stages = head.prefix_stages()
            for stage in stages:
                match = next((c for c in children.get(node, []) if _same_stage(self.stages[c], stage)), None)
                if match is None:
                    match = len(self.stages)
                    self.stages.append(stage)
                    self.parents.append(node)
                    children.setdefault(node, []).append(match)
                node = match
            self.starts.append((node, len(stages)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # Nodes are appended after their parents, so one pass in order computes each once.
        outputs: list[torch.Tensor] = []
        for stage, parent in zip(self.stages, self.parents):
            outputs.append(stage(x if parent < 0 else outputs[parent]))
        return {name: head.forward_from(x if node < 0 else outputs[node], depth)
                for name, head, (node, depth) in zip(self.names, self.heads, self.starts)}


def _key(kind: str, name: str) -> str:
    return f"{kind}_{name}"


class HeadBank(nn.Module):
    """Many heads on shared trunk features: linear heads fused, MLP heads grouped, branch prefixes shared.

    Args:
        heads: ``{head name: LoadedHead}``; the key is the name used for outputs (and
            for the ``<head>_label`` / ``<head>_score`` columns), so it must match
            ``[a-z0-9_]+``. Each head's ``tap`` and ``classes`` come from its meta.
        weight_dtype: ``None`` (the heads' own dtype, the default), or ``torch.bfloat16`` /
            ``torch.float16`` / ``torch.float32`` (or their names): the dtype the fused
            linear and grouped MLP weights are stored and multiplied in. Logits come
            back in the features' dtype.

    Attributes:
        names: head names, sorted.
        taps: the distinct taps the heads read, sorted (what to ask the trunk for).
        classes: ``{head name: class names}``; output index i means ``classes[name][i]``.
        weight_dtype: as given (resolved to a torch dtype), or None.
    """

    def __init__(self, heads: Mapping[str, LoadedHead], *, weight_dtype: torch.dtype | str | None = None) -> None:
        super().__init__()
        if not heads:
            raise HeadBankError("a head bank needs at least one head")
        self.weight_dtype = resolve_weight_dtype(weight_dtype)
        self.names: list[str] = sorted(heads)
        self.classes: dict[str, list[str]] = {}
        self.head_taps: dict[str, str] = {}
        linear_by_tap: dict[str, list[str]] = {}
        mlp_groups: dict[tuple[str, int, int, str], list[str]] = {}
        branch_by_tap: dict[str, list[str]] = {}
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
            # Exact types only: a subclass may override forward, so only the stock classes
            # are known to be what the fused, grouped and shared forms compute.
            module = head.module
            mlp = _mlp_layers(module) if type(module) is MLPHead else None
            if type(module) is LinearHead:
                self._check_outputs(name, module.fc.out_features, classes)
                linear_by_tap.setdefault(head.tap, []).append(name)
            elif mlp is not None:
                first, gelu, second = mlp
                self._check_outputs(name, second.out_features, classes)
                key = (head.tap, first.in_features, first.out_features, gelu.approximate)
                mlp_groups.setdefault(key, []).append(name)
            elif type(module) is BranchHead:
                branch_by_tap.setdefault(head.tap, []).append(name)
            else:
                self.singles[_key("head", name)] = module
        # ModuleDict keys are prefixed: a head may be called `items` or `keys`, and tap
        # names such as `stages.2` contain dots, which module names may not.
        self.fused_taps: list[str] = sorted(linear_by_tap)
        self.fused = nn.ModuleDict({
            _key("tap", str(i)): _FusedLinear(linear_by_tap[tap], [heads[n].module.fc for n in linear_by_tap[tap]])
            .reduce(self.weight_dtype)
            for i, tap in enumerate(self.fused_taps)
        })
        self.group_keys = sorted(mlp_groups)
        self.grouped = nn.ModuleDict({
            _key("group", str(i)): _GroupedMLP(mlp_groups[key], [heads[n].module for n in mlp_groups[key]], key[3])
            .reduce(self.weight_dtype)
            for i, key in enumerate(self.group_keys)
        })
        self.branch_taps: list[str] = sorted(branch_by_tap)
        self.branches = nn.ModuleDict({
            _key("tap", str(i)): _BranchTree(branch_by_tap[tap], [heads[n].module for n in branch_by_tap[tap]])
            for i, tap in enumerate(self.branch_taps)
        })
        self.taps: list[str] = sorted(set(self.head_taps.values()))
        self.eval()

    @staticmethod
    def _check_outputs(name: str, outputs: int, classes: list[str]) -> None:
        if outputs != len(classes):
            raise HeadBankError(f"head '{name}': {outputs} outputs but {len(classes)} classes")

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
        for i, key in enumerate(self.group_keys):
            out.update(self.grouped[_key("group", str(i))](self._feature(features, key[0])))
        for i, tap in enumerate(self.branch_taps):
            out.update(self.branches[_key("tap", str(i))](self._feature(features, tap)))
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
