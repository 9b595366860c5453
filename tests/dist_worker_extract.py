"""Run by tests/test_common.py under `torchrun --standalone --nproc_per_node=2` (gloo, CPU).

kNN feature extraction when ONE rank's local pass fails: an ordinary exception on rank 1, a UserError (a
corrupt file) on rank 1, the same raised inside a DataLoader worker; then a healthy pass in the same process
group, which shows that the failures left no collective unpaired. Writes each rank's outcome to <out>/rank<R>.pt.
"""
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from common import SyntheticImages, UserError, eval_transform, extract_features  # noqa: E402

# a collective that never completes must end this process (and the test) instead of hanging it
dist.init_process_group("gloo", timeout=timedelta(seconds=30))
rank = dist.get_rank()


class FailsOnRank1(Dataset):
    """The healthy images, except that rank 1 cannot read image 3 (rank 1 embeds images 1, 3, 5)."""

    def __init__(self, data, error):
        self.data, self.error = data, error

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        if rank == 1 and index == 3:
            raise self.error
        return self.data[index]


def backbone():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))


data = SyntheticImages(7, 16, transform=eval_transform(16))
net = backbone()
outcomes = []
cases = [(OSError("image 3 is unreadable"), 0), (UserError("cannot read image img3.jpg: broken"), 0),
         (UserError("cannot read image img3.jpg: broken"), 1)]  # 1: raised in a DataLoader worker process
for error, workers in cases:
    try:
        extract_features(net, FailsOnRank1(data, error), batch_size=2, device=torch.device("cpu"), workers=workers)
        outcomes.append(None)
    except Exception as e:  # noqa: BLE001
        outcomes.append((type(e).__name__, str(e)))
feats, labels = extract_features(net, data, batch_size=2, device=torch.device("cpu"))
torch.save({"outcomes": outcomes, "feats": feats, "labels": labels}, os.path.join(sys.argv[1], f"rank{rank}.pt"))
dist.destroy_process_group()
