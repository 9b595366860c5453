"""Linear probe, kNN evaluation, semi-supervised fine-tuning and backbone export of a pre-trained ResNet from
moco_co2.py, adco.py, caco.py (or a fork of one of them), in one file.

What it measures
    linear probe   top-1 / top-5 of a linear classifier (fc) trained on the FROZEN backbone: the papers' number
    --knn          weighted kNN (k=200, T=0.1) on L2-normalised backbone features, train split as memory
    --finetune     semi-supervised: the whole network trains on 1 % or 10 % of the labels
    --export-*     the backbone as a torchvision state dict or in detectron2 naming (detection transfer)

Protocols (--protocol fills the optimisation flags left unset; flags given explicitly win)
    moco   default: facebookresearch/moco main_lincls.py, the MoCo v2 / CO2 linear protocol. SGD lr 30,
           momentum 0.9, wd 0, batch 256, 100 epochs, lr x0.1 at epochs 60 and 80
    adco   AdCo lincls.py: lr 10, per-epoch cosine down to 0.01, batch 256, 100 epochs
    caco   CaCo linear.py: LARS (LARC scaling mode, trust 0.001), lr 0.025 per 256 = 0.4 at batch 4096,
           cosine to 0, 100 epochs
    semi   default with --finetune: the OpenSelfSup / mmselfsup v0 ImageNet 1 % semi-supervised benchmark.
           Backbone lr 0.01, head lr x100, wd 5e-4, batch 256, 20 epochs, lr x0.2 at epochs 12 and 16
    --batch-size is the global batch and --lr is per 256 images: the rate used is lr x B/256.

Run it (PRE = a pre-training run folder; arch and stem are read from PRE/last.pt)
    torchrun --nproc_per_node=8 linear_eval.py --data /path/to/imagenet --checkpoint PRE/last.pt \
        --out-dir runs/lincls_moco          # --protocol adco / --protocol caco for the other two protocols
    torchrun --nproc_per_node=8 linear_eval.py --data /path/to/imagenet --checkpoint PRE/last.pt --knn \
        --knn-train-fraction 0.2 --out-dir runs/knn
    python linear_eval.py --checkpoint PRE/last.pt --export-torchvision r50.pth
    Add --resume auto to continue an interrupted run.

docs/linear_eval.md has the full protocol details, the defaults compared with the official code, the accepted
checkpoint formats, the deviations from the official code and more commands.
"""

import errno
import fcntl
import glob
import json
import math
import os
import pickle
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
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
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
from torch.utils.data import DataLoader, Subset

from common import (IMAGENET_MEAN, IMAGENET_STD, UserError, build_resnet, check_same_classes, eval_transform,
                    ignore_stop_signals, knn_accuracy, make_dataset, make_loader)

SCRIPT_NAME = "linear_eval"  # written into this script's own checkpoints; --resume refuses other files
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


@dataclass
class Args:
    """Linear probe / kNN / semi-supervised fine-tuning / export of a pre-trained ResNet.
    Defaults = the MoCo linear-classification protocol (main_lincls.py); --protocol adco|caco for the others."""

    # --- experiment -------------------------------------------------------------------------------
    checkpoint: Optional[str] = None
    """pre-training last.pt (moco_co2.py, adco.py, caco.py or a fork of one) or a torchvision ResNet state dict"""
    out_dir: str = "runs/linear_eval"
    """folder for last.pt, metrics.jsonl and args.json; refused if it already holds a run and --resume is not given"""
    resume: Optional[str] = None
    """'auto': continue from <out-dir>/last.pt when it exists (else start fresh); or the path of a checkpoint"""
    seed: int = 0
    """seed for fc init, data order and the label subset (augmentations use seed + rank)"""

    # --- what to do -------------------------------------------------------------------------------
    knn: bool = False
    """kNN evaluation only (no training): top-1/top-5 on val with the train split as memory"""
    random_init: bool = False
    """use a randomly initialised backbone instead of --checkpoint (the baseline; needs --arch)"""
    finetune: bool = False
    """semi-supervised fine-tuning: the whole network trains on a labelled subset of the train split"""
    label_fraction: float = 0.01
    """--finetune: fraction of labels, drawn class-balanced with --seed (0.01 or 0.1 in the papers)"""
    subset_file: Optional[str] = None
    """--finetune: a file listing the labelled images' file names, one per line (SimCLR 1percent.txt / 10percent.txt)"""
    export_torchvision: Optional[str] = None
    """write the backbone as a torchvision state dict (torchvision.models.<arch>() loads it, only fc missing), exit"""
    export_detectron2: Optional[str] = None
    """write the backbone in detectron2 ResNet naming as a .pkl (as MoCo's convert script), then exit"""

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
    """train crop / val centre-crop size in pixels (val resizes the short side to size x 256/224 first; to size
    at <= 64 px)"""
    workers: int = 8
    """DataLoader worker processes per GPU process"""

    # --- model ------------------------------------------------------------------------------------
    arch: Optional[Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]] = None
    """backbone; read from --checkpoint (an error if given and different); required with --random-init"""
    small_stem: bool = False
    """--random-init only: 3x3 stride-1 conv1, no max-pool (read from --checkpoint otherwise)"""

    # --- optimisation (None = from --protocol) ----------------------------------------------------
    protocol: Optional[Literal["moco", "adco", "caco", "semi"]] = None
    """recipe for the fields below that are not given: moco (default), adco, caco; semi (default with --finetune)"""
    epochs: Optional[int] = None
    """training epochs E (moco/adco/caco: 100, semi: 20)"""
    batch_size: Optional[int] = None
    """GLOBAL batch B over all processes (moco/adco/semi: 256, caco: 4096)"""
    lr: Optional[float] = None
    """base learning rate per 256 images; the rate used is lr x B/256 (moco 30, adco 10, caco 0.025, semi 0.01)"""
    schedule: Optional[Literal["step", "cosine"]] = None
    """per-epoch lr schedule: step (moco, semi) or cosine (adco, caco)"""
    lr_steps: Optional[tuple[int, ...]] = None
    """step schedule: epochs at which lr is multiplied by --lr-gamma (moco: 60 80, semi: 12 16)"""
    lr_gamma: Optional[float] = None
    """step schedule factor γ (moco 0.1, semi 0.2)"""
    final_lr: Optional[float] = None
    """cosine schedule: lr at the end, absolute, not scaled (adco 0.01, caco 0)"""
    lars_trust: Optional[float] = None
    """LARS trust coefficient η_t (LARC scaling mode; caco 0.001); 0 = plain SGD"""
    momentum: float = 0.9
    """SGD momentum (all protocols)"""
    weight_decay: Optional[float] = None
    """SGD weight decay (linear protocols 0, semi 5e-4)"""
    head_lr_mult: Optional[float] = None
    """lr multiplier of fc relative to the backbone (--finetune; semi: 100)"""

    # --- kNN --------------------------------------------------------------------------------------
    knn_k: int = 200
    """k: neighbours in the weighted vote"""
    knn_t: float = 0.1
    """T: temperature of the vote weights exp(sim / T)"""
    knn_train_fraction: float = 1.0
    """fraction of the train split used as kNN memory (every 1/f-th image; 0.2 keeps ImageNet's on one GPU)"""

    # --- systems ----------------------------------------------------------------------------------
    amp: bool = True
    """mixed precision on GPU: bf16 autocast of the backbone (fp16 + GradScaler on GPUs without bf16); ignored on CPU"""
    channels_last: bool = True
    """channels_last memory format on GPU; ignored on CPU"""
    log_every: int = 50
    """log (console + metrics.jsonl) every this many steps, and at the end of every epoch"""
    eval_every: int = 1
    """evaluate on val every this many epochs (and always after the last)"""
    stop_at_epoch: Optional[int] = None
    """checkpoint and exit once this many epochs are done (split a long run into jobs; resume with --resume auto)"""


