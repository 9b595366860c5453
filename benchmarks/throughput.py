"""Training-step throughput of each method on synthetic data already on the device (optionally augmented there).

A benchmark, not a test. For a method, architecture, image size and per-device batch it times warm training
steps and prints images/s, ms/step, peak memory, model FLOP utilisation, and where the step goes:
    encoders     query/key forward, EMA, backward and optimizer step (the ResNets and heads)
    loss         logits, softmax, cross-entropy, KL: the fp32 N x K arithmetic
    queue/bank   the queue enqueue (MoCo) or the adversarial bank update (AdCo, CaCo)
    collectives  all_gather / all_reduce / broadcast (zero with one process)
Throughput comes from steps timed without any synchronisation inside the step (what training sees); the
breakdown from separate steps with a device synchronisation between phases (which costs a little, so the
phase times add up to slightly more than the free-running step).

The step is composed from the method file's own functions (Encoder, momentum_update, infonce_logits,
co2_loss, enqueue, bank_grad, ...), in the order its main() calls them; data loading is excluded on purpose
(benchmarks/dataloading.py measures it).

--augment-on workers (default): every step gets the same synthetic float batch (augmentation runs in DataLoader
workers in training, so it is not part of the step). --augment-on device: every step first draws the method's
own two views (its augmentations(), --blur/--no-blur) with common.DeviceAugment from a uint8 batch of random
images held on the device, --source-size px square (default: the crop size up to 64 px, as CIFAR; above,
image_size x 256/224, i.e. 256 for 224 px crops; original ImageNet JPEGs are larger, about 470 x 390 on
average), as training with --augment-on device does after its loader has the images on the device (decoding
and the file reading excluded; benchmarks/dataloading.py times those). The step time then includes the
augmentation; its share is reported twice: the augmentation alone timed over as many steps (synchronised at
both ends) divided by the free-running step, and its phase in the synchronised breakdown ("augment").

    python benchmarks/throughput.py --method moco_co2 --arch resnet18 --image-size 32 --batch 16 --device cpu
    python benchmarks/throughput.py --method adco --sweep            # GPU: fp32 vs bf16 vs +channels_last vs +compile
    python benchmarks/throughput.py --method caco --batch 128 --json
    python benchmarks/throughput.py --method moco_co2 --arch resnet18 --small-stem --mlp-dim 512 --image-size 32 \
        --batch 512 --bank-size 4096 --bn-splits 8 --sweep   # the CIFAR-10 recipe's step (GPU)
    python benchmarks/throughput.py --method moco_co2 --arch resnet18 --small-stem --mlp-dim 512 --image-size 32 \
        --batch 512 --bank-size 4096 --bn-splits 8 --augment-on device --no-blur   # + its augmentation on the GPU
    python benchmarks/throughput.py --method caco --augment-on device --source-size 256   # ImageNet recipe, blur
MFU = model FLOPs per step (counted by torch.utils.flop_counter on one step) / step time / peak, where the
peak is measured here: a large bf16 (GPU; fp32 on CPU) matmul.
"""
import copy
import importlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
import tyro
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common import DeviceAugment  # noqa: E402


@dataclass
class Args:
    method: Literal["moco_co2", "adco", "caco"] = "moco_co2"
    """which script's training step to time"""
    arch: str = "resnet50"
    """backbone"""
    small_stem: bool = False
    """3x3 stride-1 stem without max-pool (the CIFAR recipe's ResNet-18)"""
    mlp_dim: Optional[int] = None
    """hidden width of the projection head (default: the method's; the CIFAR recipe uses 512)"""
    bn_splits: int = 1
    """moco_co2 / adco: split BN over this many sub-batches (the CIFAR recipe's one-GPU ShuffleBN uses 8)"""
    image_size: int = 224
    """input resolution"""
    batch: int = 256
    """images per device per step"""
    bank_size: int = 65536
    """K: queue (MoCo) or bank (AdCo, CaCo) size"""
    device: Optional[str] = None
    """cuda or cpu (default: cuda if available)"""
    amp: bool = True
    """bf16 autocast on GPU (ignored on CPU)"""
    channels_last: bool = True
    """channels_last on GPU (ignored on CPU)"""
    compile: bool = False
    """torch.compile the query encoder"""
    sweep: bool = False
    """time fp32, amp, amp+channels_last and amp+channels_last+compile and print one table"""
    steps: int = 20
    """timed steps"""
    warmup: int = 5
    """untimed steps first (cudnn autotuning, compile)"""
    json: bool = False
    """print JSON lines instead of a table"""
    augment_on: Literal["workers", "device"] = "workers"
    """workers: the step's input is a fixed synthetic batch (augmentation happens elsewhere, not timed); device:
    every step first runs the method's own two views (its augmentations()) through common.DeviceAugment on a
    uint8 batch held on the device, as --augment-on device trains, and the augmentation is timed with the step"""
    source_size: Optional[int] = None
    """--augment-on device: side of the square uint8 source images (default: the image size up to 64 px, where
    the data are CIFAR/STL-like images of the crop's size; above, image_size * 256 / 224, e.g. 256 for 224 px
    crops, ImageNet resized to 256; original ImageNet JPEGs average about 470 x 390)"""
    blur: bool = True
    """--augment-on device: the views' Gaussian blur (ImageNet recipes); --no-blur for the CIFAR-10 recipe"""


