"""Shared forward buffers: ``plan_buffers(liveness) -> BufferPlan``.

BLPA keeps the forward's full-precision activations in a few shared buffers:
once a tensor is no longer saved for the backward, its storage can be reused
by any later tensor whose lifetime does not overlap. This is interval
packing, done greedily by size (as TFLite's and ExecuTorch's memory planners
do): tensors in decreasing size, each into the first buffer whose occupants
are all dead before it is born or born after it dies; a new buffer, of that
tensor's size, otherwise. Every later occupant is no larger than the first,
so a buffer's size is its first occupant's.

    >>> plan = plan_buffers(analyze_liveness(program))
    >>> plan.arena_bytes, plan.naive_bytes, len(plan.buffers)
"""
from __future__ import annotations

import dataclasses

from ..errors import InternalError
from .liveness import LiveRange, Liveness

__all__ = ["Buffer", "BufferPlan", "plan_buffers", "pack_intervals"]


@dataclasses.dataclass(frozen=True)
class Buffer:
    """One reusable buffer and the tensors that occupy it, in time order.

    Invariant: occupants' ranges are pairwise disjoint in time and none is
    larger than ``size``.
    """

    size: int
    occupants: tuple[LiveRange, ...]


@dataclasses.dataclass(frozen=True)
class BufferPlan:
    buffers: tuple[Buffer, ...]

    @property
    def arena_bytes(self) -> int:
        return sum(b.size for b in self.buffers)

    @property
    def naive_bytes(self) -> int:
        """What a separate allocation per tensor would hold at once."""
        return sum(r.nbytes for b in self.buffers for r in b.occupants)

    def check(self) -> None:
        """Raise :class:`InternalError` if two occupants of a buffer overlap in time or one does not fit."""
        for i, buf in enumerate(self.buffers):
            for r in buf.occupants:
                if r.nbytes > buf.size:
                    raise InternalError(f"buffer {i}: {r.node.name} ({r.nbytes} B) exceeds {buf.size} B")
            for a, b in zip(buf.occupants, buf.occupants[1:]):
                if a.end >= b.start:
                    raise InternalError(
                        f"buffer {i}: {a.node.name} [{a.start}, {a.end}] overlaps {b.node.name} [{b.start}, {b.end}]"
                    )


def pack_intervals(ranges: list[LiveRange]) -> BufferPlan:
    """Greedy-by-size packing of live ranges into shared buffers (see module docstring)."""
    buffers: list[list[LiveRange]] = []
    sizes: list[int] = []
    # NB: ties broken by start time and name so that the plan is deterministic
    for r in sorted(ranges, key=lambda r: (-r.nbytes, r.start, r.node.name)):
        for i, occupants in enumerate(buffers):
            if all(o.end < r.start or r.end < o.start for o in occupants):
                occupants.append(r)
                break
        else:
            buffers.append([r])
            sizes.append(r.nbytes)
    plan = BufferPlan(
        tuple(Buffer(size, tuple(sorted(occ, key=lambda o: o.start))) for size, occ in zip(sizes, buffers))
    )
    plan.check()
    return plan


def plan_buffers(liveness: Liveness) -> BufferPlan:
    """Pack the forward's transient tensors (produced and dead in the forward, not saved)."""
    transient = [
        r for r in liveness.ranges if not r.saved and r.end < liveness.num_forward and r.nbytes > 0
    ]
    return pack_intervals(transient)