# Each protocol's values for the Args fields left at None (docs/linear_eval.md compares them with the official code).
RECIPES = {
    # official MoCo main_lincls.py defaults and its step schedule
    "moco": dict(epochs=100, batch_size=256, lr=30.0, schedule="step", lr_steps=(60, 80), lr_gamma=0.1,
                 final_lr=0.0, lars_trust=0.0, weight_decay=0.0, head_lr_mult=1.0),
    # official AdCo lincls.py: cosine from 10 down to final_lr 0.01
    "adco": dict(epochs=100, batch_size=256, lr=10.0, schedule="cosine", lr_steps=(), lr_gamma=0.1,
                 final_lr=0.01, lars_trust=0.0, weight_decay=0.0, head_lr_mult=1.0),
    # official CaCo README: --lr 0.025 --batch-size 4096; linear.py scales lr by B/256 and wraps SGD in LARC 0.001
    "caco": dict(epochs=100, batch_size=4096, lr=0.025, schedule="cosine", lr_steps=(), lr_gamma=0.1,
                 final_lr=0.0, lars_trust=0.001, weight_decay=0.0, head_lr_mult=1.0),
    # OpenSelfSup / mmselfsup v0 semi_classification imagenet_1percent base.py + r50_lr0_01_head100.py
    "semi": dict(epochs=20, batch_size=256, lr=0.01, schedule="step", lr_steps=(12, 16), lr_gamma=0.2,
                 final_lr=0.0, lars_trust=0.0, weight_decay=5e-4, head_lr_mult=100.0),
}

# Arguments that must equal the checkpoint's when resuming (after the recipe is filled in).
MUST_MATCH = ("checkpoint", "random_init", "finetune", "label_fraction", "subset_file", "dataset", "image_size",
              "arch", "small_stem", "epochs", "batch_size", "lr", "schedule", "lr_steps", "lr_gamma", "final_lr",
              "lars_trust", "momentum", "weight_decay", "head_lr_mult", "seed")
# Valid values, checked (after the protocol's defaults are filled in) before anything is written (check_ranges).
RANGES = {"label_fraction": "(0, 1]", "synthetic_images": ">= 1", "image_size": ">= 8", "workers": ">= 0",
          "epochs": ">= 1", "batch_size": ">= 1", "lr": ">= 0", "lr_gamma": "> 0", "final_lr": ">= 0",
          "lars_trust": ">= 0", "momentum": "[0, 1)", "weight_decay": ">= 0", "head_lr_mult": ">= 0", "knn_k": ">= 1",
          "knn_t": "> 0", "knn_train_fraction": "(0, 1]", "log_every": ">= 1", "eval_every": ">= 1",
          "stop_at_epoch": ">= 1"}


