"""One short GPU slot, one command: the GPU tests, the step throughput, the data loading, then as many CIFAR-10
evidence rows as fit, every phase within its time budget and the whole within --budget-s.

Made for an interactive allocation of about 15 minutes (at most 10 per command), with no network and a small
upload: the repository plus the CIFAR-10 JPEG pack (~54 MiB). Phases, in order (--phases picks some):
    data         the images: a JPEG pack is unpacked into an ImageFolder under --work-dir (its JPEG bytes written
                 as they are) and its train split decoded to one uint8 tensor on the GPU (nvjpeg, batched), which
                 checks every image and times the decoder
    tests        tests/test_gpu.py (pytest), its output in test_gpu.txt
    throughput   benchmarks/throughput.py's training step: at the CIFAR-10 recipe (ResNet-18, small stem, 32 px,
                 batch 512, K 4096) fp32 and bf16, each with the input ready (--augment-on workers: augmentation
                 happens elsewhere) and with the views made on the device (--augment-on device); MoCo v2 all four,
                 AdCo and CaCo bf16 (they size the evidence phase); then ResNet-50 at 224 px, batch 256, K 65,536,
                 the same four for MoCo v2
    dataloading  benchmarks/dataloading.py on the JPEG files at 32 px: the PIL pipeline in (cores - 1) worker
                 processes, and the device path (files decoded on the GPU; the same images held in memory)
    evidence     benchmarks/evidence.py: first the random-init kNN row (it also times a kNN process), then the
                 pre-training rows of --methods with as many epochs as fit in the time left (at most the
                 recipe's 200), the faster augmentation path as measured, and no kNN monitor; the final kNN of
                 every row runs anyway. The plan, the cut and its reason are written out (plan()).
Each phase gets a share of the budget; time a phase leaves unused goes to the next. A phase that runs out of
time is cut (the pytest or evidence process stopped, SIGTERM first: a pre-training script then stops with a
checkpoint) and what it made is kept. SIGTERM / SIGINT to this process do the same for the running phase.

Data (--data): a JPEG pack (.npz), a folder holding torchvision's cifar-10-batches-py/, or an ImageFolder root
(train/ and test/ or val/ class folders). A JPEG pack holds, for each split S in (train, test):
    S_bytes    uint8 [total bytes]   the JPEG files of the split, one after the other
    S_offsets  int64 [n + 1]         image i is S_bytes[S_offsets[i]:S_offsets[i + 1]]
    S_labels   int64 [n]             class of image i
and `classes`, the class names in label order. The scripts read the unpacked ImageFolder (--dataset imagefolder),
so no method script needs to know about packs; ImageFolder numbers the sorted folder names, so the classes
must be in sorted order (CIFAR-10's are), which is checked.

Outputs, all in --out-dir (six small files, no sub-folder): summary.md and summary.json (every phase: status,
seconds, rows, cuts and their reasons, what is left for the next slot), log.txt (everything printed, the
scripts' output included), test_gpu.txt, evidence.md and evidence.json (benchmarks/evidence.py's results). The
bulky files (unpacked images, checkpoints) go to --work-dir.

    python benchmarks/gpu_slot.py --data data/cifar10_jpg_full.npz --out-dir runs/gpu-slot   # GPU, 9 minutes
    python benchmarks/gpu_slot.py --smoke --out-dir runs/gpu-slot-smoke                        # CPU, 150 s
docs/benchmarks.md ("One GPU slot") has the command for a 15-minute slot and what it leaves for the next one.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torchvision
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import dataloading  # noqa: E402
import evidence  # noqa: E402
import throughput  # noqa: E402
from common import SyntheticImages, decode_images  # noqa: E402

Phase = Literal["data", "tests", "throughput", "dataloading", "evidence"]
PHASES: tuple[Phase, ...] = ("data", "tests", "throughput", "dataloading", "evidence")
SHARE = {"data": 0.08, "tests": 0.15, "throughput": 0.25, "dataloading": 0.08, "evidence": 1.0}  # of the time left
RESERVE_S = 10  # kept at the end for the summary
STOP_GRACE_S = 40  # a stopped script's time to write its checkpoint and exit, before it is killed
SAFETY = 0.7  # the share of the evidence time planned for pre-training (the rest absorbs estimation errors)
SCRIPT = {"moco": "moco_co2", "moco_co2": "moco_co2", "adco": "adco", "caco": "caco"}  # evidence row -> script


@dataclass
class Args:
    """The GPU slot: tests, throughput, data loading, then CIFAR-10 evidence rows, within --budget-s."""

    data: Optional[str] = None
    """a JPEG pack (.npz), a folder holding cifar-10-batches-py/, or an ImageFolder root; not with --smoke"""
    out_dir: str = "runs/gpu-slot"
    """summary.md, summary.json, log.txt, test_gpu.txt, evidence.md, evidence.json"""
    work_dir: Optional[str] = None
    """unpacked images and the evidence runs (checkpoints); default: a temporary folder, removed at the end"""
    budget_s: Optional[float] = None
    """everything stops, results written, within this many seconds, counted once the imports are done (default:
    540, for one command of at most 10 minutes; 150 with --smoke)"""
    phases: tuple[Phase, ...] = PHASES
    """the phases to run, always in the order above"""
    methods: tuple[evidence.Method, ...] = ("moco", "moco_co2", "adco", "caco")
    """evidence rows to pre-train, in this order (the random-init row always comes first); the last are cut first"""
    epochs: Optional[int] = None
    """evidence pre-training epochs (default: as many as fit, planned from the measured step rates)"""
    smoke: bool = False
    """CPU smoke run of the whole command: a generated pack of 64 + 16 images, tiny sizes; numbers mean nothing"""


class Stop(Exception):
    """The slot stops: its time budget is spent, or a stop signal came."""


# ---------------------------------------------------------------------------------------------------------------
# JPEG packs
# ---------------------------------------------------------------------------------------------------------------
def read_pack(path: str) -> dict:
    """{split: (list of JPEG byte strings as uint8 tensors, labels [n])} and "classes" of a pack (format above)."""
    pack = np.load(path)
    out = {"classes": [str(name) for name in pack["classes"]]}
    for split in ("train", "test"):
        data, offsets = torch.from_numpy(pack[f"{split}_bytes"]), pack[f"{split}_offsets"].tolist()
        out[split] = ([data[a:b] for a, b in zip(offsets[:-1], offsets[1:])],
                      torch.from_numpy(pack[f"{split}_labels"]).long())
    if out["classes"] != sorted(out["classes"]):
        raise SystemExit(f"{path}: classes {out['classes']} are not in sorted order; ImageFolder would renumber them")
    return out


def write_pack(path: str, splits: dict, classes: list) -> None:
    """A JPEG pack from {split: (list of encoded JPEGs as uint8 tensors, labels)}: the inverse of read_pack."""
    arrays = {"classes": np.array(classes)}
    for split, (files, labels) in splits.items():
        arrays[f"{split}_bytes"] = torch.cat(files).numpy()
        arrays[f"{split}_offsets"] = np.cumsum([0] + [f.numel() for f in files]).astype(np.int64)
        arrays[f"{split}_labels"] = np.asarray(labels, dtype=np.int64)
    np.savez(path, **arrays)


def unpack(pack: dict, folder: str) -> None:
    """Writes a read pack as an ImageFolder: <folder>/<split>/<class>/<index>.jpg, the JPEG bytes unchanged."""
    for split in ("train", "test"):
        for name in pack["classes"]:
            os.makedirs(os.path.join(folder, split, name), exist_ok=True)
        files, labels = pack[split]
        for i, (data, label) in enumerate(zip(files, labels.tolist())):
            with open(os.path.join(folder, split, pack["classes"][label], f"{i:05d}.jpg"), "wb") as f:
                f.write(data.numpy().tobytes())


def decode_all(files: list, device: torch.device, chunk: int = 4096) -> torch.Tensor:
    """uint8 [n, 3, H, W] on `device` of equally sized JPEGs, decoded in batches (nvjpeg on CUDA)."""
    images = []
    for start in range(0, len(files), chunk):
        part = files[start:start + chunk]
        images += decode_images(part, [f"image {start + i}" for i in range(len(part))], device)
    return torch.stack(images)


def smoke_pack(path: str) -> None:
    """A pack of SyntheticImages (64 train, 16 test, 32 px, 10 classes), JPEG-encoded: --smoke's data."""
    splits = {}
    for split, n, seed in (("train", 64, 0), ("test", 16, 1)):
        images = SyntheticImages(n, 32, seed=seed)
        files = [torchvision.io.encode_jpeg(torchvision.transforms.functional.pil_to_tensor(images.render(i)),
                                            quality=95) for i in range(n)]
        splits[split] = (files, [i % 10 for i in range(n)])
    write_pack(path, splits, SyntheticImages(1, 32).classes)


