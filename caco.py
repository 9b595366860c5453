"""CaCo: cooperative positives and adversarial negatives, both learned, from one memory bank, in one file.

Paper
    CaCo  "CaCo: Both Positive and Negative Samples are Directly Learnable via Cooperative-adversarial
          Contrastive Learning", Wang, Huang, Zeng, Qi (IEEE TPAMI), arXiv 2203.14370
Official code whose defaults this file follows: maple-research-lab/CaCo @ a72b345 (training code of 083aa03:
main_worker.py, train_caco.py, init_memory.py, model/CaCo.py), with the README's 200-epoch, global batch
1024 command (71.3 % linear top-1). Spec with line references: shared/spec/adco_caco.md, sections 2-9.

Run it
    8 GPUs, ImageNet, 200 epochs at global batch 1024 (README: 71.3 % linear top-1):
        torchrun --nproc_per_node=8 caco.py --data /path/to/imagenet --out-dir runs/caco
    4 nodes x 8 GPUs, global batch 4096 (README: 72.0 %; lr scales to 0.3 x 4096/256 = 4.8):
        torchrun --nnodes=4 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
            caco.py --data /path/to/imagenet --batch-size 4096 --out-dir runs/caco4096   (node_rank 1..3 likewise)
    800 epochs, multi-crop, global batch 2048 on 4 nodes (README: 75.7 %):
        torchrun ... caco.py --data /path/to/imagenet --batch-size 2048 --epochs 800 --multi-crop
    one GPU:   python caco.py --data /path/to/imagenet --batch-size 256    (lr scales to 0.3 x 256/256)
    CPU smoke run (seconds):
        python caco.py --dataset synthetic --synthetic-images 64 --arch resnet18 --image-size 32 \
            --batch-size 16 --bank-size 64 --workers 0 --epochs 2 --out-dir runs/smoke
    Continue an interrupted run: add --resume auto (also: --stop-at-step N to end a job cleanly).
    CIFAR-10, one GPU, ResNet-18 at 32 px (the README's "CIFAR-10 recipe": no blur, K 4096):
        python caco.py --data data/cifar10 --arch resnet18 --small-stem --image-size 32 --no-blur \
            --mlp-dim 512 --batch-size 512 --bank-size 4096 --knn-every 10 --knn-k 200 --knn-t 0.1 \
            --knn-train-fraction 1 --workers 15 --out-dir runs/cifar10-caco

What this file implements (q: query embedding (gradient), t: momentum key (no gradient), all unit vectors;
W: the bank [C, K], un-normalised; n_k = W_k / ||W_k|| its k-th normalised column)
    encoders   f_q = ResNet + 3-layer MLP head (2048-2048-256, no biases, BN+ReLU after the first two layers,
               no BN on the output); f_k = EMA copy, θ_k <- m_e θ_k + (1-m_e) θ_q once per step,
               m_e = 1 - ½(1 + cos(π e/E))(1 - m) per epoch: 0.99 -> 1.
    positives  NO per-sample memory. Query i of view 1 takes as its positive the bank column closest to the
               OTHER view's momentum key:  y_i = argmax_k t2_i . n_k  (and view 2 uses t1).
    loss       bank-only logits a = q . n / τ (τ = 0.08, N x K, no in-batch keys, no "1+K" slot);
               L = CE(a1, y1) + CE(a2, y2)  -- a SUM of the two directions (upstream's scale, no ½).
    bank       one step per training step, after the network step, from the same (pre-step) q:
               p = softmax(q . n / τ_m), p~ = |p - onehot(y)|, G = -∂F/∂W with
               F = 1/(N τ_m) Σ_ik sg(p~_ik) q_i . n_k  (bank_grad, derivation there), summed over the two
               directions, averaged over ranks (ONE all-reduce), then momentum SGD: v <- 0.9 v + G,
               W <- W - η_e v, no weight decay. This is gradient DESCENT on the CE loss for each query's
               positive column (cooperative) and ASCENT for every other column (adversarial): both pull the
               column toward the query, with weights (1 - p) and p.
    bank init  before epoch 0: ceil(K/B) steps of MoCo-style training ([q.t | q.n] / 0.2, label 0) that fill W with
               the gathered keys, then θ_k <- θ_q.
    optimiser  LARS (trust 0.001, weight decay 1.5e-6 and trust ratio on weights with ndim > 1 only,
               momentum 0.9), lr 0.3 per 256, 10 warm-up epochs, cosine to lr/100, all per epoch.
    bank lr    η_e: 3.0 with a linear warm-up over the same 10 epochs, then constant (cosine to
               --mem-lr-final when it differs).
    views      asymmetric BYOL-style: blur p 1.0 / 0.1, solarize p 0 / 0.2, ColorJitter(0.4,0.4,0.2,0.1) p 0.8.
    multi-crop --multi-crop: 2 big crops (scale 0.14-1) + 6 small crops (0.05-0.14, 96/224 of the size), MoCo
               v2 augmentation; loss over all (query i, key j) pairs with i != j, keys from the 2 big crops:
               mean over the 2 big pairs + mean over the 12 small pairs (the same weights for the bank).

Deviations from the official code (also listed in README.md)
    1. --batch-size is the GLOBAL batch, divided by the world size. Upstream divides by --nodes_num, and its
       README 4096 command passes --nodes_num=1 on 4 nodes: it actually trains at 16384 (lr scaled for 4096).
    2. torchrun (or plain python) instead of mp.spawn; one process and CPU are supported. SyncBN (upstream:
       on every BN of both encoders) is used with several CUDA processes; otherwise plain BN (SyncBN needs
       NCCL; with one process it would equal BN anyway), and a message says so. No ShuffleBN, as upstream.
    3. The bank lives outside DDP, is created from the same seed on every rank and changes only by
       all-reduced gradients, so it is identical everywhere. Multi-crop all-reduces the summed bank
       gradient ONCE per step (upstream: once per (query, key) pair, 14 times).
    4. AMP: the encoders run under bf16 autocast on GPUs that support it (fp16 + GradScaler otherwise);
       normalisation, logits, softmax and all bank arithmetic are fp32. Upstream is fp32. --no-amp = fp32.
    5. Exact resume (key encoder, bank and its velocity, optimizer, RNG, position inside the epoch; bitwise
       with --workers 0, worker augmentation streams restart otherwise). Upstream
       auto-resumes silently from a folder named after the hyper-parameters, and crashes (UnboundLocalError
       on knn_test_acc) resuming at some epochs; here --resume auto is explicit.
    6. The kNN monitor never ends training (upstream calls exit() when its kNN fails after epoch 20). It
       runs every --knn-every epochs (not also every epoch up to 20) on every 5th training image (upstream:
       the first 20 % of each class), k = 20, t = 0.2 as upstream.
    7. Bank initialisation: the temperature 0.2 is a flag (--init-t; upstream hard-codes it); its steps use
       the PEAK lr without warm-up as upstream (a conscious choice, see --init-lr: LARS bounds every
       layer's step to about lr x 0.001 of its norm, so 64 steps at 1.2 are tame, and they belong to the
       recipe that gave 71.3 %). The init EMA uses --moco-m (upstream 0.999; irrelevant, θ_k is reset).
       The loader is cycled if K/B exceeds one epoch (upstream would leave part of W random). Upstream's
       init also runs view 2 through f_q (unused output; it only moves f_q's BN running statistics); not here.
    8. --mem-wd does not exist: upstream parses it but never applies it (its README passes 0 anyway).
    9. The multi-crop small size is --image-size x 96/224 (96 at 224), so 32 px smoke runs work.
   10. DDP without find_unused_parameters (every parameter is used); the momentum update covers
       parameters only, as upstream (the key encoder's BN statistics are its own).
   11. The pos_prob metric averages every (query, key) pair at τ_m (upstream's multi-crop meter: pair (0, .)
       at τ; equal temperatures by default).

Sections: Args -> method math (pure functions) -> model -> plumbing (fenced, identical in every script)
-> main(): 1 setup, 2 run folder and resume, 3 data, 4 model, bank and optimizer, 5 restore or bank
initialisation, 6 train loop, 7 end of epoch, 8 teardown.
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

from common import (IMAGENET_MEAN, IMAGENET_STD, GaussianBlur, MultiCrop, Solarize, TwoCrops, UserError,
                    build_resnet, eval_transform, knn_accuracy, make_dataset, make_loader)

METHOD = "caco"  # written into every checkpoint; --resume refuses checkpoints of other methods


@dataclass
class Args:
    """CaCo pre-training. Defaults = the official README recipe: 200 epochs, global batch 1024 (71.3 %)."""

    # --- experiment -------------------------------------------------------------------------------
    out_dir: str = "runs/caco"
    """folder for last.pt, metrics.jsonl and args.json; refused if it already holds a run and --resume is not given"""
    resume: Optional[str] = None
    """'auto': continue from <out-dir>/last.pt when it exists (else start fresh); or the path of a checkpoint"""
    seed: int = 0
    """seed for weights, bank and data order (augmentations use seed + rank)"""

    # --- data -------------------------------------------------------------------------------------
    dataset: Literal["imagefolder", "synthetic"] = "imagefolder"
    """imagefolder: --data holds train/ and val/ (or test/) class folders (ImageNet layout); synthetic: fake images"""
    data: Optional[str] = None
    """root folder for --dataset imagefolder"""
    synthetic_images: int = 256
    """number of training images for --dataset synthetic (a quarter as many val images)"""
    image_size: int = 224
    """crop size in pixels (the big crops; multi-crop small crops are image_size x 96/224)"""
    blur: bool = True
    """Gaussian blur in the augmentation (upstream probabilities); --no-blur for 32 px images (CIFAR recipe)"""
    workers: int = 8
    """DataLoader worker processes per GPU process"""
    multi_crop: bool = False
    """2 big + 6 small crops, MoCo v2 augmentation, loss over all (query, key) pairs (the 800-epoch 75.7 % recipe)"""

    # --- model ------------------------------------------------------------------------------------
    arch: Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"] = "resnet50"
    """backbone (torchvision, random init)"""
    small_stem: bool = False
    """3x3 stride-1 conv1 and no max-pool: the usual stem for 32 px images (CIFAR)"""
    mlp_dim: int = 2048
    """hidden width of the 3-layer projection head (feat -> mlp_dim -> mlp_dim -> dim, BN after the first two)"""
    dim: int = 256
    """embedding dimension C of q, t and the bank columns"""

    # --- optimisation (LARS) ----------------------------------------------------------------------
    epochs: int = 200
    """training epochs E (800 for the long runs)"""
    batch_size: int = 1024
    """GLOBAL batch B over all processes; each process gets B / world_size"""
    lr: float = 0.3
    """base learning rate per 256 images; the peak rate is lr * B / 256 (linear scaling rule)"""
    lr_final: float = 0.003
    """final learning rate per 256 images, reached by the cosine at the last epoch (upstream lr_final)"""
    warmup_epochs: int = 10
    """linear warm-up epochs of the network lr (lr_e = peak (e+1)/W) and of the bank lr η_e"""
    momentum: float = 0.9
    """LARS momentum"""
    weight_decay: float = 1.5e-6
    """LARS weight decay, on parameters with more than one dimension only (not BN, as upstream)"""
    lars_trust: float = 0.001
    """LARS trust coefficient η: a layer's update is scaled to η ||w|| / ||g + wd w|| of its gradient"""

    # --- CaCo -------------------------------------------------------------------------------------
    moco_m: float = 0.99
    """m: key-encoder momentum at epoch 0"""
    moco_m_cos: bool = True
    """raise m to 1 by a per-epoch cosine, m_e = 1 - ½(1 + cos(π e/E))(1 - m) (upstream moco_m_decay)"""
    moco_t: float = 0.08
    """τ: temperature of the network's bank logits q . n / τ"""
    mem_t: float = 0.08
    """τ_m: temperature of the bank update's softmax p = softmax(q . n / τ_m)"""
    bank_size: int = 65536
    """K: bank columns (positives and negatives alike); bank init fills them in ceil(K/B) steps"""
    mem_lr: float = 3.0
    """η: bank learning rate after warm-up (not scaled with the batch, as upstream)"""
    mem_lr_final: float = 3.0
    """bank learning rate at the last epoch; equal to --mem-lr = constant after warm-up (upstream README)"""
    mem_momentum: float = 0.9
    """μ_m: momentum of the bank's SGD (v <- μ_m v + G, W <- W - η v; no weight decay)"""
    bank_init: bool = True
    """fill the bank with momentum keys by ceil(K/B) MoCo-style steps before epoch 0 (upstream ad_init); off: randn"""
    init_t: float = 0.2
    """temperature of the bank-initialisation InfoNCE [q.t | q.n] / init_t (upstream hard-codes 0.2)"""
    init_lr: Optional[float] = None
    """lr per 256 images of the bank-initialisation steps; None = the peak lr, without warm-up, as upstream"""

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
    knn_every: int = 10
    """kNN monitor (k-NN top-1 on the val split, backbone features) every this many epochs; 0 = off"""
    knn_k: int = 20
    """k of the kNN monitor (upstream 20)"""
    knn_t: float = 0.2
    """temperature of the kNN monitor's weighted vote exp(sim / t) (upstream 0.2)"""
    knn_train_fraction: float = 0.2
    """fraction of the train split used as kNN memory (every 1/f-th image; upstream 20 %)"""