def resolve_recipe(args: Args) -> Args:
    """Fills every optimisation field left at None from --protocol (moco, or semi with --finetune)."""
    if args.knn and args.finetune:
        raise UserError("--knn and --finetune are separate evaluations; run them one at a time")
    protocol = args.protocol or ("semi" if args.finetune else "moco")
    filled = {k: v for k, v in RECIPES[protocol].items() if getattr(args, k) is None}
    return replace(args, protocol=protocol, **filled)


# =====================================================================================================
# METHOD: the evaluation math, as pure functions, and the model (imported by tests/)
# =====================================================================================================
def lr_at_epoch(epoch: int, args: Args, lr_peak: float) -> float:
    """The learning rate of a whole epoch (all three protocols set it once per epoch, no warm-up).

    step:   lr_e = lr_peak · γ^(number of milestones <= e)              (MoCo: 30 -> 3 at 60 -> 0.3 at 80)
    cosine: lr_e = lr_end + (lr_peak - lr_end) · ½(1 + cos(π e / E))    (AdCo: lr_end 0.01; CaCo: 0)
    """
    if args.schedule == "step":
        return lr_peak * args.lr_gamma ** sum(epoch >= m for m in args.lr_steps)
    return args.final_lr + (lr_peak - args.final_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / args.epochs))


@torch.no_grad()
def larc_scale_(params, trust: float, weight_decay: float, eps: float = 1e-8) -> None:
    """LARS as CaCo uses it (apex LARC, clip=False = "scaling" mode), applied to .grad before the SGD step:

        g <- (g + wd·w) · trust · ‖w‖ / (‖g‖ + wd·‖w‖ + ε)    for every tensor with ‖w‖ > 0 and ‖g‖ > 0,
        g unchanged (and no weight decay) otherwise.

    The SGD optimizer it feeds must then have weight_decay=0 (the decay is inside the scaled gradient).
    torch.where instead of an `if` on the norms: no device->host sync.
    """
    for p in params:
        if p.grad is None:
            continue
        w_norm, g_norm = p.norm(), p.grad.norm()
        local_lr = trust * w_norm / (g_norm + weight_decay * w_norm + eps)
        scaled = (p.grad + weight_decay * p) * local_lr
        p.grad.copy_(torch.where((w_norm > 0) & (g_norm > 0), scaled, p.grad))


def class_balanced_subset(labels: list, fraction: float, seed: int) -> list:
    """Indices of a seeded class-balanced subset: round(fraction x n_c) images of each class c (halves round up;
    at least one), drawn without replacement, returned sorted. Identical on every rank (own generator, fixed seed)."""
    by_class = {}
    for index, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(index)
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for label in sorted(by_class):
        members = by_class[label]
        take = max(1, math.floor(fraction * len(members) + 0.5))
        chosen += [members[i] for i in torch.randperm(len(members), generator=g)[:take].tolist()]
    return sorted(chosen)


def subset_from_file(path: str, dataset) -> list:
    """Indices of the ImageFolder images whose file names are listed in `path` (one per line; SimCLR's
    1percent.txt / 10percent.txt format). Every listed name must exist in the dataset."""
    if not hasattr(dataset, "samples"):
        raise UserError("--subset-file needs --dataset imagefolder (it lists image file names)")
    if not os.path.isfile(path):
        raise UserError(f"--subset-file {path}: no such file")
    with open(path) as f:
        wanted = {line.strip() for line in f if line.strip()}
    indices = [i for i, (file, _) in enumerate(dataset.samples) if os.path.basename(file) in wanted]
    if len(indices) != len(wanted):
        found = {os.path.basename(dataset.samples[i][0]) for i in indices}
        missing = sorted(wanted - found)
        raise UserError(f"--subset-file {path}: {len(missing)} of {len(wanted)} listed images are not in the "
                        f"train split (first: {missing[:3]})")
    return indices


def dataset_labels(dataset) -> list:
    """Labels of every image: .targets (ImageFolder, CIFAR) or .labels (STL-10), else item by item (synthetic)."""
    for name in ("targets", "labels"):
        if hasattr(dataset, name):
            return [int(y) for y in getattr(dataset, name)]
    return [dataset[i][1] for i in range(len(dataset))]