# ---------------------------------------------------------------------------------------------------------------
# Output: everything printed also goes to log.txt; time limits raise Stop
# ---------------------------------------------------------------------------------------------------------------
class Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
            s.flush()

    def flush(self):
        for s in self.streams:
            s.flush()


class Clock:
    """The slot's deadline (--budget-s less RESERVE_S). When it comes, or SIGTERM / SIGINT does, the slot stops:
    Stop is raised in this thread, after a child process started with run_child was stopped."""

    def __init__(self, budget_s: float):
        self.start = time.monotonic()
        self.end = self.start + budget_s - RESERVE_S
        self.child: Optional[subprocess.Popen] = None
        self.stop_reason: Optional[str] = None
        signal.signal(signal.SIGALRM, lambda *_: self.stop("the time budget is spent"))
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, lambda signum, _: self.stop(f"{signal.Signals(signum).name} received"))
        signal.setitimer(signal.ITIMER_REAL, max(self.left(), 0.01))

    def left(self) -> float:
        return self.end - time.monotonic()

    def disarm(self) -> None:
        """No more stops (while the summary is written)."""
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)

    def stop(self, reason: str) -> None:
        self.stop_reason = self.stop_reason or reason
        if self.child is None:  # else run_child stops the child first, then raises
            raise Stop(self.stop_reason)

    def run_child(self, argv: list, seconds: float, output: str) -> tuple[int, str]:
        """Runs argv from the repository root in its own session, its output written to the file `output` and
        shown as it comes. After `seconds` (or at a stop) it gets SIGTERM, STOP_GRACE_S later SIGKILL.
        Returns (exit code, "" or why it was cut)."""
        print(f"$ {' '.join(argv)}", flush=True)
        cut, stopped_at = "", None
        with open(output, "w") as out, open(output) as follow:
            self.child = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
            deadline = time.monotonic() + seconds
            while True:
                code = self.child.poll()  # before the read: once it has exited, this read gets all the rest
                sys.stdout.write(follow.read())
                if code is not None:
                    break
                now = time.monotonic()
                if stopped_at is None and (now > deadline or self.stop_reason):
                    cut = f"cut: {self.stop_reason}" if self.stop_reason else f"cut after its {seconds:.0f} s"
                    stopped_at = now
                    self.signal_child(signal.SIGTERM)
                elif stopped_at is not None and now > stopped_at + STOP_GRACE_S:
                    self.signal_child(signal.SIGKILL)
                time.sleep(0.2)
        self.child = None
        if self.stop_reason:
            raise Stop(self.stop_reason)
        return code, cut

    def signal_child(self, signum: int) -> None:
        try:
            os.killpg(self.child.pid, signum)
        except ProcessLookupError:  # it has just exited
            pass


