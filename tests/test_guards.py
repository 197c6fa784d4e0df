"""The checks users rely on, tested at the function level from both sides of each guard: what
must pass passes, and every way of being wrong is refused (every side of a box, every element of
a recorded pair, every non-finite value in every dtype the loaders accept). The command-line
cases of tests/test_bad_inputs.py show the messages users see; these cover the domain."""

import functools
import io
import json
import math
import os
import pickle

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np
import pytest
import torch
import yaml
from detectron2.config import instantiate
from detectron2.structures import BoxMode
from hypothesis import example, given, settings

from maskd._compat import check_checkpoint_structure
from maskd.checkpoint.provenance import check_student_preprocessing
from maskd.checkpoint.safe_pickle import UnsafePickleError, load_pkl
from maskd.config.loading import MAX_DEPTH, LazyYamlLoader, read_yaml
from maskd.data.datasets import _box_problems
from maskd.utils.numbers import check_fraction, check_number

# --- YAML -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "a: &a [1, *a]\n",  # a list that contains itself
        "a: &a {b: *a}\n",  # a mapping that contains itself
        "a: &a [1, [2, [3, *a]]]\n",  # deeper
    ],
)
def test_a_yaml_alias_that_contains_its_own_node_is_refused(tmp_path, text):
    path = tmp_path / "self.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match="self.yaml' is refused: an alias refers to a node that"):
        read_yaml(str(path))


def test_a_yaml_alias_used_twice_without_containing_itself_is_read(tmp_path):
    path = tmp_path / "shared.yaml"
    path.write_text("a: &a [1, 2]\nb: *a\nc: [*a, *a]\n")
    assert read_yaml(str(path)) == {"a": [1, 2], "b": [1, 2], "c": [[1, 2], [1, 2]]}


@pytest.mark.parametrize(
    "partial, call, expected",
    [
        (functools.partial(int, base=2), ("101",), 5),
        (functools.partial(int, "ff", base=16), (), 255),
        (functools.partial(max, 1, 7), (3,), 7),
        (functools.partial(sorted, reverse=True), ([1, 3, 2],), [3, 2, 1]),
    ],
)
def test_a_saved_functools_partial_keeps_its_arguments_and_keywords(
    tmp_path, partial, call, expected
):
    """The tag PyYAML writes for a partial (what a saved LazyConfig holds) is instantiated with
    its positional arguments and its keywords."""
    path = tmp_path / "lazy.yaml"
    path.write_text(yaml.dump({"model": {"fn": partial}}, Dumper=yaml.Dumper))
    fn = instantiate(read_yaml(str(path), loader=LazyYamlLoader)["model"]["fn"])
    assert fn(*call) == expected


# --- weights ----------------------------------------------------------------------------------

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_tensor_weights_are_refused_in_every_float_dtype(value, dtype):
    state = {"ok": torch.ones(3, dtype=dtype), "bad": torch.tensor([1.0, value, 2.0], dtype=dtype)}
    with pytest.raises(ValueError, match=r"NaN or inf values: bad"):
        check_checkpoint_structure({"model": state}, "w.pth")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_non_finite_array_weights_are_refused(value, dtype):
    state = {"bad": np.array([0.5, value], dtype=dtype), "n": np.int64(3)}
    with pytest.raises(ValueError, match=r"NaN or inf values: bad"):
        check_checkpoint_structure({"model": state}, "w.pkl")
    with pytest.raises(ValueError, match=r"NaN or inf values: bad"):
        check_checkpoint_structure({"model": {"bad": dtype(value)}}, "w.pkl")


@pytest.mark.parametrize("dtype", DTYPES)
def test_finite_extremes_pass(dtype):
    big = torch.finfo(dtype).max
    state = {"w": torch.tensor([big, -big, 0.0], dtype=dtype), "i": torch.tensor([7])}
    check_checkpoint_structure({"model": state}, "w.pth")


# --- the guarded unpickler: arrays over the whole file, not one by one ------------------------