class Classifier(nn.Module):
    """logits = fc(backbone(x)), fc: Linear(feat_dim, classes) with W ~ N(0, 0.01²), b = 0 (official MoCo's init).

    frozen=True (linear probe): the backbone's parameters never require grad, its forward runs under no_grad,
    and it stays in eval mode whatever model.train() is called with, so BN neither uses batch statistics nor
    updates its running ones. fc always runs in fp32, outside autocast.
    """

    def __init__(self, backbone: nn.Module, feat_dim: int, num_classes: int, frozen: bool):
        super().__init__()
        self.backbone, self.frozen = backbone, frozen
        self.fc = nn.Linear(feat_dim, num_classes)
        nn.init.normal_(self.fc.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.fc.bias)
        if frozen:
            self.backbone.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.backbone.eval()  # BN frozen for the whole run (official MoCo also calls model.eval() in train())
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad() if self.frozen else nullcontext():
            features = self.backbone(x)  # [N, feat_dim]; frozen: no graph kept
        with torch.autocast(x.device.type, enabled=False):
            return self.fc(features.float())  # [N, classes], fp32


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer, scaler, autocast,
               lars_trust: float, weight_decay: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step of cross-entropy on (images, labels). Returns (loss, number correct) as device tensors."""
    with autocast():
        logits = model(images)
    loss = F.cross_entropy(logits.float(), labels)  # mean over this rank; DDP averages gradients over ranks
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if lars_trust > 0:
        scaler.unscale_(optimizer)  # LARS needs the true gradient norm
        larc_scale_([p for g in optimizer.param_groups for p in g["params"]], lars_trust, weight_decay)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), (logits.detach().argmax(dim=1) == labels).sum()


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int, device: torch.device, workers: int = 0,
             autocast=None) -> tuple[float, float]:
    """top-1 and top-5 accuracy (percent) over the WHOLE dataset, every image counted exactly once.

    Rank r evaluates images r, r+R, r+2R, ... (no padding: shards may differ by one image); the counts
    [correct@1, correct@5, images] are summed over ranks with one all_reduce (fp64: exact integers).
    The model is put in eval mode and restored afterwards.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
    shard = Subset(dataset, range(rank, len(dataset), world))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator(),
                        worker_init_fn=ignore_stop_signals)
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast() if autocast is not None else nullcontext():
            logits = model(images)
        top5 = logits.float().topk(min(5, logits.shape[1]), dim=1).indices  # [N, 5], best class first
        counts[0] += (top5[:, 0] == labels).sum()
        counts[1] += (top5 == labels[:, None]).any(dim=1).sum()
        counts[2] += labels.shape[0]
    model.train(was_training)
    if is_distributed():
        dist.all_reduce(counts)
    correct1, correct5, total = counts.tolist()
    return 100.0 * correct1 / total, 100.0 * correct5 / total


# =====================================================================================================
# METHOD: reading pre-trained backbones, the sanity check, export
# =====================================================================================================
def _describe(obj) -> str:
    """What a refused checkpoint holds, for the one-line error."""
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}"
    if "method" not in obj:
        return f"a dict with keys {sorted(map(str, obj))[:6]}"
    if obj["method"] == SCRIPT_NAME:
        return f"a checkpoint of method {SCRIPT_NAME!r}: this script's own output, not a pre-training run"
    encoder_q = obj.get("encoder_q")
    if not isinstance(encoder_q, dict):
        return f"a checkpoint of method {obj['method']!r} without an encoder_q"
    if not any(str(k).startswith("backbone.") for k in encoder_q):
        return f"a checkpoint of method {obj['method']!r} whose encoder_q has no backbone.* tensors"
    if not isinstance(obj.get("args"), dict) or "arch" not in obj["args"]:
        return f"a checkpoint of method {obj['method']!r} without args.arch"
    return f"a checkpoint of method {obj['method']!r} in another format"


def _arch_from_state(state: dict) -> str:
    """torchvision ResNet depth from the state dict: blocks per stage and basic (conv2 last) vs bottleneck (conv3)."""
    blocks = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    bottleneck = "layer1.0.conv3.weight" in state
    table = {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34",
             ((3, 4, 6, 3), True): "resnet50", ((3, 4, 23, 3), True): "resnet101", ((3, 8, 36, 3), True): "resnet152"}
    if (blocks, bottleneck) not in table:
        kind = "bottleneck" if bottleneck else "basic"
        raise UserError(f"a ResNet state dict with {blocks} {kind} blocks per stage is none of {', '.join(ARCHS)}")
    return table[(blocks, bottleneck)]


