"""MoCo v2 + CO2: momentum contrast with a consistency regulariser, in one file.

Papers
    MoCo v2  "Improved Baselines with Momentum Contrastive Learning", Chen, Fan, Girshick, He, arXiv 2003.04297
             (MoCo v1: He et al., arXiv 1911.05722, CVPR 2020)
    CO2      "CO2: Consistent Contrast for Unsupervised Visual Representation Learning", Wei, Wang, Shen,
             Yuille, ICLR 2021, arXiv 2010.02217
Official code whose defaults this file follows: facebookresearch/moco @ 78b69ca (main_moco.py, moco/builder.py)
with `--mlp --moco-t 0.2 --aug-plus --cos`. No official CO2 code exists; CO2 is implemented from the paper's
definition (see "The CO2 term" below). Spec with line references: shared/spec/moco_co2.md, sections 1, 2, 6.

Run it
    8 GPUs, ImageNet (67.5 % linear top-1 reported for MoCo v2, 68.0 % for MoCo v2 + CO2 at 200 epochs):
        torchrun --nproc_per_node=8 moco_co2.py --data /path/to/imagenet --out-dir runs/moco_co2
    2 nodes x 8 GPUs (global batch stays --batch-size; scale --lr with it if you change it):
        torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
            moco_co2.py --data /path/to/imagenet        (and --node_rank=1 on the second node)
    one GPU:   python moco_co2.py --data /path/to/imagenet --batch-size 64    (lr scales to 0.03 x 64/256)
    CPU smoke run (seconds):
        python moco_co2.py --dataset synthetic --synthetic-images 64 --arch resnet18 --image-size 32 \
            --batch-size 16 --queue-size 64 --workers 0 --epochs 2 --out-dir runs/smoke
    plain MoCo v2: add --co2-alpha 0.  Continue an interrupted run: add --resume auto.
    CIFAR-10, one GPU, ResNet-18 at 32 px (the README's "CIFAR-10 recipe": no blur, K 4096, m 0.99, τ 0.1):
        python moco_co2.py --data data/cifar10 --arch resnet18 --small-stem --image-size 32 --no-blur \
            --mlp-dim 512 --batch-size 512 --weight-decay 5e-4 --moco-m 0.99 --moco-t 0.1 --queue-size 4096 \
            --bn-splits 8 --knn-every 10 --workers 15 --out-dir runs/cifar10-moco-co2

What this file implements (q: query embedding, k: key embedding, n_j: queue entries; all unit vectors)
    encoders   f_q = ResNet + MLP head (2048-2048-128, ReLU, no BN); f_k = EMA copy, θ_k <- m θ_k + (1-m) θ_q
    L_ins      MoCo InfoNCE:  -log exp(q.k/τ) / (exp(q.k/τ) + Σ_j exp(q.n_j/τ)),  τ = 0.2, K = 65536
    L_con      CO2 consistency: P = softmax_j(q.n_j/τ_con), Q = softmax_j(k.n_j/τ_con) (k: the positive crop,
               no gradient), L_con = ½ KL(P||Q) + ½ KL(Q||P), over the K negatives only
    loss       L = L_ins + α L_con, mean over the global batch; SGD on f_q only
    queue      FIFO of all-gathered keys, enqueued after the loss (a batch is never its own negative)
    ShuffleBN  key images are shuffled across GPUs before f_k and un-shuffled after (MoCo section 3.3)

Deviations from the official code (also listed in README.md)
    1. --batch-size is the GLOBAL batch, divided by the world size (official: per node, divided by the GPUs
       of one node; on several nodes the effective batch silently multiplied). Default 256 = official 8x32.
    2. torchrun (or plain python) instead of mp.spawn + --dist-url; one process and CPU are supported.
       With one process ShuffleBN can only permute the batch locally, which BN does not see, unless
       --bn-splits S runs BN over S interleaved sub-batches as S GPUs would (the MoCo authors' CIFAR-10 demo
       does this with S = 8; a message says so when S = 1). The official code refuses to run without DDP.
    3. The queue lives outside DDP (official: a DDP buffer, re-broadcast from rank 0 every forward, 32 MiB
       per step). It is still identical on every rank: it is built from the same seed and updated with
       the same all-gathered keys. The key encoder is also outside DDP (it has no gradients).
    4. AMP: the encoders run under bf16 autocast on GPUs that support it (fp16 + GradScaler otherwise);
       normalisation, logits, softmax, KL and the queue are fp32. The official code is fp32 throughout.
       --no-amp reproduces fp32.
    5. Checkpoints hold everything needed for an exact resume: the key encoder, the queue and its pointer,
       optimizer, scaler, every rank's RNG state, and the position inside the epoch (--ckpt-every-steps).
       Bitwise exact with --workers 0; with worker processes their augmentation streams restart (their
       seeds are not checkpointed), which changes no statistic. Official resume restarts the epoch and loses
       RNG and sampler state.
    6. CO2 has no official code. α = 1 and τ_con = 0.05 are the defaults of the only public
       implementation (lightly's CO2Regularizer), NOT values confirmed from the paper; that implementation
       also (a) includes the positive as a class of P and Q (we use the K negatives only, as the paper's
       Fig. 1 caption describes) and (b) since PR #1766 returns a detached tensor, so it adds no gradient.
       Ours keeps the term in the autograd graph; a test asserts that q receives its gradient.

Sections: Args -> method math (pure functions) -> model -> plumbing (fenced, identical in every script)
-> main(): 1 setup, 2 run folder and resume, 3 data, 4 model and optimizer, 5 restore, 6 train loop,
7 end of epoch, 8 teardown.
"""

