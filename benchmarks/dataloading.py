"""How many training images per second the real augmentation pipelines deliver, and at what CPU cost per image.

A benchmark, not a test: it reads real JPEGs from an ImageFolder tree (e.g. CIFAR-10 exported as JPEG class
folders, or ImageNet), takes each method's own views (`augmentations()` imported from the method file, so the
numbers are for exactly the pipeline that trains), and times batches for both executors (--augment-on):
    workers   the PIL pipeline in DataLoader workers, for each --workers count: img/s, img/s per worker, and
              the CPU time per image (workers and main process, all views)
    device    the batched executor (common.DeviceAugment) on --device, fed by common.DeviceLoader from two
              sources: the JPEG files (read by --workers processes, decoded and augmented on --device) and the
              same images held in memory as one uint8 tensor (what --dataset cifar10 does; only when all images
              have one size). On CPU the executor runs in this one process, with --threads torch threads:
              img/s is per process, and the CPU time per image is this process's (plus the file readers')
Use it to size --workers: a GPU that trains at X img/s needs about X / (img/s per worker) workers. --per-op
instead times every operator of the PIL pipeline in this process (where a worker's time goes; useful before
adding an augmentation to a fork).

    python benchmarks/dataloading.py --data data/cifar10 --image-size 32 --no-blur --workers 1 2
    python benchmarks/dataloading.py --data data/cifar10 --image-size 32 --no-blur --batch-size 128 \
        --methods moco_co2 adco caco --augment-on device --device cpu --workers 1 --threads 1 2
    python benchmarks/dataloading.py --data data/cifar10 --image-size 32 --no-blur --per-op --methods moco_co2
    python benchmarks/dataloading.py --data /path/to/imagenet --image-size 224 --workers 4 8 --json
    python benchmarks/dataloading.py --data /path/to/imagenet --image-size 224 --augment-on device --workers 4
CPU time is read from the kernel (/proc/<pid>/stat for workers, time.process_time for this process) over the
timed batches; on CUDA the device is synchronised before each clock read, and this process's CPU time then
includes kernel launches and the wait in the synchronisation.
"""
import importlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torchvision
import torchvision.transforms as T
import tyro
from torch.utils.data import TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common import decode_images, make_dataset, make_loader, pil_views  # noqa: E402


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
    augment_on: list[Literal["workers", "device"]] = field(default_factory=lambda: ["workers", "device"])
    """executors to time: the PIL pipeline in DataLoader workers, and/or the batched one on --device"""
    workers: list[int] = field(default_factory=lambda: [1, 2])
    """worker counts to time (device path, JPEG source: processes that only read the files)"""
    device: Optional[str] = None
    """--augment-on device: cpu or cuda (default: cuda if available)"""
    threads: list[int] = field(default_factory=list)
    """--augment-on device: torch threads of this process to time (default: torch's, i.e. OMP_NUM_THREADS or
    the cores)"""
    batch_size: int = 64
    """images per batch (one process)"""
    batches: int = 30
    """timed batches per setting (after 3 warm-up batches, so worker start-up is excluded)"""
    per_op: bool = False
    """time each operator of each PIL pipeline in this process (µs per image, all views) instead of a loader"""
    per_op_images: int = 500
    """--per-op: images timed (after 50 warm-up images)"""
    json: bool = False
    """print one JSON object per setting instead of a table"""


WARMUP_BATCHES = 3


def views_for(name: str, image_size: int, blur: bool = True) -> list:
    """The method file's own augmentations(image_size[, multi_crop], blur): exactly the views that train."""
    script, _, variant = name.partition("-")
    module = importlib.import_module(script)
    if variant == "multi-crop":
        return module.augmentations(image_size, multi_crop=True, blur=blur)
    return module.augmentations(image_size, blur=blur)


def transform_for(name: str, image_size: int, blur: bool = True):
    """The PIL transform of those views (what DataLoader workers run)."""
    return pil_views(views_for(name, image_size, blur))


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