class Timer:
    """Accumulates wall time per phase; synchronises the device at each mark only when `sync` is on."""

    def __init__(self, device: torch.device, sync: bool):
        self.device, self.sync, self.times, self.last = device, sync, {}, None

    def start(self):
        if self.sync:
            self._synchronize()
            self.last = time.perf_counter()

    def mark(self, phase: str):
        if self.sync:
            self._synchronize()
            now = time.perf_counter()
            self.times[phase] = self.times.get(phase, 0.0) + now - self.last
            self.last = now

    def _synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def build(name: str, args: Args, device, memory_format):
    """The method module, its default Args, query/key encoders (as its main() builds them), the module to
    call for queries (compiled or not), and a unit-column [C, K] queue/bank."""
    m = importlib.import_module(name)
    d = m.Args()
    encoder_q = m.Encoder(args.arch, args.small_stem, args.mlp_dim or d.mlp_dim, d.dim)
    if args.bn_splits > 1:
        if not hasattr(m, "use_split_bn"):
            raise SystemExit(f"--bn-splits: {name} has no ShuffleBN and no split BN")
        m.use_split_bn(encoder_q.backbone, args.bn_splits)
    encoder_q = encoder_q.to(device, memory_format=memory_format)
    encoder_k = copy.deepcopy(encoder_q).requires_grad_(False)
    model = torch.compile(encoder_q) if args.compile else encoder_q
    bank = F.normalize(torch.randn(d.dim, args.bank_size, device=device), dim=0)
    return m, d, encoder_q, encoder_k, model, bank


def query_and_shuffled_key(m, d, model, encoder_q, encoder_k, autocast, x_q, x_k, timer: "Timer"):
    """MoCo / AdCo: q with gradient; EMA, then the key through ShuffleBN, no gradient. Both [N, C] fp32."""
    with autocast():
        q = model(x_q)
    q = F.normalize(q.float(), dim=1)
    with torch.no_grad():
        m.momentum_update(encoder_q, encoder_k, d.moco_m)
        timer.mark("encoders")
        x_k, idx = m.batch_shuffle(x_k)
        timer.mark("collectives")
        with autocast():
            k = encoder_k(x_k)
        timer.mark("encoders")
        k = m.batch_unshuffle(F.normalize(k.float(), dim=1), idx)
        timer.mark("collectives")
    return q, k


