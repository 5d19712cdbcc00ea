"""Shared forward buffers: never two live tensors in one buffer, never more than the naive sum."""
import random

import pytest
import torch.fx as fx

from fxcompress.passes.buffers import pack_intervals, plan_buffers
from fxcompress.passes.liveness import LiveRange, analyze_liveness
from conftest import ZOO_NAMES, compressed, make_model, train_step


def _ranges(rng: random.Random, n: int) -> list[LiveRange]:
    graph = fx.Graph()
    out = []
    for i in range(n):
        start = rng.randrange(100)
        out.append(LiveRange(graph.placeholder(f"t{i}"), start, start + rng.randrange(30), rng.choice([1, 8, 64, 100, 4096]) * rng.randrange(1, 9), False))
    return out


def _max_live(ranges) -> int:
    return max((sum(r.nbytes for r in ranges if r.start <= t <= r.end) for t in range(200)), default=0)


@pytest.mark.parametrize("seed", range(50))
def test_random_interval_sets(seed):
    rng = random.Random(seed)
    ranges = _ranges(rng, rng.randrange(1, 60))
    plan = pack_intervals(ranges)
    plan.check()
    placed = [r for b in plan.buffers for r in b.occupants]
    assert sorted(id(r) for r in placed) == sorted(id(r) for r in ranges)  # each tensor exactly once
    for b in plan.buffers:
        for i, x in enumerate(b.occupants):
            assert x.nbytes <= b.size
            for y in b.occupants[i + 1:]:
                assert x.end < y.start or y.end < x.start
    assert _max_live(ranges) <= plan.arena_bytes <= plan.naive_bytes


def test_check_catches_an_overlap():
    from fxcompress.errors import InternalError
    from fxcompress.passes.buffers import Buffer, BufferPlan

    g = fx.Graph()
    a, b = g.placeholder("a"), g.placeholder("b")
    bad = BufferPlan((Buffer(8, (LiveRange(a, 0, 5, 8, False), LiveRange(b, 5, 9, 8, False))),))
    with pytest.raises(InternalError, match="overlaps"):
        bad.check()


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_forward_buffers(name):
    model, x = make_model(name)
    (cap,) = train_step(model, x, compressed("int4")).module.capture_log.captures()
    live = analyze_liveness(cap.rewritten)
    plan = plan_buffers(live)
    plan.check()
    assert plan.buffers
    assert plan.arena_bytes <= plan.naive_bytes
    for b in plan.buffers:
        for r in b.occupants:
            assert not r.saved and r.end < live.num_forward
