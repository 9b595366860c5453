"""MoCo v2 + CO2: momentum contrast with a consistency regulariser, in one file.

Papers   MoCo v2 "Improved Baselines with Momentum Contrastive Learning", Chen, Fan, Girshick, He, arXiv 2003.04297
         CO2 "Consistent Contrast for Unsupervised Visual Representation Learning", Wei et al., ICLR 2021,
         arXiv 2010.02217
Defaults = the official MoCo v2 recipe (facebookresearch/moco @ 78b69ca: --mlp --moco-t 0.2 --aug-plus --cos).
CO2 has no official code; it is implemented from the paper's definition.

What this file implements (q: query, k: its key, n_j: queue entries; unit vectors; equations in the functions)
    f_q      ResNet + MLP head (2048-2048-128, ReLU, no BN); f_k its EMA, θ_k <- m θ_k + (1-m) θ_q   momentum_update
    L_ins    MoCo InfoNCE over [q.k | q.n_j] / τ, τ = 0.2, K = 65536 (MoCo Eq. 1)                    infonce_logits
    L_con    CO2: ½ KL(P||Q) + ½ KL(Q||P), P, Q = softmax over the K negatives of q.n/τ_con, k.n/τ_con   co2_loss
    loss     L = L_ins + α L_con, mean over the global batch, SGD on f_q only                         moco_co2_loss
    ShuffleBN  key images are shuffled across GPUs before f_k, un-shuffled after (MoCo section 3.3)

The queue of negatives, start to finish (grep METHOD for the method's own lines in main())
    created  main(): K unit random columns [C, K], fp32, from --seed, identical on every rank, outside DDP
    used     moco_co2_loss(): the K negatives of L_ins and the classes of P and Q, BEFORE this step's enqueue
    updated  enqueue(): FIFO, the all-gathered keys of the global batch replace the oldest B columns
    saved    checkpoint_state(): "queue" and "queue_ptr" in every last.pt; restored before the first step

Run it
    torchrun --nproc_per_node=8 moco_co2.py --data /path/to/imagenet --out-dir runs/moco_co2   # 8 GPUs, 200 ep
    python moco_co2.py --dataset synthetic --synthetic-images 64 --arch resnet18 --image-size 32 \
        --batch-size 16 --queue-size 64 --workers 0 --epochs 2 --out-dir runs/smoke               # CPU, seconds
    plain MoCo v2: --co2-alpha 0.  Continue an interrupted run: --resume auto.
    Augment on the GPU instead of in PIL workers: --augment-on device (docs/augment.md).

docs/moco_co2.md: every command, defaults vs paper, logged metrics, the CO2 gradient, deviations from the
official code. Layout of this file: Args -> method math -> model and augmentations -> main() -> appendix:
the fenced plumbing blocks (byte-identical in every script, checked by tests/test_shared_blocks.py).
"""

import copy
import errno
import fcntl
import glob
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import socket
import sys
import threading
import time
import zipfile
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Literal, NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tyro
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text
from torch.nn.parallel import DistributedDataParallel as DDP

from common import (UserError, View, build_resnet, check_same_classes, eval_transform, knn_accuracy, make_dataset,
                    make_loader, pil_views)

SCRIPT_NAME = "moco_co2"  # written into every checkpoint; --resume refuses checkpoints of other methods


@dataclass
class Args:
    """MoCo v2 + CO2 pre-training. Defaults = the official MoCo v2 ImageNet recipe (8 GPUs x 32 images)."""

    # --- experiment -------------------------------------------------------------------------------
    out_dir: str = "runs/moco_co2"
    """folder for last.pt, metrics.jsonl and args.json; refused if it already holds a run and --resume is not given"""
    resume: Optional[str] = None
    """'auto': continue from <out-dir>/last.pt when it exists (else start fresh); or the path of a checkpoint"""
    seed: int = 0
    """seed for weights, queue and data order (augmentations use seed + rank)"""

    # --- data -------------------------------------------------------------------------------------
    dataset: Literal["imagefolder", "cifar10", "cifar100", "stl10", "synthetic"] = "imagefolder"
    """imagefolder: --data holds train/ and val/ (or test/) class folders (ImageNet layout); cifar10, cifar100,
    stl10: torchvision's files under --data (downloaded there if missing and the network allows);
    synthetic: fake images"""
    data: Optional[str] = None
    """root folder of the dataset (--dataset imagefolder, cifar10, cifar100, stl10)"""
    synthetic_images: int = 256
    """number of training images for --dataset synthetic (a quarter as many val images)"""
    image_size: int = 224
    """crop size in pixels (the RandomResizedCrop output)"""
    blur: bool = True
    """Gaussian blur (p = 0.5) in the augmentation, as MoCo v2; --no-blur for 32 px images (CIFAR recipe)"""
    workers: int = 8
    """DataLoader worker processes per GPU process"""
    augment_on: Literal["workers", "device"] = "workers"
    """workers: PIL augmentation in DataLoader workers (the reference path); device: batched on the training device
    from uint8 images (in-memory datasets stay on the device; ImageFolder JPEGs are decoded there), same views"""

    # --- model ------------------------------------------------------------------------------------
    arch: Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"] = "resnet50"
    """backbone (torchvision, random init)"""
    small_stem: bool = False
    """3x3 stride-1 conv1 and no max-pool: the usual stem for 32 px images (CIFAR)"""
    bn_splits: int = 1
    """S > 1: training-mode BN over S interleaved sub-batches per process, as on S GPUs, so ShuffleBN works on
    one GPU (MoCo's CIFAR-10 demo; the CIFAR recipe uses 8). 1: plain BN"""
    mlp_dim: int = 2048
    """hidden width of the projection head (feat -> mlp_dim -> ReLU -> dim; no BN, as MoCo v2)"""
    dim: int = 128
    """embedding dimension C of q, k and the queue"""

    # --- optimisation -----------------------------------------------------------------------------
    epochs: int = 200
    """training epochs E (800 for the long MoCo v2 run)"""
    batch_size: int = 256
    """GLOBAL batch B over all processes; each process gets B / world_size"""
    lr: float = 0.03
    """base learning rate per 256 images; the rate used is lr * B / 256 (linear scaling rule)"""
    momentum: float = 0.9
    """SGD momentum"""
    weight_decay: float = 1e-4
    """SGD weight decay (all query-encoder parameters, as official)"""

    # --- MoCo -------------------------------------------------------------------------------------
    moco_m: float = 0.999
    """m: key-encoder momentum, θ_k <- m θ_k + (1 - m) θ_q, once per step"""
    moco_t: float = 0.2
    """τ (τ_ins): InfoNCE temperature (MoCo v1: 0.07, v2: 0.2)"""
    queue_size: int = 65536
    """K: number of negatives in the queue; must be a multiple of --batch-size"""

    # --- CO2 --------------------------------------------------------------------------------------
    co2_alpha: float = 1.0
    """α: weight of the CO2 consistency term L_con (0 = plain MoCo v2). Default from lightly, not the paper"""
    co2_tau: float = 0.05
    """τ_con: temperature of the two distributions P and Q over the negatives. Default from lightly, not the paper"""

    # --- systems ----------------------------------------------------------------------------------
    amp: bool = True
    """mixed precision on GPU: bf16 autocast (fp16 + GradScaler on GPUs without bf16); ignored on CPU"""
    channels_last: bool = True
    """channels_last memory format on GPU (faster convolutions under AMP); ignored on CPU"""
    compile: bool = False
    """torch.compile the query encoder"""
    log_every: int = 50
    """log (console + metrics.jsonl) every this many steps, and at the end of every epoch"""
    ckpt_every_steps: int = 0
    """also checkpoint every this many global steps (0: only at the end of each epoch)"""
    stop_at_step: Optional[int] = None
    """checkpoint and exit once the global step reaches this value (split a long run into jobs; resume with --resume auto)"""
    knn_every: int = 0
    """kNN monitor (k-NN top-1 on the val split, backbone features) every this many epochs; 0 = off"""
    knn_k: int = 200
    """k of the kNN monitor"""
    knn_t: float = 0.1
    """temperature of the kNN monitor's weighted vote exp(sim / t)"""
    knn_train_fraction: float = 1.0
    """fraction of the train split used as kNN memory (every 1/f-th image); lower it for ImageNet"""