def moco_co2_step(args: Args, device, autocast, memory_format):
    """One MoCo v2 + CO2 step as moco_co2.main runs it."""
    m, d, encoder_q, encoder_k, model, queue = build("moco_co2", args, device, memory_format)
    optimizer = torch.optim.SGD(encoder_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    state = {"ptr": 0}

    def step(x_q, x_k, timer: Timer):
        timer.start()
        q, k = query_and_shuffled_key(m, d, model, encoder_q, encoder_k, autocast, x_q, x_k, timer)
        logits, labels = m.infonce_logits(q, k, queue, d.moco_t)
        loss = F.cross_entropy(logits, labels) + d.co2_alpha * m.co2_loss(q, k, queue, d.co2_tau)
        timer.mark("loss")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        timer.mark("encoders")
        k_all = m.concat_all_gather(k)
        timer.mark("collectives")
        state["ptr"] = m.enqueue(queue, state["ptr"], k_all)
        timer.mark("queue/bank")

    return step, [encoder_q]


def adco_step(args: Args, device, autocast, memory_format):
    """One single-crop AdCo step as adco.main runs it (loss + closed-form bank gradient, then the bank step)."""
    m, d, encoder_q, encoder_k, model, bank = build("adco", args, device, memory_format)
    velocity = torch.zeros_like(bank)
    optimizer = torch.optim.SGD(encoder_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    labels = m.own_key_labels(args.batch, 0, device)

    def step(x_q, x_k, timer: Timer):
        timer.start()
        q, k = query_and_shuffled_key(m, d, model, encoder_q, encoder_k, autocast, x_q, x_k, timer)
        k_all = m.concat_all_gather(k)
        timer.mark("collectives")
        loss, grad, *_ = m.adco_loss_and_bank_grad([(q, k_all, 1.0)], bank, labels, d.moco_t, d.mem_t)
        timer.mark("loss")  # includes the closed-form bank gradient (see bank_grad_ms for its own time)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        timer.mark("encoders")
        grad = m.all_reduce_mean(grad)
        timer.mark("collectives")
        m.bank_momentum_step(bank, velocity, grad, d.mem_lr, d.mem_momentum, d.mem_wd)
        timer.mark("queue/bank")

    def bank_grad_only(q, k_all):
        return m.bank_grad(q, k_all, bank, labels, d.mem_t)

    step.bank_grad = bank_grad_only
    return step, [encoder_q]


def caco_step(args: Args, device, autocast, memory_format):
    """One single-crop (symmetric) CaCo step as caco.main runs it."""
    m, d, encoder_q, encoder_k, model, bank = build("caco", args, device, memory_format)
    velocity = torch.zeros_like(bank)
    optimizer = m.LARS(encoder_q.parameters(), lr=1.2, weight_decay=d.weight_decay, momentum=d.momentum,
                       trust=d.lars_trust)
    pairs = m.crop_pairs(2, 0)

    def step(x_q, x_k, timer: Timer):
        timer.start()
        queries = []
        for x in (x_q, x_k):
            with autocast():
                out = model(x)
            queries.append(F.normalize(out.float(), dim=1))
        with torch.no_grad():
            m.momentum_update(encoder_q, encoder_k, d.moco_m)
            keys = []
            for x in (x_q, x_k):
                with autocast():
                    out = encoder_k(x)
                keys.append(F.normalize(out.float(), dim=1))
        timer.mark("encoders")
        loss, grad, *_ = m.caco_loss_and_bank_grad(queries, keys, bank, pairs, d.moco_t, d.mem_t)
        timer.mark("loss")  # includes the bank gradient of both directions (see bank_grad_ms)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        timer.mark("encoders")
        grad = m.all_reduce_mean(grad)
        timer.mark("collectives")
        m.bank_momentum_step(bank, velocity, grad, d.mem_lr, d.mem_momentum)
        timer.mark("queue/bank")

    def bank_grad_only(q, k_all):  # both directions, as in the step
        labels = m.positive_labels(q, bank)
        return m.bank_grad(q, bank, labels, d.mem_t) + m.bank_grad(q, bank, labels, d.mem_t)

    step.bank_grad = bank_grad_only
    return step, [encoder_q]


STEPS = {"moco_co2": moco_co2_step, "adco": adco_step, "caco": caco_step}


def peak_matmul_flops(device: torch.device) -> float:
    """Measured dense matmul rate (FLOP/s): bf16 8192^3 on GPU, fp32 1024^3 on CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    timer = Timer(device, sync=True)
    timer.start()
    reps = 20 if device.type == "cuda" else 3
    for _ in range(reps):
        a @ b
    timer.mark("mm")
    return 2 * n**3 * reps / timer.times["mm"]


def source_size(args: Args) -> int:
    """--source-size, or its default: the crop size up to 64 px (CIFAR/STL images are about the crop's size),
    else image_size * 256 / 224 (256 for 224 px crops)."""
    if args.source_size is not None:
        return args.source_size
    return args.image_size if args.image_size <= 64 else round(args.image_size * 256 / 224)


def device_inputs(args: Args, device: torch.device, memory_format):
    """--augment-on device: a function that returns (x_q, x_k), the method's own first two views (its
    augmentations(image_size, blur=...)) drawn afresh by common.DeviceAugment from one uint8 batch held on the
    device (random pixels; the executor's cost does not depend on them), in the step's memory format."""
    views = importlib.import_module(args.method).augmentations(args.image_size, blur=args.blur)
    augment = DeviceAugment(views)
    side = source_size(args)
    source = torch.randint(0, 256, (args.batch, 3, side, side), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).to(device)

    def inputs():
        x_q, x_k = augment(source)[:2]
        return x_q.to(memory_format=memory_format), x_k.to(memory_format=memory_format)

    return inputs


def run(args: Args, device: torch.device, peak: float) -> dict:
    use_amp = args.amp and device.type == "cuda"
    dtype = torch.bfloat16 if use_amp else None

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=use_amp)

    memory_format = torch.channels_last if (args.channels_last and device.type == "cuda") else torch.contiguous_format
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(device)
    step, _ = STEPS[args.method](args, device, autocast, memory_format)
    on_device = args.augment_on == "device"
    if on_device:  # every step augments its own views first (timed with the step)
        inputs = device_inputs(args, device, memory_format)
    else:  # one synthetic batch for every step: data loading and augmentation excluded
        x_q = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device).to(
            memory_format=memory_format)
        x_k = torch.randn_like(x_q)

        def inputs():
            return x_q, x_k
    free = Timer(device, sync=False)
    for _ in range(args.warmup):
        step(*inputs(), free)
    views = inputs()  # the FLOPs counted are the model's (the augmentation's resampling matmuls excluded)
    with FlopCounterMode(display=False) as counter:
        step(*views, free)
    flops = counter.get_total_flops()
    wall = Timer(device, sync=True)
    wall.start()
    for _ in range(args.steps):
        step(*inputs(), free)
    wall.mark("step")
    seconds = wall.times["step"] / args.steps
    phases = Timer(device, sync=True)
    for _ in range(args.steps):
        if on_device:
            phases.start()
            views = inputs()
            phases.mark("augment")
        step(*views, phases)
    total = sum(phases.times.values())
    augment_ms = None
    if on_device:  # the augmentation alone, over as many steps, synchronised at both ends
        timer = Timer(device, sync=True)
        timer.start()
        for _ in range(args.steps):
            inputs()
        timer.mark("augment")
        augment_ms = 1000 * timer.times["augment"] / args.steps
    bank_grad_ms = None
    if hasattr(step, "bank_grad"):  # the closed-form bank gradient alone, on embeddings of the right shape
        q = F.normalize(torch.randn(args.batch, 128 if args.method != "caco" else 256, device=device), dim=1)
        timer = Timer(device, sync=True)
        step.bank_grad(q, q)
        timer.start()
        for _ in range(args.steps):
            step.bank_grad(q, q)
        timer.mark("g")
        bank_grad_ms = 1000 * timer.times["g"] / args.steps
    return {
        "method": args.method, "arch": args.arch, "small_stem": args.small_stem, "bn_splits": args.bn_splits,
        "image_size": args.image_size, "batch": args.batch,
        "bank_size": args.bank_size, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "amp": use_amp, "channels_last": memory_format == torch.channels_last, "compile": args.compile,
        "img_per_s": args.batch / seconds, "ms_per_step": 1000 * seconds,
        "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "tflop_per_step": flops / 1e12, "mfu": flops / seconds / peak,
        "share": {k: v / total for k, v in sorted(phases.times.items())},
        "bank_grad_ms": bank_grad_ms,
        "bank_update_share": None if bank_grad_ms is None else
        (bank_grad_ms / 1000 + phases.times.get("queue/bank", 0) / args.steps) / seconds,
        "augment_on": args.augment_on, "source_size": source_size(args) if on_device else None,
        "blur": args.blur if on_device else None,
        "augment_ms": augment_ms, "augment_share": None if augment_ms is None else augment_ms / 1000 / seconds,
    }


def main(args: Args) -> list[dict]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    peak = peak_matmul_flops(device)
    configs = [args]
    if args.sweep:
        configs = [Args(**{**vars(args), **change, "sweep": False})
                   for change in ({"amp": False, "channels_last": False}, {"amp": True, "channels_last": False},
                                  {"amp": True, "channels_last": True},
                                  {"amp": True, "channels_last": True, "compile": True})]
    rows = [run(c, device, peak) for c in configs]
    if args.json:
        for row in rows:
            print(json.dumps({**row, "peak_gflops_measured": peak / 1e9}))
        return rows
    print(f"measured peak matmul: {peak / 1e9:.0f} GFLOP/s ({'bf16' if device.type == 'cuda' else 'fp32'})")
    print(f"{'method':<9}{'amp':>5}{'c_last':>7}{'compile':>8}{'img/s':>9}{'ms/step':>9}{'mem GB':>8}{'MFU':>7}"
          f"  share: encoders / loss / queue-bank / collectives")
    for r in rows:
        s = r["share"]
        mem = f"{r['peak_mem_gb']:.1f}" if r["peak_mem_gb"] is not None else "-"
        print(f"{r['method']:<9}{str(r['amp']):>5}{str(r['channels_last']):>7}{str(r['compile']):>8}"
              f"{r['img_per_s']:>9.0f}{r['ms_per_step']:>9.1f}{mem:>8}{100 * r['mfu']:>6.1f}%"
              f"  {100 * s.get('encoders', 0):.1f}% / {100 * s.get('loss', 0):.1f}% / "
              f"{100 * s.get('queue/bank', 0):.2f}% / {100 * s.get('collectives', 0):.2f}%"
              + (f"  bank gradient {r['bank_grad_ms']:.2f} ms, whole bank update {100 * r['bank_update_share']:.2f}%"
                 " of the step" if r["bank_grad_ms"] is not None else "")
              + (f"  augmentation ({r['source_size']} px uint8 -> 2 views, blur {'on' if r['blur'] else 'off'}) "
                 f"{r['augment_ms']:.2f} ms, {100 * r['augment_share']:.1f}% of the step "
                 f"({100 * s.get('augment', 0):.1f}% in the phase timing)" if r["augment_ms"] is not None else ""))
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args))
