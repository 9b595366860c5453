"""Run by tests/test_moco_co2.py under `torchrun --standalone --nproc_per_node=2` (gloo, CPU).

Trains moco_co2.main on the tiny setting, then (process group still up) checks the collectives against
rank-tagged data, and writes this rank's results to <out>/rank<R>.pt for the test to compare across ranks.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import moco_co2  # noqa: E402
from common import SyntheticImages, eval_transform, extract_features  # noqa: E402

out = sys.argv[1]
args = moco_co2.Args(dataset="synthetic", synthetic_images=64, arch="resnet18", image_size=32, batch_size=16,
                     workers=0, seed=0, epochs=1, queue_size=64, out_dir=out, log_every=1)
state = moco_co2.main(args)
rank, world = dist.get_rank(), dist.get_world_size()

# keys are gathered in rank order: rank r contributes rows tagged r
tagged = torch.full((3, 2), float(rank))
gathered = moco_co2.concat_all_gather(tagged)

# ShuffleBN: x tagged with global sample ids; unshuffle(shuffle(x)) must return this rank's own rows
x = torch.arange(rank * 8, rank * 8 + 8, dtype=torch.float32).view(8, 1)
shuffled, idx_unshuffle = moco_co2.batch_shuffle(x)
restored = moco_co2.batch_unshuffle(shuffled, idx_unshuffle)

# channels_last image batches (the GPU layout) survive the gather: same values, caller's layout kept
images = (torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4) + 1000 * rank)
images = images.contiguous(memory_format=torch.channels_last)
images_shuffled, images_idx = moco_co2.batch_shuffle(images)
images_ok = (images_shuffled.is_contiguous(memory_format=torch.channels_last)
             and torch.equal(moco_co2.batch_unshuffle(images_shuffled, images_idx), images))

# kNN feature extraction: 7 images over 2 ranks -> every image exactly once, in dataset order
data = SyntheticImages(7, 16, transform=eval_transform(16))
backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))
torch.manual_seed(0)
backbone[1].reset_parameters()
feats, labels = extract_features(backbone, data, batch_size=2, device=torch.device("cpu"))
torch.save({"queue": state["queue"], "queue_ptr": state["queue_ptr"], "gathered": gathered, "x": x,
            "shuffled": shuffled, "restored": restored, "feats": feats, "labels": labels, "images_ok": images_ok,
            "encoder_q": state["encoder_q"].state_dict()}, os.path.join(out, f"rank{rank}.pt"))
dist.destroy_process_group()
