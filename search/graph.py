"""Layer graph of a denoiser: layer table, traced dataflow DAG and units (paper §3.1, §4.1).

* **Layer table** — :func:`layer_table`: every quantizable layer (exactly ``quant.quantizable_layers``) with an op
  type, block category and block index guessed from module names and classes (ComfyUI's U-Net, PixArt, Hunyuan-DiT,
  MMDiT/SD3, Flux/Chroma/HunyuanVideo double- and single-stream, Qwen-Image, Wan, Lumina 2 names, common diffusers
  names; anything else is ``"other"``). Repeated blocks include refiner blocks (``noise_refiner.N``); adaLN
  modulation layers of a block form their own ``"modulation"`` category; a single-stream block's fused layers are
  ``SS-In`` (QKV + MLP-in) and ``SS-Out`` (attention-out + MLP-out) in the ``"single-stream"`` category.
* **DAG** — :func:`trace_graph` runs one real forward pass under a ``TorchFunctionMode`` and follows tensor
  provenance: every floating tensor carries the set of graph nodes it was computed from. A weight layer's output
  comes from that layer alone; edges run from the producers of its input to it. Element-wise and view ops pass the
  union of their inputs' producers on (``cat``, reshapes, norms, activations, RoPE, …), so chains collapse. A
  *combine node* is created only where an op merges paths:

  - ``add`` / ``mul`` (sub, div, …): >= 2 operands carry provenance and together have >= 2 distinct producers;
  - ``matmul`` (matmul, bmm, baddbmm, einsum, an activation-valued F.linear weight): >= 2 operands carry provenance,
    even from the same producer (Q·Kᵀ of a fused QKV); ``scaled_dot_product_attention`` is two of them,
    ``Q·Kᵀ`` then ``(·)·V``, so fused and decomposed attention give the same graph;
  - ``norm`` (layer/group/RMS norm): only when its weight/bias carry provenance too (adaptive norms);
  - an element-wise op whose operands are one combine node C plus inputs of C is folded into C (``x·(1+s)+b``
    is one ``modulate`` node; chunked attention renormalisation folds into its ``matmul``).

  Identical combine nodes (same op, same inputs) are created once. Nodes are numbered in creation order, which is
  a topological order; an edge against it (only possible when a module runs twice) is dropped and counted in
  ``meta["dropped_edges"]``. Layers that never ran are isolated nodes listed in ``meta["unexecuted"]``.
* **Units** — :meth:`LayerGraph.units`: ``"op"`` level is one unit per layer (hop 0); ``"block"`` level groups
  the layers of one block category inside one block (self-attention, cross-attention, feed-forward, ResBlock,
  t-embedding, …), see :meth:`LayerGraph.units` for the output node and hop rules.
"""

from __future__ import annotations

import json
import re
import weakref
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..quant.layer_table import LayerInfo, dtype_name, layers_fingerprint, quantizable_layers

GRAPH_FORMAT = "qua2sedimo-layer-graph"
GRAPH_VERSION = 1
LEVELS = ("op", "block")

# Block categories of layers outside the repeated blocks (block index -1, one unit per category).
GLOBAL_CATEGORIES = ("t-embed", "c-embed", "patchify", "conv-in", "conv-out", "out-proj")
_CATEGORY = {
    "t-embed": "t-embed", "v-embed": "t-embed", "c-embed": "c-embed", "pool": "c-embed", "patchify": "patchify",
    "conv-in": "conv-in", "conv-out": "conv-out", "out-proj": "out-proj", "res-conv1": "resblock",
    "res-conv2": "resblock", "time-proj": "resblock", "res-skip": "resblock", "downsample": "sample",
    "upsample": "sample", "proj-in": "transformer-proj", "proj-out": "transformer-proj", "skip": "skip",
}

# ------------------------------------------------------------------------------------ classification

_W = r"(?:^|_)"  # start of a name or of a snake_case word
_W_END = r"(?:_|$)"
_POOL = re.compile(r"pool")
_T_EMBED = re.compile(r"^t_embed|^time_?(?:embed|in$|proj|_text_embed)|^timestep_?embed|^temb")
_V_EMBED = re.compile(r"label_emb|extra_embed|csize_embed|ar_embed|size_embed|vector_in|guidance_in|add_embed|"
                      r"class_embed|style_embed|resolution_embed|aspect_ratio_embed")
_C_EMBED = re.compile(r"caption|^y_embedder$|y_proj|mlp_t5|context_embedder|txt_in|^text_embed|encoder_hid|"
                      r"cap_embed|text_proj|context_proj")
# Chroma's modulation approximator: a global network from timestep/guidance to every block's modulation vectors.
_MOD_APPROX = re.compile(r"distilled_guidance|approximator")
_PATCHIFY = re.compile(r"x_embedder|patch_embed|patchify|^img_in$|^pos_embed$")
_ATTN = re.compile(r"attn|attention(?!s$)")  # diffusers' U-Net ``attentions`` is a list of transformer blocks
_CROSS = re.compile(r"cross|attn2|" + _W + "ca" + _W_END)
_SELF = re.compile(r"attn1|self")
_ROLES = (("QKV", re.compile(r"qkv")), ("KV", re.compile(_W + r"(?:to_)?kv" + _W_END)),
          ("Q", re.compile(_W + r"(?:q|query)" + _W_END)), ("K", re.compile(_W + r"(?:k|key)" + _W_END)),
          ("V", re.compile(_W + r"(?:v|value)" + _W_END)))