# Arguments that must equal the checkpoint's when resuming (the rest, e.g. --epochs or --workers, may change).
MUST_MATCH = ("arch", "small_stem", "bn_splits", "mlp_dim", "dim", "dataset", "image_size", "blur", "batch_size", "lr",
              "momentum", "weight_decay", "moco_m", "moco_t", "queue_size", "co2_alpha", "co2_tau", "seed")
# Valid values, checked before anything is written: "> 0", ">= 1", or an interval "[a, b)" (check_ranges).
RANGES = {"epochs": ">= 1", "batch_size": ">= 1", "image_size": ">= 8", "synthetic_images": ">= 1", "workers": ">= 0",
          "bn_splits": ">= 1", "mlp_dim": ">= 1", "dim": ">= 1", "lr": ">= 0", "momentum": "[0, 1)",
          "weight_decay": ">= 0", "moco_m": "[0, 1]", "moco_t": "> 0", "queue_size": ">= 1", "co2_alpha": ">= 0",
          "co2_tau": "> 0", "log_every": ">= 1", "ckpt_every_steps": ">= 0", "stop_at_step": ">= 1",
          "knn_every": ">= 0", "knn_k": ">= 1", "knn_t": "> 0", "knn_train_fraction": "(0, 1]"}


# =====================================================================================================
# METHOD: the math, as pure functions (imported by tests/). All inputs are fp32 unit vectors.
# =====================================================================================================
def infonce_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, moco_t: float):
    """MoCo Eq. 1: logits [N, 1+K] = [q_i.k_i | q_i.n_j] / τ and labels [N] of zeros (the key is column 0),
    so L_ins = cross_entropy(logits, labels). q, k: [N, C] unit rows; queue: [C, K] unit columns."""
    l_pos = (q * k).sum(dim=1, keepdim=True)  # [N, 1]: q_i . k_i
    l_neg = q @ queue  # [N, C] x [C, K] -> [N, K]: q_i . n_j
    logits = torch.cat([l_pos, l_neg], dim=1) / moco_t  # [N, 1+K]
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return logits, labels


def co2_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau_con: float) -> torch.Tensor:
    """CO2's consistency term L_con = mean_i [½ KL(P_i||Q_i) + ½ KL(Q_i||P_i)], over the K negatives only:
        P_i(j) = softmax_j(q_i.n_j / τ_con)   the query's similarity distribution (q: [N, C], with gradient)
        Q_i(j) = softmax_j(k_i.n_j / τ_con)   the positive's: a target, no gradient to k or the queue [C, K]
    Both KL directions keep their gradient through P (detaching P in KL(P||Q) would silently make the term
    one-directional); docs/moco_co2.md derives ∂L_con/∂q. The caller multiplies by α."""
    dtype = torch.promote_types(q.dtype, torch.float32)  # fp32 at least (fp64 stays fp64, for tests)
    queue = queue.detach().to(dtype)
    # log P: [N, K]. log_softmax (not log(softmax)) stays finite when a probability underflows.
    log_P = F.log_softmax(q.to(dtype) @ queue / tau_con, dim=1)
    with torch.no_grad():  # the pseudo label: a constant
        log_Q = F.log_softmax(k.detach().to(dtype) @ queue / tau_con, dim=1)  # [N, K]
    kl_PQ = (log_P.exp() * (log_P - log_Q)).sum(dim=1)  # KL(P||Q) = Σ_j P_j (log P_j - log Q_j), [N]
    kl_QP = (log_Q.exp() * (log_Q - log_P)).sum(dim=1)  # KL(Q||P) = Σ_j Q_j (log Q_j - log P_j), [N]
    return (0.5 * kl_PQ + 0.5 * kl_QP).mean()  # sum over j, mean over samples ("batchmean")


class MocoLoss(NamedTuple):
    loss: torch.Tensor      # L = L_ins + α L_con (autograd to q)
    loss_ins: torch.Tensor  # L_ins
    loss_co2: torch.Tensor  # L_con (0 when α = 0: not computed)
    acc_ins: torch.Tensor   # % of queries whose top logit (of 1 + K) is their key


