"""CaCo: cooperative positives and adversarial negatives, both learned, from one memory bank, in one file.

Paper    "CaCo: Both Positive and Negative Samples are Directly Learnable via Cooperative-adversarial
         Contrastive Learning", Wang, Huang, Zeng, Qi, IEEE TPAMI, arXiv 2203.14370
Defaults = official code, maple-research-lab/CaCo @ a72b345 (training 083aa03), README: 200 ep, B 1024, 71.3 % linear

Equation -> function (q: query, t: momentum key, unit rows; W: the bank [C, K], raw columns W_k, n_k = W_k/||W_k||)
    f_q, f_k   ResNet + 3-layer MLP head; f_k = EMA of f_q, momentum 0.99 -> 1 (cosine)  momentum_update, key_momentum
    positive   the bank column nearest to the OTHER view's key; no per-sample memory              positive_labels
    loss       CE of bank-only logits q.n/τ (τ 0.08) vs that positive, CE1 + CE2   caco_loss_and_bank_grad, crop_pairs
    bank step  G = -∂F/∂W (F: bank_grad) descends the loss on each query's positive column (cooperative) and
               ascends it on every other (adversarial); all-reduced; momentum SGD η 3.0, μ_m 0.9  bank_momentum_step
    bank init  ceil(K/B) MoCo-style steps, [q.t | q.n] / 0.2 with label 0, whose keys fill W          init_logits
    optimiser  LARS (trust 0.001, wd 1.5e-6 on ndim > 1), lr 0.3 per 256, 10 warm-up epochs (also of the bank
               lr η_e), cosine to lr/100                                                    LARS, warmup_cosine
    views      asymmetric BYOL-style (blur 1 / 0.1, solarize 0 / 0.2); --multi-crop: 2 + 6 MoCo v2 crops  augmentations

The bank W, start to finish (grep METHOD for the method's own lines in main())
    created   main(): randn [C, K], fp32, from --seed (identical on every rank), outside DDP; velocity v = 0
    filled    main(), bank initialisation (fresh runs; --no-bank-init keeps randn): B unit keys per step
    used      caco_loss_and_bank_grad(): positives, logits and G from the bank BEFORE this step's update
    updated   bank_momentum_step(): after the network step, with the all-reduced G of the same q
    saved     checkpoint_state(): "bank" and "bank_velocity" in every last.pt; restored before the first step

Run: torchrun --nproc_per_node=8 caco.py --data /path/to/imagenet (8 GPUs); --resume auto continues a run;
--augment-on device augments on the GPU instead of in PIL workers (docs/augment.md). docs/caco.md:
CPU smoke run, 800-epoch recipe, defaults vs paper, metrics, bank-gradient derivation, deviations. Layout: Args ->
math -> model, augmentations -> main() -> appendix: fenced plumbing, byte-identical in every script (test_shared_blocks)
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

SCRIPT_NAME = "caco"  # written into every checkpoint; --resume refuses checkpoints of other methods


@dataclass
class Args:
    """CaCo pre-training. Defaults = the official README recipe: 200 epochs, global batch 1024 (71.3 %)."""
    out_dir: str = "runs/caco"
    """folder for last.pt, metrics.jsonl and args.json; refused if it already holds a run and --resume is not given"""
    resume: Optional[str] = None
    """'auto': continue from <out-dir>/last.pt when it exists (else start fresh); or the path of a checkpoint"""
    seed: int = 0
    """seed for weights, bank and data order (augmentations use seed + rank)"""
    dataset: Literal["imagefolder", "cifar10", "cifar100", "stl10", "synthetic"] = "imagefolder"
    """imagefolder: train/ and val/ (or test/) class folders in --data; cifar*, stl10: torchvision's files; synthetic"""
    data: Optional[str] = None
    """root folder of the dataset (--dataset imagefolder, cifar10, cifar100, stl10)"""
    synthetic_images: int = 256
    """number of training images for --dataset synthetic (a quarter as many val images)"""
    image_size: int = 224
    """crop size in pixels (the big crops; multi-crop small crops are image_size x 96/224)"""
    blur: bool = True
    """Gaussian blur in the augmentation (upstream probabilities); --no-blur for 32 px images (CIFAR recipe)"""
    workers: int = 8
    """DataLoader worker processes per GPU process"""
    augment_on: Literal["workers", "device"] = "workers"
    """workers: PIL augmentation in DataLoader workers (the reference path); device: batched on the training device
    from uint8 images (in-memory datasets stay on the device; ImageFolder JPEGs are decoded there), same views"""
    multi_crop: bool = False
    """2 big + 6 small crops, MoCo v2 augmentation, loss over all (query, key) pairs (the 800-epoch 75.7 % recipe)"""
    arch: Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"] = "resnet50"
    """backbone (torchvision, random init)"""
    small_stem: bool = False
    """3x3 stride-1 conv1 and no max-pool: the usual stem for 32 px images (CIFAR)"""
    mlp_dim: int = 2048
    """hidden width of the 3-layer projection head (feat -> mlp_dim -> mlp_dim -> dim, BN after the first two)"""
    dim: int = 256
    """embedding dimension C of q, t and the bank columns"""
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
    """checkpoint and exit at this global step (split a long run into jobs; resume with --resume auto)"""
    knn_every: int = 10
    """kNN monitor (k-NN top-1 on the val split, backbone features) every this many epochs; 0 = off"""
    knn_k: int = 20
    """k of the kNN monitor (upstream 20)"""
    knn_t: float = 0.2
    """temperature of the kNN monitor's weighted vote exp(sim / t) (upstream 0.2)"""
    knn_train_fraction: float = 0.2
    """fraction of the train split used as kNN memory (every 1/f-th image; upstream 20 %)"""


