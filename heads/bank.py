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
fp32, rounding only the result. ``weight_dtype="int8"`` stores them as int8 with one
float32 scale per output row (symmetric absmax, a quarter of the bytes; see
:class:`_Int8Matrix` for how it computes). Logits come back in the features' dtype. ``None``
(the default) keeps the heads' own dtype and gives today's outputs bit for bit. Branch and
other single modules always keep their own weights.

The bank is for inference: it is put in eval mode (dropout is the identity there, which is
what makes a LinearHead exactly its ``fc`` and an MLPHead its two layers and GELU) and the
fused matrices are copies taken when the bank is built, so build a new bank after
changing a head's weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import nn

from heads.branch import BranchHead
from heads.modules import LinearHead, MLPHead
from heads.spec import NAME_RE
from heads.store import LoadedHead

# Accepted weight_dtype spellings; None keeps the heads' own dtype. int8: per-row scales (_Int8Matrix).
WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "int8": torch.int8}
# Quantized CPU engines whose dynamic linear runs int8 weights, in order of preference.
_INT8_ENGINES = ("x86", "fbgemm")
# Rows dequantized at once where no quantized engine runs (a GPU): bounds the temporary copy.
_DEQUANT_ROWS = 8192
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


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``(q int8 [N, D], scale float32 [N])`` with ``weight ~= q * scale[:, None]``.

    One scale per output row, so a head with tiny weights beside one with huge weights
    keeps its own 8 bits of precision; an all-zero row gets scale 1 (and zeros).
    """
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1) if w.shape[1] else torch.zeros(w.shape[0], device=w.device)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _int8_engine() -> str | None:
    """The quantized CPU engine that runs int8 weights, or None (then weights are dequantized per chunk)."""
    if not hasattr(torch.ops.quantized, "linear_dynamic"):
        return None
    return next((e for e in _INT8_ENGINES if e in torch.backends.quantized.supported_engines), None)


class _Int8Matrix(nn.Module):
    """``x @ (q * scale[:, None]).T + bias``: an int8 ``(N, D)`` matrix with one float scale per row.

    On CPU the weights are packed once for the quantized engine (x86/fbgemm) and run with
    its dynamic linear, which quantizes each batch's activations to 8 bits (per tensor,
    from the batch's range) and multiplies int8 by int8 into int32: on a bandwidth-bound
    bank it reads a quarter of float32's bytes with integer SIMD, measured far faster than
    float32, bf16, fp16, ``torch._weight_int8pack_mm`` or dequantizing in chunks on an
    AVX2 CPU (benchmarks/bank.py). ``reduce_range``: activations use 7 bits, so AVX2's
    16-bit sums of two u8*s8 products cannot saturate. The packed form is the only copy
    kept (the ``q`` buffer is emptied); it is unpacked before the module moves
    (``.to``/``.cpu()``) and packed again on CPU. Elsewhere (a GPU, or a torch without
    the quantized engines) ``q`` stays and is dequantized :data:`_DEQUANT_ROWS` rows at
    a time into the features' dtype.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        q, scale = quantize_rows(weight)
        self.shape = tuple(q.shape)
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias.detach().float().clone())
        self._packed = None
        self._pack()

    @property
    def packed(self) -> bool:
        """Whether the quantized engine runs it (else it is dequantized per chunk)."""
        return self._packed is not None

    @property
    def nbytes(self) -> int:
        """Bytes of weights read per batch: int8 values, float32 scales and bias."""
        return self.shape[0] * self.shape[1] + self.scale.numel() * 4 + self.bias.numel() * 4

    def _pack(self) -> None:
        engine = _int8_engine()
        if self._packed is not None or engine is None or self.q.device.type != "cpu" or self.q.numel() == 0:
            return
        previous = torch.backends.quantized.engine
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # quantized tensors are deprecated: then the fallback runs
                torch.backends.quantized.engine = engine
                weight = torch._make_per_channel_quantized_tensor(
                    self.q, self.scale.double(), torch.zeros(self.shape[0], dtype=torch.long), 0)
                self._packed = torch.ops.quantized.linear_prepack(weight, self.bias.float())
        except (RuntimeError, AttributeError):
            self._packed = None
            return
        finally:
            torch.backends.quantized.engine = previous
        self.q = torch.empty(0, dtype=torch.int8)

    def weight_int8(self) -> torch.Tensor:
        """The int8 values ``q`` (N, D), from the packed form when packed."""
        if self._packed is None:
            return self.q
        return torch.ops.quantized.linear_unpack(self._packed)[0].int_repr()

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        if self._packed is not None:
            self.q, self._packed = self.weight_int8(), None
        result = super()._apply(fn, recurse)
        self._pack()
        return result

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001, ANN202
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "q"] = self.weight_int8()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self._packed is not None and flat.device.type == "cpu":
            y = torch.ops.quantized.linear_dynamic(flat.float(), self._packed, True)
        else:
            q = self.weight_int8().to(flat.device)
            dtype = flat.dtype if flat.is_floating_point() else torch.float32
            flat = flat.to(dtype)
            parts = [nn.functional.linear(flat, q[lo:lo + _DEQUANT_ROWS].to(dtype))
                     for lo in range(0, self.shape[0], _DEQUANT_ROWS)]
            y = torch.cat(parts, dim=-1) * self.scale.to(flat.device, dtype) + self.bias.to(flat.device, dtype)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.shape[0])