def moco_co2_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, moco_t: float, co2_tau: float,
                  co2_alpha: float) -> MocoLoss:
    """One step's loss, L = L_ins + α L_con, both against the queue BEFORE this step's enqueue (fp32).
    q, k: [N, C] unit rows (q with gradient), queue: [C, K]. Means over this rank; DDP averages over ranks."""
    logits, labels = infonce_logits(q, k, queue, moco_t)
    loss_ins = F.cross_entropy(logits, labels)
    loss_co2 = co2_loss(q, k, queue, co2_tau) if co2_alpha > 0 else torch.zeros((), device=q.device)
    with torch.no_grad():
        acc_ins = 100 * (logits.argmax(dim=1) == 0).float().mean()
    return MocoLoss(loss_ins + co2_alpha * loss_co2, loss_ins, loss_co2, acc_ins)


@torch.no_grad()
def momentum_update(encoder_q: nn.Module, encoder_k: nn.Module, m: float) -> None:
    """θ_k <- m θ_k + (1 - m) θ_q = lerp(θ_k, θ_q, 1 - m) for every parameter (BN buffers are f_k's own);
    lerp is exact at both ends (m = 0 copies θ_q), and _foreach_ fuses the update into a few kernels."""
    torch._foreach_lerp_(list(encoder_k.parameters()), list(encoder_q.parameters()), 1.0 - m)


@torch.no_grad()
def enqueue(queue: torch.Tensor, ptr: int, k_all: torch.Tensor) -> int:
    """FIFO: queue[:, ptr : ptr+B] <- k_allᵀ replaces the oldest B keys; returns (ptr + B) mod K. k_all: [B, C],
    the same on every rank, so the queues stay identical; ptr is a Python int (no host sync)."""
    batch, size = k_all.shape[0], queue.shape[1]  # main() refuses K % B != 0
    queue[:, ptr:ptr + batch] = k_all.T
    return (ptr + batch) % size


def augmentations(image_size: int, blur: bool = True) -> list[View]:
    """MoCo v2 "aug+", the same random pipeline for both views. blur=False (the 32 px CIFAR recipe, as MoCo's
    CIFAR-10 demo): a blur of σ up to 2 px wipes out most of a 32 px crop."""
    view = View(size=image_size, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2,
                blur_p=0.5 if blur else 0.0, blur_sigma=(0.1, 2.0), solarize_p=0.0, flip_p=0.5)
    return [view, view]  # jitter: brightness, contrast, saturation, hue


