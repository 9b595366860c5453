"""How many training images per second the real augmentation pipelines deliver, per DataLoader worker.

A benchmark, not a test: it reads real JPEGs from an ImageFolder tree (e.g. CIFAR-10 exported as JPEG class
folders, or ImageNet), builds each method's own training transform (imported from
the method file, so the numbers are for exactly the pipeline that trains), and times batches coming out of a
DataLoader for several worker counts. Use it to size --workers: a GPU that trains at X img/s needs about
X / (img/s per worker) workers. --per-op instead times every operator of the pipeline in this process (where
a worker's time goes; useful before adding an augmentation to a fork).

    python benchmarks/dataloading.py --data data/cifar10 --image-size 32 --no-blur --workers 1 2
    python benchmarks/dataloading.py --data data/cifar10 --image-size 32 --no-blur --per-op --methods moco_co2
    python benchmarks/dataloading.py --data /path/to/imagenet --image-size 224 --workers 4 8 --json
"""
import importlib
import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torchvision.transforms as T
import tyro

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common import make_dataset, make_loader, pil_views  # noqa: E402


@dataclass
class Args:
    data: str
    """ImageFolder root with train/ (ImageNet layout)"""
    methods: list[str] = field(default_factory=lambda: ["moco_co2", "adco", "adco-multi-crop", "caco",
                                                        "caco-multi-crop"])
    """pipelines to time: <script> or <script>-multi-crop"""
    image_size: int = 224
    """crop size passed to the method's transform (multi-crop sizes scale with it)"""
    blur: bool = True
    """Gaussian blur as in the ImageNet recipes; --no-blur for the CIFAR-10 recipe (docs/cifar10.md)"""
    workers: list[int] = field(default_factory=lambda: [1, 2])
    """worker counts to time"""
    batch_size: int = 64
    """images per batch (one process)"""
    batches: int = 30
    """timed batches per setting (after 3 warm-up batches, so worker start-up is excluded)"""
    per_op: bool = False
    """time each operator of each pipeline in this process (µs per image, all views) instead of a DataLoader"""
    per_op_images: int = 500
    """--per-op: images timed (after 50 warm-up images)"""
    json: bool = False
    """print one JSON object per setting instead of a table"""


def transform_for(name: str, image_size: int, blur: bool = True):
    """The method file's own augmentations(image_size[, multi_crop], blur): exactly the pipeline that trains."""
    script, _, variant = name.partition("-")
    module = importlib.import_module(script)
    if variant == "multi-crop":
        return pil_views(module.augmentations(image_size, multi_crop=True, blur=blur))
    return pil_views(module.augmentations(image_size, blur=blur))


def time_operators(name: str, transform, dataset, images: int) -> dict:
    """µs per image spent in each operator (summed over the views; RandomApply counted with its probability,
    as in training) and in reading + decoding the JPEG, one process, one thread."""
    views = transform.pipelines
    for i in range(50):  # warm-up: the first calls of some operators pay one-time set-up costs
        transform(dataset[i % len(dataset)][0])
    spent: dict[str, float] = {"read + decode JPEG": 0.0}
    for i in range(50, 50 + images):
        start = time.perf_counter()
        img = dataset[i % len(dataset)][0]
        spent["read + decode JPEG"] += time.perf_counter() - start
        for view in views:
            x = img
            for op in view.transforms:
                label = type(op).__name__
                if isinstance(op, T.RandomApply):
                    label = f"{type(op.transforms[0]).__name__} (p={op.p:g})"
                start = time.perf_counter()
                x = op(x)
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - start
    total = sum(spent.values())
    return {"pipeline": name, "views": len(views), "images": images,
            "us_per_image": {k: 1e6 * v / images for k, v in spent.items()},
            "share": {k: v / total for k, v in spent.items()}, "img_per_s": images / total}


def main(args: Args) -> list[dict]:
    rows = []
    if args.per_op:
        torch.set_num_threads(1)  # as in a DataLoader worker
        for name in args.methods:
            dataset = make_dataset("imagefolder", args.data, "train", None)
            rows.append(time_operators(name, transform_for(name, args.image_size, args.blur), dataset,
                                       args.per_op_images))
        for row in rows:
            if args.json:
                print(json.dumps(row))
                continue
            print(f"{row['pipeline']} ({row['views']} views, {row['images']} images, one process): "
                  f"{row['img_per_s']:.0f} img/s")
            for label, us in sorted(row["us_per_image"].items(), key=lambda kv: -kv[1]):
                print(f"  {label:<28}{us:>9.1f} µs/img{100 * row['share'][label]:>7.1f} %")
        return rows
    for name in args.methods:
        try:
            transform = transform_for(name, args.image_size, args.blur)
        except (ImportError, AttributeError, TypeError) as e:
            print(f"skipping {name}: {e}", file=sys.stderr)
            continue
        dataset = make_dataset("imagefolder", args.data, "train", transform)
        for workers in args.workers:
            loader = make_loader(dataset, args.batch_size, 0, 1, workers, seed=0)
            loader.sampler.set_epoch(0)
            it = iter(loader)
            for _ in range(3):
                views, _ = next(it)
            start = time.perf_counter()
            for _ in range(args.batches):
                views, _ = next(it)
            seconds = time.perf_counter() - start
            images = args.batches * args.batch_size
            rows.append({"pipeline": name, "image_size": args.image_size, "blur": args.blur, "workers": workers,
                         "views": len(views), "img_per_s": images / seconds,
                         "img_per_s_per_worker": images / seconds / max(workers, 1),
                         "torch_threads": torch.get_num_threads()})
            del it, loader
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(f"{'pipeline':<18}{'size':>6}{'blur':>6}{'views':>7}{'workers':>9}{'img/s':>10}{'img/s/worker':>14}")
        for r in rows:
            print(f"{r['pipeline']:<18}{r['image_size']:>6}{'yes' if r['blur'] else 'no':>6}{r['views']:>7}"
                  f"{r['workers']:>9}"
                  f"{r['img_per_s']:>10.0f}{r['img_per_s_per_worker']:>14.0f}")
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args))
