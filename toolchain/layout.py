"""The canonical tensor layout every architecture maps onto.

Canonical names (torch ``Linear`` orientation, ``[out, in]``; H hidden, I expert intermediate,
S shared-expert intermediate, E experts, V vocabulary, Q = heads * head_dim, KV likewise):

    embed [V, H]                       final_norm [H]        lm_head [V, H] (absent when tied)
    layers.{l}.attn_norm [H]           layers.{l}.ffn_norm [H]
    layers.{l}.q [Q, H]  .k [KV, H]  .v [KV, H]  .o [H, Q]   (+ .q_bias .k_bias .v_bias)
    layers.{l}.q_norm, .k_norm         [head_dim] ("head") or [Q] / [KV] ("full")
    layers.{l}.router [E, H]
    layers.{l}.experts.{e}.gate [I, H]  .up [I, H]  .down [H, I]
    layers.{l}.shared.gate [S, H]  .up [S, H]  .down [H, S]   layers.{l}.shared_gate [1, H]

An architecture module returns ``{canonical name: Ref}``; a :class:`Ref` names a source tensor
and, for fused source tensors, which expert (``index``) and which rows along the next axis.
:func:`check_coverage` proves every source tensor is used exactly once.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from dymoe.bundle.errors import CheckpointError
from dymoe.bundle.manifest import ModelSpec


@dataclass(frozen=True)
class Ref:
    source: str
    index: int | None = None  # position along a fused tensor's first (expert) axis
    rows: tuple[int, int] | None = None  # row range along the next axis


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor this spec needs, with its shape."""
    H, V, D = spec.hidden_size, spec.vocab_size, spec.head_dim
    Q, KV = spec.num_heads * D, spec.num_kv_heads * D
    I, S = spec.expert_intermediate_size, spec.shared_intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"embed": (V, H), "final_norm": (H,)}
    if not spec.tie_word_embeddings:
        shapes["lm_head"] = (V, H)
    for layer in range(spec.num_layers):
        p = f"layers.{layer}."
        shapes.update({p + "attn_norm": (H,), p + "ffn_norm": (H,), p + "q": (Q, H), p + "k": (KV, H),
                       p + "v": (KV, H), p + "o": (H, Q), p + "router": (spec.num_experts, H)})
        if spec.attention_bias:
            shapes.update({p + "q_bias": (Q,), p + "k_bias": (KV,), p + "v_bias": (KV,)})
        if spec.qk_norm == "head":
            shapes.update({p + "q_norm": (D,), p + "k_norm": (D,)})
        elif spec.qk_norm == "full":
            shapes.update({p + "q_norm": (Q,), p + "k_norm": (KV,)})
        for e in range(spec.num_experts):
            q = f"{p}experts.{e}."
            shapes.update({q + "gate": (I, H), q + "up": (I, H), q + "down": (H, I)})
        if S:
            shapes.update({p + "shared.gate": (S, H), p + "shared.up": (S, H), p + "shared.down": (H, S)})
            if spec.shared_expert_gate:
                shapes[p + "shared_gate"] = (1, H)
    return shapes


def check_coverage(
    mapping: dict[str, Ref],
    spec: ModelSpec,
    source_shapes: dict[str, tuple[int, ...]],
) -> None:
    """Fail loudly unless the mapping uses every source tensor exactly once, with right shapes.

    ``source_shapes`` maps each tensor name in the checkpoint to its shape.
    """
    want = expected_shapes(spec)
    missing_canon = sorted(set(want) - set(mapping))
    if missing_canon:
        raise AssertionError(f"architecture mapping lacks canonical tensors {missing_canon[:5]}")
    absent = sorted({r.source for r in mapping.values()} - set(source_shapes))
    if absent:
        raise CheckpointError(
            f"checkpoint lacks {len(absent)} tensor(s) the {spec.model_type} layout needs: "
            f"{', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}",
            "the checkpoint is incomplete or its config.json does not match its weights",
        )
    leftovers = sorted(set(source_shapes) - {r.source for r in mapping.values()})
    if leftovers:
        raise CheckpointError(
            f"{len(leftovers)} checkpoint tensor(s) would be ignored by the {spec.model_type} export: "
            f"{', '.join(leftovers[:5])}{' ...' if len(leftovers) > 5 else ''}",
            "dymoe exports every tensor exactly once; this checkpoint has parts dymoe does not "
            "support yet (please report it)",
        )
    # Each source tensor must be covered exactly: by one whole use, or by disjoint parts that
    # add up to the whole tensor.
    parts: dict[str, list[tuple[str, Ref]]] = defaultdict(list)
    for canon, ref in mapping.items():
        parts[ref.source].append((canon, ref))
    for source, uses in parts.items():
        src_shape = source_shapes[source]
        covered = 0
        seen: set[tuple] = set()
        for canon, ref in uses:
            shape = list(src_shape)
            if ref.index is not None:
                if not 0 <= ref.index < shape[0]:
                    raise _shape_error(source, src_shape, canon, want[canon])
                shape = shape[1:]
            if ref.rows is not None:
                r0, r1 = ref.rows
                if not 0 <= r0 < r1 <= shape[0]:
                    raise _shape_error(source, src_shape, canon, want[canon])
                shape = [r1 - r0, *shape[1:]]
            if tuple(shape) != want[canon]:
                raise _shape_error(source, src_shape, canon, want[canon])
            key = (ref.index, ref.rows)
            if key in seen:
                raise AssertionError(f"mapping uses {source} {key} twice")
            seen.add(key)
            n = 1
            for d in shape:
                n *= d
            covered += n
        total = 1
        for d in src_shape:
            total *= d
        if covered != total:
            raise CheckpointError(
                f"tensor {source} is only partly used ({covered} of {total} values)",
                "its shape does not match config.json; check the checkpoint",
            )


def _shape_error(source, src_shape, canon, want) -> CheckpointError:
    return CheckpointError(
        f"tensor {source} has shape {list(src_shape)}, which does not give {canon} of shape {list(want)}",
        "config.json does not match the weights; check the checkpoint",
    )