class Encoder(nn.Module):
    """f(x) = head(backbone(x)): ResNet without fc, then MoCo v2's MLP Linear -> ReLU -> Linear (no BN)."""

    def __init__(self, arch: str, small_stem: bool, mlp_dim: int, dim: int):
        super().__init__()
        self.backbone, feat_dim = build_resnet(arch, small_stem)
        self.head = nn.Sequential(nn.Linear(feat_dim, mlp_dim), nn.ReLU(inplace=True), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


# =====================================================================================================
# main
# =====================================================================================================
def main(args: Args) -> dict:
    """Trains and returns the final state {"encoder_q", "encoder_k", "queue", "queue_ptr"} (for tests)."""
    # ---- 1. setup: processes, sizes, seeds; every check before any file is touched -------------------------
    run = setup_run(args)
    check_bn_splits(args.bn_splits, run.batch_per_rank)
    if args.queue_size % args.batch_size:
        raise UserError(f"--queue-size {args.queue_size} must be a multiple of the global --batch-size "
                        f"{args.batch_size} (each step enqueues one global batch of keys)")
    device = run.device
    lr_peak = args.lr * args.batch_size / 256  # linear scaling rule: lr per 256 images

    # ---- 2. data (before the run folder: a data error leaves no empty folder behind) -------------------------
    views = augmentations(args.image_size, args.blur)  # in workers (PIL), or batched on the device
    on_device = args.augment_on == "device"
    train_set = make_dataset(args.dataset, args.data, "train", None if on_device else pil_views(views),
                             args.synthetic_images, args.image_size, args.seed)
    loader = make_loader(train_set, run.batch_per_rank, run.rank, run.world, args.workers, args.seed,
                         device_views=views if on_device else None, device=device)
    steps_per_epoch = len(loader.sampler) // run.batch_per_rank
    knn_sets = make_knn_sets(args, run.console)

    # ---- 3. run folder (locked for this job), checkpoint to resume -----------------------------------------
    if not open_run_folder(run, args, MUST_MATCH):
        return {}

    # ---- 4. model, queue, optimizer ---------------------------------------------------------------------
    encoder_q = Encoder(args.arch, args.small_stem, args.mlp_dim, args.dim).to(device)
    if args.bn_splits > 1:
        use_split_bn(encoder_q.backbone, args.bn_splits)  # before the copy: f_k gets split BN too
    encoder_k = copy.deepcopy(encoder_q).requires_grad_(False)  # θ_k = θ_q at start
    channels_last = device.type == "cuda" and args.channels_last
    if channels_last:
        encoder_q.to(memory_format=torch.channels_last)
        encoder_k.to(memory_format=torch.channels_last)
    # METHOD: the queue, K unit random columns [C, K], fp32, outside DDP; the same seed gives every rank the
    # same queue, and the same gathered keys keep it so.
    queue = F.normalize(torch.randn(args.dim, args.queue_size), dim=0).to(device)
    optimizer = torch.optim.SGD(encoder_q.parameters(), lr=lr_peak, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    autocast, scaler, amp_dtype = setup_amp(device, args.amp)
    torch.manual_seed(args.seed + run.rank)  # from here on: per-rank randomness (augmentations, ShuffleBN)

    # ---- 5. restore --------------------------------------------------------------------------------------
    start_epoch, start_batch, step = restore_training(run, encoder_q, encoder_k, optimizer, scaler, queue=queue)
    queue_ptr = run.ckpt["queue_ptr"] if run.ckpt else 0  # the queue's FIFO pointer, a Python int
    model = wrap_model(encoder_q, run, args.compile)
    metrics = MetricsLog(os.path.join(args.out_dir, "metrics.jsonl"), run.rank, step if run.ckpt else None)
    announce(run, args, {"lr used (lr x B/256)": lr_peak, "amp dtype": amp_dtype or "fp32",
                         "steps per epoch": steps_per_epoch})
    if run.world == 1 and args.bn_splits == 1:
        run.console.print("one process with --bn-splits 1: ShuffleBN cannot hide the key batch from BN (one BN "
                          "batch for all keys); on one GPU use --bn-splits 8 (as on 8 GPUs)")

    def checkpoint_state(next_epoch: int, next_batch: int) -> dict:
        return {"method": SCRIPT_NAME, "args": asdict(args), "next_epoch": next_epoch, "next_batch": next_batch,
                "step": step, "encoder_q": encoder_q.state_dict(), "encoder_k": encoder_k.state_dict(),
                "queue": queue.cpu(), "queue_ptr": queue_ptr, "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "rng": all_rng_states(device)}

    # ---- 6. train loop -----------------------------------------------------------------------------------
    tail = StepTail(args, run, steps_per_epoch, metrics, checkpoint_state, knn_sets, encoder_q.backbone, autocast)
    encoder_q.train()
    encoder_k.train()  # f_k's BN uses batch statistics (of the shuffled batch), as official
    with make_progress(run.console) as progress:
        task = progress.add_task("train", total=(args.epochs - start_epoch) * steps_per_epoch - start_batch)
        for epoch in range(start_epoch, args.epochs):
            first_batch = start_batch if epoch == start_epoch else 0
            loader.sampler.set_epoch(epoch, first_batch)
            lr = lr_peak * 0.5 * (1.0 + math.cos(math.pi * epoch / args.epochs))  # cosine per epoch, no warm-up
            for group in optimizer.param_groups:
                group["lr"] = lr
            for batch_idx, (views, _) in enumerate(loader, start=first_batch):
                x_q, x_k = (v.to(device, non_blocking=True) for v in views)
                if channels_last:
                    x_q, x_k = x_q.to(memory_format=torch.channels_last), x_k.to(memory_format=torch.channels_last)

                # METHOD: one MoCo v2 + CO2 step. Queries with gradient, normalised in fp32 (fp16 can overflow).
                with autocast():
                    q = model(x_q)
                q = F.normalize(q.float(), dim=1)  # [N, C]
                # keys, no gradient: EMA first (uses θ_q after the previous step), then the ShuffleBN forward
                with torch.no_grad():
                    momentum_update(encoder_q, encoder_k, args.moco_m)
                    x_k, idx_unshuffle = batch_shuffle(x_k)
                    with autocast():
                        k = encoder_k(x_k)
                    k = batch_unshuffle(F.normalize(k.float(), dim=1), idx_unshuffle)  # [N, C], k_i pairs q_i
                out = moco_co2_loss(q, k, queue, args.moco_t, args.co2_tau, args.co2_alpha)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(out.loss).backward()  # DDP averages the gradient over ranks
                scaler.step(optimizer)
                scaler.update()
                queue_ptr = enqueue(queue, queue_ptr, concat_all_gather(k))  # the GLOBAL batch, rank order

                step += 1
                progress.advance(task)
                if tail(epoch, batch_idx + 1, step, out._asdict(), lr=lr):
                    break
            if tail.stopped:
                break

    # ---- 7. teardown (the process group is destroyed by cli()) ----------------------------------------------
    tail.finish(step)
    return {"encoder_q": encoder_q, "encoder_k": encoder_k, "queue": queue, "queue_ptr": queue_ptr}


# ==== APPENDIX: fenced plumbing, byte-identical in every script (fix one: tests/test_shared_blocks.py --sync FILE.py)
# this script's blocks: distributed shuffle-bn amp checkpoint console pretrain entry
# >>> shared: distributed
def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[07-09,12],cpu1" -> "gpu07", "n[1-2]-ib" -> "n1-ib"."""
    first = re.split(r",(?![^\[]*\])", nodelist)[0]  # split at commas outside brackets
    return re.sub(r"\[([^\],-]+)[^\]]*\]", r"\1", first, count=1)


def setup_distributed() -> tuple[int, int, torch.device]:
    """(GLOBAL rank, world size, device) from torchrun's variables, else srun's (docs/checkpoints.md, SLURM);
    plain `python` is one process without a process group. The local rank only picks the GPU."""
    env, store = os.environ, None
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
    if "RANK" not in env and "SLURM_PROCID" in env and tasks > 1:  # one srun task per GPU
        job, step = (int(env.get(name, "0")) for name in ("SLURM_JOB_ID", "SLURM_STEP_ID"))
        env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=str(tasks), LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
        env.setdefault("MASTER_ADDR", first_host(env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", ""))))
        env.setdefault("MASTER_PORT", str(20000 + (job + 1000 * step) % 10000))  # concurrent steps of a job differ
        where, seconds = f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}", float(env.get("RENDEZVOUS_TIMEOUT", "300"))
        try:
            store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), tasks, env["RANK"] == "0",
                                  timedelta(seconds=seconds))  # rank 0 serves it and waits until every rank joined
        except RuntimeError as e:  # DistStoreError (ranks missing), DistNetworkError (no server, port in use)
            raise UserError(f"rank {env['RANK']} of {tasks} found no rendezvous at {where} within {seconds:g} s "
                            f"({str(e).strip().splitlines()[0]}); start all {tasks} tasks with srun, not plain "
                            f"python in a multi-task allocation") from None
    if "RANK" not in env:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, local_rank, world = int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"])
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None, store=store, rank=rank,
                            world_size=world)
    return rank, world, device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """[N, ...] on every rank -> [R*N, ...] on every rank, rank 0's rows first. No gradient."""
    if not is_distributed():
        return x
    # Send and receive buffers must share one memory layout: a channels_last batch gathered into NCHW
    # buffers (or the reverse) can arrive with scrambled pixels and no error. So gather NCHW copies.
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def raise_on_every_rank(error: Optional[str]) -> None:
    """Rank 0's error message (or None) becomes a UserError on every rank: no rank waits alone in a collective."""
    if is_distributed():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = errors[0]
    if error:
        raise UserError(error)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """In place: the mean over ranks (one all_reduce); identity with one process. Returns x."""
    if is_distributed():
        dist.all_reduce(x)
        x.div_(dist.get_world_size())
    return x
# <<< shared: distributed


# >>> shared: shuffle-bn
@torch.no_grad()
def batch_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ShuffleBN step 1 (MoCo section 3.3): gather all ranks' key images, permute them with rank 0's
    permutation, give each rank one slice, so per-GPU BN cannot leak which key belongs to which query.
    One process: a local permutation (it matters only with --bn-splits). Returns (images, inverse perm)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
    x_all = concat_all_gather(x)  # [R*N, ...]
    idx_shuffle = torch.randperm(x_all.shape[0], device=x.device)
    if world > 1:
        dist.broadcast(idx_shuffle, src=0)  # every rank uses rank 0's permutation
    mine = x_all[idx_shuffle.view(world, -1)[rank]]
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        mine = mine.contiguous(memory_format=torch.channels_last)  # back to the caller's (fast) layout
    return mine, torch.argsort(idx_shuffle)


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    """ShuffleBN step 2: this rank's own key features, in their original order (k_i pairs q_i again)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
    return concat_all_gather(x)[idx_unshuffle.view(world, -1)[rank]]


class SplitBatchNorm2d(nn.BatchNorm2d):
    """Training-mode BN over S interleaved sub-batches (samples n mod S = s): one process behaves like S GPUs
    with per-GPU BN, so ShuffleBN works on one GPU (--bn-splits S; MoCo's CIFAR-10 demo uses 8). Running
    statistics = mean of the S sub-batch updates; eval mode is plain BN; same state dict as nn.BatchNorm2d."""

    def __init__(self, bn: nn.BatchNorm2d, splits: int):  # torchvision's BN: affine, running statistics, momentum
        super().__init__(bn.num_features, bn.eps, bn.momentum, device=bn.weight.device, dtype=bn.weight.dtype)
        self.load_state_dict(bn.state_dict())
        self.splits = splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        n, c, h, w = x.shape
        s = self.splits
        # [n, c, h, w] -> [n/s, s*c, h, w]: sample a*s + j lands in channel block j, so BN over block j is BN
        # over the sub-batch {n : n mod s = j}; weights and running statistics are repeated per block.
        mean, var = self.running_mean.repeat(s), self.running_var.repeat(s)
        y = F.batch_norm(x.reshape(n // s, s * c, h, w), mean, var, self.weight.repeat(s), self.bias.repeat(s),
                         True, self.momentum, self.eps)
        with torch.no_grad():  # F.batch_norm updated the repeated copies in place: average the s blocks
            self.running_mean.copy_(mean.view(s, c).mean(dim=0))
            self.running_var.copy_(var.view(s, c).mean(dim=0))
            self.num_batches_tracked.add_(1)
        return y.reshape(n, c, h, w)


def use_split_bn(module: nn.Module, splits: int) -> nn.Module:
    """Replaces every nn.BatchNorm2d inside `module` by a SplitBatchNorm2d with the same state (in place)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SplitBatchNorm2d):
            setattr(module, name, SplitBatchNorm2d(child, splits))
        else:
            use_split_bn(child, splits)
    return module


def check_bn_splits(splits: int, batch_per_rank: int) -> None:  # splits >= 1: RANGES
    if batch_per_rank % splits or (splits > 1 and batch_per_rank < 2 * splits):
        raise UserError(f"--bn-splits {splits} must be >= 1 and divide the per-process batch {batch_per_rank} "
                        "into sub-batches of at least 2 images")
# <<< shared: shuffle-bn


# >>> shared: amp
def setup_amp(device: torch.device, enabled: bool):
    """(autocast factory, GradScaler, dtype or None): bf16 on GPUs that have it, else fp16 + loss scaling;
    fp32 on CPU or with --no-amp. Only the encoders run under autocast: embeddings are cast to fp32 before
    normalising, and logits, softmax, KL and queue/bank arithmetic are fp32."""
    dtype = None
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    return autocast, torch.amp.GradScaler(device.type, enabled=dtype is torch.float16), dtype
# <<< shared: amp


# >>> shared: checkpoint
def all_rng_states(device: torch.device) -> list:
    """Every rank's RNG states (CPU tensors and plain types: weights_only=True loads them), in rank order.
    A collective: all ranks must call it."""
    mine = {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    if not is_distributed():
        return [mine]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def tensor_bytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.nelement() * obj.element_size()
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return sum(tensor_bytes(x) for x in items)


def save_checkpoint(path: str, state: dict) -> None:
    """Atomic (a per-process temp file, then a rename): a crash or a full disk leaves the previous file intact."""
    folder = os.path.dirname(path) or "."
    need = int(1.1 * tensor_bytes(state)) + 2**26  # tensors + 10 % + 64 MiB for pickle and file system slack
    free = shutil.disk_usage(folder).free
    tmp = f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"
    try:
        if free < need:
            raise OSError(errno.ENOSPC, "not enough free space")
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk or a file size limit as RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:80]}"
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]  # ulimit -f, which torch.save's message does not name
        if limit != resource.RLIM_INFINITY and limit < need:
            why = f"{os.strerror(errno.EFBIG)}: this process may write files of at most {limit / 2**30:.2f} GiB"
        raise UserError(f"cannot write {path}: {free / 2**30:.2f} GiB free in {folder}, a checkpoint needs about "
                        f"{need / 2**30:.2f} GiB ({why}); the previous checkpoint is kept") from None


