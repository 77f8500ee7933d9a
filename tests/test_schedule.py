"""Layer splits and tick tables (layout.schedule): pure arithmetic, checked exhaustively."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshscale import InvalidMeshShape, MeshShape
from meshscale.layout.schedule import (
    IDLE,
    PADDING,
    SCHEDULES,
    Schedule,
    bubble_formula,
    check,
    gpipe_slots,
    one_f_one_b,
    slot_table,
    zb_cap,
    zero_bubble,
)


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



# -- slot tables: GPipe, 1F1B and zero-bubble (layout.schedule.SlotTable) ---------------
@settings(max_examples=150, deadline=None)
@given(st.sampled_from(SCHEDULES), st.integers(1, 12), st.data())
def test_slot_tables_keep_every_dependency_and_count_the_formula(kind, pipe, data):
    """Each stage runs each microbatch's F, B and W once, one op per slot; F on stage s
    follows F on s - 1, B on s follows B on s + 1 (the last stage's B its own F: the head
    runs between), W follows B, all by at least one slot (the ppermute at a slot's end);
    the idle stage-slots counted equal the formula."""
    micro = data.draw(st.integers(1, 4 * pipe + 2))
    t = slot_table(kind, pipe, micro)
    ops = np.stack([t.forward, t.backward, t.weight])
    assert ((ops != IDLE).sum(0) <= 1).all()  # one op per stage per slot
    f, b, w = t.when("forward"), t.when("backward"), t.when("weight")
    assert (f >= 0).all() and (b >= 0).all() and (w >= 0).all()
    for which in ("forward", "backward", "weight"):  # each microbatch exactly once
        table = getattr(t, which)
        for s in range(pipe):
            assert sorted(table[:, s][table[:, s] != IDLE].tolist()) == list(range(micro))
    assert (f[1:] > f[:-1]).all() and (b[:-1] > b[1:]).all()
    assert (b[-1] > f[-1]).all() and (w > b).all() and (b > f).all()
    assert t.busy().sum() == 3 * pipe * micro  # 3 M work slots a stage
    assert t.idle_stage_slots() == t.slots * pipe - 3 * pipe * micro
    assert t.counted_bubble() == pytest.approx(bubble_formula(kind, pipe, micro))
    if kind == "1f1b":
        assert t.counted_bubble() == pytest.approx(gpipe_slots(pipe, micro).counted_bubble())
        # stage s holds at most p - s stage inputs, whatever M
        assert (t.in_flight().max(0) <= np.minimum(micro, pipe - np.arange(pipe))).all()
    if kind == "zb":
        assert (t.in_flight() <= zb_cap(pipe)).all()
        if micro >= pipe:  # the issue's target, of the step's 3 M work slots a stage
            idle = t.idle_stage_slots() / pipe
            assert idle / (3 * micro) <= (pipe - 1) / (3 * micro) + 1 / micro
    # the GPipe slot table is the existing tick rule's arithmetic in slots
    assert gpipe_slots(pipe, micro).counted_bubble() == pytest.approx(
        Schedule(pipe, pipe, 1, micro).bubble())


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 10), st.integers(1, 40))
def test_in_flight_inputs_fit_a_ring_of_buffers_indexed_by_microbatch(pipe, micro):
    """The 1F1B executor keeps a stage's inputs in ``p`` buffers at ``m % p``: the
    microbatches a stage holds at once (from its input's arrival to its W) are
    consecutive and at most ``p``, so no two share a buffer; its cotangents in one."""
    t = one_f_one_b(pipe, micro)
    f, w = t.when("forward"), t.when("weight")
    arrive = np.concatenate([f[:1], f[:-1] + 1])  # stage 0 reads the batch at its F
    for s in range(pipe):
        for u in range(t.slots):
            held = [m for m in range(micro) if arrive[s, m] <= u <= w[s, m]]
            assert held == list(range(held[0], held[0] + len(held))) if held else True
            assert len(held) <= pipe
    # a cotangent waits at most from its arrival to the B that reads it: one buffer;
    # W runs right after B: one buffer of what W reads
    assert t.cotangents_waiting().max() == 1 and t.rings() == (min(pipe, micro), 1, 1)
    z = zero_bubble(pipe, micro)  # W deferred: up to the in-flight cap wait for it
    assert z.rings()[1] == 1 and max(z.rings()) <= zb_cap(pipe)


def test_one_f_one_b_table_for_four_stages():
    t = one_f_one_b(4, 4)
    assert t.slots == 21 and t.idle_stage_slots() == 4 * 9  # 3 (p - 1) per stage
    assert t.forward[:, 0].tolist()[:10] == [0, -1, -1, 1, -1, -1, 2, -1, -1, 3]
    assert t.when("backward")[0].tolist() == [10, 13, 16, 19]  # 3 m + 3 p - 2 - 2 s
    assert t.when("backward")[3].tolist() == [4, 7, 10, 13]  # right after the last F
    assert t.in_flight().max(0).tolist() == [4, 3, 2, 1]
    assert zero_bubble(4, 16).idle_stage_slots() == 4 * 3  # p - 1 a stage
    assert zero_bubble(4, 16, cap=4).idle_stage_slots() > 4 * 3  # 1F1B's memory costs
    with pytest.raises(InvalidMeshShape, match="schedule must be one of gpipe, 1f1b, zb"):
        slot_table("interleaved", 4, 4)


def test_mesh_shape_names_its_schedule_and_old_strings_round_trip():
    for text in ("4x2/m16/1f1b", "4x2/m16/zb", "4x2/m8/r2", "4x2/m8", "1x8/m1"):
        assert str(MeshShape.parse(text)) == text
    assert MeshShape.parse("4x2/m16/1f1b") == MeshShape(4, 2, 16, schedule="1f1b")
    assert MeshShape.parse("4x2/m16/gpipe") == MeshShape(4, 2, 16)  # gpipe: the default
    with pytest.raises(InvalidMeshShape, match="runs only the gpipe schedule.*use repeats=1"):
        MeshShape.parse("4x2/m8/r2/zb")
    with pytest.raises(InvalidMeshShape, match="schedule must be one of gpipe, 1f1b, zb"):
        MeshShape(4, 2, 8, schedule="interleaved")
    with pytest.raises(InvalidMeshShape, match=r"PIPExDATA\[/mM\]\[/rR\]\[/1f1b\|zb\]"):
        MeshShape.parse("4x2/m8/2f2b")