# ---------------------------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------------------------
def sizes(smoke: bool) -> dict:
    """The settings of every phase: the real ones, or tiny ones for a CPU smoke run."""
    workers = max(1, min(15, (os.cpu_count() or 2) - 1))  # the recipe's 15 on a 16-core machine
    if not smoke:
        return {"cifar": dict(arch="resnet18", small_stem=True, mlp_dim=512, image_size=32, batch=512,
                              bank_size=4096, bn_splits=8, blur=False),
                "large": dict(arch="resnet50", image_size=224, batch=256, bank_size=65536, blur=True),
                "steps": dict(steps=10, warmup=3), "loader": dict(batch_size=512, batches=20),
                "workers": workers,
                "evidence": ["--batch-size", "512", "--negatives", "4096", "--workers", str(workers)]}
    # smoke: ResNet-18 without the small stem (16x fewer FLOPs at 32 px), as the smoke evidence rows train
    return {"cifar": dict(arch="resnet18", small_stem=False, mlp_dim=512, image_size=32, batch=16, bank_size=32,
                          bn_splits=2, blur=False),
            "large": dict(arch="resnet18", image_size=32, batch=2, bank_size=32, blur=True),
            "steps": dict(steps=1, warmup=1), "loader": dict(batch_size=8, batches=2), "workers": 1,
            "evidence": ["--batch-size", "16", "--negatives", "32", "--workers", "0", "--no-small-stem"]}