import copy
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
import tyro
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text
from torch.nn.parallel import DistributedDataParallel as DDP

from common import (IMAGENET_MEAN, IMAGENET_STD, GaussianBlur, TwoCrops, UserError, build_resnet,
                    eval_transform, knn_accuracy, make_dataset, make_loader)

METHOD = "moco_co2"  # written into every checkpoint; --resume refuses checkpoints of other methods


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
    dataset: Literal["imagefolder", "synthetic"] = "imagefolder"
    """imagefolder: --data holds train/ and val/ (or test/) class folders (ImageNet layout); synthetic: fake images"""
    data: Optional[str] = None
    """root folder for --dataset imagefolder"""
    synthetic_images: int = 256
    """number of training images for --dataset synthetic (a quarter as many val images)"""
    image_size: int = 224
    """crop size in pixels (the RandomResizedCrop output)"""
    blur: bool = True
    """Gaussian blur (p = 0.5) in the augmentation, as MoCo v2; --no-blur for 32 px images (CIFAR recipe)"""
    workers: int = 8
    """DataLoader worker processes per GPU process"""

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


# =====================================================================================================
# METHOD: the math, as pure functions (imported by tests/). All inputs are fp32 unit vectors.
# =====================================================================================================
def infonce_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, moco_t: float):
    """MoCo InfoNCE logits (MoCo Eq. 1). q, k: [N, C] unit rows; queue: [C, K] unit columns.

    Returns logits [N, 1+K] = [q_i.k_i | q_i.n_j] / τ and labels [N] of zeros (the positive is column 0),
    so L_ins = cross_entropy(logits, labels).
    """
    l_pos = (q * k).sum(dim=1, keepdim=True)  # [N, 1]: q_i . k_i
    l_neg = q @ queue  # [N, C] x [C, K] -> [N, K]: q_i . n_j
    logits = torch.cat([l_pos, l_neg], dim=1) / moco_t  # [N, 1+K]
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return logits, labels