MUST_MATCH = ("arch", "small_stem", "mlp_dim", "dim", "dataset", "image_size", "blur", "multi_crop", "batch_size",
              "lr", "lr_final", "warmup_epochs", "momentum", "weight_decay", "lars_trust", "moco_m", "moco_m_cos",
              "moco_t", "mem_t", "bank_size", "mem_lr", "mem_lr_final", "mem_momentum", "bank_init", "init_t",
              "init_lr", "seed")  # must equal the checkpoint's on --resume; the rest (e.g. --epochs) may change
# Valid values, checked before anything is written: "> 0", ">= 1", or an interval "[a, b)" (check_ranges).
RANGES = {"epochs": ">= 1", "batch_size": ">= 1", "image_size": ">= 8", "synthetic_images": ">= 1", "workers": ">= 0",
          "mlp_dim": ">= 1", "dim": ">= 1", "lr": ">= 0", "lr_final": ">= 0", "warmup_epochs": ">= 0",
          "momentum": "[0, 1)", "weight_decay": ">= 0", "lars_trust": ">= 0", "moco_m": "[0, 1]", "moco_t": "> 0",
          "mem_t": "> 0", "bank_size": ">= 1", "mem_lr": ">= 0", "mem_lr_final": ">= 0", "mem_momentum": "[0, 1)",
          "init_t": "> 0", "init_lr": ">= 0", "log_every": ">= 1", "ckpt_every_steps": ">= 0", "stop_at_step": ">= 1",
          "knn_every": ">= 0", "knn_k": ">= 1", "knn_t": "> 0", "knn_train_fraction": "(0, 1]"}
# A log window's mean neg_share (1 - pos_prob) below this warns: both parts of G are ∝ 1 - p(positive) (docs/caco.md).
DEAD_BANK_SHARE = 1e-3


