"""Run by tests/test_caco.py under `torchrun --standalone --nproc_per_node=2` (gloo, CPU).

Trains caco.main twice on the tiny setting, single-crop then --multi-crop (one process group for both:
the second main() reuses the group the first one set up),
and writes each rank's final bank, bank velocity and query encoder to <out>/<variant>_rank<R>.pt, so the
test can check that the two ranks, which saw different images, hold the identical bank.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import caco  # noqa: E402

out = sys.argv[1]
setup_once = caco.setup_distributed


def reuse_group():
    """caco.main calls setup_distributed(); a process group can be set up only once per process."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), torch.device("cpu")
    return setup_once()


caco.setup_distributed = reuse_group
for variant, multi_crop in (("single", False), ("multi", True)):
    args = caco.Args(dataset="synthetic", synthetic_images=64, arch="resnet18", image_size=32, batch_size=16,
                     workers=0, seed=0, epochs=1, bank_size=64, mlp_dim=512, knn_every=0, log_every=1,
                     multi_crop=multi_crop, out_dir=os.path.join(out, variant))
    state = caco.main(args)
    rank = dist.get_rank()
    torch.save({"bank": state["bank"], "bank_velocity": state["bank_velocity"],
                "encoder_q": state["encoder_q"].state_dict()}, os.path.join(out, f"{variant}_rank{rank}.pt"))
dist.destroy_process_group()
