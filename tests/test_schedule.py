"""Layer splits and tick tables (layout.schedule): pure arithmetic, checked exhaustively."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshscale import InvalidMeshShape, MeshShape
from meshscale.layout.schedule import PADDING, Schedule, check


@st.composite
def schedules(draw):
    layers = draw(st.integers(1, 40))
    pipe = draw(st.integers(1, min(layers, 12)))
    repeats = draw(st.integers(1, max(1, layers // pipe))) if pipe > 1 else 1
    micro = draw(st.integers(pipe if repeats > 1 else 1, 3 * pipe + 2))
    return Schedule.of(MeshShape(pipe, 1, micro, repeats), layers)


@settings(max_examples=300, deadline=None)
@given(schedules())
def test_groups_are_contiguous_as_small_as_possible_and_cover_every_layer_once(s):
    sizes = s.group_sizes
    assert sum(sizes) == s.num_layers and sizes == tuple(sorted(sizes, reverse=True))
    # the largest group, the lockstep tick's work and each stage's memory, is the least
    # any split of L layers into G groups reaches: ceil(L / G)
    assert max(sizes) == s.slots == -(-s.num_layers // s.groups)
    assert s.rows == s.groups * s.slots and s.rows % s.pipe == 0 and s.rows >= s.num_layers
    order = []
    for g in range(s.groups):  # group g = round * pipe + stage, in layer order
        k, stage = divmod(g, s.pipe)
        row = [int(i) for i in s.slot_layers[stage, k] if i != PADDING]
        assert row == list(range(g * s.slots, g * s.slots + len(row)))  # contiguous
        order += row
    assert order == list(range(s.num_layers))
    assert sorted(sum((s.stage_layers(st_) for st_ in range(s.pipe)), [])) == order
    if s.repeats == 1:  # GPipe: a stage's slots are its own slice of the padded stack
        assert s.contiguous
        for stage in range(s.pipe):
            assert list(s.slot_rows[stage, 0]) == list(
                range(stage * s.slots, (stage + 1) * s.slots))


@settings(max_examples=300, deadline=None)
@given(schedules())
def test_idle_stage_ticks_equal_the_bubble_formula(s):
    busy = s.busy()
    assert busy.shape == (s.repeats * s.microbatches + s.pipe - 1, s.pipe)
    assert int(busy.sum()) == s.pipe * s.repeats * s.microbatches  # each stage, each item
    assert s.idle_stage_ticks() == s.pipe * (s.pipe - 1)
    assert s.idle_stage_ticks() / busy.size == pytest.approx(
        (s.pipe - 1) / (s.repeats * s.microbatches + s.pipe - 1))
    assert s.bubble() == pytest.approx(s.idle_stage_ticks() / busy.size)


@settings(max_examples=300, deadline=None)
@given(schedules())
def test_every_microbatch_meets_every_layer_in_order(s):
    """Play the tick rule as the pipeline does (stage 0's inbox, the ring back from the
    last stage) on symbolic values: each microbatch's history of layers."""
    p, m, r = s.pipe, s.microbatches, s.repeats
    inbox = [[] for _ in range(m)]  # round 0 inputs: nothing applied yet
    received = [None] * p
    finished = {}
    for t in range(s.ticks):
        if r > 1 and t >= p:  # the last stage's output of item t - p, back on stage 0
            inbox[(t - p) % m] = received[0]
        outputs = [None] * p
        for stage in range(p):
            item = s.item(t, stage)
            if item is None:
                continue
            x = inbox[t % m] if stage == 0 else received[stage]
            k = item // m
            outputs[stage] = x + [int(i) for i in s.slot_layers[stage, k] if i != PADDING]
            if stage == p - 1 and k == r - 1:
                finished[item % m] = outputs[stage]
        received = [outputs[(stage - 1) % p] for stage in range(p)]
    assert finished == {mb: list(range(s.num_layers)) for mb in range(m)}


