"""The two-rank checks of the suite, in one launch: run by the `two_ranks` fixture of tests/conftest.py as TWO
torchrun nodes of one process each (--nnodes 2 --node_rank 0/1, gloo, CPU), so LOCAL_RANK is 0 on both ranks.

One process group serves every job (a Python start costs seconds): the first main() sets it up through the
script's own setup_distributed, the later ones reuse it. Each job writes this rank's results under <out>/<job>/
for its test to compare across ranks:
- adco (tests/test_adco.py): adco.main single crop with bank initialisation, then --sym --no-bank-init; the last
  step's labels, own keys and gathered keys, recorded by wrapping adco's own functions (main() keeps no test-only
  state), bank and velocity. LOCAL_RANK = 0 on both nodes is exactly where upstream AdCo's label (local GPU
  index * N + i) goes wrong.
- moco (tests/test_moco_co2.py): moco_co2.main, then the collectives against rank-tagged data and a kNN extraction.
- caco (tests/test_caco.py): caco.main single crop, then --multi-crop; bank, velocity, query encoder.
- augment (tests/test_augment.py): each method's main() for 1 step with --augment-on device; the first draw.
- extract (tests/test_common.py): kNN extraction when ONE rank's local pass fails (an ordinary exception, a
  UserError, one raised in a DataLoader worker), then a healthy pass: the failures left no collective unpaired.
- linear_eval (tests/test_linear_eval.py): a frozen probe of the moco job's checkpoint on 60 synthetic images.
- refusal (tests/test_moco_co2.py): moco_co2.py's command line with a global batch of 15, which 2 processes
  cannot split: its entry point's exit code and error line on each rank.
"""
import contextlib
import io
import os
import sys

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import adco  # noqa: E402
import caco  # noqa: E402
import common  # noqa: E402
import linear_eval  # noqa: E402
import moco_co2  # noqa: E402
from common import SyntheticImages, UserError, eval_transform, extract_features  # noqa: E402

TINY = dict(dataset="synthetic", synthetic_images=64, arch="resnet18", image_size=32, batch_size=16, workers=0,
            seed=0, epochs=1, log_every=1)


def save(results: dict, prefix: str) -> None:
    """This rank's results in <prefix><rank>.pt (RANK from torchrun: it holds after the group is gone too)."""
    torch.save(results, f"{prefix}{os.environ['RANK']}.pt")


def reuse_the_group(module) -> None:
    """main() calls setup_distributed(); a process group can be set up only once per process."""
    module.setup_distributed = lambda: (dist.get_rank(), dist.get_world_size(), torch.device("cpu"))


def wrapped(module, name: str, record) -> None:
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        record(args, result)
        return result
    setattr(module, name, wrapper)


def job_adco(out: str) -> None:
    last_step, originals = {}, (adco.batch_unshuffle, adco.adco_loss_and_bank_grad)
    # the loss term of crop_plan's first entry: single (0, 1); --sym (0, 1) first, so its key crop 1 is the last
    # embedded key crop (key crops are embedded in sorted order)
    wrapped(adco, "batch_unshuffle", lambda args, result: last_step.update(keys=result))
    wrapped(adco, "adco_loss_and_bank_grad", lambda args, result: last_step.update(labels=args[2],
                                                                                    keys_all=args[0][0][1]))
    for variant, extra in (("single", {}), ("sym_noinit", {"sym": True, "bank_init": False})):
        state = adco.main(adco.Args(**TINY, bank_size=64, out_dir=os.path.join(out, variant), **extra))
        save({"bank": state["bank"], "bank_velocity": state["bank_velocity"], **last_step,
              "local_rank": int(os.environ["LOCAL_RANK"]), "world": dist.get_world_size()},
             os.path.join(out, f"{variant}_rank"))
        reuse_the_group(adco)
    adco.batch_unshuffle, adco.adco_loss_and_bank_grad = originals