def lock_run_folder(out_dir: str, rank: int) -> None:
    """Makes --out-dir. One job per folder: rank 0 holds an OS lock on <out-dir>/.lock while it lives (the kernel
    releases it, even after kill -9) and removes the temp checkpoints left by processes killed in mid-write."""
    global RUN_LOCK
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot make --out-dir {out_dir}: {e.strerror}") from None
    error = None
    if rank == 0:
        try:
            RUN_LOCK = open(os.path.join(out_dir, ".lock"), "a+")
            fcntl.flock(RUN_LOCK, fcntl.LOCK_EX | fcntl.LOCK_NB)
            RUN_LOCK.seek(0), RUN_LOCK.truncate(), RUN_LOCK.write(f"{socket.gethostname()} {os.getpid()}\n")
            RUN_LOCK.flush()
            for stale in glob.glob(os.path.join(glob.escape(out_dir), "*.pt.tmp.*")):  # no live job owns them
                os.remove(stale)
                print(f"removed {stale}, a temporary checkpoint left by a process killed while writing it")
        except BlockingIOError:
            RUN_LOCK.seek(0)
            error = f"--out-dir {out_dir} is in use by another job ({RUN_LOCK.read().strip()}, host and pid)"
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # no locks on this file system
                print(f"warning: {out_dir} does not support file locks; a second job on it would not be detected")
            else:
                error = f"--out-dir {out_dir} is not writable ({e.strerror})"
    raise_on_every_rank(error)