class _Reduced(nn.Module):
    """A fused module whose buffers may be stored in a reduced dtype (``cast``: inputs follow them).

    ``torch.int8`` instead replaces the float matrices by :class:`_Int8Matrix` modules
    (``quantized``); subclasses say how in :meth:`_quantize`.
    """

    cast = False
    quantized = False

    def _in(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return x.to(like.dtype) if self.cast else x

    def _out(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return y.to(x.dtype) if self.cast else y

    def reduce(self, dtype: torch.dtype | None) -> _Reduced:
        if dtype == torch.int8:
            self._quantize()
            self.quantized = True
        elif dtype is not None:
            self.to(dtype)
            self.cast = True
        return self

    def _quantize(self) -> None:
        raise NotImplementedError

    def weight_bytes(self) -> int:
        """Bytes of the weights (and biases, scales) this module reads per batch."""
        own = sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))
        return own + sum(m.nbytes for m in self.modules() if isinstance(m, _Int8Matrix))


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

    def _quantize(self) -> None:
        self.int8 = _Int8Matrix(self.weight, self.bias)
        del self.weight, self.bias

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.quantized:
            logits = self.int8(x)
        else:
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
        if dtype is not None and dtype not in (torch.float32, torch.int8) and self.w1_columns:
            self.w1 = self.w1.t().contiguous()
            self.w1_columns = False
        return self

    def _quantize(self) -> None:
        # Layer 1 one int8 matrix (G*H rows); layer 2 one per head, each called on its own
        # slice of the hidden units: measured faster than dequantizing a bucket for one
        # baddbmm (64 heads of 256 x 1000: 18 ms vs 38 ms float32 vs 64 ms at batch 8).
        rows = self.w1.t() if self.w1_columns else self.w1
        self.l1 = _Int8Matrix(rows, self.b1)
        seconds = []
        for k, (start, end, _) in enumerate(self.buckets):
            w2, b2 = getattr(self, f"w2_{k}"), getattr(self, f"b2_{k}")
            for j in range(end - start):
                size = self.sizes[start + j]
                seconds.append(_Int8Matrix(w2[j, :, :size].t(), b2[j, 0, :size]))
            delattr(self, f"w2_{k}")
            delattr(self, f"b2_{k}")
        self.l2 = nn.ModuleList(seconds)
        del self.w1, self.b1

    def _forward_int8(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = nn.functional.gelu(self.l1(x.float()), approximate=self.approximate)
        batch = hidden.shape[:-1]
        per_head = hidden.reshape(-1, len(self.names), self.hidden).transpose(0, 1).contiguous()
        return {name: layer(h).to(x.dtype).reshape(*batch, size)
                for name, layer, h, size in zip(self.names, self.l2, per_head, self.sizes)}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.quantized:
            return self._forward_int8(x)
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
            linear and grouped MLP weights are stored and multiplied in; or ``"int8"`` /
            ``torch.int8``: int8 weights with one float32 scale per output row, run by the
            quantized CPU engine (:class:`_Int8Matrix`). Logits come back in the
            features' dtype.

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

    def weight_bytes(self) -> int:
        """Bytes of the fused and grouped weights (biases and int8 scales included) read per batch."""
        return sum(m.weight_bytes() for m in [*self.fused.values(), *self.grouped.values()])

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