# ==== METHOD: the math, as pure functions (imported by tests/). Embeddings are unit rows, fp32 or fp64. ====
def bank_grad(q: torch.Tensor, bank: torch.Tensor, labels: torch.Tensor, mem_t: float) -> torch.Tensor:
    """Bank step direction G [C, K] for one (query crop, key crop) pair: W -= η G is CaCo's update. q: [N, C] unit
    rows (pre-step queries, detached: G is no autograd gradient); bank W: [C, K] raw; labels: [N] positives y_i.
    With l_ik = q_i . n_k, p = softmax_k(l / τ_m), p~ = |p - onehot(y)| and F = 1/(N τ_m) Σ_ik sg(p~_ik) l_ik,
    G = -∂F/∂W; ∂l_ik/∂n_k = q_i and ∂n_k/∂W_k = (I - n_k n_kᵀ) / ||W_k|| give the tangent
        ∂F/∂W_k = 1/(τ_m ||W_k||) [ (1/N) Σ_i p~_ik q_i - ((1/N) Σ_i p~_ik l_ik) n_k ].
    As ∂CE/∂l_ik = (p_ik - [k = y_i]) / (N τ_m) at τ_m, W -= η G DESCENDS the CE on the positive (cooperative,
    weight 1 - p) and ASCENDS it on every negative (adversarial, weight p): no single loss has this gradient."""
    dtype = torch.promote_types(torch.promote_types(q.dtype, bank.dtype), torch.float32)  # fp32 at least
    q, bank = q.detach().to(dtype), bank.detach().to(dtype)  # (fp64 stays fp64, for tests)
    norms = bank.norm(dim=0).clamp_min(1e-12)  # [K]: ||W_k|| (the eps of F.normalize, as in adco.py)
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
    """Momentum SGD on the bank, in place, = torch.optim.SGD(momentum=μ_m), no weight decay; v_0 = 0."""
    velocity.mul_(momentum).add_(grad)  # v <- μ_m v + G
    bank.add_(velocity, alpha=-lr)  # W <- W - η v


@torch.no_grad()
def positive_labels(keys: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """y_i = argmax_k t_i . n_k, the column nearest (cosine) to key t_i. keys: [N, C] unit rows; bank: [C, K] -> [N]."""
    return (keys.float() @ F.normalize(bank.float(), dim=0)).argmax(dim=1)


def crop_pairs(num_big: int, num_small: int) -> list[tuple[int, int, float]]:
    """(query crop i, key crop j != i, weight w) terms of L and G; keys from the big crops. Two views: L = CE1 + CE2
    (no ½); multi-crop: L = mean over the 2 big pairs + mean over the 2 x 6 (small query, big key) pairs."""
    big = [(i, j) for i in range(num_big) for j in range(num_big) if i != j]
    if num_small == 0:
        return [(i, j, 1.0) for i, j in big]
    small = [(i, j) for i in range(num_big, num_big + num_small) for j in range(num_big)]
    return [(i, j, 1.0 / len(big)) for i, j in big] + [(i, j, 1.0 / len(small)) for i, j in small]


class CacoStep(NamedTuple):
    loss: torch.Tensor      # L (autograd to the queries)
    grad: torch.Tensor      # G [C, K], this rank's, before the all-reduce
    pos_prob: torch.Tensor  # mean τ_m-softmax probability of the positive, over queries and pairs
    acc_pos: torch.Tensor   # % of queries whose top logit is their positive
    pos_cols: torch.Tensor  # distinct positive columns / N, mean over key crops: 1/N = every key picks one column


def caco_loss_and_bank_grad(queries: list, keys: list, bank: torch.Tensor, pairs: list, moco_t: float,
                            mem_t: float) -> CacoStep:
    """From the pre-step bank [C, K]; queries[i] (with gradient), keys[j]: [N, C] unit rows; pairs: crop_pairs.
    L = Σ_(i,j,w) w CE(q_i . n / τ, y_j), y_j = argmax_k t_j . n_k;  G = Σ_(i,j,w) w bank_grad(q_i, W, y_j, τ_m)."""
    dtype = torch.promote_types(bank.dtype, torch.float32)  # fp32 at least (fp64 stays fp64, for tests)
    n = F.normalize(bank.detach().to(dtype), dim=0)  # [C, K]: the bank is normalised on the fly; W stays raw
    labels = [positive_labels(t, bank) for t in keys]  # [N] per key crop, no gradient
    logits = [q.to(dtype) @ n for q in queries]  # [N, K] per query crop: l = q . n (bank only, no keys)
    loss, grad = torch.zeros((), dtype=dtype, device=bank.device), torch.zeros_like(bank, dtype=dtype)  # G: [C, K]
    pos_prob, acc = [], []
    for i, j, w in pairs:
        loss = loss + w * F.cross_entropy(logits[i] / moco_t, labels[j])  # mean over this rank's N queries
        grad += w * bank_grad(queries[i], bank, labels[j], mem_t)
        with torch.no_grad():  # metrics: the τ_m-softmax mass on the positive (upstream mem_losses), top-1
            pos_prob.append(torch.softmax(logits[i].detach() / mem_t, dim=1).gather(1, labels[j][:, None]).mean())
            acc.append((logits[i].detach().argmax(dim=1) == labels[j]).float().mean())
    # bincount keeps the shape fixed (no host sync, unlike unique): the number of columns chosen as a positive
    pos_cols = torch.stack([(torch.bincount(y, minlength=bank.shape[1]) > 0).sum() / y.numel() for y in labels])
    return CacoStep(loss, grad, torch.stack(pos_prob).mean(), 100 * torch.stack(acc).mean(), pos_cols.mean())


def init_logits(q: torch.Tensor, k: torch.Tensor, bank: torch.Tensor, init_t: float):
    """Bank-init InfoNCE: logits [N, 1+K] = [q_i.k_i | q_i.n_k] / init_t, label 0 (own key positive, bank negatives)."""
    l_pos = (q * k).sum(dim=1, keepdim=True)  # [N, 1]
    l_neg = q @ F.normalize(bank.float(), dim=0)  # [N, K]
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return torch.cat([l_pos, l_neg], dim=1) / init_t, labels


def warmup_cosine(epoch: int, peak: float, final: float, warmup: int, epochs: int) -> float:
    """Per-epoch network lr and bank lr: peak (e+1)/W in the W warm-up epochs, then final + ½(1 + cos(π (e-W)/(E-W)))
    (peak - final); final == peak: constant after warm-up (the bank lr of the README recipe)."""
    if epoch < warmup:
        return peak * (epoch + 1) / warmup
    return final + 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup))) * (peak - final)