# Arguments that must equal the checkpoint's when resuming (the rest, e.g. --epochs or --workers, may change).
MUST_MATCH = ("arch", "small_stem", "mlp_dim", "dim", "dataset", "image_size", "blur", "multi_crop", "batch_size",
              "lr", "lr_final", "warmup_epochs", "momentum", "weight_decay", "lars_trust", "moco_m", "moco_m_cos",
              "moco_t", "mem_t", "bank_size", "mem_lr", "mem_lr_final", "mem_momentum", "bank_init", "init_t",
              "init_lr", "seed")


# =====================================================================================================
# METHOD: the math, as pure functions (imported by tests/). Embeddings are unit rows, fp32 or fp64.
# =====================================================================================================
def bank_grad(q: torch.Tensor, bank: torch.Tensor, labels: torch.Tensor, mem_t: float) -> torch.Tensor:
    """CaCo's bank step direction for one (query view, key view) direction: the tensor to put in bank.grad
    so that plain SGD, bank -= lr * grad, is CaCo's update (train_caco.py L193-211).

    q: [N, C] unit rows (pre-step queries, no gradient needed); bank W: [C, K] un-normalised;
    labels: [N] each query's positive column y_i.  Returns G: [C, K] = -∂F/∂W, where

        F = 1/(N τ_m) Σ_i Σ_k sg(p~_ik) l_ik,   l_ik = q_i . n_k,   n_k = W_k / ||W_k||,
        p = softmax_k(l / τ_m),   p~ = |p - onehot(y)|   (p~_ik = p_ik for k != y_i, 1 - p_iy for the positive)

    Derivation. ∂F/∂l_ik = p~_ik / (N τ_m) (p~ is a constant: stop-gradient), ∂l_ik/∂n_k = q_i, and the
    normalisation's Jacobian is ∂n_k/∂W_k = (I - n_k n_kᵀ) / ||W_k||, so

        ∂F/∂W_k = 1/(τ_m ||W_k||) [ (1/N) Σ_i p~_ik q_i  -  ((1/N) Σ_i p~_ik l_ik) n_k ],

    the part of the p~-weighted mean query orthogonal to W_k. A step W -= η G = W += η ∂F/∂W raises every
    logit l_ik: it pulls every column toward its queries, the positive with weight 1 - p, each negative
    with weight p. For the CE loss L = -(1/N) Σ_i log p_iy (at τ_m), ∂L/∂l_ik = (p_ik - [k = y_i]) / (N τ_m):
    on a negative (i, k) the step is ASCENT of L (adversarial), on the positive (i, y_i) it is DESCENT
    (cooperative). It is no single loss's gradient; F is the exact surrogate (spec section 7).
    """
    dtype = torch.promote_types(torch.promote_types(q.dtype, bank.dtype), torch.float32)  # fp32 at least
    q, bank = q.detach().to(dtype), bank.detach().to(dtype)  # (fp64 stays fp64, for tests)
    norms = bank.norm(dim=0)  # [K]: ||W_k||
    n = bank / norms  # [C, K]: n_k, unit columns
    logits = q @ n  # [N, K]: l_ik = q_i . n_k
    p_tilde = torch.softmax(logits / mem_t, dim=1)  # [N, K]: p_ik at the memory temperature τ_m
    rows = torch.arange(q.shape[0], device=q.device)
    p_tilde[rows, labels] = 1.0 - p_tilde[rows, labels]  # p~ = |p - onehot(y)|: the positive entry 1 - p_iy
    weighted_q = q.T @ p_tilde  # [C, K]: Σ_i p~_ik q_i
    radial = (p_tilde * logits).sum(dim=0)  # [K]:    Σ_i p~_ik l_ik (the component along n_k, removed below)
    grad_F = (weighted_q - radial * n) / (q.shape[0] * mem_t * norms)  # ∂F/∂W_k, tangent to W_k
    return -grad_F  # SGD descends along -(-∂F/∂W): the bank ascends F