def unlock_run_folder() -> None:  # at the end of main(), for the next main() in this process
    if RUN_LOCK is not None:
        RUN_LOCK.close()  # (closing it twice is harmless)


RUN_LOCK = None


def resolve_resume(resume: Optional[str], out_dir: str) -> Optional[str]:
    """The checkpoint to load, or None. --resume None: a fresh run, never over an existing one; 'auto':
    <out-dir>/last.pt if it exists; else a path that must exist."""
    last = os.path.join(out_dir, "last.pt")
    if resume is None:
        if os.path.exists(last):
            raise UserError(f"{last} already exists: pass --resume auto to continue that run, "
                            f"or choose another --out-dir (nothing was overwritten)")
        found = None
    elif resume == "auto":
        found = last if os.path.exists(last) else None
    elif not os.path.isfile(resume):
        raise UserError(f"--resume {resume}: no such file")
    elif (os.path.realpath(os.path.dirname(resume)) != os.path.realpath(out_dir) and os.path.isdir(out_dir)
          and os.listdir(out_dir)):
        raise UserError(f"--out-dir {out_dir} already holds another run; --resume {resume} continues into an empty "
                        f"--out-dir (or into its own folder), so nothing of that run is overwritten")
    else:
        found = resume
    if is_distributed():  # all ranks must resume from the same file (rank 0 writes; other nodes must see it)
        seen = [None] * dist.get_world_size()
        dist.all_gather_object(seen, found)
        if len(set(seen)) > 1:
            raise UserError(f"ranks disagree about the checkpoint to resume ({seen}): --out-dir must be on a "
                            f"filesystem shared by all nodes")
    return found


def check_crc(path: str) -> None:
    """torch.save writes a CRC-32 checksum of every record (the pickled structure, each tensor's bytes) into the zip
    file, but torch.load never checks them: a file damaged on disk is refused here (a non-zip file by torch.load)."""
    try:
        damaged = zipfile.is_zipfile(path) and zipfile.ZipFile(path).testzip()  # the first bad record, or None
    except zipfile.BadZipFile as e:  # a damaged header
        damaged = str(e)
    if damaged:
        raise UserError(f"{path} is damaged: {damaged} does not match the CRC-32 checksum written with it")


def load_checkpoint(path: str, args, must_match: tuple) -> dict:
    """Loads a checkpoint of THIS method and checks that the arguments in `must_match` are unchanged."""
    check_crc(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch.load raises many kinds: KeyError for text, UnpicklingError, ...)
        raise UserError(f"cannot read checkpoint {path}: not a complete torch.save file of tensors and plain "
                        f"types ({type(e).__name__})") from None
    found = ckpt.get("method") if isinstance(ckpt, dict) else type(ckpt).__name__
    if not isinstance(ckpt, dict) or found != SCRIPT_NAME:
        what = f"method {found!r}" if found else f"keys {sorted(ckpt)[:6]}"
        raise UserError(f"{path} is not a {SCRIPT_NAME}.py checkpoint (it holds {what})")
    old = ckpt["args"]
    changed = [f"--{k.replace('_', '-')} {old.get(k)!r} -> {getattr(args, k)!r}"
               for k in must_match if old.get(k) != getattr(args, k)]
    if changed:
        raise UserError(f"{path} was trained with other arguments; resuming would mix two recipes: "
                        + ", ".join(changed))
    return ckpt
# <<< shared: checkpoint


# >>> shared: console
def make_console(rank: int) -> Console:
    """Rich console on rank 0 only (others are quiet). soft_wrap keeps log lines whole in files."""
    return Console(quiet=rank != 0, soft_wrap=True, log_path=False)


def print_args(console: Console, args, derived: dict) -> None:
    """The arguments and derived values as a table; Text() cells, so paths are never parsed as markup."""
    table = Table("argument", "value", title=f"{SCRIPT_NAME}.py", show_header=True, header_style="bold")
    for key, value in list(asdict(args).items()) + list(derived.items()):
        table.add_row(Text(key), Text(str(value)))
    console.print(table)


def make_progress(console: Console) -> Progress:
    """A progress bar in an interactive terminal; disabled (plain log lines only) when output is a file."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, disable=not console.is_terminal, transient=True)


class MetricsLog:
    """<out-dir>/metrics.jsonl, one JSON record per line, written by rank 0. On resume, the records after the
    checkpoint's step and a line torn by a crash in mid-write (said so) are dropped: the file reads as one run."""

    def __init__(self, path: str, rank: int, resume_step: Optional[int]):
        self.path, self.active = path, rank == 0
        if not self.active:
            return
        kept, torn = [], 0
        if resume_step is not None and os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        torn += 1
                        continue
                    if record.get("step", 0) <= resume_step:
                        kept.append(line)
        if torn:
            print(f"{path}: dropped {torn} incomplete line(s) left by an interrupted write")
        with open(path, "w") as f:
            f.writelines(kept)

    def write(self, record: dict) -> None:
        if self.active:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
# <<< shared: console


# >>> shared: pretrain
@dataclass
class Run:
    """What every pre-training main() sets up alike: processes, console, sizes, the checkpoint to resume."""
    rank: int
    world: int
    device: torch.device
    console: Console
    batch_per_rank: int
    stop: "GracefulStop"
    resume_path: Optional[str] = None
    ckpt: Optional[dict] = None


