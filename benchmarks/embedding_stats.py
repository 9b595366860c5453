"""Where the embeddings of a moco_co2.py / adco.py checkpoint sit: a diagnostic for collapse and a dead bank.

A diagnostic, not a benchmark: it loads last.pt, embeds ONE training batch of the run's own size exactly as a
training step does (query encoder on view 1, momentum encoder with ShuffleBN on view 2, train-mode BN, the
run's augmentation) and prints the geometry that decides whether the negatives still matter:

    q.q        mean cosine between different queries (-> 1: every image maps to the same point)
    q.k        own key vs the other keys of the batch (no gap: the queries cannot find their key)
    q.n        queries vs the bank / queue columns (mean, and each query's nearest column)
    n.n        mean cosine between bank / queue columns (-> 1: the negatives are one point)
    shares     the softmax mass on the batch keys, the own key and the bank / queue at τ (and τ_m for AdCo)

docs/adco.md ("AdCo: a dead bank") quotes its output. The share of the batch keys is what AdCo's loss sees (the other
keys are negatives there); for MoCo it is reported for comparison only (MoCo's loss has one key per query).

    python benchmarks/embedding_stats.py --checkpoint runs/abl-r0/last.pt
    python benchmarks/embedding_stats.py --checkpoint runs/cifar10-moco/last.pt --json
"""
import importlib
import json
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import tyro

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common import make_dataset, make_loader, pil_views  # noqa: E402


@dataclass
class Args:
    checkpoint: str
    """last.pt of a moco_co2.py or adco.py run"""
    data: str = ""
    """ImageFolder root with train/ (default: the run's own --data)"""
    seed: int = 0
    """which random batch and augmentation"""
    json: bool = False
    """print one JSON object instead of the table"""


def geometry(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperatures: dict) -> dict:
    """q, k: [N, C] unit rows, k[i] the key of q[i]; negatives: [C, K] unit columns. Pure function (tested)."""
    n = q.shape[0]
    other = ~torch.eye(n, dtype=torch.bool, device=q.device)
    qq, qk, qn = q @ q.T, q @ k.T, q @ negatives
    nn_ = negatives.T @ negatives
    out = {"q.q_mean": qq[other].mean().item(), "q.k_own": qk.diag().mean().item(),
           "q.k_other": qk[other].mean().item(), "q.n_mean": qn.mean().item(),
           "q.n_nearest": qn.max(dim=1).values.mean().item(),
           "n.n_mean": nn_[~torch.eye(nn_.shape[0], dtype=torch.bool, device=q.device)].mean().item()}
    for name, t in temperatures.items():
        p = torch.softmax(torch.cat([qk, qn], dim=1) / t, dim=1)  # [N, N+K]: batch keys | negatives
        out[f"share_batch@{name}"] = p[:, :n].sum(dim=1).mean().item()
        out[f"share_own@{name}"] = p.diagonal().mean().item()
        out[f"share_negatives@{name}"] = p[:, n:].sum(dim=1).mean().item()
    return out


def main(args: Args) -> dict:
    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    method = ckpt.get("method") if isinstance(ckpt, dict) else None
    if method not in ("adco", "moco_co2"):
        raise SystemExit(f"error: {args.checkpoint} is not a moco_co2.py or adco.py checkpoint (method {method!r})")
    run = ckpt["args"]
    m = importlib.import_module(method)
    torch.manual_seed(args.seed)

    def encoder():
        e = m.Encoder(run["arch"], run["small_stem"], run["mlp_dim"], run["dim"])
        if run.get("bn_splits", 1) > 1:
            m.use_split_bn(e.backbone, run["bn_splits"])
        return e.train()  # train-mode BN: the step's view of the batch

    encoder_q, encoder_k = encoder(), encoder()
    encoder_q.load_state_dict(ckpt["encoder_q"])
    encoder_k.load_state_dict(ckpt["encoder_k"])
    transform = pil_views(m.augmentations(run["image_size"], blur=run.get("blur", True)))
    dataset = make_dataset(run["dataset"], args.data or run["data"], "train", transform,
                           run["synthetic_images"], run["image_size"])
    loader = make_loader(dataset, run["batch_size"], 0, 1, workers=0, seed=args.seed, pin_memory=False)
    loader.sampler.set_epoch(0)
    views, _ = next(iter(loader))
    with torch.no_grad():
        q = F.normalize(encoder_q(views[0]), dim=1)
        x, unshuffle = m.batch_shuffle(views[1])
        k = m.batch_unshuffle(F.normalize(encoder_k(x), dim=1), unshuffle)
    if method == "adco":
        negatives = F.normalize(ckpt["bank"].float(), dim=0)  # [C, K]: n_k (W is stored un-normalised)
        temperatures = {"tau": run["moco_t"], "tau_m": run["mem_t"]}
    else:
        negatives, temperatures = ckpt["queue"].float(), {"tau": run["moco_t"]}  # [C, K], unit columns
    out = {"checkpoint": args.checkpoint, "method": method, "step": ckpt["step"], "batch": q.shape[0],
           **geometry(q, k, negatives, temperatures)}
    if args.json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key:24s} {value:.4g}" if isinstance(value, float) else f"{key:24s} {value}")
    return out


if __name__ == "__main__":
    main(tyro.cli(Args))
