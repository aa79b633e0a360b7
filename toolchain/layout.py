"""Where each canonical tensor comes from, and the proof that a checkpoint is used exactly once.

An architecture module (``archs/``) maps canonical names onto source tensors
(``{canonical name: Ref}``) and says which shape each canonical tensor must have; a
:class:`Ref` names a source tensor and, for fused source tensors, which expert (``index``) and
which rows along the next axis. :func:`check_coverage` proves every source tensor is used
exactly once, with the right shapes.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from dymoe.bundle.errors import CheckpointError


@dataclass(frozen=True)
class Ref:
    source: str
    index: int | None = None  # position along a fused tensor's first (expert) axis
    rows: tuple[int, int] | None = None  # row range along the next axis


def check_coverage(mapping: dict[str, Ref], want: dict[str, tuple[int, ...]],
                   source_shapes: dict[str, tuple[int, ...]], model_type: str) -> None:
    """Fail loudly unless the mapping uses every source tensor exactly once, with right shapes.

    ``want`` maps each canonical name to its shape; ``source_shapes`` each checkpoint tensor to its own.
    """
    missing_canon = sorted(set(want) - set(mapping))
    extra_canon = sorted(set(mapping) - set(want))
    if missing_canon or extra_canon:
        raise AssertionError(f"architecture mapping lacks canonical tensors {missing_canon[:5]} "
                             f"or maps unknown ones {extra_canon[:5]}")
    absent = sorted({r.source for r in mapping.values()} - set(source_shapes))
    if absent:
        raise CheckpointError(
            f"checkpoint lacks {len(absent)} tensor(s) the {model_type} layout needs: "
            f"{', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}",
            "the checkpoint is incomplete or its config.json does not match its weights",
        )
    leftovers = sorted(set(source_shapes) - {r.source for r in mapping.values()})
    if leftovers:
        raise CheckpointError(
            f"{len(leftovers)} checkpoint tensor(s) would be ignored by the {model_type} export: "
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
