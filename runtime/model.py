"""The token loop's forward pass over a bundle: embed, then per layer its graph (attention with
KV cache, and in a MoE layer the routing decision and any shared expert), the routed experts of
MoE layers, then the head. Which experts a token uses is decided inside each layer graph by the
architecture's own rule; this module only runs graphs and hands each routing decision to the
``ExpertExecutor``.

T new tokens, S tokens in the cache after the step, H hidden.
"""

from __future__ import annotations

import numpy as np

from dymoe.bundle import graph_io as io
from dymoe.bundle.errors import BundleError

from .bundle import Bundle
from .experts import ExpertExecutor, LayerStep

_MOE_OUT = [io.LAYER_OUT_RESIDUAL, io.LAYER_OUT_ATTN_COLSUM, io.LAYER_OUT_ATTN_INPUT, io.LAYER_OUT_EXPERT_INPUT,
            io.LAYER_OUT_EXPERT_IDS, io.LAYER_OUT_EXPERT_WEIGHTS]
_DENSE_OUT = _MOE_OUT[:3]


class KVCache:
    """Per layer, the cache tensors the manifest declares (``model.kv_cache``), each [heads, S, dim]."""

    def __init__(self, bundle: Bundle) -> None:
        spec = bundle.spec
        empty = {c.name: np.zeros((c.heads, 0, c.dim), dtype=np.float32) for c in spec.kv_cache}
        self.names = [c.name for c in spec.kv_cache]
        self.layers = [dict(empty) for _ in range(spec.num_layers)]

    @property
    def length(self) -> int:
        return next(iter(self.layers[0].values())).shape[1]

    def nbytes(self) -> int:
        return sum(a.nbytes for layer in self.layers for a in layer.values())


class MoEModel:
    def __init__(self, bundle: Bundle, experts: ExpertExecutor) -> None:
        self.bundle = bundle
        self.spec = bundle.spec
        self.experts = experts
        bb = bundle.manifest.backbone
        self.backbone_files = [bb.embed, *bb.layers, bb.head]
        self.embed = bundle.session(bb.embed)
        self.layers = [bundle.session(rel) for rel in bb.layers]
        self.head = bundle.session(bb.head)
        cache = [c.name for c in self.spec.kv_cache]
        self._outputs = []
        for layer, (rel, sess) in enumerate(zip(bb.layers, self.layers, strict=True)):
            outs = (_MOE_OUT if self.spec.is_moe(layer) else _DENSE_OUT) + [io.present(n) for n in cache]
            ins = [io.LAYER_IN_HIDDEN, io.LAYER_IN_POSITIONS] + [io.past(n) for n in cache]
            declared = {o.name for o in sess.get_outputs()} | {i.name for i in sess.get_inputs()}
            missing = set(outs + ins) - declared
            if missing:
                raise BundleError(f"{bundle.path / rel} lacks input(s)/output(s) {', '.join(sorted(missing))}",
                                  "the bundle was written by another dymoe version; re-export it")
            self._outputs.append(outs)

    def new_cache(self) -> KVCache:
        return KVCache(self.bundle)

    def forward(self, ids: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run ``ids`` [T] after what ``cache`` holds; return logits ``[T, V]`` or ``[1, V]``."""
        ids = np.asarray(ids, dtype=np.int64)
        start = cache.length
        positions = np.arange(start, start + ids.shape[0], dtype=np.int64)
        phase = "prefill" if start == 0 else "decode"
        h = self.embed.run([io.EMBED_OUT], {io.EMBED_IN_IDS: ids})[0]
        for layer, sess in enumerate(self.layers):
            past = cache.layers[layer]
            feeds = {io.LAYER_IN_HIDDEN: h, io.LAYER_IN_POSITIONS: positions,
                     **{io.past(n): past[n] for n in cache.names}}
            outs = sess.run(self._outputs[layer], feeds)
            n_fixed = len(self._outputs[layer]) - len(cache.names)
            cache.layers[layer] = dict(zip(cache.names, outs[n_fixed:], strict=True))
            residual, colsum, attn_in = outs[:3]
            if n_fixed == len(_DENSE_OUT):
                h = residual
                continue
            x, experts, weights = outs[3:6]
            h = residual + self.experts.run(LayerStep(layer, phase, x, experts, weights, colsum, attn_in))
        if not all_logits:
            h = h[-1:]
        return self.head.run([io.HEAD_OUT], {io.HEAD_IN: h})[0]