_ADALN = re.compile(r"adaln|modulation|^t_block$|" + _W + "mod" + _W_END)
_FINAL = re.compile(r"^(?:final_layer|final|norm_out|proj_out|out|conv_out|out_layer|final_linear|head|proj_out_[12])$")
_FINAL_MOD = re.compile(r"^proj_out_1$")  # diffusers DiT: the final layer's adaLN (shift, scale) from the conditioning
_FF = re.compile(r"^(?:mlp|ff|ffn|feed_forward|feedforward|ff_net|mlp_block)$|_mlp$|^mlp_")
_FF_CLASSES = ("FeedForward", "Mlp", "MLP", "GEGLU")
# The down-projection of a feed-forward module, by name (SwiGLU's w2 is registered before w3); otherwise the last.
_FF_DOWN = re.compile(r"^(?:w2|fc2|down_proj|c_proj|wo|fc_out|out_proj|linear_?2|proj_out)$")
_SINGLE = re.compile(r"^single_(?:transformer_)?blocks$")
_SS_ROLES = {"linear1": "SS-In", "linear2": "SS-Out"}
_RES = (("res-conv1", re.compile(r"^(?:in_layers|conv1)$")), ("res-conv2", re.compile(r"^(?:out_layers|conv2)$")),
        ("time-proj", re.compile(r"^(?:emb_layers|time_emb_proj)$")),
        ("res-skip", re.compile(r"^(?:skip_connection|conv_shortcut|nin_shortcut)$")))
_BLOCK_LIST = re.compile(r"(?:^|_)blocks$|^layers$|^resnets$|^attentions$|(?:^|_)refiner$")
_BLOCK_ONE = re.compile(r"^(?:middle|mid)_block$")