def setup_run(args) -> Run:
    """Checks every numeric flag (RANGES), then processes, device, console, seeds, signal handlers. No file."""
    check_ranges(args, RANGES)
    rank, world, device = setup_distributed()
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} is the global batch and must divide by the "
                        f"{world} processes")
    torch.manual_seed(args.seed)  # identical initial weights and negatives on every rank
    random.seed(args.seed + rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return Run(rank, world, device, make_console(rank), args.batch_size // world, GracefulStop())


def open_run_folder(run: Run, args, must_match: tuple) -> bool:
    """Sets run.ckpt (the checkpoint to resume), makes --out-dir and locks it for this job. False: nothing to do."""
    run.resume_path = resolve_resume(args.resume, args.out_dir)
    run.ckpt = load_checkpoint(run.resume_path, args, must_match) if run.resume_path else None
    if run.ckpt is not None and (run.ckpt["next_epoch"] >= args.epochs
                                 or (args.stop_at_step is not None and run.ckpt["step"] >= args.stop_at_step)):
        run.console.print(f"{run.resume_path} is at epoch {run.ckpt['next_epoch']}, step {run.ckpt['step']}: "
                          f"nothing to do (raise --epochs or --stop-at-step to train longer)", markup=False)
        return False
    lock_run_folder(args.out_dir, run.rank)
    return True


def make_knn_sets(args, console: Console):
    """(memory, val) datasets of the kNN monitor, eval transform; None when off or without a val split."""
    if args.knn_every <= 0:
        return None
    try:
        split = [make_dataset(args.dataset, args.data, s, eval_transform(args.image_size), args.synthetic_images,
                              args.image_size, args.seed) for s in ("train", "val")]
        check_same_classes(*split, "kNN monitor")  # a shifted class list would give wrong numbers silently
    except UserError as e:
        console.print(f"kNN monitor off: {e}", markup=False)
        return None
    stride = max(1, round(1 / args.knn_train_fraction))  # every stride-th train image is memory
    return torch.utils.data.Subset(split[0], range(0, len(split[0]), stride)), split[1]


def restore_training(run: Run, encoder_q: nn.Module, encoder_k: nn.Module, optimizer, scaler, **state) -> tuple:
    """Encoders, optimizer, scaler, this rank's RNG and the method's `state` tensors (queue=..., bank=...: copied in
    place from the same keys) from run.ckpt. Returns (start epoch, start batch, global step): (0, 0, 0) if fresh."""
    ckpt = run.ckpt
    if ckpt is None:
        return 0, 0, 0
    for name, tensor in state.items():
        tensor.copy_(ckpt[name])
    encoder_q.load_state_dict(ckpt["encoder_q"])
    encoder_k.load_state_dict(ckpt["encoder_k"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    if len(ckpt["rng"]) == run.world:
        set_rng_state(ckpt["rng"][run.rank], run.device)
    else:
        run.console.print(f"resuming on {run.world} processes from a run on {len(ckpt['rng'])}: RNG streams restart")
    return ckpt["next_epoch"], ckpt["next_batch"], ckpt["step"]


def wrap_model(encoder_q: nn.Module, run: Run, compile_model: bool) -> nn.Module:
    """DDP (averages the gradients) around the query encoder with several processes; then torch.compile."""
    model = encoder_q
    if run.world > 1:
        model = DDP(encoder_q, device_ids=[run.device] if run.device.type == "cuda" else None)
    return torch.compile(model) if compile_model else model


def announce(run: Run, args, derived: dict) -> None:
    """args.json in the run folder (rank 0) and the table of arguments and derived values."""
    if run.rank == 0:
        with open(os.path.join(args.out_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=2)
    resumed = "-" if run.ckpt is None else \
        f"{run.resume_path} (epoch {run.ckpt['next_epoch']}, batch {run.ckpt['next_batch']})"
    print_args(run.console, args, {"world size": run.world, "device": run.device,
                                   "per-process batch": run.batch_per_rank, **derived, "resumed from": resumed})


class StepTail:
    """The end of every training step, alike in every script, and the only place with host syncs: statistics
    are summed on the device and all-reduced once per log window (docs/checkpoints.md: when last.pt is written).
    checkpoint_state(next_epoch, next_batch) is the method's checkpoint; log_values() adds host values to a log."""

    def __init__(self, args, run: Run, steps_per_epoch: int, metrics: MetricsLog, checkpoint_state, knn_sets,
                 backbone: nn.Module, autocast, log_values=dict):
        self.args, self.run, self.steps_per_epoch, self.metrics = args, run, steps_per_epoch, metrics
        self.checkpoint_state, self.knn_sets = checkpoint_state, knn_sets
        self.backbone, self.autocast, self.last = backbone, autocast, os.path.join(args.out_dir, "last.pt")
        self.log_values, self.names, self.sums = log_values, None, None
        self.window_start, self.record, self.stopped, self.signal = time.perf_counter(), None, False, 0

    def __call__(self, epoch: int, done: int, step: int, stats: dict, **fields) -> bool:
        """After `done` batches of `epoch`, at global step `step`; stats: 0-dim device tensors by name, fields
        (lr, ...) logged as given. True when the run stops here (--stop-at-step or a signal), after its checkpoint."""
        args = self.args
        values = torch.stack([*(v.detach().float() for v in stats.values()), torch.ones((), device=self.run.device)])
        if self.sums is None:
            self.names, self.sums = list(stats), torch.zeros_like(values)
        self.sums += values  # the last entry counts the steps
        end_of_epoch = done == self.steps_per_epoch
        self.signal = self.run.stop.agreed()
        self.stopped = bool(self.signal) or (args.stop_at_step is not None and step >= args.stop_at_step)
        save = end_of_epoch or self.stopped or (args.ckpt_every_steps > 0 and step % args.ckpt_every_steps == 0)
        self.record = self.log(epoch, done, step, fields) if done % args.log_every == 0 or save else None
        if end_of_epoch and self.knn_sets is not None and (epoch + 1) % args.knn_every == 0:
            self.knn_monitor(epoch, step)
        if save:
            self.save(self.last, self.checkpoint_state(epoch + 1, 0) if end_of_epoch else
                      self.checkpoint_state(epoch, done))
        if self.stopped:
            why = f"by {signal.Signals(self.signal).name}" if self.signal else "(--stop-at-step)"
            self.run.console.print(f"stopped {why} at step {step}; {self.last} holds it; continue with the same "
                                   f"command and --resume auto", markup=False)
        return self.stopped

    def save(self, path: str, state: dict) -> None:
        """Rank 0 writes; every rank learns whether it worked, so a full disk stops all ranks with one line."""
        error = None
        if self.run.rank == 0:
            try:
                save_checkpoint(path, state)
            except UserError as e:
                error = str(e)
        raise_on_every_rank(error)

    def log(self, epoch: int, done: int, step: int, fields: dict) -> dict:
        *totals, steps = all_reduce_mean(self.sums.clone()).tolist()
        seconds = time.perf_counter() - self.window_start
        record = {"epoch": epoch, "step": step, **fields, **{k: t / steps for k, t in zip(self.names, totals)},
                  **self.log_values(), "img_per_s": steps * self.args.batch_size / seconds}
        if not all(math.isfinite(v) for v in record.values() if isinstance(v, float)):
            bad = os.path.join(self.args.out_dir, f"nonfinite_step{step}.pt")  # last.pt stays the last good state
            self.save(bad, self.checkpoint_state(epoch, done))
            kept = f"{self.last} is the last good checkpoint" if os.path.exists(self.last) else \
                "no checkpoint was written before"
            raise UserError(f"non-finite loss or state at epoch {epoch}, step {step} ({record}); {kept}, the diverged "
                            f"state is in {bad}")
        if self.run.device.type == "cuda":
            record["max_mem_gb"] = torch.cuda.max_memory_allocated(self.run.device) / 2**30
        self.metrics.write(record)
        shown = "  ".join(f"{k} {v:.4g}" for k, v in record.items() if k not in ("epoch", "step"))
        self.run.console.print(f"epoch {epoch} [{done}/{self.steps_per_epoch}] step {step}  {shown}",
                               markup=False, highlight=False)
        self.sums.zero_()
        self.window_start = time.perf_counter()
        return record

    def knn_monitor(self, epoch: int, step: int) -> None:
        try:  # a monitor must never end a training run
            top1, top5 = knn_accuracy(self.backbone, *self.knn_sets, self.run.batch_per_rank * 2, self.run.device,
                                      self.args.knn_k, self.args.knn_t, self.args.workers, self.autocast)
            self.metrics.write({"epoch": epoch, "step": step, "knn_top1": top1, "knn_top5": top5})
            self.run.console.print(f"epoch {epoch}  kNN top-1 {top1:.2f}  top-5 {top5:.2f}", markup=False)
        except Exception as e:  # noqa: BLE001
            self.run.console.print(f"kNN monitor failed, training continues: {type(e).__name__}: {e}", markup=False)

    def finish(self, step: int) -> None:
        """The last line; a run stopped by a signal exits with 128 + its number (non-zero, as if killed by it)."""
        unlock_run_folder()
        if self.signal:
            raise SystemExit(128 + self.signal)
        if not self.stopped:
            self.run.console.print(f"done: {self.args.epochs} epochs, {step} steps; checkpoint {self.last}",
                                   markup=False)
# <<< shared: pretrain


# >>> shared: entry
def cli(main, args_type) -> None:
    """Parses Args with tyro (--help from the field docstrings) and runs main. A UserError is one line on stderr
    and exit code 2, a full /dev/shm one line and exit code 1, no traceback. Always tears down the process group."""
    args = tyro.cli(args_type, console_outputs=os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0")

    def exit_with_one_line(message: str, code: int) -> None:
        prefix = f"[rank {os.environ['RANK']}] " if "RANK" in os.environ else ""
        Console(stderr=True, soft_wrap=True).print(f"{prefix}error: {message}", markup=False, highlight=False)
        sys.exit(code)

    try:
        main(args)
    except UserError as e:
        # a UserError raised inside a DataLoader worker arrives wrapped with the worker's traceback text
        exit_with_one_line(str(e).strip().splitlines()[-1].split("UserError: ", 1)[-1], 2)
    except RuntimeError as e:  # a crash keeps its traceback; a full /dev/shm, which the user can fix, is one line
        if not re.search(r"shared memory.*No space left|out of shared memory", str(e)):
            raise
        free = shutil.disk_usage("/dev/shm").free / 2**20
        exit_with_one_line(f"the DataLoader workers ran out of shared memory ({free:.0f} MiB free in /dev/shm): use "
                           f"fewer --workers, or a larger /dev/shm (a container's --shm-size)", 1)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        if threading.current_thread() is threading.main_thread():  # the run is over: signals act as usual again
            for s, default in zip(GracefulStop.SIGNALS, (signal.SIG_DFL, signal.default_int_handler, signal.SIG_DFL)):
                signal.signal(s, default)


class GracefulStop:
    """SIGTERM, SIGINT, SIGUSR1 ask the run to stop after the current step, with a checkpoint; a repeated SIGTERM
    or SIGUSR1 asks again, a second Ctrl-C ends the process at once (docs/checkpoints.md). The ranks agree on the
    step without a GPU sync: an async all-reduce (MAX) of the flags on a CPU (gloo) group, read a step later."""
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self):
        self.received, self.pending = 0, None
        self.group = dist.new_group(backend="gloo") if is_distributed() else None
        for s in self.SIGNALS if threading.current_thread() is threading.main_thread() else ():
            signal.signal(s, self.handler)  # (Python lets only the main thread set handlers)

    def handler(self, signum, frame) -> None:
        self.received = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)

    def agreed(self) -> int:
        """The signal (a number) every rank stops for at this step, or 0. Called once per step by every rank."""
        if self.group is None:
            return self.received
        decided = 0
        if self.pending is not None:
            work, flag = self.pending
            work.wait()
            decided = int(flag)  # a CPU tensor: no device sync
        flag = torch.tensor(self.received, dtype=torch.int32)
        self.pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return decided


def check_ranges(args, ranges: dict) -> None:
    """Every numeric flag against its rule in RANGES before anything is written; None (an unset flag) passes."""
    for name, rule in ranges.items():
        value = getattr(args, name)
        if value is None:
            continue
        low, high = (float(x) for x in ((rule.split()[1], "inf") if rule[0] == ">" else rule[1:-1].split(",")))
        above = value >= low if rule.startswith((">=", "[")) else value > low  # "> 0" is (0, inf), ">= 1" [1, inf)
        if not (above and (value <= high if rule[-1] == "]" else value < high) and math.isfinite(value)):
            raise UserError(f"--{name.replace('_', '-')} {value} is out of range: it must be {rule}")
# <<< shared: entry


if __name__ == "__main__":
    cli(main, Args)