def process_cpu_seconds(pid: int) -> Optional[float]:
    """User + system CPU time of another process (a DataLoader worker), from /proc; None where unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()  # after "pid (comm)": state is field 3
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)
    except (OSError, ValueError, IndexError):
        return None


def worker_pids(it) -> list:
    """The worker processes of a DataLoader iterator (none with workers=0)."""
    return [w.pid for w in getattr(it, "_workers", [])]


def reader_pids(loader) -> list:
    """The file-reading workers of a DeviceLoader (its persistent DataLoader's iterator; none in memory)."""
    return [] if loader.files is None else worker_pids(getattr(loader.files, "_iterator", None))


def batches_forever(loader):
    """The loader's batches, epoch after epoch (a small in-memory set may hold fewer than the batches timed)."""
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def time_batches(next_batch, batches: int, batch_size: int, device: torch.device, pids) -> dict:
    """img/s and CPU µs per image (this process; the given worker processes) over `batches` calls of next_batch,
    after WARMUP_BATCHES untimed ones. The device is synchronised before each clock read."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(WARMUP_BATCHES):
        views = next_batch()
    pids = pids()  # workers exist once the first batch was asked for
    sync()
    workers_before = [process_cpu_seconds(p) for p in pids]
    cpu, start = time.process_time(), time.perf_counter()
    for _ in range(batches):
        views = next_batch()
    sync()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    workers_after = [process_cpu_seconds(p) for p in pids]
    images = batches * batch_size
    readable = all(t is not None for t in workers_before + workers_after)
    worker_cpu = sum(b - a for a, b in zip(workers_before, workers_after)) if readable else None
    return {"views": len(views), "img_per_s": images / seconds,
            "main_cpu_us_per_image": 1e6 * cpu / images,
            "worker_cpu_us_per_image": None if worker_cpu is None else 1e6 * worker_cpu / images,
            "cpu_us_per_image": None if worker_cpu is None else 1e6 * (cpu + worker_cpu) / images}


def time_workers_path(args: Args, name: str) -> list:
    """The PIL pipeline in DataLoader workers, for each --workers count."""
    rows = []
    dataset = make_dataset("imagefolder", args.data, "train", transform_for(name, args.image_size, args.blur))
    for workers in args.workers:
        loader = make_loader(dataset, args.batch_size, 0, 1, workers, seed=0)
        loader.sampler.set_epoch(0)
        it = iter(loader)
        r = time_batches(lambda it=it: next(it)[0], args.batches, args.batch_size, torch.device("cpu"),
                         lambda it=it: worker_pids(it))
        rows.append({"pipeline": name, "augment_on": "workers", "image_size": args.image_size, "blur": args.blur,
                     "workers": workers, "views": r["views"], "img_per_s": r["img_per_s"],
                     "img_per_s_per_worker": r["img_per_s"] / max(workers, 1),
                     "torch_threads": torch.get_num_threads(), **{k: v for k, v in r.items() if k.endswith("image")}})
        del it, loader
    return rows


def held_images(folder, count: int) -> Optional[tuple]:
    """The first `count` images of the ImageFolder decoded to one uint8 tensor [count, 3, H, W] (+ labels), or
    None when they differ in size (a single tensor needs one size, as CIFAR's)."""
    samples = folder.samples[:count]
    data = [torchvision.io.read_file(path) for path, _ in samples]
    images = decode_images(data, [path for path, _ in samples], torch.device("cpu"))
    if len({tuple(im.shape) for im in images}) != 1:
        return None
    return torch.stack(images), [label for _, label in samples]


def time_device_path(args: Args, name: str, device: torch.device) -> list:
    """The batched executor on `device`: JPEG files (decoded on the device), then the images held in memory."""
    views = views_for(name, args.image_size, args.blur)
    folder = make_dataset("imagefolder", args.data, "train", None)
    held = held_images(folder, min(len(folder), args.batch_size * (args.batches + WARMUP_BATCHES)))
    if held is None:
        print(f"{name}: the images differ in size, so no in-memory source (one uint8 tensor needs one size)",
              file=sys.stderr)
    sources = [("jpeg files", folder, workers) for workers in args.workers]
    if held is not None:
        # a TensorDataset of uint8 images takes DeviceLoader's in-memory path, the one --dataset cifar10 takes
        sources.append(("memory uint8", TensorDataset(held[0], torch.tensor(held[1])), 0))
    rows = []
    for threads in args.threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        for source, dataset, workers in sources:
            loader = make_loader(dataset, args.batch_size, 0, 1, workers, seed=0, device_views=views, device=device)
            batches = batches_forever(loader)
            r = time_batches(lambda batches=batches: next(batches)[0], args.batches, args.batch_size, device,
                             lambda loader=loader: reader_pids(loader))
            rows.append({"pipeline": name, "augment_on": "device", "source": source, "device": device.type,
                         "image_size": args.image_size, "blur": args.blur, "workers": workers,
                         "views": r["views"], "img_per_s": r["img_per_s"],
                         "img_per_s_per_process": r["img_per_s"] if device.type == "cpu" else None,
                         "torch_threads": threads, **{k: v for k, v in r.items() if k.endswith("image")}})
            del batches, loader
    return rows


def fmt(value, width: int, digits: int = 0) -> str:
    return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def print_table(rows: list) -> None:
    workers = [r for r in rows if r["augment_on"] == "workers"]
    if workers:
        print(f"{'pipeline':<18}{'size':>6}{'blur':>6}{'views':>7}{'workers':>9}{'img/s':>10}{'img/s/worker':>14}"
              f"{'CPU µs/img':>12}")
        for r in workers:
            print(f"{r['pipeline']:<18}{r['image_size']:>6}{'yes' if r['blur'] else 'no':>6}{r['views']:>7}"
                  f"{r['workers']:>9}"
                  f"{r['img_per_s']:>10.0f}{r['img_per_s_per_worker']:>14.0f}{fmt(r['cpu_us_per_image'], 12)}")
    device = [r for r in rows if r["augment_on"] == "device"]
    if device:
        if workers:
            print()
        print(f"--augment-on device ({device[0]['device']}); CPU µs/img: this process (decode + augment) + the "
              f"file readers")
        print(f"{'pipeline':<18}{'size':>6}{'blur':>6}{'views':>7}{'source':>14}{'readers':>9}{'threads':>9}"
              f"{'img/s':>10}{'img/s/process':>15}{'CPU µs/img':>12}{'(readers)':>11}")
        for r in device:
            print(f"{r['pipeline']:<18}{r['image_size']:>6}{'yes' if r['blur'] else 'no':>6}{r['views']:>7}"
                  f"{r['source']:>14}{r['workers']:>9}{r['torch_threads']:>9}{r['img_per_s']:>10.0f}"
                  f"{fmt(r['img_per_s_per_process'], 15)}{fmt(r['cpu_us_per_image'], 12)}"
                  f"{fmt(r['worker_cpu_us_per_image'], 11)}")


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
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = torch.get_num_threads()
    for name in args.methods:
        try:
            views_for(name, args.image_size, args.blur)
        except (ImportError, AttributeError, TypeError) as e:
            print(f"skipping {name}: {e}", file=sys.stderr)
            continue
        if "workers" in args.augment_on:
            rows += time_workers_path(args, name)
        if "device" in args.augment_on:
            rows += time_device_path(args, name, device)
            torch.set_num_threads(threads)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print_table(rows)
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args))
