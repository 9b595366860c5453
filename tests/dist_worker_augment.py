"""Run by tests/test_augment.py under `torchrun --standalone --nproc_per_node=2` (gloo, CPU).

Trains each method's main() for 1 step with --augment-on device (one process group for all three: each main()
reuses the group the first one set up) and records this rank's first augmentation draw of each method (what
common.draw_params returned for the first view of the first batch) in <out>/rank<R>.pt, so the test can
check that the two ranks augment with their own random numbers.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import adco  # noqa: E402
import caco  # noqa: E402
import common  # noqa: E402
import moco_co2  # noqa: E402

out = sys.argv[1]
draw_params, draws = common.draw_params, []


def recording(view, heights, widths):
    draws.append(draw_params(view, heights, widths))
    return draws[-1]


common.draw_params = recording  # DeviceAugment looks it up in common at each call
first = {}
for module, size in ((moco_co2, {"queue_size": 32}), (adco, {"bank_size": 32}), (caco, {"bank_size": 32})):
    setup_once = module.setup_distributed

    def reuse_group(setup_once=setup_once):
        """main() calls setup_distributed(); a process group can be set up only once per process."""
        if dist.is_initialized():
            return dist.get_rank(), dist.get_world_size(), torch.device("cpu")
        return setup_once()

    module.setup_distributed = reuse_group
    name = module.__name__
    draws.clear()
    module.main(module.Args(dataset="synthetic", synthetic_images=32, arch="resnet18", image_size=32, batch_size=16,
                            workers=0, seed=0, epochs=1, stop_at_step=1, augment_on="device", log_every=1,
                            out_dir=os.path.join(out, name), **size))
    first[name] = draws[0]
torch.save(first, os.path.join(out, f"rank{dist.get_rank()}.pt"))
dist.destroy_process_group()