def key_momentum(epoch: int, base: float, epochs: int, cosine: bool) -> float:
    """m_e = 1 - ½(1 + cos(π e/E))(1 - m): m at epoch 0, -> 1 at the end."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * (1.0 - base) if cosine else base


@torch.no_grad()
def momentum_update(encoder_q: nn.Module, encoder_k: nn.Module, m: float) -> None:
    """θ_k <- m θ_k + (1 - m) θ_q on parameters (BN buffers stay f_k's own); exact lerp: m = 0 copies θ_q."""
    torch._foreach_lerp_(list(encoder_k.parameters()), list(encoder_q.parameters()), 1.0 - m)


class LARS(torch.optim.Optimizer):
    """LARS as upstream CaCo / MoCo v3. For a parameter w with gradient g:
        if w.ndim > 1:  d = g + wd w,  d <- d * η ||w|| / ||d||   (trust ratio; 1 if either norm is 0)
        else:           d = g          (BN weights and biases: no weight decay, no trust ratio)
        μ <- momentum μ + d  (μ starts at zero);   w <- w - lr μ"""

    def __init__(self, params, lr: float, weight_decay: float, momentum: float, trust: float):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust=trust))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for w in [p for p in group["params"] if p.grad is not None]:
                d = w.grad
                if w.ndim > 1:
                    d = d.add(w, alpha=group["weight_decay"])
                    w_norm, d_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(d)
                    ok = (w_norm > 0) & (d_norm > 0)  # the trust ratio stays a tensor: no host sync
                    d = d.mul(torch.where(ok, group["trust"] * w_norm / d_norm, torch.ones_like(w_norm)))
                if "mu" not in self.state[w]:
                    self.state[w]["mu"] = torch.zeros_like(w)
                mu = self.state[w]["mu"].mul_(group["momentum"]).add_(d)  # in place: μ <- momentum μ + d
                w.add_(mu, alpha=-group["lr"])


