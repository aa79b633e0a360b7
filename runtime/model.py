"""The token loop's forward pass over a bundle: embed, then per layer the backbone graph
(attention with KV cache, router, shared expert) and the routed experts, then the head.

T new tokens, S tokens in the cache after the step, H hidden, K kv heads, D head_dim.
"""

from __future__ import annotations

import numpy as np

from dymoe.bundle import graph_io as io
from dymoe.bundle.errors import BundleError

from .bundle import Bundle
from .experts import ExpertExecutor, LayerStep
from .routing import route


class KVCache:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int) -> None:
        empty = np.zeros((kv_heads, 0, head_dim), dtype=np.float32)
        self.keys = [empty] * num_layers
        self.values = [empty] * num_layers

    @property
    def length(self) -> int:
        return self.keys[0].shape[1]


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
        self._layer_outputs = [io.LAYER_OUT_RESIDUAL, io.LAYER_OUT_ROUTER_INPUT, io.LAYER_OUT_ROUTER_LOGITS,
                               io.LAYER_OUT_PRESENT_KEY, io.LAYER_OUT_PRESENT_VALUE, io.LAYER_OUT_ATTN_COLSUM,
                               io.LAYER_OUT_ATTN_INPUT]
        if self.spec.shared_intermediate_size:
            self._layer_outputs.append(io.LAYER_OUT_SHARED)
        for rel, sess in zip(bb.layers, self.layers, strict=True):
            missing = set(self._layer_outputs) - {o.name for o in sess.get_outputs()}
            if missing:
                raise BundleError(f"{bundle.path / rel} lacks output(s) {', '.join(sorted(missing))}",
                                  "the bundle was written by another dymoe version; re-export it")

    def new_cache(self) -> KVCache:
        return KVCache(self.spec.num_layers, self.spec.num_kv_heads, self.spec.head_dim)

    def forward(self, ids: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run ``ids`` [T] after what ``cache`` holds; return logits ``[T, V]`` or ``[1, V]``."""
        ids = np.asarray(ids, dtype=np.int64)
        start = cache.length
        positions = np.arange(start, start + ids.shape[0], dtype=np.int64)
        phase = "prefill" if start == 0 else "decode"
        h = self.embed.run([io.EMBED_OUT], {io.EMBED_IN_IDS: ids})[0]
        for layer, sess in enumerate(self.layers):
            outs = sess.run(self._layer_outputs, {
                io.LAYER_IN_HIDDEN: h, io.LAYER_IN_POSITIONS: positions,
                io.LAYER_IN_PAST_KEY: cache.keys[layer], io.LAYER_IN_PAST_VALUE: cache.values[layer]})
            residual, router_in, logits, cache.keys[layer], cache.values[layer], colsum, attn_in = outs[:7]
            experts, weights = route(logits, self.spec.top_k, self.spec.norm_topk_prob)
            step = LayerStep(layer, phase, router_in, logits, experts, weights, colsum, h, attn_in)
            h = residual + self.experts.run(step)
            if self.spec.shared_intermediate_size:
                h = h + outs[7]
        if not all_logits:
            h = h[-1:]
        return self.head.run([io.HEAD_OUT], {io.HEAD_IN: h})[0]