def co2_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau_con: float) -> torch.Tensor:
    """CO2 consistency term (Wei et al. 2021): mean_i [½ KL(P_i||Q_i) + ½ KL(Q_i||P_i)].

    q: [N, C] queries (with gradient), k: [N, C] keys of the positive crops, queue: [C, K] negatives.
        P_i(j) = softmax_j(q_i.n_j / τ_con)   the query's similarity distribution over the K negatives
        Q_i(j) = softmax_j(k_i.n_j / τ_con)   the positive's distribution: the pseudo label
    Only the K negatives are classes (not the positive). Q is a target: no gradient reaches k or the
    queue, even if they require grad. Both KL directions keep their gradient through P (detaching P in
    KL(P||Q) would silently turn this into a one-directional KL). The caller multiplies by α.
    """
    dtype = torch.promote_types(q.dtype, torch.float32)  # fp32 at least (fp64 stays fp64, for tests)
    queue = queue.detach().to(dtype)
    # log P: [N, K]. log_softmax (not log(softmax)) stays finite when a probability underflows.
    log_P = F.log_softmax(q.to(dtype) @ queue / tau_con, dim=1)
    with torch.no_grad():  # the pseudo label: a constant
        log_Q = F.log_softmax(k.detach().to(dtype) @ queue / tau_con, dim=1)  # [N, K]
    kl_PQ = (log_P.exp() * (log_P - log_Q)).sum(dim=1)  # KL(P||Q) = Σ_j P_j (log P_j - log Q_j), [N]
    kl_QP = (log_Q.exp() * (log_Q - log_P)).sum(dim=1)  # KL(Q||P) = Σ_j Q_j (log Q_j - log P_j), [N]
    return (0.5 * kl_PQ + 0.5 * kl_QP).mean()  # sum over j, mean over samples ("batchmean")


@torch.no_grad()
def momentum_update(encoder_q: nn.Module, encoder_k: nn.Module, m: float) -> None:
    """θ_k <- m θ_k + (1 - m) θ_q for every parameter (not BN buffers: f_k's BN statistics are its own).

    lerp(θ_k, θ_q, 1 - m) = θ_k + (1 - m)(θ_q - θ_k); torch's lerp is exact at both ends (m = 1 keeps θ_k,
    m = 0 copies θ_q), and the _foreach_ form updates all tensors in a few fused kernels.
    """
    torch._foreach_lerp_(list(encoder_k.parameters()), list(encoder_q.parameters()), 1.0 - m)


@torch.no_grad()
def enqueue(queue: torch.Tensor, ptr: int, k_all: torch.Tensor) -> int:
    """FIFO update: queue[:, ptr : ptr+B] <- k_allᵀ, the oldest B keys are replaced. Returns (ptr + B) mod K.

    queue: [C, K], k_all: [B, C] keys gathered from every rank (identical on every rank, so the queues stay
    identical). ptr is a Python int: no device->host sync. K % B == 0 is checked at start-up.
    """
    batch, size = k_all.shape[0], queue.shape[1]
    if ptr + batch > size:
        raise ValueError(f"queue of size {size} at pointer {ptr} cannot take {batch} keys (K % B != 0)")
    queue[:, ptr:ptr + batch] = k_all.T
    return (ptr + batch) % size


