#!/usr/bin/env python
"""The checked COCO loader against detectron2's at COCO's size, side by side in one process.

Writes (once, cached under ``--root``) a synthetic data set of COCO train2017's size: 118,287
tiny real images (16 x 16 PNG, each of the size the JSON states) and 887,000 boxes with
polygons, then times ``detectron2.data.datasets.load_coco_json`` and
``maskd.data.datasets.load_checked_coco_json`` alternately (``--repeats`` each, page cache
warm after the first), and prints the times and their ratios: the checked loader's first load
of a run (which reads every image header) and its other loads (a multi-GPU run's workers, the
evaluations: the headers were checked once).

    python tools/benchmark_coco_load.py [--root datasets/coco_size] [--repeats 2]
"""

import argparse
import json
import os
import statistics
import time

import cv2
import numpy as np

N_IMAGES, N_BOXES = 118_287, 887_000
SIZE = 16


def write_dataset(root: str) -> tuple:
    """(annotation json, image folder) of the synthetic set, written unless cached."""
    images_dir = os.path.join(root, "images")
    json_file = os.path.join(root, "annotations.json")
    if os.path.isfile(json_file):
        return json_file, images_dir
    os.makedirs(images_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    images, annotations = [], []
    for i in range(N_IMAGES):
        name = f"{i:012d}.png"
        cv2.imwrite(os.path.join(images_dir, name), pixels)
        images.append({"id": i + 1, "file_name": name, "width": SIZE, "height": SIZE})
    boxes = rng.uniform(0, SIZE / 2, (N_BOXES, 2))
    owners = rng.integers(1, N_IMAGES + 1, N_BOXES)
    for k, ((x, y), image_id) in enumerate(zip(boxes.tolist(), owners.tolist())):
        annotations.append(
            {
                "id": k + 1,
                "image_id": image_id,
                "category_id": 1 + k % 80,
                "bbox": [x, y, 4.0, 4.0],
                "area": 16.0,
                "iscrowd": 0,
                "segmentation": [[x, y, x + 4, y, x + 4, y + 4, x, y + 4]],
            }
        )
    categories = [{"id": c + 1, "name": f"class{c}"} for c in range(80)]
    tmp = json_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    os.replace(tmp, json_file)
    return json_file, images_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.path.join("datasets", "coco_size"))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    from detectron2.data.datasets import load_coco_json

    from maskd.data.datasets import load_checked_coco_json

    start = time.perf_counter()
    json_file, images = write_dataset(args.root)
    print(f"data set: {N_IMAGES} images, {N_BOXES} boxes ({time.perf_counter() - start:.0f} s)")
    from maskd.data import datasets as checked

    def first_load():  # the run's first load: with the image-header check
        os.environ.pop(checked.CHECKED_IMAGES_ENV, None)
        return load_checked_coco_json(json_file, images, "coco_size")

    loaders = {
        "detectron2 load_coco_json": lambda: load_coco_json(json_file, images, "coco_size"),
        "maskd, a run's first load (image headers read)": first_load,
        "maskd, every other load (workers, evaluations)": lambda: load_checked_coco_json(
            json_file, images, "coco_size"
        ),
    }
    times = {name: [] for name in loaders}
    for _ in range(args.repeats):
        for name, load in loaders.items():
            start = time.perf_counter()
            records = load()
            times[name].append(time.perf_counter() - start)
            assert len(records) == N_IMAGES, (name, len(records))
            del records
    for name, values in times.items():
        print(f"{name}: " + ", ".join(f"{v:.1f} s" for v in values))
    plain, first, other = (statistics.median(v) for v in times.values())
    print(f"median of {args.repeats}, ratio to detectron2's load:")
    print(f"  maskd, a run's first load: {first / plain:.2f}")
    print(f"  maskd, every other load:   {other / plain:.2f}")


if __name__ == "__main__":
    main()
