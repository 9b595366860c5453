"""Run by tests/test_adco.py as TWO torchrun nodes of one process each (--nnodes 2 --node_rank 0/1, gloo, CPU).

On both nodes LOCAL_RANK is 0, which is exactly where upstream AdCo's label (local GPU index * N + i) goes
wrong. Trains adco.main twice in one process group: single crop with bank initialisation, then --sym with
--no-bank-init (the seeded random bank). Writes each rank's final bank, bank velocity, the last step's labels,
own keys and gathered keys to <out>/<variant>_rank<R>.pt for the test to compare across ranks. The last step's
tensors are recorded by wrapping adco's own functions (main() keeps no test-only state): the own keys are
what batch_unshuffle returns, the labels and gathered keys what adco_loss_and_bank_grad receives.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import adco  # noqa: E402

out = sys.argv[1]
last_step = {}


def recording(name, record):
    original = getattr(adco, name)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        record(args, result)
        return result
    setattr(adco, name, wrapper)


# the loss term of crop_plan's first entry: single (0, 1); --sym (0, 1) first, so its key crop 1 is the last
# embedded key crop (key crops are embedded in sorted order)
recording("batch_unshuffle", lambda args, result: last_step.update(keys=result))
recording("adco_loss_and_bank_grad", lambda args, result: last_step.update(labels=args[2], keys_all=args[0][0][1]))
for variant, extra in (("single", {}), ("sym_noinit", {"sym": True, "bank_init": False})):
    args = adco.Args(dataset="synthetic", synthetic_images=64, arch="resnet18", image_size=32, batch_size=16,
                     workers=0, seed=0, epochs=1, bank_size=64, log_every=1, out_dir=os.path.join(out, variant),
                     **extra)
    state = adco.main(args)
    rank = dist.get_rank()
    torch.save({"bank": state["bank"], "bank_velocity": state["bank_velocity"], **last_step,
                "local_rank": int(os.environ["LOCAL_RANK"]), "world": dist.get_world_size()},
               os.path.join(out, f"{variant}_rank{rank}.pt"))
    # the second main() keeps this process group (setup_distributed would refuse to initialise it twice)
    adco.setup_distributed = lambda: (dist.get_rank(), dist.get_world_size(), torch.device("cpu"))
dist.destroy_process_group()