def read_backbone(path: str) -> tuple[dict, str, bool, str]:
    """Reads the backbone of a pre-trained model -> (state dict in torchvision names without fc, arch, small_stem,
    a description of the source). Accepts:
      * a pre-training checkpoint of this project, whatever its method name (moco_co2.py, adco.py, caco.py or a
        fork): {"method": str, "args": {"arch", "small_stem", ...}, "encoder_q": {"backbone.<torchvision name>",
        "head.*"}}: the QUERY encoder's backbone, as official MoCo's linear eval loads it;
      * a torchvision ResNet state dict ("conv1.weight", "layer1.0...", optional "fc.*", ignored);
      * an official MoCo/AdCo/CaCo file {"state_dict": {"module.encoder_q.<torchvision name>"}} (fc = head, dropped).
    Anything else is refused with a one-line UserError naming what the file holds.
    """
    if not os.path.isfile(path):
        raise UserError(f"--checkpoint {path}: no such file")
    check_crc(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""  # torch's messages span many lines
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {first_line}") from None
    refuse = (f"{path} is neither a pre-training checkpoint (method, args, encoder_q with backbone.* tensors) "
              f"nor a torchvision ResNet state dict (it holds {_describe(ckpt)})")
    if not isinstance(ckpt, dict):
        raise UserError(refuse)
    if "method" in ckpt:  # a pre-training script's checkpoint: the format decides, not the method's name
        encoder_q, args = ckpt.get("encoder_q"), ckpt.get("args")
        state = ({k[len("backbone."):]: v for k, v in encoder_q.items() if str(k).startswith("backbone.")}
                 if isinstance(encoder_q, dict) else {})
        if not (isinstance(ckpt["method"], str) and state and all(torch.is_tensor(v) for v in state.values())
                and isinstance(args, dict) and isinstance(args.get("arch"), str)):
            raise UserError(refuse)
        return state, args["arch"], bool(args.get("small_stem", False)), f"{ckpt['method']}.py checkpoint"
    source = "torchvision state dict"
    if isinstance(ckpt.get("state_dict"), dict):  # official MoCo-style file: strip module. and encoder_q.
        inner = {k[len("module."):] if k.startswith("module.") else k: v for k, v in ckpt["state_dict"].items()}
        ckpt = {k[len("encoder_q."):]: v for k, v in inner.items() if k.startswith("encoder_q.")}
        source = "official encoder_q checkpoint"
    is_resnet = "conv1.weight" in ckpt and "layer1.0.conv1.weight" in ckpt
    if not (is_resnet and all(torch.is_tensor(v) for v in ckpt.values())):
        raise UserError(refuse)
    state = {k: v for k, v in ckpt.items() if not k.startswith("fc.")}  # the classifier / projection head
    return state, _arch_from_state(state), state["conv1.weight"].shape[-1] == 3, source


def load_into_backbone(backbone: nn.Module, state: dict, path: str) -> None:
    """strict load: every backbone tensor must be in `state` and nothing else (= MoCo's "only fc missing" assert)."""
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UserError(f"{path} does not fit the backbone: {' '.join(first[:3])[:400]}") from None


def sanity_check(backbone: nn.Module, reference: dict, where: str) -> None:
    """Every tensor of the backbone's state (weights, BN running mean/var, num_batches_tracked) must equal the
    reference bitwise (as official MoCo's sanity_check). A difference means the 'frozen' backbone moved."""
    state = backbone.state_dict()
    if set(state) != set(reference):
        raise UserError(f"sanity check failed: the backbone's tensors {sorted(set(state) ^ set(reference))[:4]} "
                        f"do not match {where}")
    for name, tensor in state.items():
        if not torch.equal(tensor.detach().cpu(), reference[name].cpu()):
            raise UserError(f"sanity check failed: backbone tensor {name} differs from {where}: the frozen "
                            f"backbone moved (or the file changed); the linear-probe number would be invalid")


# torchvision -> detectron2 ResNet names (detectron2 modeling/backbone/resnet.py; the mapping MoCo's
# detection/convert-pretrain-to-detectron2.py applies). BN "bn<i>" becomes the "norm" of conv<i>; the
# projection shortcut "downsample.0/1" is "shortcut" and its norm; stages layer1..4 are res2..res5.
D2_RULES = [
    (re.compile(r"^conv1\.(\w+)$"), r"stem.conv1.\1"),
    (re.compile(r"^bn1\.(\w+)$"), r"stem.conv1.norm.\1"),
    (re.compile(r"^layer(\d)\.(\d+)\.conv(\d)\.(\w+)$"), lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.{m[4]}"),
    (re.compile(r"^layer(\d)\.(\d+)\.bn(\d)\.(\w+)$"), lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}"),
    (re.compile(r"^layer(\d)\.(\d+)\.downsample\.0\.(\w+)$"), lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.{m[3]}"),
    (re.compile(r"^layer(\d)\.(\d+)\.downsample\.1\.(\w+)$"),
     lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.norm.{m[3]}"),
]


def torchvision_to_detectron2(state: dict) -> dict:
    """{torchvision name: tensor} -> {detectron2 name: numpy array}. num_batches_tracked is dropped (detectron2's
    FrozenBatchNorm2d has weight, bias, running_mean, running_var only)."""
    out = {}
    for name, tensor in state.items():
        if name.endswith("num_batches_tracked"):
            continue
        for pattern, target in D2_RULES:
            if pattern.match(name):
                out[pattern.sub(target, name)] = tensor.detach().cpu().numpy()
                break
        else:
            raise UserError(f"no detectron2 name for backbone tensor {name}")
    return out


def export(args: Args) -> None:
    """--export-torchvision / --export-detectron2: convert --checkpoint's backbone and exit (no training)."""
    console = make_console(0)
    if args.checkpoint is None:
        raise UserError("--export-torchvision / --export-detectron2 need --checkpoint")
    if args.knn or args.finetune or args.random_init:
        raise UserError("--export-* only converts --checkpoint; run --knn / --finetune / --random-init separately")
    if args.export_detectron2 and not args.export_detectron2.endswith(".pkl"):
        raise UserError(f"--export-detectron2 {args.export_detectron2}: detectron2 reads this format only from a "
                        f".pkl file name")
    state, arch, small_stem, source = read_backbone(args.checkpoint)
    if args.arch is not None and args.arch != arch:
        raise UserError(f"--arch {args.arch} but {args.checkpoint} holds a {arch}")
    backbone, _ = build_resnet(arch, small_stem)
    load_into_backbone(backbone, state, args.checkpoint)  # proves the tensors form a complete backbone
    state = {k: v.detach().clone().contiguous() for k, v in backbone.state_dict().items()}
    for path in (args.export_torchvision, args.export_detectron2):
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    if args.export_torchvision:
        save_checkpoint(args.export_torchvision, state)  # atomic; a plain state dict (weights_only loads it)
        console.print(f"wrote {args.export_torchvision}: {arch} backbone from the {source}; load with "
                      f"torchvision.models.{arch}().load_state_dict(sd, strict=False) (missing: fc.weight, fc.bias)",
                      markup=False)
    if args.export_detectron2:
        tmp = args.export_detectron2 + ".tmp"
        with open(tmp, "wb") as f:
            pickle.dump({"model": torchvision_to_detectron2(state), "__author__": f"linear_eval.py ({source})",
                         "matching_heuristics": True}, f)
        os.replace(tmp, args.export_detectron2)
        console.print(f"wrote {args.export_detectron2}: detectron2 names (stem, res2-res5), numpy arrays; use with "
                      f"MODEL.WEIGHTS, INPUT.FORMAT RGB and torchvision's pixel mean/std", markup=False)
    if small_stem:
        console.print("note: this backbone has the small 3x3 stem (conv1 64x3x3x3, no max-pool); a stock "
                      "torchvision / detectron2 ResNet has a 7x7 stem and will not accept conv1", markup=False)


# =====================================================================================================
# main() and its steps
# =====================================================================================================
def build_backbone(args: Args) -> tuple[nn.Module, int, dict, str, Args]:
    """The backbone to evaluate: --checkpoint's query-encoder backbone, or a random init (the baseline).
    Returns (backbone on CPU, feature dim, its initial state, a description, args with arch/stem filled in)."""
    if args.random_init:
        if args.checkpoint is not None:
            raise UserError("--random-init ignores weights: drop --checkpoint (or drop --random-init)")
        if args.arch is None:
            raise UserError("--random-init needs --arch (e.g. --arch resnet50)")
        backbone, feat_dim = build_resnet(args.arch, args.small_stem)
        # the sanity check's reference: the initial weights themselves (a copy, not views of the live tensors)
        reference = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
        return backbone, feat_dim, reference, f"random init ({args.arch})", args
    if args.checkpoint is None:
        raise UserError("--checkpoint PRE/last.pt is required (or --random-init --arch ... for the baseline)")
    reference, arch, small_stem, source = read_backbone(args.checkpoint)
    if args.arch is not None and args.arch != arch:
        raise UserError(f"--arch {args.arch} but {args.checkpoint} holds a {arch}")
    if args.small_stem and not small_stem:
        raise UserError(f"--small-stem but {args.checkpoint} has the standard 7x7 stem")
    backbone, feat_dim = build_resnet(arch, small_stem)
    load_into_backbone(backbone, reference, args.checkpoint)
    return backbone, feat_dim, reference, source, replace(args, arch=arch, small_stem=small_stem)


def run_knn(args: Args, backbone: nn.Module, source: str, batch_per_rank: int, device: torch.device, autocast,
            console: Console, rank: int, world: int) -> dict:
    """kNN top-1/top-5 on val with (a 1/stride share of) the train split as memory, both with the eval transform;
    the result is appended to <out-dir>/metrics.jsonl, so earlier results (e.g. the random-init baseline) stay."""
    memory = make_dataset(args.dataset, args.data, "train", eval_transform(args.image_size),
                          args.synthetic_images, args.image_size, args.seed)
    stride = max(1, round(1 / args.knn_train_fraction))
    memory = Subset(memory, range(0, len(memory), stride))  # every stride-th image (all classes kept)
    val_set = make_dataset(args.dataset, args.data, "val", eval_transform(args.image_size),
                           args.synthetic_images, args.image_size, args.seed)
    check_same_classes(memory, val_set, "kNN")  # a shifted label numbering gives a wrong number, not an error
    print_args(console, args, {"mode": "kNN", "backbone": source, "memory images": len(memory),
                               "val images": len(val_set), "world size": world, "device": device})
    stop = GracefulStop()  # nothing to checkpoint here: a signal stops after the current batch, with one line

    def on_batch(images: int) -> None:
        progress.advance(task, images)
        signum = stop.agreed()
        if signum:
            console.print(f"stopped by {signal.Signals(signum).name} during the kNN feature extraction; nothing was "
                          f"written: run the same command again", markup=False)
            raise SystemExit(128 + signum)

    with make_progress(console) as progress:  # this rank's share of both sets (each padded to a multiple of world)
        task = progress.add_task("kNN features", total=-(-len(memory) // world) - (-len(val_set) // world))
        top1, top5 = knn_accuracy(backbone, memory, val_set, batch_per_rank, device, args.knn_k, args.knn_t,
                                  args.workers, autocast, on_batch)
    record = {"mode": "knn", "knn_top1": top1, "knn_top5": top5, "top1": top1, "top5": top5,
              "k": args.knn_k, "t": args.knn_t, "memory_images": len(memory), "backbone": source}
    if rank == 0:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
    console.print(f"kNN (k={args.knn_k}, T={args.knn_t}, {source}): top-1 {top1:.2f}  top-5 {top5:.2f}",
                  markup=False)
    return {"top1": top1, "top5": top5}


def make_datasets(args: Args) -> tuple:
    """(train set, val set, classes, labelled images). Train: RandomResizedCrop (scale 0.08-1) + flip; val: the
    eval transform (Resize(size·256/224) + CenterCrop). --finetune keeps only the labelled subset of train."""
    train_transform = T.Compose([
        T.RandomResizedCrop(args.image_size),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    train_set = make_dataset(args.dataset, args.data, "train", train_transform, args.synthetic_images,
                             args.image_size, args.seed)
    val_set = make_dataset(args.dataset, args.data, "val", eval_transform(args.image_size), args.synthetic_images,
                           args.image_size, args.seed)
    check_same_classes(train_set, val_set, "linear probe")  # a renamed class keeps the count but shifts labels
    num_classes = len(train_set.classes)
    if not args.finetune:
        return train_set, val_set, num_classes, len(train_set)
    if args.subset_file:  # the listed files, or a seeded class-balanced draw
        indices = subset_from_file(args.subset_file, train_set)
    else:
        indices = class_balanced_subset(dataset_labels(train_set), args.label_fraction, args.seed)
    return Subset(train_set, indices), val_set, num_classes, len(indices)


def main(args: Args) -> dict:
    """Runs the requested evaluation. Returns {"top1", "top5"} and, after training, the "model" (for tests)."""
    if args.export_torchvision or args.export_detectron2:
        export(args)
        return {}
    # ---- 1. setup: processes, recipe, sizes, seeds -----------------------------------------------------
    args = resolve_recipe(args)
    check_ranges(args, RANGES)
    rank, world, device = setup_distributed()
    console = make_console(rank)
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} is the global batch and must divide by the "
                        f"{world} processes")
    batch_per_rank = args.batch_size // world
    lr_peak = args.lr * args.batch_size / 256  # linear scaling rule: --lr is per 256 images
    torch.manual_seed(args.seed)  # identical fc init (and random-init backbone) on every rank
    random.seed(args.seed + rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # ---- 2. backbone: pre-trained (query encoder of --checkpoint) or random ------------------------------
    backbone, feat_dim, reference, source, args = build_backbone(args)
    backbone.to(device)
    if device.type == "cuda" and args.channels_last:
        backbone.to(memory_format=torch.channels_last)
    autocast, scaler, amp_dtype = setup_amp(device, args.amp)

    # ---- 3. kNN evaluation: no training, done here ---------------------------------------------------------
    if args.knn:
        return run_knn(args, backbone, source, batch_per_rank, device, autocast, console, rank, world)

    # ---- 4. data (before the run folder: a data error leaves no empty folder behind) -------------------------
    train_set, val_set, num_classes, labelled = make_datasets(args)
    loader = make_loader(train_set, batch_per_rank, rank, world, args.workers, args.seed)
    steps_per_epoch = len(loader.sampler) // batch_per_rank

    # ---- 5. run folder (locked for this job), resume -----------------------------------------------------
    resume_path = resolve_resume(args.resume, args.out_dir)
    ckpt = load_checkpoint(resume_path, args, MUST_MATCH) if resume_path else None
    if ckpt is not None and ckpt["next_epoch"] >= args.epochs:
        console.print(f"{resume_path} already finished its {ckpt['next_epoch']} epochs; nothing to do", markup=False)
        return {}
    lock_run_folder(args.out_dir, rank)
    stop = GracefulStop()  # SIGTERM / SIGINT / SIGUSR1: checkpoint after the current step, then exit

    # ---- 6. model, optimizer -----------------------------------------------------------------------------
    model = Classifier(backbone, feat_dim, num_classes, frozen=not args.finetune).to(device)
    if args.finetune and device.type == "cuda" and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # the benchmark fine-tunes with SyncBN
    if args.finetune:  # backbone at lr, the new head at lr x head_lr_mult (benchmark: x100)
        groups = [{"params": list(model.backbone.parameters()), "lr_mult": 1.0},
                  {"params": list(model.fc.parameters()), "lr_mult": args.head_lr_mult}]
    else:  # exactly fc.weight and fc.bias (official MoCo asserts the same)
        groups = [{"params": list(model.fc.parameters()), "lr_mult": 1.0}]
    # with LARS the weight decay is applied inside larc_scale_ (LARC zeroes the optimizer's own decay)
    optimizer = torch.optim.SGD(groups, lr=lr_peak, momentum=args.momentum,
                                weight_decay=0.0 if args.lars_trust > 0 else args.weight_decay)
    torch.manual_seed(args.seed + rank)  # from here on: per-rank randomness (augmentations)

    # ---- 7. restore ----------------------------------------------------------------------------------------
    start_epoch, start_batch, step, best_top1 = 0, 0, 0, 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, start_batch, step, best_top1 = (ckpt[k] for k in ("next_epoch", "next_batch", "step", "best_top1"))
        if len(ckpt["rng"]) == world:
            set_rng_state(ckpt["rng"][rank], device)
        else:
            console.print(f"resuming on {world} processes from a run on {len(ckpt['rng'])}: RNG streams restart")
    # DDP: the frozen backbone's buffers never change, so they are not re-broadcast every forward
    ddp_model = DDP(model, device_ids=[device] if device.type == "cuda" else None,
                    broadcast_buffers=args.finetune) if world > 1 else model
    metrics = MetricsLog(os.path.join(args.out_dir, "metrics.jsonl"), rank, step if ckpt else None)
    if rank == 0:
        with open(os.path.join(args.out_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=2)
    print_args(console, args, {
        "mode": "fine-tune (whole network)" if args.finetune else "linear probe (frozen backbone)",
        "backbone": source, "classes": num_classes, "labelled train images": labelled, "world size": world,
        "device": device, "per-process batch": batch_per_rank, "lr used (lr x B/256)": lr_peak,
        "amp dtype": amp_dtype or "fp32", "steps per epoch": steps_per_epoch,
        "resumed from": f"{resume_path} (epoch {start_epoch}, batch {start_batch})" if ckpt else "-",
    })

    def checkpoint_state(next_epoch: int, next_batch: int) -> dict:  # every rank calls it: RNG is a collective
        return {"method": SCRIPT_NAME, "args": asdict(args), "next_epoch": next_epoch, "next_batch": next_batch,
                "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "best_top1": best_top1, "rng": all_rng_states(device)}

    last_pt = os.path.join(args.out_dir, "last.pt")

    def save(state: dict) -> None:
        if rank == 0:
            save_checkpoint(last_pt, state)

    # ---- 8. train loop ------------------------------------------------------------------------------------
    ddp_model.train()  # a frozen backbone stays in eval mode (Classifier.train)
    sums = torch.zeros(4, device=device)  # running on-device sums: loss, correct, images, steps (no host sync)
    window_start = time.perf_counter()
    top1 = top5 = float("nan")
    with make_progress(console) as progress:
        task = progress.add_task("train", total=(args.epochs - start_epoch) * steps_per_epoch - start_batch)
        for epoch in range(start_epoch, args.epochs):
            first_batch = start_batch if epoch == start_epoch else 0
            loader.sampler.set_epoch(epoch, first_batch)
            lr = lr_at_epoch(epoch, args, lr_peak)  # once per epoch, no warm-up (all three protocols)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_mult"]
            for batch_idx, (images, labels) in enumerate(loader, start=first_batch):
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                if device.type == "cuda" and args.channels_last:
                    images = images.to(memory_format=torch.channels_last)
                loss, correct = train_step(ddp_model, images, labels, optimizer, scaler, autocast, args.lars_trust,
                                           args.weight_decay)
                step += 1
                progress.advance(task)
                sums += torch.stack([loss, correct.float(), torch.tensor(float(labels.shape[0]), device=device),
                                     torch.ones((), device=device)])

                # logging and the non-finite guard: the only host syncs
                done = batch_idx + 1
                end_of_epoch = done == steps_per_epoch
                signum = stop.agreed()  # the same answer on every rank
                if done % args.log_every == 0 or end_of_epoch or signum:
                    totals = all_reduce_mean(sums.clone()).tolist()
                    elapsed = time.perf_counter() - window_start
                    record = {"epoch": epoch, "step": step, "lr": lr, "loss": totals[0] / totals[3],
                              "train_top1": 100 * totals[1] / totals[2],
                              "img_per_s": totals[2] * world / elapsed}
                    if not all(math.isfinite(v) for v in totals):
                        raise UserError(f"non-finite loss at epoch {epoch}, step {step} ({record}); lower --lr; " +
                                        (f"{last_pt} is the last good checkpoint" if os.path.exists(last_pt) else
                                         "no checkpoint was written before"))
                    if not end_of_epoch:  # the end-of-epoch record also carries the val accuracy
                        metrics.write(record)
                    console.print(f"epoch {epoch} [{done}/{steps_per_epoch}] step {step}  loss {record['loss']:.4f}  "
                                  f"train top-1 {record['train_top1']:.1f}  lr {lr:.5g}  {record['img_per_s']:.0f} "
                                  f"img/s", markup=False, highlight=False)
                    sums.zero_()
                    window_start = time.perf_counter()
                if signum and not end_of_epoch:  # mid-epoch: save this position and leave
                    save(checkpoint_state(epoch, done))
                    console.print(f"stopped by {signal.Signals(signum).name} at step {step}; {last_pt} holds it; "
                                  f"continue with --resume auto", markup=False)
                    raise SystemExit(128 + signum)

            # ---- 9. end of epoch: sanity check, val accuracy, checkpoint ---------------------------------------
            last = epoch == args.epochs - 1
            if not args.finetune and (epoch == start_epoch or last):
                # a linear-probe number is valid only if the backbone never moved: compare it bitwise with the
                # file, re-read from disk so that the reference cannot share memory with the running model
                where = "the initial random weights" if args.random_init else args.checkpoint
                sanity_check(model.backbone, reference if args.random_init else read_backbone(args.checkpoint)[0],
                             where)
                console.print(f"sanity check passed: the backbone equals {where} bitwise", markup=False)
            if last or (epoch + 1) % args.eval_every == 0:
                top1, top5 = evaluate(model, val_set, batch_per_rank, device, args.workers, autocast)
                best_top1 = max(best_top1, top1)
                record.update(top1=top1, top5=top5)
                console.print(f"epoch {epoch}  val top-1 {top1:.2f}  top-5 {top5:.2f}  (best top-1 {best_top1:.2f})",
                              markup=False)
            metrics.write(record)
            save(checkpoint_state(epoch + 1, 0))
            if signum and not last:
                console.print(f"stopped by {signal.Signals(signum).name} after epoch {epoch}; continue with "
                              f"--resume auto", markup=False)
                raise SystemExit(128 + signum)
            if args.stop_at_epoch is not None and epoch + 1 >= args.stop_at_epoch and not last:
                console.print(f"stopped after epoch {epoch} (--stop-at-epoch); continue with --resume auto")
                return {"top1": top1, "top5": top5, "best_top1": best_top1, "model": model}

    # ---- 10. teardown (the process group is destroyed by cli()) -------------------------------------------
    table = Table(title="linear_eval result", show_header=True, header_style="bold")
    for column in ("mode", "backbone", "epochs", "val top-1", "val top-5", "best top-1"):
        table.add_column(column)
    table.add_row(Text("fine-tune" if args.finetune else f"linear ({args.protocol})"), Text(source),
                  Text(str(args.epochs)), Text(f"{top1:.2f}"), Text(f"{top5:.2f}"), Text(f"{best_top1:.2f}"))
    console.print(table)
    return {"top1": top1, "top5": top5, "best_top1": best_top1, "model": model}


# ==== APPENDIX: fenced plumbing, byte-identical in every script (fix one: tests/test_shared_blocks.py --sync FILE.py)
# this script's blocks: distributed amp checkpoint console entry
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