def augmentations(image_size: int, blur: bool = True) -> TwoCrops:
    """MoCo v2 "aug+" (main_moco.py L225-235): the same random pipeline draws the query and the key view.

    blur=False drops the Gaussian blur, the one change of the 32 px CIFAR recipe (the MoCo CIFAR-10 demo and
    lightly's CIFAR-10 benchmark do the same): σ up to 2 px wipes out most of a 32 px crop.
    """
    augmentation = T.Compose([
        T.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),  # brightness, contrast, saturation, hue
        T.RandomGrayscale(p=0.2),
        *([T.RandomApply([GaussianBlur(0.1, 2.0)], p=0.5)] if blur else []),  # sigma ~ U[0.1, 2.0]
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    return TwoCrops(augmentation)


class Encoder(nn.Module):
    """f(x) = head(backbone(x)): ResNet without fc, then Linear(feat, mlp_dim) -> ReLU -> Linear(mlp_dim, dim).

    MoCo v2's head replaces torchvision's fc by this 2-layer MLP with biases and no BatchNorm.
    """

    def __init__(self, arch: str, small_stem: bool, mlp_dim: int, dim: int):
        super().__init__()
        self.backbone, feat_dim = build_resnet(arch, small_stem)
        self.head = nn.Sequential(nn.Linear(feat_dim, mlp_dim), nn.ReLU(inplace=True), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


# =====================================================================================================
# PLUMBING: fenced blocks are byte-identical in every script that carries them (tests/test_shared_blocks.py).
# Fix them in one file, copy to the others.
# =====================================================================================================
# >>> shared: distributed
def setup_distributed() -> tuple[int, int, torch.device]:
    """Returns (global rank, world size, device). torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; a plain
    `python script.py` is one process with no process group. NCCL on GPUs, gloo on CPU.

    The rank used everywhere is the GLOBAL rank (official AdCo uses the local GPU index, which is wrong on
    every node but the first). The local rank only picks the GPU.
    """
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return rank, world, device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """[N, ...] on every rank -> [R*N, ...] on every rank, in rank order (rank 0's rows first).
    Identity with one process. Warning: all_gather has no gradient; use only on keys / no-grad tensors."""
    if not is_distributed():
        return x
    # Send and receive buffers must share one memory layout: a channels_last image batch sent into NCHW
    # buffers (or the reverse) can arrive with scrambled pixels and no error. So gather plain NCHW copies.
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks (one all_reduce); identity with one process. Returns x."""
    if is_distributed():
        dist.all_reduce(x)
        x.div_(dist.get_world_size())
    return x
# <<< shared: distributed


# >>> shared: shuffle-bn
@torch.no_grad()
def batch_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ShuffleBN, step 1 (MoCo section 3.3): gather the key images of all ranks, permute them with rank 0's
    random permutation, give each rank one slice. The key encoder's per-GPU BN then sees a random subset
    of the global batch, so BN statistics cannot leak which key belongs to which query.
    One process: a local permutation, which changes BN only together with --bn-splits (SplitBatchNorm2d).
    Returns (this rank's shuffled images [N, ...], the inverse permutation)."""
    if not is_distributed():
        idx_shuffle = torch.randperm(x.shape[0], device=x.device)
        mine, idx_unshuffle = x[idx_shuffle], torch.argsort(idx_shuffle)
    else:
        rank, world = dist.get_rank(), dist.get_world_size()
        x_all = concat_all_gather(x)  # [R*N, ...], gathered as plain NCHW
        idx_shuffle = torch.randperm(x_all.shape[0], device=x.device)
        dist.broadcast(idx_shuffle, src=0)  # every rank uses rank 0's permutation
        idx_unshuffle = torch.argsort(idx_shuffle)
        mine = x_all[idx_shuffle.view(world, -1)[rank]]
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        mine = mine.contiguous(memory_format=torch.channels_last)  # back to the caller's (fast) layout
    return mine, idx_unshuffle


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    """ShuffleBN, step 2: gather the shuffled key features and return this rank's own samples, in their
    original order (so k_i again belongs to q_i)."""
    if not is_distributed():
        return x[idx_unshuffle]
    rank, world = dist.get_rank(), dist.get_world_size()
    x_all = concat_all_gather(x)  # [R*N, C] in shuffled order
    return x_all[idx_unshuffle.view(world, -1)[rank]]


class SplitBatchNorm2d(nn.BatchNorm2d):
    """Training-mode BN over S interleaved sub-batches (samples n with n mod S = s), so that one process
    behaves like S GPUs with per-GPU BN and ShuffleBN can work without DDP (--bn-splits S; the MoCo
    authors' CIFAR-10 demo uses S = 8). The running statistics are the mean of the S sub-batches' updates.
    Eval mode is plain BN. Same parameters and buffers as nn.BatchNorm2d: checkpoints do not change.
    Cost: a channels_last input is copied by the reshape and comes back NCHW (the sub-batches are not
    contiguous in that layout); time it with benchmarks/throughput.py --bn-splits 8 --sweep."""

    def __init__(self, bn: nn.BatchNorm2d, splits: int):
        if not (bn.affine and bn.track_running_stats and bn.momentum is not None):
            raise ValueError("SplitBatchNorm2d needs an affine BN with running statistics and a float momentum")
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
# <<< shared: shuffle-bn


# >>> shared: amp
def setup_amp(device: torch.device, enabled: bool):
    """Returns (autocast context factory, GradScaler, dtype or None).

    bf16 autocast on GPUs that support it (no loss scaling needed); fp16 + GradScaler on older GPUs;
    plain fp32 on CPU or with --no-amp. Autocast covers the encoders only: every script casts embeddings to
    fp32 before normalising, and computes logits, softmax, KL and bank/queue arithmetic in fp32.
    """
    dtype = None
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    return autocast, scaler, dtype
# <<< shared: amp


# >>> shared: checkpoint
def rng_state(device: torch.device) -> dict:
    """This process's RNG states as plain types (loadable with weights_only=True)."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def all_rng_states(device: torch.device) -> list:
    """Every rank's RNG state, in rank order (a collective: all ranks must call it)."""
    mine = rng_state(device)
    if not is_distributed():
        return [mine]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in mine.items()})
    return states


