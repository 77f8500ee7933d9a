"""The search-space rule (meshscale.planning.space): pure arithmetic, checked over many inputs."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshscale import InsufficientDevices, InvalidArgument, MeshShape, SearchSpace
from meshscale.planning.space import (
    candidates,
    default_microbatches,
    microbatch_choices,
    repeat_choices,
    ruled_out,
)

LAYERS = st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16, 24])
BATCH = st.sampled_from([1, 2, 4, 6, 8, 12, 16, 32, 48, 64])
PROPS = settings(max_examples=300, deadline=None)


def is_valid(shape, *, n, p_min, layers, batch):
    circular_ok = shape.repeats == 1 or (shape.pipe > 1 and shape.microbatches >= shape.pipe)
    return (shape.pipe >= p_min and shape.pipe * shape.repeats <= layers and circular_ok
            and shape.num_devices <= n and batch % shape.data == 0
            and (batch // shape.data) % shape.microbatches == 0)


@st.composite
def space_inputs(draw):
    n = draw(st.integers(1, 64))
    p_min = draw(st.integers(1, 8))
    layers, batch = draw(LAYERS), draw(BATCH)
    current = None
    if draw(st.booleans()):
        current = MeshShape(draw(st.integers(1, 16)), draw(st.integers(1, 16)),
                            draw(st.sampled_from([1, 2, 4, 8])), draw(st.sampled_from([1, 2])))
    return n, p_min, layers, batch, current


@PROPS
@given(space_inputs(), st.sampled_from([None, "all", [2, 3]]))
def test_every_candidate_is_valid_and_unique(args, repeats):
    n, p_min, layers, batch, current = args
    if n < p_min:
        return
    found = candidates(n, p_min=p_min, num_layers=layers, global_batch=batch, current=current,
                       repeats=repeats)
    shapes = [c.shape for c in found]
    assert len(shapes) == len(set(shapes))
    assert shapes == sorted(shapes)
    for c in found:
        assert is_valid(c.shape, n=n, p_min=p_min, layers=layers, batch=batch), c
        assert c.kind in {"current", "vertical", "horizontal"}


@PROPS
@given(space_inputs())
def test_data_axis_never_grows_when_devices_not_multiple_of_p_min(args):
    n, p_min, layers, batch, current = args
    if n < p_min or n % p_min == 0:
        return
    found = candidates(n, p_min=p_min, num_layers=layers, global_batch=batch, current=current)
    cap = current.data if current is not None else 1
    assert all(c.shape.data <= cap for c in found)
    assert all(c.kind != "horizontal" for c in found)


@PROPS
@given(space_inputs())
def test_horizontal_candidate_present_when_devices_multiple_of_p_min(args):
    n, p_min, layers, batch, current = args
    if n < p_min or n % p_min:
        return
    found = candidates(n, p_min=p_min, num_layers=layers, global_batch=batch, current=current)
    wide = n // p_min
    if layers % p_min == 0 and batch % wide == 0:
        assert any((c.shape.pipe, c.shape.data) == (p_min, wide) for c in found)


@PROPS
@given(space_inputs())
def test_each_pipe_width_keeps_its_widest_data_axis(args):
    n, p_min, layers, batch, current = args
    if n < p_min:
        return
    found = candidates(n, p_min=p_min, num_layers=layers, global_batch=batch, current=current)
    cap = n if n % p_min == 0 else (current.data if current else 1)
    for pipe in {c.shape.pipe for c in found}:
        widest = max(d for d in range(1, min(cap, n // pipe) + 1) if batch % d == 0)
        assert max(c.shape.data for c in found if c.shape.pipe == pipe) == widest
    # and no valid pipe width is missing: every width up to the layer count, even or not
    for pipe in range(p_min, min(n, layers) + 1):
        assert any(c.shape.pipe == pipe for c in found), pipe


@PROPS
@given(space_inputs())
def test_widest_candidate_uses_every_device_up_to_the_layer_count(args):
    n, p_min, layers, batch, current = args
    if n < p_min or n > layers or p_min > layers:
        return
    found = candidates(n, p_min=p_min, num_layers=layers, global_batch=batch)
    assert max(c.shape.num_devices for c in found) == n  # n stages of one replica at least


def test_device_use_on_real_layer_counts_is_complete():
    """The issue's 60 cases: Llama-3-8B, Qwen2.5-7B, Llama-2-13B, Llama-3-70B layer counts,
    2..16 devices, p_min 2, batch 256: the widest candidate uses every device."""
    for layers in (32, 28, 40, 80):
        for n in range(2, 17):
            found = candidates(n, p_min=2, num_layers=layers, global_batch=256)
            widest = max(found, key=lambda c: c.shape.num_devices)
            assert widest.shape.num_devices == n, (layers, n, widest)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 64), st.integers(1, 8), LAYERS, BATCH)
def test_fewer_devices_than_p_min_raises_with_count_needed(n, p_min, layers, batch):
    if n >= p_min:
        return
    with pytest.raises(InsufficientDevices, match=f"at least {p_min} devices, only {n}"):
        candidates(n, p_min=p_min, num_layers=layers, global_batch=batch)


@PROPS
@given(space_inputs())
def test_current_shape_included_when_still_valid(args):
    n, p_min, layers, batch, current = args
    if n < p_min or current is None:
        return
    found = candidates(n, p_min=p_min, num_layers=layers, global_batch=batch, current=current)
    if is_valid(current, n=n, p_min=p_min, layers=layers, batch=batch):
        assert any(c.shape == current and c.kind == "current" for c in found)


def test_kinds_relative_to_current():
    found = candidates(8, p_min=2, num_layers=8, global_batch=32, current=MeshShape(2, 2, 2))
    kinds = {(c.shape.pipe, c.shape.data): c.kind for c in found}
    assert kinds == {(2, 4): "horizontal", (2, 2): "current", (3, 2): "vertical",
                     (4, 2): "vertical", (5, 1): "vertical", (6, 1): "vertical",
                     (7, 1): "vertical", (8, 1): "vertical"}
    assert MeshShape(2, 2, 2) in [c.shape for c in found]  # the current schedule is kept


def test_kinds_at_start_up_without_current():
    found = candidates(8, p_min=2, num_layers=8, global_batch=32)
    assert [(c.shape.pipe, c.shape.data, c.kind) for c in found] == [
        (2, 4, "horizontal"), (3, 2, "horizontal"), (4, 2, "horizontal"), (5, 1, "vertical"),
        (6, 1, "vertical"), (7, 1, "vertical"), (8, 1, "vertical")]
    odd = candidates(7, p_min=2, num_layers=8, global_batch=32)  # 7 % 2: vertical only
    assert [(c.shape.pipe, c.shape.data, c.kind) for c in odd] == [
        (p, 1, "vertical") for p in range(2, 8)]


def test_lost_devices_refit_current_to_narrower_data():
    found = candidates(6, p_min=2, num_layers=8, global_batch=32, current=MeshShape(2, 4, 2))
    assert [(c.shape, c.kind) for c in found] == [
        (MeshShape(2, 2, 2), "current"), (MeshShape(3, 2, 8), "vertical"),
        (MeshShape(4, 1, 8), "vertical"), (MeshShape(5, 1, 16), "vertical"),
        (MeshShape(6, 1, 16), "vertical")]


def test_microbatch_choices_and_default():
    assert microbatch_choices(2, 16) == [2, 4, 8]
    assert microbatch_choices(4, 8) == [4, 8]
    assert microbatch_choices(3, 32) == [4, 8, 16]  # the nearest divisors above 3, 6, 12
    assert microbatch_choices(4, 6) == [6]  # 6 in [4, 8); nothing in [8, 16) or [16, 32)
    assert microbatch_choices(8, 6) == [6]  # nothing in [8, 64): largest divisor <= 8
    assert microbatch_choices(8, 1) == [1]
    assert default_microbatches(2, 16) == 4  # 2 * pipe
    assert default_microbatches(2, 2) == 2  # 4 does not divide 2: pipe
    assert default_microbatches(7, 256) == 16  # the first divisor of 256 in [14, 28)
    assert default_microbatches(8, 6) == 6  # fallback
    assert default_microbatches(1, 16) == 1  # one stage: no bubble to hide


def test_microbatch_search_lists():
    every = candidates(4, p_min=2, num_layers=4, global_batch=16, microbatches="all")
    assert [str(c.shape) for c in every] == ["2x2/m2", "2x2/m4", "2x2/m8", "3x1/m4",
                                             "3x1/m8", "3x1/m16", "4x1/m4", "4x1/m8",
                                             "4x1/m16"]
    listed = candidates(4, p_min=2, num_layers=4, global_batch=16, microbatches=[3, 4])
    assert [str(c.shape) for c in listed] == ["2x2/m4", "3x1/m4", "4x1/m4"]


def test_bounds_and_bad_arguments():
    found = candidates(8, p_min=1, num_layers=8, global_batch=8, max_pipe=2)
    assert {c.shape.pipe for c in found} == {1, 2}
    assert candidates(4, p_min=2, num_layers=1, global_batch=8) == []  # no stage fits
    assert [c.shape.pipe for c in candidates(4, p_min=2, num_layers=5, global_batch=8)] == [
        2, 3, 4]  # any width up to the layers, even or not
    with pytest.raises(InvalidArgument, match="max_pipe"):
        candidates(8, p_min=4, num_layers=8, global_batch=8, max_pipe=2)
    with pytest.raises(InvalidArgument, match="p_min"):
        candidates(8, p_min=0, num_layers=8, global_batch=8)


def test_repeat_choices_and_circular_candidates():
    assert repeat_choices(4, 8, 32) == [1, 2, 4]
    assert repeat_choices(4, 8, 12) == [1, 2]  # 4 * 4 groups exceed 12 layers
    assert repeat_choices(4, 2, 32) == [1]  # fewer microbatches than stages
    assert repeat_choices(1, 8, 32) == [1]  # one stage has no bubble
    assert repeat_choices(4, 8, 32, None) == [1]
    assert repeat_choices(4, 8, 32, [3]) == [1, 3]
    with pytest.raises(InvalidArgument, match="repeats must be"):
        repeat_choices(4, 8, 32, "some")
    found = candidates(6, p_min=2, num_layers=8, global_batch=32, repeats="all")
    assert [str(c.shape) for c in found] == [
        "2x2/m4", "2x2/m4/r2", "2x2/m4/r4", "3x2/m8", "3x2/m8/r2", "4x1/m8", "4x1/m8/r2",
        "5x1/m16", "6x1/m16"]
    # The running circular schedule is re-fitted with its rounds when they stay valid.
    kept = candidates(4, p_min=2, num_layers=8, global_batch=32,
                      current=MeshShape(2, 4, 4, repeats=2))
    assert [(str(c.shape), c.kind) for c in kept] == [
        ("2x2/m4/r2", "current"), ("3x1/m8", "vertical"), ("4x1/m8", "vertical")]


def test_search_space_is_one_checked_object_and_lists_the_rule():
    space = SearchSpace(p_min=2, max_pipe=4, microbatches=[4, 2], repeats="all")
    assert space.microbatches == (4, 2) and hash(space)  # frozen, hashable
    assert space.candidates(8, num_layers=8, global_batch=16) == candidates(
        8, p_min=2, num_layers=8, global_batch=16, max_pipe=4, microbatches=[2, 4],
        repeats="all")
    with pytest.raises(InvalidArgument, match="max_pipe=1 is below p_min=2"):
        SearchSpace(p_min=2, max_pipe=1)
    with pytest.raises(InvalidArgument, match="p_min must be a positive int or 'auto'"):
        SearchSpace(p_min=0)
    with pytest.raises(InvalidArgument, match="repeats must be None, 'all'"):
        SearchSpace(repeats="some")
    with pytest.raises(InvalidArgument, match="must be resolved first"):
        SearchSpace(p_min="auto").candidates(8, num_layers=8, global_batch=16)


@PROPS
@given(space_inputs(), st.sampled_from([None, "all", [2, 3]]))
def test_every_pipe_width_not_tried_at_full_width_is_explained(args, microbatches):
    """Each pipe width 1..n is tried with its widest data axis (n // pipe), or a ruled-out
    line names it: as a pipe range, or as the pipe x data shapes left out."""
    n, p_min, layers, batch, current = args
    if n < p_min:
        return
    kw = dict(p_min=p_min, num_layers=layers, global_batch=batch, current=current,
              microbatches=microbatches)
    found, why = candidates(n, **kw), ruled_out(n, **kw)
    covered = set()
    for line in why:
        assert line.reason and str(line) == f"{line.what}: {line.reason}"
        if line.what.startswith("pipe "):
            first, _, last = line.what.removeprefix("pipe ").partition("-")
            covered |= set(range(int(first), int(last or first) + 1))
        else:
            covered.add(int(line.what.split("x")[0]))
    for pipe in range(1, n + 1):
        widest = max((c.shape.data for c in found if c.shape.pipe == pipe), default=0)
        if widest < n // pipe:
            assert pipe in covered, (pipe, widest, [str(w) for w in why])


def test_ruled_out_names_batch_p_min_layers_max_pipe_and_the_vertical_rule():
    lines = [str(w) for w in ruled_out(4, p_min=1, num_layers=8, global_batch=7)]
    assert lines == [
        "1x4, 1x3, 1x2: global batch 7 does not split into 4, 3 or 2 replicas: 1x1 (1 of 4 "
        "devices) is tried instead",
        "2x2: global batch 7 does not split into 2 replicas: 2x1 (2 of 4 devices) is tried "
        "instead"]
    lines = [str(w) for w in SearchSpace(p_min=2, max_pipe=6).ruled_out(
        16, num_layers=8, global_batch=24)]
    assert lines[:3] == ["pipe 1: fewer stages than p_min 2",
                         "pipe 7-8: more stages than max_pipe 6",
                         "pipe 9-16: more stages than the model's 8 layers"]
    assert lines[3].startswith("3x5: global batch 24 does not split into 5 replicas: 3x4")
    odd = [str(w) for w in ruled_out(7, p_min=2, num_layers=8, global_batch=24,
                                     current=MeshShape(2, 2, 2))]
    assert "2x3: 7 devices is not a multiple of p_min 2, so only the pipe axis may change: " \
           "the data axis stays at most 2" in odd
    assert ruled_out(8, p_min=1, num_layers=8, global_batch=24) == []  # all tried in full
    none = ruled_out(4, p_min=2, num_layers=4, global_batch=16, microbatches=[3, 5])
    assert str(none[1]) == ("2x2, 2x1: with 2 or 1 replicas no microbatch count of [3, 5] "
                            "splits the replica batch: no data axis works, so no 2-stage "
                            "mesh is tried")


def test_the_current_meshs_1f1b_schedule_stands_when_its_pipe_width_is_refitted():
    """Losing devices re-fits the current pipe width to a narrower data axis: its
    schedule comes along (a 1f1b mesh is never quietly re-fitted as GPipe)."""
    current = MeshShape(2, 4, 4, schedule="1f1b")
    found = [c.shape for c in candidates(6, p_min=2, num_layers=8, global_batch=48,
                                         current=current)]
    two = [s for s in found if s.pipe == 2]
    assert two and all(s.schedule == "1f1b" for s in two), found
    assert all(s.schedule == "gpipe" for s in found if s.pipe != 2)