def data_phase(args: Args, work: str, device: torch.device, result: dict) -> dict:
    """Where the images are, as evidence.py's and dataloading.py's flags: {"dataset", "data", "jpeg_folder"}."""
    path = os.path.join(work, "smoke.npz") if args.smoke else args.data
    if args.smoke:
        smoke_pack(path)
    if path.endswith(".npz"):
        start = time.perf_counter()
        pack = read_pack(path)
        folder = os.path.join(work, "images")
        unpack(pack, folder)
        result["unpacked_s"] = time.perf_counter() - start
        start = time.perf_counter()
        images = decode_all(pack["train"][0], device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        result.update(pack=os.path.basename(path), train_images=len(pack["train"][0]),
                      test_images=len(pack["test"][0]), classes=pack["classes"], decoded=list(images.shape),
                      decoded_on=device.type, decode_s=seconds, decode_img_per_s=images.shape[0] / seconds)
        print(f"{path}: {images.shape[0]} train images decoded to uint8 {list(images.shape)} on {device} in "
              f"{seconds:.2f} s ({images.shape[0] / seconds:.0f} img/s); ImageFolder under {folder}")
        del images
        return {"dataset": "imagefolder", "data": folder, "jpeg_folder": folder}
    if os.path.isdir(os.path.join(path, "cifar-10-batches-py")):
        return {"dataset": "cifar10", "data": path, "jpeg_folder": None}  # no JPEG files: no dataloading rows
    return {"dataset": "imagefolder", "data": path, "jpeg_folder": path}


def tests_phase(args: Args, clock: Clock, seconds: float, result: dict) -> None:
    """tests/test_gpu.py under pytest, its output in test_gpu.txt (on a CPU every test is skipped)."""
    code, cut = clock.run_child([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                                 "tests/test_gpu.py"], seconds, os.path.join(args.out_dir, "test_gpu.txt"))
    result.update(exit_code=code, cut=cut)


def throughput_rows(size: dict) -> list:
    """(setting, throughput.Args) of every row, in order."""
    rows = []
    for setting, common_args, methods in (("cifar10 recipe", size["cifar"], ("moco_co2", "adco", "caco")),
                                          ("resnet50 224 px", size["large"], ("moco_co2",))):
        for method in methods:
            for amp in (False, True):
                for augment_on in ("workers", "device"):
                    if method != "moco_co2" and not amp:
                        continue  # AdCo and CaCo: bf16 only, what the evidence rows train with
                    extra = dict(common_args, bn_splits=1) if method == "caco" else common_args  # CaCo: no split BN
                    rows.append((setting, throughput.Args(method=method, amp=amp, augment_on=augment_on,
                                                          json=True, **extra, **size["steps"])))
    return rows


def throughput_phase(size: dict, seconds: float, device: torch.device, result: dict) -> None:
    """Each row in this process (no start-up per row); a row starts only when the last one's time still fits."""
    end, last = time.monotonic() + seconds, 0.0
    peak = throughput.peak_matmul_flops(device)
    result.update(rows=[], peak_gflops_measured=peak / 1e9)
    for setting, row_args in throughput_rows(size):
        if time.monotonic() + 1.5 * last > end:
            result["cut"] = (f"cut before {setting} {row_args.method} amp {row_args.amp} {row_args.augment_on} "
                             f"(1.5 x the last row's time no longer fits in the phase's {seconds:.0f} s)")
            return
        start = time.perf_counter()
        row = throughput.run(row_args, device, peak)
        last = time.perf_counter() - start
        result["rows"].append({"setting": setting, **row, "seconds": last})
        print(f"{setting}: {row['method']} amp {row['amp']} augment_on {row['augment_on']}: "
              f"{row['img_per_s']:.0f} img/s, {row['ms_per_step']:.1f} ms/step", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def dataloading_phase(size: dict, folder: str, device: torch.device, result: dict) -> None:
    rows = dataloading.main(dataloading.Args(
        data=folder, methods=["moco_co2"], image_size=32, blur=False, augment_on=["workers", "device"],
        workers=[size["workers"]], device=device.type, json=True, **size["loader"]))
    result["rows"] = rows


def rates(phases: dict, device: torch.device) -> dict:
    """{augment_on: {script: img/s}}: how fast each script trains at the CIFAR recipe, as measured here. The step
    in the precision the scripts train in (bf16 on a GPU, fp32 on a CPU), capped by the data loading measured
    for its path (the PIL workers, or the JPEG files decoded on the device), where measured."""
    loading = phases.get("dataloading", {}).get("rows", [])
    feed = {"workers": [r["img_per_s"] for r in loading if r["augment_on"] == "workers"],
            "device": [r["img_per_s"] for r in loading if r.get("source") == "jpeg files"]}
    out = {"workers": {}, "device": {}}
    for r in phases.get("throughput", {}).get("rows", []):
        if r["setting"] == "cifar10 recipe" and r["amp"] == (device.type == "cuda"):
            out[r["augment_on"]][r["method"]] = min([r["img_per_s"]] + feed[r["augment_on"]])
    return out


def plan(methods: tuple, measured: dict, images: int, seconds: float, per_row_s: float, epochs: Optional[int],
         default_path: str) -> dict:
    """The evidence rows that fit in `seconds`: the augmentation path whose epoch of all rows is faster, and the
    most epochs (at most the recipe's 200) whose pre-training fits in SAFETY x (seconds - rows x per_row_s); while
    not even one epoch fits, the last method is dropped. --epochs, when given, replaces the fitted number."""
    methods, dropped = list(methods), []
    while methods:
        usable = {path: r for path, r in measured.items() if all(SCRIPT[m] in r for m in methods)}
        if not usable and epochs is not None:
            return {"methods": methods, "epochs": epochs, "augment_on": default_path,
                    "reason": f"--epochs {epochs} given, no step rate measured: all rows, --augment-on {default_path}"}
        if not usable:
            return {"methods": [], "epochs": 0, "augment_on": None,
                    "reason": "no step rate was measured for these methods (throughput phase cut): no rows planned"}
        epoch_s = {path: sum(images / r[SCRIPT[m]] for m in methods) for path, r in usable.items()}
        path = min(epoch_s, key=epoch_s.get)
        budget = SAFETY * (seconds - len(methods) * per_row_s)
        fit = min(200, int(budget // epoch_s[path])) if budget > 0 else 0
        if fit >= 1 or epochs is not None:
            rates_text = ", ".join(f"{m} {usable[path][SCRIPT[m]]:.3g}" for m in methods)
            reason = (f"{seconds:.0f} s left for {len(methods)} rows, less {per_row_s:.0f} s per row for start-up "
                      f"and the final kNN (twice the random-init kNN row's time), {SAFETY:.0%} of the rest for "
                      f"pre-training: {budget:.0f} s. One epoch of all rows takes {epoch_s[path]:.1f} s with "
                      f"--augment-on {path} (measured img/s: {rates_text}), so {fit} epochs fit; the recipe's 200 "
                      f"would take {200 * epoch_s[path] / 60:.0f} min")
            reason += f"; --epochs {epochs} given" if epochs is not None else ""
            reason += f". Cut: {', '.join(dropped)} (not even one epoch fits with them)" if dropped else ""
            return {"methods": methods, "epochs": epochs or fit, "augment_on": path, "reason": reason}
        dropped.insert(0, methods.pop())
    return {"methods": [], "epochs": 0, "augment_on": None,
            "reason": f"{seconds:.0f} s left: not one epoch of even one row fits; cut: {', '.join(dropped)}"}


def evidence_phase(args: Args, size: dict, data: dict, work: str, clock: Clock, device: torch.device,
                   phases: dict) -> None:
    """The random-init row first (timed: a kNN process), then the planned pre-training rows. Each evidence.py call
    may run until STOP_GRACE_S before the slot's end, so that a stopped script can still write its checkpoint."""
    result, out = phases["evidence"], os.path.join(work, "evidence")
    base = [sys.executable, "benchmarks/evidence.py", "--dataset", data["dataset"], "--data", data["data"],
            "--image-size", "32", "--out-dir", out, *size["evidence"]]
    start = time.monotonic()
    code, cut = clock.run_child(base + ["--methods", "random_init"], clock.left() - STOP_GRACE_S,
                                os.path.join(work, "evidence-random_init.log"))
    knn_s = time.monotonic() - start
    result.update(random_init_s=knn_s, calls=[{"methods": ["random_init"], "exit_code": code, "cut": cut}])
    if code == 0:
        images = (len(torchvision.datasets.ImageFolder(os.path.join(data["data"], "train")))
                  if data["dataset"] == "imagefolder" else 50000)
        p = result["plan"] = plan(args.methods, rates(phases, device), images, clock.left() - STOP_GRACE_S,
                                  2 * knn_s, args.epochs, "device" if device.type == "cuda" else "workers")
        print(f"evidence plan: {p['reason']}", flush=True)
        if p["methods"]:
            code, cut = clock.run_child(base + ["--methods", *p["methods"], "--epochs", str(p["epochs"]),
                                                "--knn-every", "0", "--augment-on", p["augment_on"]],
                                        clock.left() - STOP_GRACE_S, os.path.join(work, "evidence-rows.log"))
            result["calls"].append({"methods": p["methods"], "exit_code": code, "cut": cut})
    result["cut"] = "; ".join(c["cut"] for c in result["calls"] if c["cut"])
    for name, target in (("results.json", "evidence.json"), ("results.md", "evidence.md")):
        if os.path.exists(os.path.join(out, name)):
            shutil.copy(os.path.join(out, name), os.path.join(args.out_dir, target))
    rows = evidence.read_json(os.path.join(out, "results.json"), [])
    result["rows"] = [{k: r[k] for k in ("method", "knn_top1", "knn_top5", "epochs", "wall_s")} for r in rows]


# ---------------------------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------------------------
def next_slot(args: Args, result: dict) -> list:
    """What this slot did not do, for the next one."""
    left = [f"phase {name}: {r['status']}" + (f" ({r['cut']})" if r.get("cut") else "")
            for name, r in result["phases"].items() if r["status"] != "done"]
    ev = result["phases"].get("evidence", {})
    made = {r["method"] for r in ev.get("rows", [])}
    missing = [m for m in ("random_init", *args.methods) if m not in made]
    if "evidence" in args.phases and missing:
        left.append(f"evidence rows not made: {', '.join(missing)}")
    if 0 < ev.get("plan", {}).get("epochs", 200) < 200:
        left.append(f"the recipe's 200 epochs (this slot: {ev['plan']['epochs']}); a slot of its own per row, e.g. "
                    "`--phases data evidence --methods caco --epochs N` with N from this slot's plan")
    left.append("data loading at 224 px: needs ImageNet-like JPEG files (this slot has 32 px CIFAR-10)")
    return left


def summary_markdown(result: dict) -> str:
    lines = ["# GPU slot (benchmarks/gpu_slot.py)", "",
             f"device {result['device']}, commit {result['commit']}, budget {result['budget_s']:.0f} s, "
             f"ended after {result['elapsed_s']:.0f} s" + (f" ({result['stopped']})" if result.get("stopped") else ""),
             "", "| phase | status | seconds | note |", "|---|---|---|---|"]
    for name, r in result["phases"].items():
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', 0):.0f} | {r.get('cut', r.get('note', ''))} |")
    phases = result["phases"]
    if "data" in phases and "decode_img_per_s" in phases["data"]:
        d = phases["data"]
        lines += ["", f"Data: {d['pack']}, {d['train_images']} + {d['test_images']} images, unpacked in "
                  f"{d['unpacked_s']:.1f} s; train split decoded to uint8 {d['decoded']} on {d['decoded_on']} in "
                  f"{d['decode_s']:.2f} s ({d['decode_img_per_s']:.0f} img/s)."]
    if phases.get("tests", {}).get("exit_code") is not None:
        lines += ["", f"tests/test_gpu.py: exit code {phases['tests']['exit_code']} (test_gpu.txt)."]
    if phases.get("throughput", {}).get("rows"):
        lines += ["", "Training step (benchmarks/throughput.py; workers: input ready, device: views made in the step)",
                  "", "| setting | method | amp | augment_on | img/s | ms/step | augment ms | peak GB | MFU |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in phases["throughput"]["rows"]:
            aug = f"{r['augment_ms']:.1f}" if r["augment_ms"] is not None else "–"
            mem = f"{r['peak_mem_gb']:.1f}" if r["peak_mem_gb"] is not None else "–"
            lines.append(f"| {r['setting']} | {r['method']} | {r['amp']} | {r['augment_on']} | {r['img_per_s']:.0f} "
                         f"| {r['ms_per_step']:.1f} | {aug} | {mem} | {100 * r['mfu']:.1f} % |")
    if phases.get("dataloading", {}).get("rows"):
        lines += ["", "Data loading, moco_co2 views, 32 px (benchmarks/dataloading.py)", "",
                  "| augment_on | source | workers | img/s |", "|---|---|---|---|"]
        for r in phases["dataloading"]["rows"]:
            lines.append(f"| {r['augment_on']} | {r.get('source', 'files, PIL')} | {r['workers']} "
                         f"| {r['img_per_s']:.0f} |")
    ev = phases.get("evidence", {})
    if ev.get("plan"):
        lines += ["", f"Evidence plan: {ev['plan']['reason']}."]
    if ev.get("rows"):
        lines += ["", "| row | epochs | kNN top-1 | kNN top-5 | wall s |", "|---|---|---|---|---|"]
        for r in ev["rows"]:
            lines.append(f"| {r['method']} | {r['epochs']} | {r['knn_top1']:.2f} | {r['knn_top5']:.2f} "
                         f"| {r['wall_s']:.0f} |")
        lines.append("\nThe rows with their commands: evidence.md.")
    lines += ["", "Left for the next slot:", ""] + [f"- {item}" for item in result["next_slot"]]
    return "\n".join(lines) + "\n"


def write_summary(args: Args, result: dict) -> None:
    evidence.write_atomic(os.path.join(args.out_dir, "summary.json"), json.dumps(result, indent=2) + "\n")
    evidence.write_atomic(os.path.join(args.out_dir, "summary.md"), summary_markdown(result))


def main(args: Args) -> dict:
    if args.smoke == (args.data is not None):
        raise SystemExit("give --data (a JPEG pack, a CIFAR-10 root or an ImageFolder root) or --smoke")
    if args.data is not None and not os.path.exists(args.data):
        raise SystemExit(f"--data {args.data} does not exist")
    if "data" not in args.phases:
        raise SystemExit("every phase needs the data phase (it finds, or unpacks, the images)")
    if "evidence" in args.phases and "throughput" not in args.phases and args.epochs is None:
        raise SystemExit("without the throughput phase, the evidence rows need --epochs (nothing to plan from)")
    if args.budget_s is None:
        args.budget_s = 150 if args.smoke else 540
    clock = Clock(args.budget_s)
    os.makedirs(args.out_dir, exist_ok=True)
    log = open(os.path.join(args.out_dir, "log.txt"), "w")
    sys.stdout, sys.stderr = Tee(sys.__stdout__, log), Tee(sys.__stderr__, log)
    work = args.work_dir or tempfile.mkdtemp(prefix="gpu_slot-")
    os.makedirs(work, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    size = sizes(args.smoke)
    result = {"args": asdict(args), "device": evidence.device_name(), "commit": evidence.git_commit(),
              "budget_s": args.budget_s, "phases": {}}
    phases = result["phases"]
    try:
        for name in (name for name in PHASES if name in args.phases):
            r = phases[name] = {"status": "running"}
            share, start = SHARE[name] * clock.left(), time.monotonic()
            print(f"\n=== {name} ({share:.0f} s of the {clock.left():.0f} s left)", flush=True)
            try:
                if name == "data":
                    data = data_phase(args, work, device, r)
                elif name == "tests":
                    tests_phase(args, clock, share, r)
                elif name == "throughput":
                    throughput_phase(size, share, device, r)
                elif name == "dataloading" and data["jpeg_folder"] is None:
                    r["status"], r["note"] = "skipped", "torchvision's CIFAR-10 files are no JPEG files"
                    continue
                elif name == "dataloading":
                    dataloading_phase(size, data["jpeg_folder"], device, r)
                else:
                    evidence_phase(args, size, data, work, clock, device, phases)
                r["status"] = "cut" if r.get("cut") else "done"
            finally:
                r["seconds"] = time.monotonic() - start
                if r["status"] == "running":
                    r["status"] = "stopped"
    except Stop as e:
        result["stopped"] = str(e)
    finally:
        clock.disarm()
        result["elapsed_s"] = time.monotonic() - clock.start
        result["next_slot"] = next_slot(args, result)
        write_summary(args, result)
        print(f"\n{os.path.join(args.out_dir, 'summary.md')}:\n\n{summary_markdown(result)}", flush=True)
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        log.close()
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main(tyro.cli(Args))