class Encoder(nn.Module):
    """head(backbone(x)); head: Linear -> BN -> ReLU -> Linear -> BN -> ReLU -> Linear, feat-mlp-mlp-dim, no biases."""

    def __init__(self, arch: str, small_stem: bool, mlp_dim: int, dim: int):
        super().__init__()
        self.backbone, feat_dim = build_resnet(arch, small_stem)
        self.head = nn.Sequential(
            nn.Linear(feat_dim, mlp_dim, bias=False), nn.BatchNorm1d(mlp_dim), nn.ReLU(inplace=True),
            nn.Linear(mlp_dim, mlp_dim, bias=False), nn.BatchNorm1d(mlp_dim), nn.ReLU(inplace=True),
            nn.Linear(mlp_dim, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def augmentations(image_size: int, multi_crop: bool = False, blur: bool = True) -> list[View]:
    """[view1, view2], or 2 big + 6 small crops (multi-crop; small = image_size x 96/224, so 32 px runs work).
    blur=False drops the Gaussian blur (32 px CIFAR recipe: σ up to 2 px wipes out most of a 32 px crop)."""
    def view(size, scale, saturation, blur_p, solarize_p) -> View:  # jitter: brightness, contrast, saturation, hue
        return View(size=size, scale=scale, jitter=(0.4, 0.4, saturation, 0.1), jitter_p=0.8, gray_p=0.2,
                    blur_p=blur_p if blur else 0.0, blur_sigma=(0.1, 2.0), solarize_p=solarize_p, flip_p=0.5)

    if not multi_crop:  # asymmetric BYOL-style views
        return [view(image_size, (0.2, 1.0), 0.2, 1.0, 0.0),  # view 1: always blurred, no solarize
                view(image_size, (0.2, 1.0), 0.2, 0.1, 0.2)]  # view 2: rarely blurred, solarize 0.2
    small = max(1, round(image_size * 96 / 224))  # 96 px at 224
    big_crop = view(image_size, (0.14, 1.0), 0.4, 0.5, 0.0)  # MoCo v2 augmentation on every crop
    small_crop = view(small, (0.05, 0.14), 0.4, 0.5, 0.0)
    return [big_crop] * 2 + [small_crop] * 6


# ==== main =========================================================================================================
def main(args: Args) -> dict:
    """Trains and returns the final state {"encoder_q", "encoder_k", "bank", "bank_velocity"} (for tests)."""
    # ---- 1. setup: checks (RANGES, before any file is touched), processes, sizes, seeds; data; run folder
    run = setup_run(args)
    device = run.device
    lr_peak, lr_final = args.lr * args.batch_size / 256, args.lr_final * args.batch_size / 256  # lr per 256 images
    init_lr = (args.init_lr if args.init_lr is not None else args.lr) * args.batch_size / 256
    views, on_device = augmentations(args.image_size, args.multi_crop, args.blur), args.augment_on == "device"
    train_set = make_dataset(args.dataset, args.data, "train", None if on_device else pil_views(views),
                             args.synthetic_images, args.image_size, args.seed)
    loader = make_loader(train_set, run.batch_per_rank, run.rank, run.world, args.workers, args.seed,
                         device_views=views if on_device else None, device=device)
    steps_per_epoch = len(loader.sampler) // run.batch_per_rank
    pairs = crop_pairs(2, 6 if args.multi_crop else 0)  # (query crop, key crop, weight)
    knn_sets = make_knn_sets(args, run.console)
    if not open_run_folder(run, args, MUST_MATCH):  # after the data: a data error leaves no empty folder
        return {}
    # ---- 2. model, bank, optimizer
    encoder_q = Encoder(args.arch, args.small_stem, args.mlp_dim, args.dim)
    sync_bn = device.type == "cuda" and run.world > 1  # SyncBN needs NCCL; with one process it equals BN
    encoder_q = (nn.SyncBatchNorm.convert_sync_batchnorm(encoder_q) if sync_bn else encoder_q).to(device)  # all BN
    encoder_k = copy.deepcopy(encoder_q).requires_grad_(False)  # θ_k = θ_q at start
    channels_last = device.type == "cuda" and args.channels_last
    for encoder in (encoder_q, encoder_k) if channels_last else ():
        encoder.to(memory_format=torch.channels_last)
    # METHOD: the bank W [C, K], fp32, raw, outside DDP; randn from --seed (upstream: unseeded), the same on every rank
    bank = torch.randn(args.dim, args.bank_size).to(device)
    bank_velocity = torch.zeros_like(bank)  # v: the bank's momentum buffer, v_0 = 0
    optimizer = LARS(encoder_q.parameters(), lr=lr_peak, weight_decay=args.weight_decay, momentum=args.momentum,
                     trust=args.lars_trust)
    autocast, scaler, amp_dtype = setup_amp(device, args.amp)
    torch.manual_seed(args.seed + run.rank)  # from here on: per-rank randomness (augmentations)

    def to_device(x):
        x = x.to(device, non_blocking=True)
        return x.to(memory_format=torch.channels_last) if channels_last else x

    def embed(encoder, x):  # the encoder under autocast, then unit rows in fp32 (fp16 can overflow): [N, C]
        with autocast():
            z = encoder(x)
        return F.normalize(z.float(), dim=1)

    def sgd_step(loss: torch.Tensor) -> None:  # LARS; DDP averages the gradient; the bank is outside DDP and LARS
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    # ---- 3. restore: W and v continue exactly where they were (bank initialisation is never redone)
    start_epoch, start_batch, step = restore_training(run, encoder_q, encoder_k, optimizer, scaler, bank=bank,
                                                      bank_velocity=bank_velocity)
    model = wrap_model(encoder_q, run, args.compile)
    metrics = MetricsLog(os.path.join(args.out_dir, "metrics.jsonl"), run.rank, step if run.ckpt else None)
    announce(run, args, {"peak lr (lr x B/256)": lr_peak, "final lr": lr_final, "amp dtype": amp_dtype or "fp32",
                         "steps per epoch": steps_per_epoch, "loss terms (query, key, weight)": pairs,
                         "bank initialisation": "restored" if run.ckpt else "off (randn)" if not args.bank_init else
                         f"{-(-args.bank_size // args.batch_size)} steps (ceil K/B) at lr {init_lr:g}"})
    if not sync_bn:
        run.console.print("plain BatchNorm: SyncBN (upstream, on every BN) is used only with several CUDA processes"
                          + ("" if run.world == 1 else "; here each process normalises its own batch"), markup=False)
    # ---- 4. METHOD: bank initialisation (fresh runs): ceil(K/B) MoCo-style steps (label 0: own key), each writing a
    # global batch of keys into the next B columns of W; the network trains (init_lr, no warm-up; LARS μ carries on)
    encoder_q.train()
    encoder_k.train()  # f_k's BN uses batch statistics, as upstream; so in bank init
    if run.ckpt is None and args.bank_init:
        for group in optimizer.param_groups:
            group["lr"] = init_lr
        filled, init_epoch, init_steps = 0, 0, 0
        while filled < args.bank_size:  # the loader is cycled if K/B exceeds one epoch
            loader.sampler.set_epoch(init_epoch)  # epoch 0's order first, as upstream (no set_epoch before init)
            for views, _ in loader:
                q = embed(model, to_device(views[0]))  # [N, C], with gradient
                with torch.no_grad():
                    momentum_update(encoder_q, encoder_k, args.moco_m)
                    k = embed(encoder_k, to_device(views[1]))  # [N, C]: key of the other view
                init_loss = F.cross_entropy(*init_logits(q, k, bank, args.init_t))
                sgd_step(init_loss)
                # W[:, f : f+B] <- all_gather(k)ᵀ, rank order, on every rank; if K % B != 0 the last step writes K - f
                take = min(args.batch_size, args.bank_size - filled)
                bank[:, filled:filled + take] = concat_all_gather(k)[:take].T
                filled, init_steps = filled + take, init_steps + 1
                if init_steps % args.log_every == 0:
                    run.console.print(f"bank initialisation: {filled}/{args.bank_size} columns, init loss "
                                      f"{init_loss.item():.4f}", markup=False, highlight=False)
                if filled >= args.bank_size:
                    break
            init_epoch += 1
        momentum_update(encoder_q, encoder_k, 0.0)  # θ_k <- θ_q: the EMA of the init steps is discarded
        metrics.write({"epoch": 0, "step": 0, "bank_init_steps": init_steps, "bank_init_loss": init_loss.item()})
        run.console.print(f"bank initialised: {args.bank_size} momentum keys in {init_steps} steps at lr {init_lr:g} "
                          f"(last init loss {init_loss.item():.4f}); key encoder reset to the query encoder",
                          markup=False)

    def checkpoint_state(next_epoch: int, next_batch: int) -> dict:
        return {"method": SCRIPT_NAME, "args": asdict(args), "next_epoch": next_epoch, "next_batch": next_batch,
                "step": step, "encoder_q": encoder_q.state_dict(), "encoder_k": encoder_k.state_dict(),
                "bank": bank.cpu(), "bank_velocity": bank_velocity.cpu(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "rng": all_rng_states(device)}
    # ---- 5. train loop; bank_norm (mean ||W_k||) is logged, non-finite iff W holds a non-finite entry
    tail = StepTail(args, run, steps_per_epoch, metrics, checkpoint_state, knn_sets, encoder_q.backbone, autocast,
                    log_values=lambda: {"bank_norm": bank.norm(dim=0).mean().item()})
    warned_dead_bank = False
    with make_progress(run.console) as progress:
        task = progress.add_task("train", total=(args.epochs - start_epoch) * steps_per_epoch - start_batch)
        for epoch in range(start_epoch, args.epochs):
            first_batch = start_batch if epoch == start_epoch else 0
            loader.sampler.set_epoch(epoch, first_batch)
            lr = warmup_cosine(epoch, lr_peak, lr_final, args.warmup_epochs, args.epochs)  # per epoch, as upstream
            mem_lr = warmup_cosine(epoch, args.mem_lr, args.mem_lr_final, args.warmup_epochs, args.epochs)
            key_m = key_momentum(epoch, args.moco_m, args.epochs, args.moco_m_cos)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for batch_idx, (views, _) in enumerate(loader, start=first_batch):
                crops = [to_device(v) for v in views]  # 2 views, or 2 big + 6 small crops
                # METHOD: one CaCo step. Queries q_i with gradient, one forward per crop (BN statistics per crop);
                # keys t_j of the big crops, no gradient: EMA first (θ_q after the previous step), then f_k
                queries = [embed(model, x) for x in crops]
                with torch.no_grad():
                    momentum_update(encoder_q, encoder_k, key_m)
                    keys = [embed(encoder_k, x) for x in crops[:2]]
                out = caco_loss_and_bank_grad(queries, keys, bank, pairs, args.moco_t, args.mem_t)
                sgd_step(out.loss)
                # METHOD: the bank step, from the same pre-step queries: G averaged over ranks (ONE all-reduce of
                # [C, K], also with multi-crop), then v <- μ_m v + G, W <- W - η_e v, identical on every rank
                bank_momentum_step(bank, bank_velocity, all_reduce_mean(out.grad), mem_lr, args.mem_momentum)
                step += 1
                progress.advance(task)
                stats = {"loss": out.loss, "pos_prob": out.pos_prob, "neg_share": 1 - out.pos_prob,
                         "acc_pos": out.acc_pos, "pos_cols": out.pos_cols}
                stop = tail(epoch, batch_idx + 1, step, stats, lr=lr, mem_lr=mem_lr, key_m=key_m)
                if tail.record and tail.record["neg_share"] < DEAD_BANK_SHARE and not warned_dead_bank:
                    warned_dead_bank = True  # once per run; neg_share stays in every log line
                    run.console.print(f"WARNING: the negatives hold {tail.record['neg_share']:.1e} of the τ_m-softmax "
                                      f"(< {DEAD_BANK_SHARE:g}): the bank step G, ∝ 1 - p(positive) in both its parts, "
                                      "has vanished, so the bank no longer moves. docs/caco.md: 'Bank health'.",
                                      markup=False, highlight=False)
                if stop:
                    break
            if tail.stopped:
                break
    tail.finish(step)  # teardown; cli() destroys the process group
    return {"encoder_q": encoder_q, "encoder_k": encoder_k, "bank": bank, "bank_velocity": bank_velocity}


# ==== APPENDIX: fenced plumbing, byte-identical in every script (fix one: tests/test_shared_blocks.py --sync FILE.py)
# this script's blocks: distributed amp checkpoint console pretrain entry
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