@torch.no_grad()
def bank_momentum_step(bank: torch.Tensor, velocity: torch.Tensor, grad: torch.Tensor, lr: float,
                       momentum: float) -> None:
    """Momentum SGD on the bank, in place (train_caco.py L209-212; = torch.optim.SGD(momentum=μ_m), no wd):
        v <- μ_m v + G      (v starts at zero, so the first step is v = G, as torch's SGD)
        W <- W - η v
    """
    velocity.mul_(momentum).add_(grad)  # v <- μ_m v + G
    bank.add_(velocity, alpha=-lr)  # W <- W - η v


@torch.no_grad()
def positive_labels(keys: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """y_i = argmax_k t_i . n_k: the bank column nearest (cosine) to momentum key t_i (train_caco.py L153-163).
    keys: [N, C] unit rows; bank: [C, K] un-normalised -> [N] column indices. No gradient."""
    return (keys.float() @ F.normalize(bank.float(), dim=0)).argmax(dim=1)


def crop_pairs(num_big: int, num_small: int) -> list[tuple[int, int, float]]:
    """The (query crop i, key crop j, weight w) terms of the loss and of the bank gradient.

    Single crop (num_small = 0, 2 views): (0, 1, 1) and (1, 0, 1): L = CE1 + CE2, upstream's scale (no ½).
    Multi-crop: keys come from the big crops only; every crop is a query; pairs with i != j. The 2 big pairs
    share weight 1 (mean), the 2 x 6 small pairs share weight 1 (mean): L = mean(big) + mean(small)
    (train_caco.py L78-82, L100-105).
    """
    big = [(i, j) for i in range(num_big) for j in range(num_big) if i != j]
    if num_small == 0:
        return [(i, j, 1.0) for i, j in big]
    small = [(i, j) for i in range(num_big, num_big + num_small) for j in range(num_big)]
    return [(i, j, 1.0 / len(big)) for i, j in big] + [(i, j, 1.0 / len(small)) for i, j in small]


def caco_loss_and_bank_grad(queries: list, keys: list, bank: torch.Tensor, pairs: list, moco_t: float,
                            mem_t: float):
    """One CaCo step's math. queries[i]: [N, C] unit rows (with gradient); keys[j]: [N, C] momentum keys;
    bank: [C, K]; pairs from crop_pairs.  Returns (loss, bank gradient G [C, K] before the all-reduce,
    mean positive probability at τ_m, fraction of queries whose top logit is their positive):

        L = Σ_(i,j,w) w CE(q_i . n / τ, y_j),    y_j = argmax_k t_j . n_k   (the key of the OTHER crop)
        G = Σ_(i,j,w) w bank_grad(q_i, W, y_j, τ_m)
    """
    dtype = torch.promote_types(bank.dtype, torch.float32)  # fp32 at least (fp64 stays fp64, for tests)
    n = F.normalize(bank.detach().to(dtype), dim=0)  # [C, K]: the bank is normalised on the fly; W stays raw
    labels = [positive_labels(t, bank) for t in keys]  # [N] per key crop, no gradient
    logits = [q.to(dtype) @ n for q in queries]  # [N, K] per query crop: l = q . n (bank only, no keys)
    loss = torch.zeros((), dtype=dtype, device=bank.device)
    grad = torch.zeros_like(bank, dtype=dtype)
    pos_prob, acc = [], []
    for i, j, w in pairs:
        loss = loss + w * F.cross_entropy(logits[i] / moco_t, labels[j])  # mean over this rank's N queries
        grad += w * bank_grad(queries[i], bank, labels[j], mem_t)
        with torch.no_grad():  # metrics: the τ_m-softmax mass on the positive (upstream mem_losses), top-1
            pos_prob.append(torch.softmax(logits[i].detach() / mem_t, dim=1).gather(1, labels[j][:, None]).mean())
            acc.append((logits[i].detach().argmax(dim=1) == labels[j]).float().mean())
    return loss, grad, torch.stack(pos_prob).mean(), torch.stack(acc).mean()


def init_logits(q: torch.Tensor, k: torch.Tensor, bank: torch.Tensor, init_t: float):
    """Bank initialisation's MoCo-style InfoNCE (init_memory.py L40-60): logits [N, 1+K] = [q_i.k_i | q_i.n_k]
    / init_t with labels 0 (the own key is the positive; the partly random bank supplies negatives)."""
    l_pos = (q * k).sum(dim=1, keepdim=True)  # [N, 1]
    l_neg = q @ F.normalize(bank.float(), dim=0)  # [N, K]
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return torch.cat([l_pos, l_neg], dim=1) / init_t, labels


def warmup_cosine(epoch: int, peak: float, final: float, warmup: int, epochs: int) -> float:
    """Per-epoch schedule of the network lr and of the bank lr (train_utils.py L83-93, train_caco.py L319-328):
    peak (e+1)/W during the W warm-up epochs, then final + ½(1 + cos(π (e-W)/(E-W))) (peak - final).
    With final == peak the value stays constant after warm-up (the bank lr of the README recipe)."""
    if epoch < warmup:
        return peak * (epoch + 1) / warmup
    return final + 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup))) * (peak - final)


