"""The checks users rely on, tested at the function level from both sides of each guard: what
must pass passes, and every way of being wrong is refused (every side of a box, every element of
a recorded pair, every non-finite value in every dtype the loaders accept). The command-line
cases of tests/test_bad_inputs.py show the messages users see; these cover the domain."""

import functools
import io
import math
import pickle

import numpy as np
import pytest
import torch
import yaml
from detectron2.config import instantiate
from detectron2.structures import BoxMode

from maskd._compat import check_checkpoint_structure
from maskd.checkpoint.provenance import check_student_preprocessing
from maskd.checkpoint.safe_pickle import UnsafePickleError, load_pkl
from maskd.config.loading import LazyYamlLoader, read_yaml
from maskd.data.datasets import _box_problems

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