def save_checkpoint(path: str, state: dict) -> None:
    """Atomic write: a crash while saving leaves the previous file intact (temp file + rename)."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def resolve_resume(resume: Optional[str], out_dir: str) -> Optional[str]:
    """--resume None: start fresh, but never over an existing run; 'auto': <out-dir>/last.pt if present;
    otherwise a path that must exist. Returns the checkpoint to load, or None."""
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
    else:
        found = resume
    if is_distributed():  # all ranks must resume from the same file (rank 0 writes; other nodes must see it)
        seen = [None] * dist.get_world_size()
        dist.all_gather_object(seen, found)
        if len(set(seen)) > 1:
            raise UserError(f"ranks disagree about the checkpoint to resume ({seen}): --out-dir must be on a "
                            f"filesystem shared by all nodes")
    return found


def load_checkpoint(path: str, args, must_match: tuple) -> dict:
    """Loads a checkpoint of THIS method and checks that the arguments in `must_match` are unchanged."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {first_line}") from None
    found = ckpt.get("method") if isinstance(ckpt, dict) else type(ckpt).__name__
    if not isinstance(ckpt, dict) or found != METHOD:
        what = f"method {found!r}" if found else f"keys {sorted(ckpt)[:6]}"
        raise UserError(f"{path} is not a {METHOD}.py checkpoint (it holds {what})")
    # arguments added later take the value that reproduces what older checkpoints did
    old = {"blur": True, "bn_splits": 1, **ckpt["args"]}
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
    """The run's arguments (and derived values) as a table. Text() cells: paths are never parsed as markup."""
    table = Table(title=f"{METHOD}.py", show_header=True, header_style="bold")
    table.add_column("argument")
    table.add_column("value")
    for key, value in list(asdict(args).items()) + list(derived.items()):
        table.add_row(Text(key), Text(str(value)))
    console.print(table)