def key_momentum(epoch: int, base: float, epochs: int, cosine: bool) -> float:
    """m_e = 1 - ½(1 + cos(π e/E))(1 - m): m at epoch 0, -> 1 at the end (main_worker.py L269-272)."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * (1.0 - base) if cosine else base


class LARS(torch.optim.Optimizer):
    """LARS as upstream CaCo / MoCo v3 (model/optimizer.py, built at main_worker.py L103).
    For a parameter w with gradient g:
        if w.ndim > 1:  d = g + wd w,  d <- d * η ||w|| / ||d||   (trust ratio; 1 if either norm is 0)
        else:           d = g          (BN weights and biases: no weight decay, no trust ratio)
        μ <- momentum μ + d            (μ starts at zero)
        w <- w - lr μ
    """

    def __init__(self, params, lr: float, weight_decay: float, momentum: float, trust: float):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust=trust))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for w in group["params"]:
                if w.grad is None:
                    continue
                d = w.grad
                if w.ndim > 1:
                    d = d.add(w, alpha=group["weight_decay"])
                    w_norm, d_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(d)
                    ratio = torch.where((w_norm > 0) & (d_norm > 0), group["trust"] * w_norm / d_norm,
                                        torch.ones_like(w_norm))  # a tensor: no host sync
                    d = d.mul(ratio)
                state = self.state[w]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(w)
                state["mu"].mul_(group["momentum"]).add_(d)
                w.add_(state["mu"], alpha=-group["lr"])


@torch.no_grad()
def momentum_update(encoder_q: nn.Module, encoder_k: nn.Module, m: float) -> None:
    """θ_k <- m θ_k + (1 - m) θ_q for every parameter (not BN buffers: f_k's BN statistics are its own).
    lerp is exact at both ends: m = 1 keeps θ_k, m = 0 copies θ_q (the reset after bank initialisation)."""
    torch._foreach_lerp_(list(encoder_k.parameters()), list(encoder_q.parameters()), 1.0 - m)


class Encoder(nn.Module):
    """f(x) = head(backbone(x)). The head is CaCo's 3-layer MLP (model/CaCo.py L35-51, last_bn=False):
    Linear(feat, mlp, no bias) -> BN -> ReLU -> Linear(mlp, mlp, no bias) -> BN -> ReLU -> Linear(mlp, dim, no bias)."""

    def __init__(self, arch: str, small_stem: bool, mlp_dim: int, dim: int):
        super().__init__()
        self.backbone, feat_dim = build_resnet(arch, small_stem)
        self.head = nn.Sequential(
            nn.Linear(feat_dim, mlp_dim, bias=False), nn.BatchNorm1d(mlp_dim), nn.ReLU(inplace=True),
            nn.Linear(mlp_dim, mlp_dim, bias=False), nn.BatchNorm1d(mlp_dim), nn.ReLU(inplace=True),
            nn.Linear(mlp_dim, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def augmentations(image_size: int, multi_crop: bool = False, blur: bool = True):
    """The crop transform: [view1, view2] (single crop) or 2 big + 6 small crops (multi-crop).
    blur=False drops the Gaussian blur (32 px CIFAR recipe: σ up to 2 px wipes out most of a 32 px crop)."""
    def pipeline(size, scale, jitter_hue_sat, blur_p, solarize_p):
        ops = [T.RandomResizedCrop(size, scale=scale),
               T.RandomApply([T.ColorJitter(0.4, 0.4, jitter_hue_sat, 0.1)], p=0.8),  # brightness, contrast, sat, hue
               T.RandomGrayscale(p=0.2)]
        if blur:
            ops.append(T.RandomApply([GaussianBlur(0.1, 2.0)], p=blur_p))  # sigma ~ U[0.1, 2.0]
        if solarize_p > 0:
            ops.append(T.RandomApply([Solarize(128)], p=solarize_p))
        return T.Compose(ops + [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    if not multi_crop:  # asymmetric BYOL-style views (main_worker.py L183-210)
        return TwoCrops(pipeline(image_size, (0.2, 1.0), 0.2, 1.0, 0.0),  # view 1: always blurred, no solarize
                        pipeline(image_size, (0.2, 1.0), 0.2, 0.1, 0.2))  # view 2: rarely blurred, solarize 0.2
    small = max(1, round(image_size * 96 / 224))  # 96 px at 224
    big_crop = pipeline(image_size, (0.14, 1.0), 0.4, 0.5, 0.0)  # MoCo v2 augmentation on every crop
    small_crop = pipeline(small, (0.05, 0.14), 0.4, 0.5, 0.0)
    return MultiCrop([big_crop] * 2 + [small_crop] * 6)


# =====================================================================================================
# PLUMBING: fenced blocks are byte-identical in every script that carries them (tests/test_shared_blocks.py).
# Fix them in one file, copy to the others. (CaCo has no ShuffleBN, so it does not carry that block.)
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
    """Trains and returns the final state {"encoder_q", "encoder_k", "bank", "bank_velocity"} (for tests)."""
    # ---- 1. setup: processes, sizes, seeds ------------------------------------------------------------
    rank, world, device = setup_distributed()
    console = make_console(rank)
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} is the global batch and must divide by the "
                        f"{world} processes")
    batch_per_rank = args.batch_size // world
    if args.bank_size <= 0 or args.warmup_epochs < 0 or min(args.moco_t, args.mem_t, args.init_t) <= 0:
        raise UserError("--bank-size must be positive, --warmup-epochs >= 0, and --moco-t, --mem-t, --init-t > 0")
    lr_peak = args.lr * args.batch_size / 256  # linear scaling rule: lr per 256 images
    lr_final = args.lr_final * args.batch_size / 256
    init_lr = (args.init_lr if args.init_lr is not None else args.lr) * args.batch_size / 256
    torch.manual_seed(args.seed)  # identical initial weights and bank on every rank
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

    # ---- 3. data: asymmetric BYOL-style views, or 2 + 6 multi-crops (values in augmentations()) ---------
    train_set = make_dataset(args.dataset, args.data, "train",
                             augmentations(args.image_size, args.multi_crop, args.blur),
                             args.synthetic_images, args.image_size, args.seed)
    loader = make_loader(train_set, batch_per_rank, rank, world, args.workers, args.seed)
    steps_per_epoch = len(loader.sampler) // batch_per_rank
    pairs = crop_pairs(2, 6 if args.multi_crop else 0)  # (query crop, key crop, weight)
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

    # ---- 4. model, bank, optimizer ----------------------------------------------------------------------
    encoder_q = Encoder(args.arch, args.small_stem, args.mlp_dim, args.dim)
    sync_bn = device.type == "cuda" and world > 1
    if sync_bn:  # upstream converts every BN of both encoders (main_worker.py L101)
        encoder_q = nn.SyncBatchNorm.convert_sync_batchnorm(encoder_q)
    encoder_q = encoder_q.to(device)
    encoder_k = copy.deepcopy(encoder_q).requires_grad_(False)  # θ_k = θ_q at start
    if device.type == "cuda" and args.channels_last:
        encoder_q.to(memory_format=torch.channels_last)
        encoder_k.to(memory_format=torch.channels_last)
    # The bank W: [C, K], fp32, un-normalised, outside DDP. randn from the same seed on every rank (upstream
    # CaCo_PN: randn, unseeded); bank initialisation (section 5) then overwrites every column with keys.
    bank = torch.randn(args.dim, args.bank_size).to(device)
    bank_velocity = torch.zeros_like(bank)  # v: the bank's momentum buffer, v_0 = 0
    optimizer = LARS(encoder_q.parameters(), lr=lr_peak, weight_decay=args.weight_decay, momentum=args.momentum,
                     trust=args.lars_trust)
    autocast, scaler, amp_dtype = setup_amp(device, args.amp)
    torch.manual_seed(args.seed + rank)  # from here on: per-rank randomness (augmentations)

    def to_device(x):
        x = x.to(device, non_blocking=True)
        return x.to(memory_format=torch.channels_last) if device.type == "cuda" and args.channels_last else x

    # ---- 5. restore; or initialise the bank (init_memory.py) -------------------------------------------
    start_epoch, start_batch, step = 0, 0, 0
    if ckpt is not None:
        encoder_q.load_state_dict(ckpt["encoder_q"])
        encoder_k.load_state_dict(ckpt["encoder_k"])
        bank.copy_(ckpt["bank"])
        bank_velocity.copy_(ckpt["bank_velocity"])
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
    if ckpt is None and args.bank_init:
        # K/B steps of MoCo-style training (own key positive, label 0, temperature init_t), each writing one
        # global batch of momentum keys into the next B columns of W. The network really trains here, at
        # init_lr (upstream: the peak lr, no warm-up), and LARS's momentum carries into epoch 0.
        encoder_q.train()
        encoder_k.train()
        for group in optimizer.param_groups:
            group["lr"] = init_lr
        filled, init_epoch, init_steps = 0, 0, 0
        while filled < args.bank_size:
            loader.sampler.set_epoch(init_epoch)  # epoch 0's order first, as upstream (no set_epoch before init)
            for views, _ in loader:
                with autocast():
                    q = model(to_device(views[0]))
                q = F.normalize(q.float(), dim=1)  # [N, C]
                with torch.no_grad():
                    momentum_update(encoder_q, encoder_k, args.moco_m)
                    with autocast():
                        k = encoder_k(to_device(views[1]))
                    k = F.normalize(k.float(), dim=1)  # [N, C]: key of the other view
                logits, labels = init_logits(q, k, bank, args.init_t)
                init_loss = F.cross_entropy(logits, labels)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(init_loss).backward()
                scaler.step(optimizer)
                scaler.update()
                # W[:, f : f+B] <- all_gather(k)ᵀ: unit-norm keys of the whole global batch, rank order,
                # identical on every rank (so the banks start identical, whatever randn gave). When
                # K % B != 0 the last step writes only the first K - f keys (as upstream).
                take = min(args.batch_size, args.bank_size - filled)
                bank[:, filled:filled + take] = concat_all_gather(k)[:take].T
                filled += take
                init_steps += 1
                if filled >= args.bank_size:
                    break
            init_epoch += 1
        momentum_update(encoder_q, encoder_k, 0.0)  # θ_k <- θ_q: the EMA of the init steps is discarded
        metrics.write({"epoch": 0, "step": 0, "bank_init_steps": init_steps, "bank_init_loss": init_loss.item()})
        console.print(f"bank initialised: {args.bank_size} momentum keys in {init_steps} steps at lr {init_lr:g} "
                      f"(last init loss {init_loss.item():.4f}); key encoder reset to the query encoder",
                      markup=False)
    if rank == 0:
        with open(os.path.join(args.out_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=2)
    print_args(console, args, {
        "world size": world, "device": device, "per-process batch": batch_per_rank,
        "peak lr (lr x B/256)": lr_peak, "final lr": lr_final, "amp dtype": amp_dtype or "fp32",
        "steps per epoch": steps_per_epoch, "loss terms (query, key, weight)": pairs,
        "resumed from": f"{resume_path} (epoch {start_epoch}, batch {start_batch})" if ckpt else "-",
    })
    if not sync_bn:
        console.print("plain BatchNorm: SyncBN (upstream, on every BN) is used only with several CUDA processes"
                      + ("" if world == 1 else "; here each process normalises its own batch"), markup=False)

    def checkpoint_state(next_epoch: int, next_batch: int) -> dict:
        return {"method": METHOD, "args": asdict(args), "next_epoch": next_epoch, "next_batch": next_batch,
                "step": step, "encoder_q": encoder_q.state_dict(), "encoder_k": encoder_k.state_dict(),
                "bank": bank.cpu(), "bank_velocity": bank_velocity.cpu(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "rng": all_rng_states(device)}

    # ---- 6. train loop ----------------------------------------------------------------------------------
    encoder_q.train()
    encoder_k.train()  # f_k's BN uses batch statistics, as upstream
    # Running sums on the device (no host sync per step): loss, positive probability, top-1, steps.
    sums = torch.zeros(4, device=device)
    window_start = time.perf_counter()
    with make_progress(console) as progress:
        task = progress.add_task("train", total=(args.epochs - start_epoch) * steps_per_epoch - start_batch)
        for epoch in range(start_epoch, args.epochs):
            first_batch = start_batch if epoch == start_epoch else 0
            loader.sampler.set_epoch(epoch, first_batch)
            # per-epoch schedules (upstream sets all three once per epoch)
            lr = warmup_cosine(epoch, lr_peak, lr_final, args.warmup_epochs, args.epochs)
            mem_lr = warmup_cosine(epoch, args.mem_lr, args.mem_lr_final, args.warmup_epochs, args.epochs)
            key_m = key_momentum(epoch, args.moco_m, args.epochs, args.moco_m_cos)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for batch_idx, (views, _) in enumerate(loader, start=first_batch):
                crops = [to_device(v) for v in views]  # 2 views, or 2 big + 6 small crops

                # queries q_i = normalize(f_q(crop_i)), with gradient; one forward per crop (BN per crop)
                queries = []
                for x in crops:
                    with autocast():
                        out = model(x)
                    queries.append(F.normalize(out.float(), dim=1))  # [N, C], fp32
                # keys t_j of the big crops, no gradient: EMA first (θ_q after the previous step), then f_k
                with torch.no_grad():
                    momentum_update(encoder_q, encoder_k, key_m)
                    keys = []
                    for x in crops[:2]:
                        with autocast():
                            out = encoder_k(x)
                        keys.append(F.normalize(out.float(), dim=1))  # [N, C], fp32

                # L = Σ w CE(q_i.n/τ, argmax_k t_j.n_k) and the bank's G, both from the bank BEFORE its step
                loss, grad, pos_prob, acc = caco_loss_and_bank_grad(queries, keys, bank, pairs, args.moco_t,
                                                                    args.mem_t)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()  # DDP averages the network gradient over ranks
                scaler.step(optimizer)
                scaler.update()

                # bank step, from the pre-step queries: G <- mean over ranks (ONE all-reduce of [C, K]);
                # v <- μ_m v + G; W <- W - η_e v. Identical on every rank, since G and W are.
                bank_momentum_step(bank, bank_velocity, all_reduce_mean(grad), mem_lr, args.mem_momentum)

                step += 1
                progress.advance(task)
                sums += torch.stack([loss.detach(), pos_prob, acc, torch.ones((), device=device)])

                # ---- logging, non-finite guard, checkpoints (the only host syncs) ----------------------
                done = batch_idx + 1
                end_of_epoch = done == steps_per_epoch
                stop = args.stop_at_step is not None and step >= args.stop_at_step
                save = end_of_epoch or stop or (args.ckpt_every_steps > 0 and step % args.ckpt_every_steps == 0)
                if done % args.log_every == 0 or save:
                    totals = all_reduce_mean(sums.clone()).tolist()
                    n = totals[3]
                    elapsed = time.perf_counter() - window_start
                    record = {"epoch": epoch, "step": step, "lr": lr, "mem_lr": mem_lr, "key_m": key_m,
                              "loss": totals[0] / n, "pos_prob": totals[1] / n, "acc_pos": 100 * totals[2] / n,
                              "img_per_s": n * args.batch_size / elapsed}
                    if not all(math.isfinite(v) for v in totals) or not torch.isfinite(bank).all():
                        # keep last.pt (the last good state); save the diverged state beside it for inspection
                        bad = os.path.join(args.out_dir, f"nonfinite_step{step}.pt")
                        state = checkpoint_state(epoch, done)
                        if rank == 0:
                            save_checkpoint(bad, state)
                        raise UserError(f"non-finite loss or bank at epoch {epoch}, step {step} ({record}); "
                                        f"{os.path.join(args.out_dir, 'last.pt')} is the last good checkpoint, "
                                        f"the diverged state is in {bad}")
                    if device.type == "cuda":
                        record["max_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                    metrics.write(record)
                    console.print(f"epoch {epoch} [{done}/{steps_per_epoch}] step {step}  loss {record['loss']:.4f}  "
                                  f"pos_prob {record['pos_prob']:.4f}  acc_pos {record['acc_pos']:.1f}  lr {lr:.5f}  "
                                  f"mem_lr {mem_lr:.3f}  key_m {key_m:.5f}  {record['img_per_s']:.0f} img/s",
                                  markup=False, highlight=False)
                    sums.zero_()
                    window_start = time.perf_counter()

                # ---- 7. end of epoch: kNN monitor, checkpoint --------------------------------------------------
                if end_of_epoch and knn_sets is not None and (epoch + 1) % args.knn_every == 0:
                    try:  # a monitor must never end a training run (upstream exit()s on a failed kNN)
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
                    return {"encoder_q": encoder_q, "encoder_k": encoder_k, "bank": bank,
                            "bank_velocity": bank_velocity}

    # ---- 8. teardown (the process group is destroyed by cli()) -------------------------------------------
    console.print(f"done: {args.epochs} epochs, {step} steps; checkpoint {os.path.join(args.out_dir, 'last.pt')}",
                  markup=False)
    return {"encoder_q": encoder_q, "encoder_k": encoder_k, "bank": bank, "bank_velocity": bank_velocity}


if __name__ == "__main__":
    cli(main, Args)