@pytest.mark.parametrize("layers,pipe,sizes", [
    (8, 3, (3, 3, 2)), (8, 5, (2, 2, 2, 2, 0)), (8, 6, (2, 2, 2, 2, 0, 0)),
    (8, 7, (2, 2, 2, 2, 0, 0, 0)), (32, 3, (11, 11, 10)), (32, 7, (5, 5, 5, 5, 5, 5, 2)),
    (80, 6, (14, 14, 14, 14, 14, 10)),
])
def test_the_issue_splits(layers, pipe, sizes):
    s = Schedule(layers, pipe)
    assert s.group_sizes == sizes and s.rows == pipe * sizes[0]
    assert s.stage_layers(0) == list(range(sizes[0]))
    assert s.padding_slots() == s.rows - layers  # per microbatch: one per missing layer


def test_circular_groups_interleave_over_the_stages():
    s = Schedule(8, 2, repeats=2, microbatches=2)
    assert s.stage_layers(0) == [0, 1, 4, 5] and s.stage_layers(1) == [2, 3, 6, 7]
    odd = Schedule(7, 2, repeats=2, microbatches=2)  # groups (2, 2, 2, 1)
    assert odd.stage_layers(0) == [0, 1, 4, 5] and odd.stage_layers(1) == [2, 3, 6]
    assert odd.padding_slots() == 2  # one missing layer, for each of 2 microbatches
    assert odd.slot_rows[1, 1].tolist() == [6, 7]  # stage 1's second group: rows 6, 7
    assert Schedule(8, 2, repeats=2, microbatches=4).bubble() == pytest.approx(1 / 9)
    assert Schedule(8, 2, repeats=1, microbatches=4).bubble() == pytest.approx(1 / 5)


def test_schedules_that_do_not_fit_are_refused_with_the_fix():
    check(MeshShape(8, 1), 8)
    with pytest.raises(InvalidMeshShape, match="pipe=9 exceeds num_layers=8"):
        check(MeshShape(9, 1), 8)
    with pytest.raises(InvalidMeshShape, match="choose repeats <= 2"):
        check(MeshShape(4, 1, 4, repeats=3), 8)
    with pytest.raises(InvalidMeshShape, match="needs microbatches >= pipe=4"):
        check(MeshShape(4, 1, 2, repeats=2), 8)
    with pytest.raises(InvalidMeshShape, match="needs pipe > 1"):
        check(MeshShape(1, 1, 2, repeats=2), 8)
    assert MeshShape.parse("4x2/m8/r2") == MeshShape(4, 2, 8, repeats=2)
    assert str(MeshShape(4, 2, 8, repeats=2)) == "4x2/m8/r2" and str(MeshShape(4, 2, 8)) == "4x2/m8"
    with pytest.raises(InvalidMeshShape, match="repeats must be a positive int"):
        MeshShape(2, 1, 2, repeats=0)
    with pytest.raises(InvalidMeshShape, match="PIPExDATA"):
        MeshShape.parse("4x2/m8/rtwo")


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 8), st.integers(1, 9))
def test_regroup_tables_deliver_every_round_group_to_its_stage(pipe, repeats):
    """Play `regroup_tables` as the pipeline's ppermutes do: in shift t every stage sends
    one stored group to stage (s + t) % p; each stage must end with groups k p + s."""
    s = Schedule(pipe * repeats, pipe, repeats, microbatches=pipe)
    send, recv = s.regroup_tables
    stored = {st_: [st_ * repeats + k for k in range(repeats)] + [None] for st_ in range(pipe)}
    out = {st_: [None] * (repeats + 1) for st_ in range(pipe)}
    for t in range(pipe):
        for u in range(send.shape[-1]):
            for src in range(pipe):
                dest = (src + t) % pipe
                out[dest][recv[dest, t, u]] = stored[src][send[src, t, u]]
    for stage in range(pipe):
        assert out[stage][:repeats] == [k * pipe + stage for k in range(repeats)]