@dataclass(frozen=True)
class LayerNode:
    """One quantizable layer with its op type, block category and block (``block`` is the module path of the
    innermost repeated block holding it, ``""`` and index -1 for global layers)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    op_type: str
    block_category: str
    block_index: int
    block: str

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "shape": list(self.shape), "dtype": self.dtype,
                "op_type": self.op_type, "block_category": self.block_category, "block_index": self.block_index,
                "block": self.block}


def block_path(name: str) -> tuple[str, str]:
    """(outer, inner) block paths of a module name: ``input_blocks.4.1.transformer_blocks.0.attn1.to_q`` →
    (``input_blocks.4``, ``input_blocks.4.1.transformer_blocks.0``); ``middle_block.2.in_layers.2`` →
    (``middle_block``, ``middle_block.2``); ``""`` outside blocks."""
    parts = name.split(".")
    bounds = [i for i, p in enumerate(parts[:-1])
              if (p.isdigit() and i > 0 and _BLOCK_LIST.search(parts[i - 1].lower())) or _BLOCK_ONE.search(p.lower())]
    if not bounds:
        return "", ""
    j = bounds[-1]
    if j + 1 < len(parts) - 1 and parts[j + 1].isdigit():  # a child of a sequential block (ResBlock, transformer)
        j += 1
    return ".".join(parts[: bounds[0] + 1]), ".".join(parts[: j + 1])


def _attn_op(words: list[str], classes: list[str]) -> str | None:
    """SA-/CA- role of a layer inside an attention module, else None."""
    at = next((i for i in range(len(words) - 2, -1, -1) if _ATTN.search(words[i])), None)
    if at is None:
        at = next((i for i in range(len(classes) - 2, -1, -1) if "Attention" in classes[i]), None)
    if at is None:
        return None
    w, cls = words[at], classes[at] if at < len(classes) else ""
    # by name or class, unless the class says self-attention (SD3.5's x_block.attn2 is a SelfAttention)
    cross = (bool(_CROSS.search(w)) or "Cross" in cls) and not (_SELF.search(w) or "SelfAttention" in cls)
    leaf = words[-1]
    role = next((r for r, pat in _ROLES if pat.search(leaf)), "Out")
    return f"{'CA' if cross else 'SA'}-{role}"


def classify_layer(name: str, kind: str = "linear", classes: Sequence[str] = ()) -> tuple[str, str]:
    """(op type, block category) of a layer from its module path and (optionally) its ancestors' class names
    (``classes[i]`` is the class of the module at ``parts[: i + 1]``)."""
    parts = name.split(".")
    named = [(p.lower(), classes[i] if i < len(classes) else "") for i, p in enumerate(parts) if not p.isdigit()]
    words, wclasses = [w for w, _ in named], [c for _, c in named]
    block = block_path(name)[1]
    in_block = bool(block)
    op = _op_type(name, kind, words, wclasses, list(classes), block)
    if op == "adaln":
        cat = "modulation" if in_block else ("out-proj" if _FINAL.search(words[0]) else "t-embed")
    elif op.startswith("SS-"):
        cat = "single-stream"
    elif op.startswith("SA-"):
        cat = "self-attn"
    elif op.startswith("CA-"):
        cat = "cross-attn"
    elif op.startswith("FF"):
        cat = "feedforward"
    else:
        cat = _CATEGORY.get(op, "other")
    return op, cat


_EMBEDS = (("c-embed", _C_EMBED), ("v-embed", _V_EMBED), ("t-embed", _T_EMBED), ("patchify", _PATCHIFY))


def _embed_op(anc: list[str]) -> str | None:
    """Embedder op type of the innermost ancestor that names one (``time_text_embed.timestep_embedder`` is a
    timestep embedder, not a text embedder)."""
    for w in reversed(anc):
        for op, pat in _EMBEDS:
            if pat.search(w):
                return op
    return None


def _op_type(name: str, kind: str, words: list[str], wclasses: list[str], classes: list[str], block: str) -> str:
    """Op type of ``name``; ``block`` is its innermost repeated block (``""`` outside blocks)."""
    in_block = bool(block)
    parts = name.split(".")
    anc = [p.lower() for p in parts[:-1] if not p.isdigit()] or words
    if any(_MOD_APPROX.search(w) for w in anc):
        return "v-embed"
    if any(_POOL.search(w) for w in anc) or any("Pool" in c for c in classes[:-1]):
        return "pool"
    if in_block:  # inside a repeated block only the names below it count (HunyuanVideo's txt_in refiner blocks)
        anc = [p.lower() for p in parts[len(block.split(".")):-1] if not p.isdigit()]
        if any("norm" in w for w in anc):  # a block's own conditioning embedder under its adaLN (diffusers DiT's
            return "adaln"  # ``norm1.emb.timestep_embedder``): that block's modulation, not the global t-embedding
    elif _FINAL_MOD.search(words[0]):
        return "adaln"
    embed = _embed_op(anc)
    if embed is not None:
        return embed
    if any(_ADALN.search(w) for w in words) or (len(words) > 1 and any("norm" in w for w in words[:-1])):
        return "adaln"
    if in_block and words[-1] in _SS_ROLES and (any(_SINGLE.search(w) for w in words)
                                                 or any("SingleStream" in c for c in classes)):
        return _SS_ROLES[words[-1]]
    attn = _attn_op(words, wclasses)
    if attn is not None:
        return attn
    if not in_block and _FINAL.search(words[0]):
        return "conv-out" if kind == "conv2d" and words[0] in ("out", "conv_out") else "out-proj"
    if any(_FF.search(w) for w in anc) or any(c in _FF_CLASSES for c in classes[:-1]):
        return "FF"  # FF-1 / FF-2 is decided per FF module by layer_table()
    for op, pat in _RES:
        if any(pat.search(w) for w in words):
            return op
    if any("Downsample" in c for c in classes[:-1]) or words[-1] == "op" or any("downsampl" in w for w in words):
        return "downsample"
    if any("Upsample" in c for c in classes[:-1]) or any("upsampl" in w for w in words):
        return "upsample"
    if words[-1] == "proj_in":
        return "proj-in"
    if words[-1] == "proj_out":
        return "proj-out"
    if any("skip" in w for w in words):
        return "skip"
    if words[0] == "conv_in" or (parts[0] == "input_blocks" and parts[1:2] == ["0"]):
        return "conv-in"
    return "other"


def _ff_roles(names: list[str]) -> dict[str, str]:
    """FF-2 for the down-projection of each FF module (by name, e.g. SwiGLU's ``w2``; else its last layer in module
    order), FF-1 for the others (up and gate projections)."""
    by_module: dict[str, list[str]] = defaultdict(list)
    for n in names:
        parts = n.split(".")
        cut = max((i for i, p in enumerate(parts[:-1]) if _FF.search(p.lower())), default=len(parts) - 2)
        by_module[".".join(parts[: cut + 1])].append(n)
    roles = {}
    for members in by_module.values():
        named = [n for n in members if _FF_DOWN.search(n.rsplit(".", 1)[-1].lower())]
        down = named[0] if len(named) == 1 else members[-1]
        for n in members:
            roles[n] = "FF-2" if n == down and len(members) > 1 else "FF-1"
    return roles


def layer_table(model: nn.Module | Iterable[LayerInfo]) -> list[LayerNode]:
    """Every quantizable layer of ``model`` (``quant.quantizable_layers`` order) with op type, block category,
    block index (ordinal of its outermost block among non-global layers; -1 for global layers) and block."""
    infos = quantizable_layers(model)
    mods = dict(model.named_modules()) if isinstance(model, nn.Module) else {}

    def classes(name: str) -> list[str]:
        parts = name.split(".")
        return [type(mods[p]).__name__ if (p := ".".join(parts[: i + 1])) in mods else "" for i in range(len(parts))]

    ops = [classify_layer(i.name, i.kind, classes(i.name)) for i in infos]
    ff = _ff_roles([i.name for i, (op, _) in zip(infos, ops, strict=True) if op == "FF"])
    outer_index: dict[str, int] = {}
    out = []
    for info, (op, cat) in zip(infos, ops, strict=True):
        outer, inner = block_path(info.name)
        if cat in GLOBAL_CATEGORIES or not outer:
            index, inner = -1, ""
        else:
            index = outer_index.setdefault(outer, len(outer_index))
        out.append(LayerNode(info.name, info.kind, tuple(info.shape), dtype_name(info.dtype), ff.get(info.name, op),
                             cat, index, inner))
    return out


def layer_tags(model: nn.Module | Iterable[LayerInfo]) -> dict[str, tuple[str, ...]]:
    """Each quantizable layer's tags for ``@tag`` rules (``quant.QuantConfig.from_rules``): its op type, block
    category and kind (``FF-2``, ``feedforward``, ``linear``)."""
    return {n.name: (n.op_type, n.block_category, n.kind) for n in layer_table(model)}


# -------------------------------------------------------------------------------------------- tracing

_ADD = frozenset({"add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__", "__isub__",
                  "rsub", "subtract"})
_MUL = frozenset({"mul", "mul_", "__mul__", "__rmul__", "__imul__", "div", "div_", "__truediv__", "__rtruediv__",
                  "__itruediv__", "addcmul", "addcmul_", "multiply", "true_divide"})
_MATMUL = frozenset({"matmul", "__matmul__", "__rmatmul__", "bmm", "mm", "baddbmm", "baddbmm_", "addbmm", "addmm",
                     "einsum", "linear", "bilinear", "conv1d", "conv2d", "conv3d"})
_BIAS_FIRST = frozenset({"baddbmm", "baddbmm_", "addbmm", "addmm"})  # arg 0 is an added bias, not a factor
_NORM = frozenset({"layer_norm", "group_norm", "rms_norm", "instance_norm", "batch_norm"})
_SDPA = frozenset({"scaled_dot_product_attention"})
_WRITES = frozenset({"__setitem__", "copy_", "index_copy_", "index_put_", "masked_scatter_", "scatter_", "index_add_"})
_INPLACE_DUNDER = frozenset({"__iadd__", "__isub__", "__imul__", "__itruediv__"})
_FRESH = frozenset({"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like",
                    "new_zeros", "new_ones", "new_empty", "new_full", "zero_", "fill_", "normal_", "uniform_"})
_EMPTY: frozenset[int] = frozenset()


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


@dataclass
class _Node:
    kind: str
    op: str
    scope: str
    name: str = ""
    inputs: set[int] = field(default_factory=set)


class _Tracer(TorchFunctionMode):
    """Provenance bookkeeping for one traced forward pass (see the module docstring)."""

    def __init__(self, model: nn.Module, layers: list[LayerNode]):
        super().__init__()
        self.model, self.layers = model, layers
        self.nodes: list[_Node] = []
        self.layer_node: dict[str, int] = {}
        self.edges: set[tuple[int, int]] = set()
        self.dropped = 0
        self.prov: dict[int, tuple[weakref.ref, frozenset[int]]] = {}
        self.combine_key: dict[tuple[str, frozenset[int]], int] = {}
        self.scope: list[str] = []
        self.in_layer = 0
        self.busy = False
        self.handles: list[Any] = []
        mods = dict(model.named_modules())
        self.weights = {id(w): (n, w) for n in (la.name for la in layers)
                        if isinstance(w := getattr(mods[n], "weight", None), torch.Tensor)}

    # -- provenance map (keyed by id, checked through a weak reference, dropped when the tensor dies)
    def _own(self, t: torch.Tensor) -> frozenset[int]:
        e = self.prov.get(id(t))
        return e[1] if e is not None and e[0]() is t else _EMPTY

    def get(self, t: torch.Tensor) -> frozenset[int]:
        """Producers of ``t``; a view never seen before inherits those of its base (written in place)."""
        p = self._own(t)
        if p or t._base is None:
            return p
        return self._own(t._base)

    def set(self, t: torch.Tensor, p: frozenset[int]) -> None:
        if not (t.is_floating_point() or t.is_complex()):
            return
        key = id(t)
        if not p:
            self.prov.pop(key, None)
            return
        prov = self.prov
        self.prov[key] = (weakref.ref(t, lambda _r, k=key: prov.pop(k, None)), p)

    def get_all(self, obj: Any) -> frozenset[int]:
        return frozenset().union(*(self.get(t) for t in _tensors(obj)))

    # -- graph construction
    def _node(self, kind: str, op: str, scope: str) -> int:
        self.nodes.append(_Node(kind, op, scope))
        return len(self.nodes) - 1

    def _edge(self, src: int, dst: int) -> None:
        if src < dst:
            self.edges.add((src, dst))
            self.nodes[dst].inputs.add(src)
        else:
            self.dropped += 1

    def layer_call(self, name: str, inputs: frozenset[int]) -> int:
        idx = self.layer_node.get(name)
        if idx is None:
            idx = self.layer_node[name] = self._node("layer", name, name)
            self.nodes[idx].name = name
        for s in inputs:
            self._edge(s, idx)
        return idx

    def combine(self, op: str, provs: Sequence[frozenset[int]]) -> frozenset[int]:
        carriers = [p for p in provs if p]
        union = frozenset().union(*carriers)
        if self.in_layer or len(carriers) < 2 or (op != "matmul" and len(union) < 2):
            return union
        if op in ("add", "mul"):  # fold into a combine node C when the other operands are inputs of C
            for p in carriers:
                node = self.nodes[next(iter(p))] if len(p) == 1 else None
                if node is not None and node.kind == "combine" and union - p <= node.inputs:
                    if {node.op, op} == {"add", "mul"}:
                        node.op = "modulate"
                    return p
        key = (op, union)
        hit = self.combine_key.get(key)
        if hit is None:
            hit = self.combine_key[key] = self._node("combine", op, self.scope[-1] if self.scope else "")
            for s in sorted(union):
                self._edge(s, hit)
        return frozenset({hit})

    # -- torch function mode
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.busy:
            self._on_op(getattr(func, "__name__", ""), args, kwargs, out)
        return out

    def _on_op(self, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        if name in ("linear", "conv2d") and not self.in_layer and len(args) > 1:
            hit = self.weights.get(id(args[1]))
            if hit is not None and hit[1] is args[1]:  # a weight layer used functionally (module not called)
                self.set_all(out, frozenset({self.layer_call(hit[0], self.get_all(args[0]))}))
                return
        if name in _WRITES:
            target = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if target is not None:
                self.set_inplace(target, self.get_all((args[1:], kwargs)), replace=name == "copy_")
            return
        if name in _FRESH:  # values do not depend on the inputs
            p = _EMPTY
        elif name in _SDPA:
            q, k, v = (args[i] if i < len(args) else kwargs.get(n) for i, n in enumerate(("query", "key", "value")))
            qk = self.combine("matmul", [self.get_all(q), self.get_all(k)])
            p = self.combine("matmul", [qk, self.get_all(v)])
        elif name in _MATMUL:
            ops = list(_tensors((args, kwargs)))
            extra = _EMPTY
            if name in _BIAS_FIRST and ops:
                extra, ops = self.get_all(ops[0]), ops[1:]
            p = self.combine("matmul", [self.get_all(a) for a in ops]) | extra
        elif name in _ADD or name in _MUL or name in _NORM:
            op = "add" if name in _ADD else "mul" if name in _MUL else "norm"
            p = self.combine(op, [self.get_all(a) for a in (*args, *kwargs.values())])
        else:
            p = self.get_all((args, kwargs))
        inplace = name in _INPLACE_DUNDER or (name.endswith("_") and not name.startswith("_"))
        target = kwargs.get("out") if isinstance(kwargs.get("out"), torch.Tensor) else None
        if target is None and inplace and args and isinstance(args[0], torch.Tensor):
            target = args[0]
        if target is not None:
            self.set_inplace(target, p, replace=True)
        else:
            self.set_all(out, p)

    def set_all(self, out: Any, p: frozenset[int]) -> None:
        for t in _tensors(out):
            self.set(t, p)

    def set_inplace(self, t: torch.Tensor, p: frozenset[int], replace: bool) -> None:
        base = t._base
        self.set(t, p if replace and base is None else self._own(t) | p)
        if base is not None:
            self.set(base, self._own(base) | p)

    # -- module hooks
    def _pre(self, name: str, is_layer: bool):
        def hook(mod, args, kwargs):
            self.busy = True
            try:
                self.scope.append(name)
                if is_layer and not self.in_layer:
                    self.layer_call(name, self.get_all((args, kwargs)))
                if is_layer:
                    self.in_layer += 1
            finally:
                self.busy = False
        return hook

    def _post(self, name: str, is_layer: bool):
        def hook(mod, args, kwargs, out):
            self.busy = True
            try:
                if self.scope and self.scope[-1] == name:
                    self.scope.pop()
                if is_layer:
                    self.in_layer -= 1
                    if not self.in_layer:
                        self.set_all(out, frozenset({self.layer_node[name]}))
            finally:
                self.busy = False
        return hook

    def __enter__(self):
        layer_names = {la.name for la in self.layers}
        for name, mod in self.model.named_modules():
            is_layer = name in layer_names
            self.handles.append(mod.register_forward_pre_hook(self._pre(name, is_layer), with_kwargs=True))
            self.handles.append(mod.register_forward_hook(self._post(name, is_layer), with_kwargs=True))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for h in self.handles:
                h.remove()
            self.handles.clear()


def trace_graph(model: nn.Module, run: Callable[[], Any]) -> LayerGraph:
    """Trace one forward pass of ``model`` (``run()`` performs it, with the caller's inputs) into a
    :class:`LayerGraph`. Runs ``run`` under ``torch.no_grad``; works with dense or quantized layers."""
    layers = layer_table(model)
    tracer = _Tracer(model, layers)
    with torch.no_grad(), tracer:
        run()
    unexecuted = [la.name for la in layers if la.name not in tracer.layer_node]
    for name in unexecuted:
        tracer.layer_call(name, _EMPTY)
    counts: Counter = Counter()
    for node in tracer.nodes:
        if node.kind == "combine":
            node.name = f"{node.scope}/{node.op}_{counts[(node.scope, node.op)]}"
            counts[(node.scope, node.op)] += 1
    op_type = {la.name: la.op_type for la in layers}
    nodes = [GraphNode(n.name, n.kind, op_type[n.name] if n.kind == "layer" else n.op, n.scope)
             for n in tracer.nodes]
    meta = {"dropped_edges": tracer.dropped, "unexecuted": unexecuted}
    return LayerGraph(layers, nodes, sorted(tracer.edges), meta=meta)


def _layer_index(layers: list[LayerNode]) -> dict[str, int]:
    return {la.name: i for i, la in enumerate(layers)}


# ----------------------------------------------------------------------------------------------- graph


@dataclass(frozen=True)
class GraphNode:
    """A DAG node: a weight layer (``op`` = its op type) or a combine node (``op`` = add | mul | modulate |
    matmul | norm; ``scope`` = the module it ran in)."""

    name: str
    kind: str
    op: str
    scope: str


@dataclass(frozen=True)
class Unit:
    """A unit of the partition: its weight layers, all its graph nodes, output node and hop depth."""

    name: str
    level: str
    members: tuple[str, ...]
    output_node: str
    hop: int
    nodes: tuple[str, ...]
    category: str
    block_index: int

    def to_json(self) -> dict:
        return {"name": self.name, "level": self.level, "members": list(self.members),
                "output_node": self.output_node, "hop": self.hop, "nodes": list(self.nodes),
                "category": self.category, "block_index": self.block_index}


_MERGE_DEPTH = 4  # combine-only hops searched downstream of a unit's sinks for its merge node
MAX_UNIT_LAYERS = 4  # 6^4 variants; larger groups put side embedders (size/extra/pool) in units of their own
_SIDE_EMBEDDERS = ("v-embed", "pool")


def _components(nodes: set[int], succ: list[list[int]]) -> list[set[int]]:
    """Weakly connected components of the subgraph induced by ``nodes``."""
    parent = {i: i for i in nodes}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in nodes:
        for j in succ[i]:
            if j in nodes:
                parent[find(i)] = find(j)
    comps: dict[int, set[int]] = defaultdict(set)
    for i in nodes:
        comps[find(i)].add(i)
    return list(comps.values())


@dataclass
class LayerGraph:
    """Layer table + dataflow DAG. ``nodes`` are in topological order; ``edges`` are (src, dst) node indices."""

    layers: list[LayerNode]
    nodes: list[GraphNode]
    edges: list[tuple[int, int]]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.edges = [(int(s), int(d)) for s, d in self.edges]
        self._index = {n.name: i for i, n in enumerate(self.nodes)}
        self._lidx = _layer_index(self.layers)
        if any(not 0 <= s < d < len(self.nodes) for s, d in self.edges):
            raise ValueError("an edge is out of range or against the topological order of the nodes")
        self._succ: list[list[int]] = [[] for _ in self.nodes]
        self._pred: list[list[int]] = [[] for _ in self.nodes]
        for s, d in self.edges:
            self._succ[s].append(d)
            self._pred[d].append(s)
        self._units: dict[str, list[Unit]] = {}

    # -- basic queries
    @property
    def fingerprint(self) -> str:
        """``quant.layers_fingerprint`` of the layer table (matches configs of the same model)."""
        return layers_fingerprint(LayerInfo(la.name, la.kind, la.shape, torch.float32) for la in self.layers)

    def index(self, name: str) -> int:
        return self._index[name]

    def layer(self, name: str) -> LayerNode:
        return self.layers[self._lidx[name]]

    def successors(self, name: str) -> list[str]:
        return [self.nodes[j].name for j in self._succ[self._index[name]]]

    def predecessors(self, name: str) -> list[str]:
        return [self.nodes[j].name for j in self._pred[self._index[name]]]

    def op_type_counts(self) -> dict[str, int]:
        """Number of layers per op type."""
        return dict(Counter(la.op_type for la in self.layers))

    def combine_counts(self) -> dict[str, int]:
        """Number of combine nodes per op."""
        return dict(Counter(n.op for n in self.nodes if n.kind == "combine"))

    def is_acyclic(self) -> bool:
        indeg = [len(p) for p in self._pred]
        stack = [i for i, d in enumerate(indeg) if d == 0]
        seen = 0
        while stack:
            i = stack.pop()
            seen += 1
            for j in self._succ[i]:
                indeg[j] -= 1
                if indeg[j] == 0:
                    stack.append(j)
        return seen == len(self.nodes)

    def depths(self) -> list[int]:
        """Longest path (edges) from any source to each node (nodes are topologically ordered)."""
        depth = [0] * len(self.nodes)
        for i in range(len(self.nodes)):
            for j in self._pred[i]:
                depth[i] = max(depth[i], depth[j] + 1)
        return depth

    # -- units
    def units(self, level: str = "block") -> list[Unit]:
        """The partition of the layers into units (paper §4.1), in layer order.

        ``"op"``: every layer alone; output node = the layer, hop 0.

        ``"block"``: the layers of one block category inside one block (``LayerNode.block``; global layers form
        one group per category). A unit may hold combine nodes that ran in its own block (not in a nested one):
        those on combine-only paths between its layers (attention matmuls, AdaLN modulation, ResBlock ``h + emb``).
        A group falls apart into its weakly connected pieces (a transformer's proj-in and proj-out); pieces whose
        ends reach one combine node within ``_MERGE_DEPTH`` combine-only hops stay one unit (ResBlock conv path +
        shortcut → add; t-MLP + extra/label embedder → add, as in the paper). Groups of more than
        ``MAX_UNIT_LAYERS`` layers put their side embedders (``v-embed``, ``pool``) into units of their own.

        Output node: the piece's single sink, else the earliest combine node reached from all its sinks (the
        merge, then part of the unit), else its last sink. Hop: the longest path, in edges inside the unit, from
        any of its layers to its output node, i.e. the message-passing depth at which the output node has seen
        the whole unit (PixArt self-attention qkv → Q·Kᵀ → ·V → proj: 3). Not capped; a predictor with M
        message-passing layers uses min(hop, M).
        """
        if level not in LEVELS:
            raise ValueError(f"unknown unit level {level!r}; expected one of {LEVELS}")
        if level not in self._units:
            self._units[level] = self._op_units() if level == "op" else self._block_units()
        return self._units[level]

    def _op_units(self) -> list[Unit]:
        return [Unit(la.name, "op", (la.name,), la.name, 0, (la.name,), la.block_category, la.block_index)
                for la in self.layers]

    def _is_combine(self, i: int) -> bool:
        return self.nodes[i].kind == "combine"

    def _reach(self, starts: Iterable[int], forward: bool, allowed: set[int], limit: int | None = None) -> set[int]:
        """Nodes of ``allowed`` (combine nodes) reachable from ``starts`` through ``allowed`` only."""
        adj = self._succ if forward else self._pred
        seen: set[int] = set()
        frontier = list(starts)
        depth = 0
        while frontier and (limit is None or depth < limit):
            frontier = [j for i in frontier for j in adj[i] if j in allowed and j not in seen]
            seen.update(frontier)
            depth += 1
        return seen

    def _block_units(self) -> list[Unit]:
        sizes = Counter((la.block_category, la.block) for la in self.layers)
        groups: dict[tuple[str, str, str], list[LayerNode]] = {}
        for la in self.layers:
            key = (la.block_category, la.block)
            tag = la.op_type if la.op_type in _SIDE_EMBEDDERS and sizes[key] > MAX_UNIT_LAYERS else ""
            groups.setdefault((*key, tag), []).append(la)
        combine_block: dict[str, set[int]] = defaultdict(set)
        for i, n in enumerate(self.nodes):
            if n.kind == "combine":
                combine_block[block_path(n.scope + ".x")[1]].add(i)
        units: list[Unit] = []
        for (cat, block, tag), members in groups.items():
            allowed = combine_block[block]
            parts = self._split_group({self._index[la.name] for la in members}, allowed)
            base = (f"{block}/{cat}" if block else cat) + (f":{tag}" if tag else "")
            for nodes, output in parts:
                name = base if len(parts) == 1 else f"{base}:{self._short(self.nodes[output].name, block)}"
                units.append(self._make_unit(name, cat, members[0].block_index, nodes, output))
        units.sort(key=lambda u: min(self._lidx[m] for m in u.members))
        return units

    @staticmethod
    def _short(name: str, block: str) -> str:
        return name[len(block) + 1:] if block and name.startswith(block + ".") else name.lstrip("/")

    def _split_group(self, members: set[int], allowed: set[int]) -> list[tuple[set[int], int]]:
        """Connected parts of one group, joined at common merge nodes, as (nodes, output node)."""
        inside = members | (self._reach(members, True, allowed) & self._reach(members, False, allowed))
        parts = _components(inside, self._succ)
        # parts whose sinks reach a common combine node are one unit (ResBlock conv path + shortcut → add)
        owner: dict[int, int] = {}
        link = list(range(len(parts)))

        def root(k: int) -> int:
            while link[k] != k:
                k = link[k]
            return k

        for k, part in enumerate(parts):
            for c in self._reach(self._sinks(part), True, allowed, _MERGE_DEPTH):
                if c in owner:
                    link[root(k)] = root(owner[c])
                else:
                    owner[c] = k
        joined: dict[int, set[int]] = defaultdict(set)
        for k, part in enumerate(parts):
            joined[root(k)] |= part
        return [self._with_output(part, allowed) for part in sorted(joined.values(), key=min)]

    def _sinks(self, part: set[int]) -> list[int]:
        return sorted(i for i in part if not any(j in part for j in self._succ[i]))

    def _with_output(self, part: set[int], allowed: set[int]) -> tuple[set[int], int]:
        sinks = self._sinks(part)
        if len(sinks) == 1:
            return part, sinks[0]
        reach = [self._reach([s], True, allowed, _MERGE_DEPTH) for s in sinks]
        common = set.intersection(*reach)
        if not common:
            return part, sinks[-1]
        output = min(common)
        path = set().union(*reach) & self._reach([output], False, allowed, _MERGE_DEPTH)
        return part | path | {output}, output

    def _make_unit(self, name: str, cat: str, block_index: int, nodes: set[int], output: int) -> Unit:
        dist = {i: (-1 if self._is_combine(i) else 0) for i in nodes}  # longest path from a layer, -1: none
        for i in sorted(nodes):
            for j in self._pred[i]:
                if j in nodes and dist[j] >= 0:
                    dist[i] = max(dist[i], dist[j] + 1)
        members = sorted((self.nodes[i].name for i in nodes if not self._is_combine(i)), key=self._lidx.__getitem__)
        return Unit(name, "block", tuple(members), self.nodes[output].name, max(dist[output], 0),
                    tuple(self.nodes[i].name for i in sorted(nodes)), cat, block_index)

    # -- export
    def to_dict(self) -> dict:
        return {
            "format": GRAPH_FORMAT, "version": GRAPH_VERSION, "fingerprint": self.fingerprint, "meta": self.meta,
            "layers": [la.to_json() for la in self.layers],
            "nodes": [{"name": n.name, "kind": n.kind, "op": n.op, "scope": n.scope} for n in self.nodes],
            "edges": [list(e) for e in self.edges],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict) -> LayerGraph:
        """Rebuild and validate a graph written by :meth:`to_dict`."""
        if not isinstance(data, dict) or data.get("format") != GRAPH_FORMAT:
            raise ValueError(f"not a layer graph (missing format {GRAPH_FORMAT!r})")
        if data.get("version") != GRAPH_VERSION:
            raise ValueError(f"layer graph version {data.get('version')!r}; this release reads {GRAPH_VERSION}")
        try:
            layers = [LayerNode(d["name"], d["kind"], tuple(int(s) for s in d["shape"]), d["dtype"], d["op_type"],
                                d["block_category"], int(d["block_index"]), d["block"]) for d in data["layers"]]
            nodes = [GraphNode(d["name"], d["kind"], d["op"], d["scope"]) for d in data["nodes"]]
            edges = [(int(s), int(d)) for s, d in data["edges"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed layer graph: {e!r}") from None
        graph = cls(layers, nodes, edges, dict(data.get("meta") or {}))
        graph.validate()
        if data.get("fingerprint") not in (None, graph.fingerprint):
            raise ValueError("layer graph fingerprint does not match its layer table")
        return graph

    @classmethod
    def from_json(cls, text: str) -> LayerGraph:
        return cls.from_dict(json.loads(text))

    def validate(self) -> None:
        """Raise ValueError unless node names are unique and each layer is exactly one layer node."""
        if len(self._index) != len(self.nodes):
            raise ValueError("duplicate node names")
        layer_nodes = sorted(n.name for n in self.nodes if n.kind == "layer")
        if layer_nodes != sorted(la.name for la in self.layers) or len(set(layer_nodes)) != len(self.layers):
            raise ValueError("layer nodes and layer table differ")

    def to_dot(self, name: str = "layer_graph") -> str:
        """Graphviz source: layers as boxes coloured by block category, combine nodes as small ellipses,
        one cluster per block."""
        colors = dict(zip(sorted({la.block_category for la in self.layers}), _PALETTE * 4, strict=False))
        lmap = {la.name: la for la in self.layers}
        clusters: dict[str, list[str]] = defaultdict(list)
        for i, n in enumerate(self.nodes):
            if n.kind == "layer":
                la = lmap[n.name]
                line = (f'n{i} [shape=box, style=filled, fillcolor="{colors[la.block_category]}", '
                        f'label="{_esc(n.name)}\\n{_esc(la.op_type)} {list(la.shape)}"];')
                block = la.block
            else:
                line = f'n{i} [shape=ellipse, fontsize=9, label="{_esc(n.op)}", tooltip="{_esc(n.name)}"];'
                block = block_path(n.scope + ".x")[1]
            clusters[block].append(line)
        out = [f'digraph "{_esc(name)}" {{', "  rankdir=TB;", "  node [fontname=Helvetica];"]
        for k, (block, lines) in enumerate(clusters.items()):
            if block:
                out.append(f'  subgraph cluster_{k} {{ label="{_esc(block)}"; style=rounded;')
                out.extend("    " + ln for ln in lines)
                out.append("  }")
            else:
                out.extend("  " + ln for ln in lines)
        out.extend(f"  n{s} -> n{d};" for s, d in self.edges)
        out.append("}")
        return "\n".join(out) + "\n"


_PALETTE = ("#a6cee3", "#b2df8a", "#fb9a99", "#fdbf6f", "#cab2d6", "#ffff99", "#8dd3c7", "#bebada", "#80b1d3",
            "#fccde5", "#d9d9d9", "#ccebc5", "#ffed6f", "#e5d8bd")


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')