def _shared_bytes_pickle(count: int, nbytes: int) -> bytes:
    """A pickle of ``count`` float32 arrays whose data is one memoized bytes object of
    ``nbytes``: each array is smaller than the file, all of them together far larger."""
    reconstruct = np.zeros(1).__reduce__()[0]
    data, dtype = b"\x00" * nbytes, np.dtype("float32")

    class Shared(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, np.ndarray):
                state = (1, (nbytes // 4,), dtype, False, data)
                return reconstruct, (np.ndarray, (0,), b"b"), state
            return NotImplemented

    out = io.BytesIO()
    Shared(out, protocol=2).dump([np.zeros(1) for _ in range(count)])
    return out.getvalue()


def test_arrays_sharing_one_buffer_are_counted_together(tmp_path):
    path = tmp_path / "shared.pkl"
    path.write_bytes(_shared_bytes_pickle(400, 2000))
    assert 2000 < path.stat().st_size < 400 * 2000 / 10  # each array under the file, all over
    with pytest.raises(UnsafePickleError, match="more bytes .* than the file holds"):
        load_pkl(str(path))


def test_arrays_within_the_file_load(tmp_path):
    path = tmp_path / "one.pkl"
    path.write_bytes(_shared_bytes_pickle(1, 2000))
    assert [a.shape for a in load_pkl(str(path))] == [(500,)]
    path.write_bytes(pickle.dumps([np.arange(500, dtype=np.float32) for _ in range(4)], protocol=2))
    assert [float(a.sum()) for a in load_pkl(str(path))] == [124750.0] * 4


# --- boxes against their image ----------------------------------------------------------------

WIDTH, HEIGHT = 100, 40  # not square: a check that swaps the sides fails


def _record(box, mode):
    ann = {"bbox": list(box), "bbox_mode": mode}
    return {"file_name": "img.png", "width": WIDTH, "height": HEIGHT, "annotations": [ann]}


def _as(mode, x, y, w, h):
    return (x, y, w, h) if mode == BoxMode.XYWH_ABS else (x, y, x + w, y + h)


OUTSIDE = {
    "left": (-30, 10, 20, 10),
    "above": (10, -30, 20, 10),
    "right": (WIDTH + 5, 10, 20, 10),
    "below": (10, HEIGHT + 5, 20, 10),
    "below, within the width": (60, 50, 10, 10),  # y0 > height although y0 < width
}
INSIDE = {
    "middle": (10, 10, 20, 10),
    "right part, beyond the height": (70, 5, 20, 10),  # x0 > height although x0 < width
    "touching the right edge": (WIDTH, 10, 5, 5),
    "overlapping the left edge": (-5, 10, 10, 10),
    "overlapping the bottom edge": (10, HEIGHT - 2, 10, 10),
}


@pytest.mark.parametrize("mode", [BoxMode.XYWH_ABS, BoxMode.XYXY_ABS])
@pytest.mark.parametrize("side", sorted(OUTSIDE))
def test_a_box_outside_its_image_is_refused_on_every_side(side, mode):
    problems = _box_problems(_record(_as(mode, *OUTSIDE[side]), mode))
    assert len(problems) == 1 and f"lies outside the {WIDTH}x{HEIGHT} image" in problems[0]


@pytest.mark.parametrize("mode", [BoxMode.XYWH_ABS, BoxMode.XYXY_ABS])
@pytest.mark.parametrize("where", sorted(INSIDE))
def test_a_box_that_overlaps_its_image_passes(where, mode):
    assert _box_problems(_record(_as(mode, *INSIDE[where]), mode)) == []


# --- paired values: the student's preprocessing recorded with a stage-2 checkpoint ------------

MEAN, STD = [103.53, 116.28, 123.675], [57.375, 57.12, 58.395]


@pytest.mark.parametrize("index", range(6))
def test_every_element_of_the_recorded_mean_and_std_is_compared(index):
    ours = torch.tensor(MEAN + STD)
    recorded = ours.clone()
    recorded[index] += 1.0
    with pytest.raises(ValueError, match="PIXEL_MEAN .* PIXEL_STD"):
        check_student_preprocessing(recorded, ours, "MODEL.WEIGHTS")
    check_student_preprocessing(ours.clone(), ours, "MODEL.WEIGHTS")  # the same: passes


# --- image headers: EXIF rotation, as detectron2 reads the image ------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_the_header_check_reads_the_exif_rotation(tmp_path, fmt, orientation):
    """A 30x10 image whose EXIF orientation turns it (5-8) is 10x30 for detectron2: the size
    the annotation file must state, in PNG (an eXIf chunk) and JPEG alike."""
    from PIL import Image

    from maskd.data.datasets import _header_problems

    path = str(tmp_path / f"img.{fmt.lower()}")
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.new("RGB", (30, 10), (90, 20, 200)).save(path, fmt, exif=exif)
    turned = orientation in (5, 6, 7, 8)
    right, wrong = ((10, 30), (30, 10)) if turned else ((30, 10), (10, 30))
    record = {"file_name": path, "annotations": []}
    assert _header_problems({**record, "width": right[0], "height": right[1]}) == []
    problems = _header_problems({**record, "width": wrong[0], "height": wrong[1]})
    assert len(problems) == 1 and f"is {right[0]}x{right[1]}, the annotation" in problems[0]


@pytest.mark.parametrize(
    "opcode",
    [pickle.EMPTY_SET, pickle.EMPTY_DICT, pickle.EMPTY_LIST, pickle.EMPTY_TUPLE, pickle.MARK],
    ids=["EMPTY_SET", "EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE", "MARK"],
)
def test_one_opcode_repeated_is_refused_by_the_memory_count(tmp_path, opcode):
    """No global at all: 300,000 times one allowed opcode (a 300 KB file that would build tens
    of MB) is refused by the count of what the unpickler builds; 500 times loads."""
    for count, refused in ((300_000, True), (500, False)):
        path = tmp_path / f"ops{count}.pkl"
        path.write_bytes(
            pickle.PROTO + b"\x04" + pickle.MARK + opcode * count + pickle.LIST + pickle.STOP
        )
        if refused:
            with pytest.raises(
                UnsafePickleError, match="builds more objects than 8 times its size"
            ):
                load_pkl(str(path))
        else:
            loaded = load_pkl(str(path))
            assert len(loaded) == (0 if opcode == pickle.MARK else count)


# --- over the whole domain: property tests (hypothesis; tests/conftest.py bounds the examples) --

ANY_VALUE = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.booleans(),
    st.text(max_size=5),
    st.none(),
    st.lists(st.integers(), max_size=2),
)


def _a_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@given(value=ANY_VALUE, zero_allowed=st.booleans())
def test_a_config_number_passes_exactly_when_finite_and_in_its_bounds(value, zero_allowed):
    """check_number: a finite int or float > 0 (>= 0 where 0 switches a term off) passes; any
    other value (NaN, +-inf, a bool, a string, None, a list, a negative) names its key."""
    ok = _a_number(value) and (value > 0 or (zero_allowed and value == 0))
    if ok:
        check_number(value, "MODEL.MASKD.X", zero_allowed=zero_allowed)
    else:
        with pytest.raises(ValueError, match=r"MODEL\.MASKD\.X must be a finite"):
            check_number(value, "MODEL.MASKD.X", zero_allowed=zero_allowed)


@given(value=ANY_VALUE)
def test_a_config_share_passes_exactly_when_a_number_in_0_1(value):
    """check_fraction: a number in [0, 1] passes as a float; NaN, a bool, a string or anything
    outside names its key (not a TypeError from the comparison)."""
    if _a_number(value) and 0 <= value <= 1:
        assert check_fraction(value, "MODEL.MASKD.SHARE") == float(value)
    else:
        with pytest.raises(ValueError, match=r"MODEL\.MASKD\.SHARE must lie in \[0, 1\]"):
            check_fraction(value, "MODEL.MASKD.SHARE")


FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@given(
    dtype=st.sampled_from(FLOAT_DTYPES),
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    where=st.floats(0, 1, exclude_max=True),
    bad=st.sampled_from([math.nan, math.inf, -math.inf]),
    seed=st.integers(0, 2**16),
)
def test_one_non_finite_value_anywhere_in_a_tensor_is_refused(dtype, shape, where, bad, seed):
    """Any shape, any dtype a .pth holds, NaN/+inf/-inf at any position: refused, naming the
    key; the same tensor with that entry finite passes."""
    g = torch.Generator().manual_seed(seed)
    good = (torch.rand(shape, generator=g) * 2 - 1).to(dtype)
    check_checkpoint_structure({"model": {"w": good}}, "w.pth")
    flat = good.flatten().clone()
    flat[int(where * flat.numel())] = bad
    with pytest.raises(ValueError, match=r"NaN or inf values: w"):
        check_checkpoint_structure({"model": {"w": flat.view(shape)}}, "w.pth")


@given(
    values=hnp.arrays(
        st.sampled_from([np.float16, np.float32, np.float64]),
        hnp.array_shapes(max_dims=3, max_side=4),
        elements={"allow_nan": True, "allow_infinity": True},
    )
)
def test_an_array_is_refused_exactly_when_it_holds_a_non_finite_value(values):
    """Arrays of a .pkl (detectron2's format), every float dtype, every mix of values."""
    state = {"model": {"a": values}}
    if np.isfinite(values).all():
        check_checkpoint_structure(state, "w.pkl")
    else:
        with pytest.raises(ValueError, match=r"NaN or inf values: a"):
            check_checkpoint_structure(state, "w.pkl")


COORD = st.integers(-300, 300)


@given(
    size=st.tuples(st.integers(1, 200), st.integers(1, 200)),
    box=st.tuples(COORD, COORD, st.integers(0, 300), st.integers(0, 300)),
    mode=st.sampled_from([BoxMode.XYWH_ABS, BoxMode.XYXY_ABS]),
)
def test_a_box_is_refused_exactly_when_it_misses_its_image(size, box, mode):
    """Any image size (square or not), any box in either mode: refused exactly when it lies
    wholly outside the image (an edge shared counts as touching)."""
    width, height = size
    x, y, w, h = box
    ann = {"bbox": list(_as(mode, x, y, w, h)), "bbox_mode": mode}
    record = {"file_name": "img.png", "width": width, "height": height, "annotations": [ann]}
    outside = x + w < 0 or y + h < 0 or x > width or y > height
    problems = _box_problems(record)
    assert len(problems) == int(outside)
    if outside:
        assert f"lies outside the {width}x{height} image" in problems[0]


@given(
    ours=st.lists(st.floats(0.5, 300, allow_nan=False), min_size=6, max_size=6),
    index=st.integers(0, 5),
    change=st.floats(1e-3, 10).flatmap(lambda d: st.sampled_from([d, -d])),
)
def test_any_recorded_mean_or_std_element_that_differs_is_refused(ours, index, change):
    """Each of PIXEL_MEAN's and PIXEL_STD's elements, changed by any amount beyond float
    tolerance (relative 1e-3 or more), is refused; the recorded values themselves pass."""
    ours = torch.tensor(ours)
    check_student_preprocessing(ours.clone(), ours, "MODEL.WEIGHTS")
    recorded = ours.clone()
    recorded[index] += change * max(1.0, abs(float(ours[index])))
    with pytest.raises(ValueError, match="PIXEL_MEAN .* PIXEL_STD"):
        check_student_preprocessing(recorded, ours, "MODEL.WEIGHTS")


YAML_LEAF = st.one_of(
    st.integers(-1000, 1000), st.booleans(), st.text("abcxyz_ ", min_size=1, max_size=6)
)
YAML_KEY = st.text("abcdefgh", min_size=1, max_size=4)
YAML_TREE = st.recursive(
    YAML_LEAF,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(YAML_KEY, inner, max_size=3),
    max_leaves=12,
)


@given(tree=st.dictionaries(YAML_KEY, YAML_TREE, min_size=1, max_size=4))
def test_any_config_tree_reads_back_as_written(tmp_path_factory, tree):
    """Nested mappings and lists as yaml writes them, and the same with every subtree written
    once and referenced by alias (a node reused, not containing itself), read back equal."""
    path = tmp_path_factory.mktemp("yaml") / "tree.yaml"
    path.write_text(yaml.safe_dump(tree))
    assert read_yaml(str(path)) == tree
    shared = {"first": tree, "again": tree}  # the same object twice: an anchor and an alias
    text = yaml.dump(shared, Dumper=yaml.SafeDumper)
    assert "&id" in text and "*id" in text
    path.write_text(text)
    assert read_yaml(str(path)) == {"first": tree, "again": tree}


@given(key=YAML_KEY, first=YAML_LEAF, second=YAML_LEAF, depth=st.integers(0, 3))
def test_a_duplicate_key_at_any_depth_is_refused(tmp_path_factory, key, first, second, depth):
    path = tmp_path_factory.mktemp("yaml") / "dup.yaml"
    indent = "  " * depth
    nest = "".join(f"{'  ' * d}n{d}:\n" for d in range(depth))
    path.write_text(
        nest + f"{indent}{key}: {json.dumps(first)}\n{indent}{key}: {json.dumps(second)}\n"
    )
    with pytest.raises(ValueError, match=f"the key '{key}' appears twice in one mapping"):
        read_yaml(str(path))


@settings(max_examples=40)
@given(depth=st.integers(1, 250))
@example(depth=MAX_DEPTH - 2)
@example(depth=MAX_DEPTH - 1)
def test_nesting_is_read_up_to_its_bound_and_refused_beyond(tmp_path_factory, depth):
    """``depth`` lists inside the top mapping: the mapping and the innermost number count as
    levels too, so the document is MAX_DEPTH deep at depth MAX_DEPTH - 2."""
    path = tmp_path_factory.mktemp("yaml") / "deep.yaml"
    path.write_text("a: " + "[" * depth + "1" + "]" * depth + "\n")
    if depth + 2 <= MAX_DEPTH:
        value = read_yaml(str(path))["a"]
        for _ in range(depth):
            (value,) = value
        assert value == 1
    else:
        with pytest.raises(ValueError, match="nest"):
            read_yaml(str(path))


@given(count=st.integers(1, 120), floats=st.integers(1, 600))
@example(count=55, floats=1)  # was refused by counting the stack below each closed mark again
def test_arrays_load_exactly_while_their_bytes_fit_in_the_file(tmp_path_factory, count, floats):
    """``count`` arrays over one memoized buffer of ``4 * floats`` bytes (memo reuse: the data
    is written once): loaded while all the arrays' bytes together fit in the file, refused
    beyond, whatever the count and size."""
    data = _shared_bytes_pickle(count, 4 * floats)
    path = tmp_path_factory.mktemp("pkl") / "shared.pkl"
    path.write_bytes(data)
    if count * 4 * floats <= len(data):
        loaded = load_pkl(str(path))
        assert len(loaded) == count and all(a.shape == (floats,) for a in loaded)
    else:
        with pytest.raises(UnsafePickleError, match="than the file holds"):
            load_pkl(str(path))


def test_a_pickle_of_thousands_of_tiny_arrays_is_refused_by_the_memory_count(tmp_path):
    """Hundreds of arrays of a thousand numbers count under twice the file's size and load;
    thousands of arrays of two numbers count about 14 times (an array's Python objects outweigh
    its bytes): refused by the memory count, as docs/reliability.md says."""
    path = tmp_path / "w.pkl"
    big = {"model": {f"l{i}.w": np.full(1000, i, np.float32) for i in range(300)}}
    path.write_bytes(pickle.dumps(big, protocol=2))
    assert float(load_pkl(str(path))["model"]["l7.w"].sum()) == 7000.0
    tiny = {"model": {f"l{i}.w": np.zeros(2, np.float32) for i in range(2000)}}
    path.write_bytes(pickle.dumps(tiny, protocol=2))
    with pytest.raises(UnsafePickleError, match="builds more objects than 8 times its size"):
        load_pkl(str(path))


# --- files a user names (maskd.utils.files): both sides of each bound, what the message names ---


@pytest.mark.parametrize("size", [0, 1, 63, 64])
def test_a_small_file_is_read_whole_up_to_its_bound(tmp_path, size):
    from maskd.utils.files import read_small_text

    path = tmp_path / "marker"
    path.write_text("x" * size)
    assert read_small_text(str(path), 64, "the marker") == "x" * size


def test_a_small_file_one_byte_over_its_bound_is_refused_naming_it(tmp_path):
    from maskd.utils.files import read_small_text

    path = tmp_path / "marker"
    path.write_text("x" * 65)
    with pytest.raises(ValueError, match="the marker: '.*marker' is larger than the 64 bytes"):
        read_small_text(str(path), 64, "the marker")


def test_a_small_file_that_is_a_link_is_refused_naming_who_named_it(tmp_path):
    from maskd.utils.files import NotARegularFileError, read_small_text

    (tmp_path / "real").write_text("x")
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(NotARegularFileError, match="^last_checkpoint: .* is a symbolic link"):
        read_small_text(str(tmp_path / "link"), 64, "last_checkpoint")


def test_a_live_process_is_alive_and_left_running(tmp_path):
    import subprocess
    import sys

    from maskd.utils.files import _alive

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert _alive(child.pid)
        with pytest.raises(subprocess.TimeoutExpired):  # asked, not signalled
            child.wait(timeout=0.5)
    finally:
        child.kill()
        child.wait()
    assert not _alive(child.pid)


def test_another_users_live_process_counts_as_alive(monkeypatch):
    from maskd.utils import files

    def denied(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(files.os, "kill", denied)
    assert files._alive(12345)


def test_a_small_file_that_is_not_text_is_refused_naming_it(tmp_path):
    from maskd.utils.files import read_small_text

    path = tmp_path / "stage.json"
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match="the marker: '.*stage.json' is not text"):
        read_small_text(str(path), 64, "the marker")