def job_moco(out: str) -> None:
    reuse_the_group(moco_co2)
    state = moco_co2.main(moco_co2.Args(**TINY, queue_size=64, out_dir=out))
    rank = dist.get_rank()
    # keys are gathered in rank order: rank r contributes rows tagged r
    gathered = moco_co2.concat_all_gather(torch.full((3, 2), float(rank)))
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
    feats, labels = extract_features(linear_backbone(), SyntheticImages(7, 16, transform=eval_transform(16)),
                                     batch_size=2, device=torch.device("cpu"))
    save({"queue": state["queue"], "queue_ptr": state["queue_ptr"], "gathered": gathered, "x": x,
          "shuffled": shuffled, "restored": restored, "feats": feats, "labels": labels, "images_ok": images_ok,
          "encoder_q": state["encoder_q"].state_dict()}, os.path.join(out, "rank"))


def job_caco(out: str) -> None:
    reuse_the_group(caco)
    for variant, multi_crop in (("single", False), ("multi", True)):
        state = caco.main(caco.Args(**TINY, bank_size=64, mlp_dim=512, knn_every=0, multi_crop=multi_crop,
                                    out_dir=os.path.join(out, variant)))
        save({"bank": state["bank"], "bank_velocity": state["bank_velocity"],
              "encoder_q": state["encoder_q"].state_dict()}, os.path.join(out, f"{variant}_rank"))


def job_augment(out: str) -> None:
    draw_params, draws, first = common.draw_params, [], {}

    def recording(view, heights, widths):
        draws.append(draw_params(view, heights, widths))
        return draws[-1]

    common.draw_params = recording  # DeviceAugment looks it up in common at each call
    for module, size in ((moco_co2, {"queue_size": 32}), (adco, {"bank_size": 32}), (caco, {"bank_size": 32})):
        reuse_the_group(module)
        draws.clear()
        module.main(module.Args(**{**TINY, "synthetic_images": 32}, stop_at_step=1, augment_on="device",
                                out_dir=os.path.join(out, module.__name__), **size))
        first[module.__name__] = draws[0]
    common.draw_params = draw_params
    save(first, os.path.join(out, "rank"))


class FailsOnRank1(Dataset):
    """The healthy images, except that rank 1 cannot read image 3 (rank 1 embeds images 1, 3, 5)."""

    def __init__(self, data, error):
        self.data, self.error = data, error

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        if dist.get_rank() == 1 and index == 3:
            raise self.error
        return self.data[index]


def linear_backbone():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))


def job_extract(out: str) -> None:
    data, net, outcomes = SyntheticImages(7, 16, transform=eval_transform(16)), linear_backbone(), []
    cases = [(OSError("image 3 is unreadable"), 0), (UserError("cannot read image img3.jpg: broken"), 0),
             (UserError("cannot read image img3.jpg: broken"), 1)]  # 1: raised in a DataLoader worker process
    for error, workers in cases:
        try:
            extract_features(net, FailsOnRank1(data, error), batch_size=2, device=torch.device("cpu"),
                             workers=workers)
            outcomes.append(None)
        except Exception as e:  # noqa: BLE001
            outcomes.append((type(e).__name__, str(e)))
    feats, labels = extract_features(net, data, batch_size=2, device=torch.device("cpu"))
    save({"outcomes": outcomes, "feats": feats, "labels": labels}, os.path.join(out, "rank"))


def job_linear_eval(out: str) -> None:
    reuse_the_group(linear_eval)
    linear_eval.main(linear_eval.Args(**{**TINY, "synthetic_images": 60}, out_dir=out,
                                      checkpoint=os.path.join(os.path.dirname(out), "moco", "last.pt")))


def job_refusal(out: str) -> None:
    """Last: cli() ends the process group, as it ends every run."""
    reuse_the_group(moco_co2)
    sys.argv = ["moco_co2.py", "--dataset", "synthetic", "--synthetic-images", "64", "--arch", "resnet18",
                "--image-size", "32", "--batch-size", "15", "--queue-size", "60", "--workers", "0",
                "--out-dir", os.path.join(out, "run")]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            moco_co2.cli(moco_co2.main, moco_co2.Args)
            code = 0
        except SystemExit as e:
            code = e.code
    save({"code": code, "stderr": err.getvalue(), "wrote": os.path.exists(os.path.join(out, "run"))},
         os.path.join(out, "rank"))


if __name__ == "__main__":
    root = sys.argv[1]
    # adco first: its main() sets the process group up; refusal last: cli() ends it
    for name in ("adco", "moco", "caco", "augment", "extract", "linear_eval", "refusal"):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        globals()[f"job_{name}"](os.path.join(root, name))