def make_progress(console: Console) -> Progress:
    """A progress bar in an interactive terminal; disabled (plain log lines only) when output is a file."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, disable=not console.is_terminal, transient=True)


class MetricsLog:
    """<out-dir>/metrics.jsonl, one JSON object per line, written by rank 0.

    On resume, records with a step after the checkpoint's (logged by the interrupted run after its last
    checkpoint) are dropped, so the file reads as one uninterrupted run."""

    def __init__(self, path: str, rank: int, resume_step: Optional[int]):
        self.path, self.active = path, rank == 0
        if not self.active:
            return
        kept = []
        if resume_step is not None and os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        with open(path, "w") as f:
            f.writelines(kept)

    def write(self, record: dict) -> None:
        if self.active:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
# <<< shared: console


# >>> shared: entry
def cli(main, args_type) -> None:
    """Parse the Args dataclass (tyro: --help comes from the field docstrings), run main, and turn a
    UserError into one line on stderr and exit code 2 (no traceback). Always tears down the process group."""
    args = tyro.cli(args_type, console_outputs=int(os.environ.get("RANK", "0")) == 0)
    try:
        main(args)
    except UserError as e:
        # a UserError raised inside a DataLoader worker arrives wrapped with the worker's traceback text
        message = str(e).strip().splitlines()[-1].split("UserError: ", 1)[-1]
        prefix = f"[rank {os.environ['RANK']}] " if "RANK" in os.environ else ""
        Console(stderr=True, soft_wrap=True).print(f"{prefix}error: {message}", markup=False, highlight=False)
        sys.exit(2)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
# <<< shared: entry


# =====================================================================================================
# main
# =====================================================================================================
def main(args: Args) -> dict:
    """Trains and returns the final state {"encoder_q", "encoder_k", "queue", "queue_ptr"} (for tests)."""
    # ---- 1. setup: processes, sizes, seeds ------------------------------------------------------------
    rank, world, device = setup_distributed()
    console = make_console(rank)
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} is the global batch and must divide by the "
                        f"{world} processes")
    batch_per_rank = args.batch_size // world
    too_small = args.bn_splits > 1 and batch_per_rank < 2 * args.bn_splits  # a sub-batch needs 2 images
    if args.bn_splits < 1 or batch_per_rank % args.bn_splits or too_small:
        raise UserError(f"--bn-splits {args.bn_splits} must be >= 1 and divide the per-process batch {batch_per_rank} "
                        "into sub-batches of at least 2 images")
    if args.queue_size % args.batch_size:
        raise UserError(f"--queue-size {args.queue_size} must be a multiple of the global --batch-size "
                        f"{args.batch_size} (each step enqueues one global batch of keys)")
    lr_peak = args.lr * args.batch_size / 256  # linear scaling rule: lr per 256 images
    torch.manual_seed(args.seed)  # identical initial weights and queue on every rank
    random.seed(args.seed + rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # ---- 2. run folder, resume --------------------------------------------------------------------------
    resume_path = resolve_resume(args.resume, args.out_dir)
    ckpt = load_checkpoint(resume_path, args, MUST_MATCH) if resume_path else None
    if ckpt is not None and ckpt["next_epoch"] >= args.epochs:
        console.print(f"{resume_path} already finished {ckpt['next_epoch']} epochs; nothing to do "
                      f"(raise --epochs to train longer)", markup=False)
        return {}
    os.makedirs(args.out_dir, exist_ok=True)

    # ---- 3. data ----------------------------------------------------------------------------------------
    train_set = make_dataset(args.dataset, args.data, "train", augmentations(args.image_size, args.blur),
                             args.synthetic_images, args.image_size, args.seed)
    loader = make_loader(train_set, batch_per_rank, rank, world, args.workers, args.seed)
    steps_per_epoch = len(loader.sampler) // batch_per_rank
    knn_sets = None
    if args.knn_every > 0:
        try:
            memory = make_dataset(args.dataset, args.data, "train", eval_transform(args.image_size),
                                  args.synthetic_images, args.image_size, args.seed)
            stride = max(1, round(1 / args.knn_train_fraction))
            memory = torch.utils.data.Subset(memory, range(0, len(memory), stride))
            knn_sets = (memory, make_dataset(args.dataset, args.data, "val", eval_transform(args.image_size),
                                             args.synthetic_images, args.image_size, args.seed))
        except UserError as e:
            console.print(f"kNN monitor off: {e}", markup=False)

    # ---- 4. model, queue, optimizer ----------------------------------------------------------------------
    encoder_q = Encoder(args.arch, args.small_stem, args.mlp_dim, args.dim).to(device)
    if args.bn_splits > 1:
        use_split_bn(encoder_q.backbone, args.bn_splits)  # before the copy: f_k gets split BN too
    encoder_k = copy.deepcopy(encoder_q).requires_grad_(False)  # θ_k = θ_q at start (MoCo builder L34-36)
    if device.type == "cuda" and args.channels_last:
        encoder_q.to(memory_format=torch.channels_last)
        encoder_k.to(memory_format=torch.channels_last)
    # The queue: K unit-norm random columns [C, K], fp32, outside DDP; same seed -> same queue on every rank.
    queue = F.normalize(torch.randn(args.dim, args.queue_size), dim=0).to(device)
    queue_ptr = 0
    optimizer = torch.optim.SGD(encoder_q.parameters(), lr=lr_peak, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    autocast, scaler, amp_dtype = setup_amp(device, args.amp)
    torch.manual_seed(args.seed + rank)  # from here on: per-rank randomness (augmentations, ShuffleBN perm)

    # ---- 5. restore ----------------------------------------------------------------------------------------
    start_epoch, start_batch, step = 0, 0, 0
    if ckpt is not None:
        encoder_q.load_state_dict(ckpt["encoder_q"])
        encoder_k.load_state_dict(ckpt["encoder_k"])
        queue.copy_(ckpt["queue"])
        queue_ptr = ckpt["queue_ptr"]
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, start_batch, step = ckpt["next_epoch"], ckpt["next_batch"], ckpt["step"]
        if len(ckpt["rng"]) == world:
            set_rng_state(ckpt["rng"][rank], device)
        else:
            console.print(f"resuming on {world} processes from a run on {len(ckpt['rng'])}: RNG streams restart")
    model = DDP(encoder_q, device_ids=[device] if device.type == "cuda" else None) if world > 1 else encoder_q
    if args.compile:
        model = torch.compile(model)
    metrics = MetricsLog(os.path.join(args.out_dir, "metrics.jsonl"), rank, step if ckpt else None)
    if rank == 0:
        with open(os.path.join(args.out_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=2)
    print_args(console, args, {
        "world size": world, "device": device, "per-process batch": batch_per_rank,
        "lr used (lr x B/256)": lr_peak, "amp dtype": amp_dtype or "fp32", "steps per epoch": steps_per_epoch,
        "resumed from": f"{resume_path} (epoch {start_epoch}, batch {start_batch})" if ckpt else "-",
    })
    if world == 1 and args.bn_splits == 1:
        console.print("one process with --bn-splits 1: ShuffleBN cannot hide the key batch from BN (one BN "
                      "batch for all keys); on one GPU use --bn-splits 8 (as on 8 GPUs)")

    def checkpoint_state(next_epoch: int, next_batch: int) -> dict:
        return {"method": METHOD, "args": asdict(args), "next_epoch": next_epoch, "next_batch": next_batch,
                "step": step, "encoder_q": encoder_q.state_dict(), "encoder_k": encoder_k.state_dict(),
                "queue": queue.cpu(), "queue_ptr": queue_ptr, "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "rng": all_rng_states(device)}

    # ---- 6. train loop ----------------------------------------------------------------------------------
    encoder_q.train()
    encoder_k.train()  # f_k's BN uses batch statistics (of the shuffled batch), as official
    # Running sums on the device (no host sync per step): loss, L_ins, L_con, InfoNCE top-1, steps.
    sums = torch.zeros(5, device=device)
    window_start = time.perf_counter()
    with make_progress(console) as progress:
        task = progress.add_task("train", total=(args.epochs - start_epoch) * steps_per_epoch - start_batch)
        for epoch in range(start_epoch, args.epochs):
            first_batch = start_batch if epoch == start_epoch else 0
            loader.sampler.set_epoch(epoch, first_batch)
            # cosine schedule, set once per epoch, no warm-up (main_moco.py L372-381)
            lr = lr_peak * 0.5 * (1.0 + math.cos(math.pi * epoch / args.epochs))
            for group in optimizer.param_groups:
                group["lr"] = lr
            for batch_idx, (views, _) in enumerate(loader, start=first_batch):
                x_q, x_k = (v.to(device, non_blocking=True) for v in views)
                if device.type == "cuda" and args.channels_last:
                    x_q, x_k = x_q.to(memory_format=torch.channels_last), x_k.to(memory_format=torch.channels_last)

                # queries, with gradient. Normalise in fp32 (fp16 normalisation can overflow -> NaN).
                with autocast():
                    q = model(x_q)
                q = F.normalize(q.float(), dim=1)  # [N, C]
                # keys, no gradient: EMA first (uses θ_q after the previous step), then ShuffleBN forward.
                with torch.no_grad():
                    momentum_update(encoder_q, encoder_k, args.moco_m)
                    x_k, idx_unshuffle = batch_shuffle(x_k)
                    with autocast():
                        k = encoder_k(x_k)
                    k = batch_unshuffle(F.normalize(k.float(), dim=1), idx_unshuffle)  # [N, C], k_i pairs q_i

                # L = L_ins + α L_con, both against the queue BEFORE this step's enqueue (fp32).
                logits, labels = infonce_logits(q, k, queue, args.moco_t)
                loss_ins = F.cross_entropy(logits, labels)  # mean over this rank; DDP averages over ranks
                loss_co2 = co2_loss(q, k, queue, args.co2_tau) if args.co2_alpha > 0 else torch.zeros((), device=device)
                loss = loss_ins + args.co2_alpha * loss_co2

                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()

                # dequeue/enqueue the GLOBAL batch of keys (rank order), identical on every rank
                queue_ptr = enqueue(queue, queue_ptr, concat_all_gather(k))

                step += 1
                progress.advance(task)
                with torch.no_grad():
                    top1 = (logits.argmax(dim=1) == 0).float().mean()
                    sums += torch.stack([loss.detach(), loss_ins.detach(), loss_co2.detach(), top1,
                                         torch.ones((), device=device)])

                # ---- logging, non-finite guard, checkpoints (the only host syncs) ----------------------
                done = batch_idx + 1
                end_of_epoch = done == steps_per_epoch
                stop = args.stop_at_step is not None and step >= args.stop_at_step
                save = end_of_epoch or stop or (args.ckpt_every_steps > 0 and step % args.ckpt_every_steps == 0)
                if done % args.log_every == 0 or save:
                    totals = all_reduce_mean(sums.clone()).tolist()
                    n = totals[4]
                    elapsed = time.perf_counter() - window_start
                    record = {"epoch": epoch, "step": step, "lr": lr, "loss": totals[0] / n,
                              "loss_ins": totals[1] / n, "loss_co2": totals[2] / n, "acc_ins": 100 * totals[3] / n,
                              "img_per_s": n * args.batch_size / elapsed}
                    if not all(math.isfinite(v) for v in totals):
                        # keep last.pt (the last good state); save the diverged state beside it for inspection
                        bad = os.path.join(args.out_dir, f"nonfinite_step{step}.pt")
                        state = checkpoint_state(epoch, done)
                        if rank == 0:
                            save_checkpoint(bad, state)
                        raise UserError(f"non-finite loss at epoch {epoch}, step {step} ({record}); "
                                        f"{os.path.join(args.out_dir, 'last.pt')} is the last good checkpoint, "
                                        f"the diverged state is in {bad}")
                    if device.type == "cuda":
                        record["max_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                    metrics.write(record)
                    console.print(f"epoch {epoch} [{done}/{steps_per_epoch}] step {step}  loss {record['loss']:.4f} "
                                  f"(ins {record['loss_ins']:.4f}, co2 {record['loss_co2']:.4f})  "
                                  f"acc_ins {record['acc_ins']:.1f}  lr {lr:.5f}  {record['img_per_s']:.0f} img/s",
                                  markup=False, highlight=False)
                    sums.zero_()
                    window_start = time.perf_counter()

                # ---- 7. end of epoch: kNN monitor, checkpoint --------------------------------------------------
                if end_of_epoch and knn_sets is not None and (epoch + 1) % args.knn_every == 0:
                    try:  # a monitor must never end a training run (CaCo exits on a failed kNN)
                        top1_knn, top5_knn = knn_accuracy(encoder_q.backbone, *knn_sets, batch_per_rank * 2,
                                                          device, args.knn_k, args.knn_t, args.workers, autocast)
                        metrics.write({"epoch": epoch, "step": step, "knn_top1": top1_knn, "knn_top5": top5_knn})
                        console.print(f"epoch {epoch}  kNN top-1 {top1_knn:.2f}  top-5 {top5_knn:.2f}", markup=False)
                    except Exception as e:  # noqa: BLE001
                        console.print(f"kNN monitor failed, training continues: {type(e).__name__}: {e}", markup=False)
                if save:
                    state = checkpoint_state(epoch + 1, 0) if end_of_epoch else checkpoint_state(epoch, done)
                    if rank == 0:
                        save_checkpoint(os.path.join(args.out_dir, "last.pt"), state)
                if stop:
                    console.print(f"stopped at step {step} (--stop-at-step); continue with --resume auto")
                    return {"encoder_q": encoder_q, "encoder_k": encoder_k, "queue": queue, "queue_ptr": queue_ptr}

    # ---- 8. teardown (the process group is destroyed by cli()) -------------------------------------------
    console.print(f"done: {args.epochs} epochs, {step} steps; checkpoint {os.path.join(args.out_dir, 'last.pt')}",
                  markup=False)
    return {"encoder_q": encoder_q, "encoder_k": encoder_k, "queue": queue, "queue_ptr": queue_ptr}


if __name__ == "__main__":
    cli(main, Args)
