"""common.py: ResNet factory, datasets and their errors, the resumable sampler, the kNN vote."""
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from common import (ResumableSampler, SyntheticImages, UserError, build_resnet, check_same_classes, eval_transform,
                    extract_features, knn_predict, make_dataset)
from conftest import load


@pytest.mark.parametrize("arch,feat", [("resnet18", 512), ("resnet50", 2048)])
def test_build_resnet_loads_into_torchvision(arch, feat):
    backbone, dim = build_resnet(arch)
    assert dim == feat
    reference = getattr(torchvision.models, arch)()
    missing, unexpected = reference.load_state_dict(backbone.state_dict(), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    backbone.eval(), reference.eval()
    x = torch.randn(2, 3, 64, 64)
    reference.fc = torch.nn.Identity()
    assert torch.equal(backbone(x), reference(x))


def test_small_stem_keeps_resolution():
    backbone, _ = build_resnet("resnet18", small_stem=True)
    assert backbone.conv1.kernel_size == (3, 3) and backbone.conv1.stride == (1, 1)
    assert isinstance(backbone.maxpool, torch.nn.Identity)
    # 32 px: stride 1 stem + 3 stride-2 stages -> 4x4 before pooling (standard stem would give 1x1)
    feats = {}
    backbone.layer4.register_forward_hook(lambda m, i, o: feats.update(l4=o.shape))
    backbone(torch.randn(2, 3, 32, 32))
    assert feats["l4"][-2:] == (4, 4)


def test_synthetic_is_deterministic_and_labelled():
    a = SyntheticImages(20, 16, seed=3)
    b = SyntheticImages(20, 16, seed=3)
    img, label = a[7]
    assert isinstance(img, Image.Image) and img.size == (16, 16) and label == 7 % 10
    assert img.tobytes() == b[7][0].tobytes()
    assert img.tobytes() != SyntheticImages(20, 16, seed=4)[7][0].tobytes()


def test_imagefolder_errors_name_the_path(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        make_dataset("imagefolder", str(tmp_path / "nope"), "train", None)
    with pytest.raises(UserError, match="no train/"):
        make_dataset("imagefolder", str(tmp_path), "train", None)
    (tmp_path / "train").mkdir()
    with pytest.raises(UserError, match="class folder"):
        make_dataset("imagefolder", str(tmp_path), "train", None)
    (tmp_path / "train" / "cat").mkdir()
    with pytest.raises(UserError, match="cat"):
        make_dataset("imagefolder", str(tmp_path), "train", None)
    with pytest.raises(UserError, match="needs --data"):
        make_dataset("imagefolder", None, "train", None)


def test_corrupt_image_names_the_file(tmp_path):
    folder = tmp_path / "train" / "cat"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "good.jpg")
    (folder / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    data = make_dataset("imagefolder", str(tmp_path), "train", eval_transform(8))
    assert data[1][0].shape == (3, 8, 8)  # files sort by name: bad.jpg is 0, good.jpg is 1
    with pytest.raises(UserError, match="bad.jpg"):
        data[0]


def test_val_split_falls_back_to_test(tmp_path):
    folder = tmp_path / "test" / "dog"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    assert len(make_dataset("imagefolder", str(tmp_path), "val", None)) == 1


def test_resumable_sampler_skips_exactly_the_seen_batches():
    data = list(range(50))
    full = ResumableSampler(data, num_replicas=2, rank=1, batch_per_rank=4, seed=0)
    full.set_epoch(3)
    order = list(full)
    assert len(order) == len(full) == 24  # 25 samples per rank -> 6 whole batches of 4
    resumed = ResumableSampler(data, num_replicas=2, rank=1, batch_per_rank=4, seed=0)
    resumed.set_epoch(3, start_batch=2)
    assert list(resumed) == order[8:] and len(resumed) == 16
    other_epoch = ResumableSampler(data, num_replicas=2, rank=1, batch_per_rank=4, seed=0)
    other_epoch.set_epoch(4)
    assert list(other_epoch) != order


def test_knn_predict_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=1)
    labels = torch.randint(0, 3, (40,), generator=g)
    test = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1)
    k, t = 7, 0.1
    scores = knn_predict(train, labels, test, num_classes=3, k=k, t=t, chunk=2)
    for i in range(5):
        sims = [(float(test[i] @ train[j]), j) for j in range(40)]
        nearest = sorted(sims, reverse=True)[:k]
        expected = [sum(torch.exp(torch.tensor(s / t)).item() for s, j in nearest if labels[j] == c)
                    for c in range(3)]
        assert torch.allclose(scores[i], torch.tensor(expected), rtol=1e-5)


def test_cifar10_by_name_reads_torchvision_files_and_says_where_they_go(tmp_path, monkeypatch):
    """--dataset cifar10 goes through torchvision's CIFAR10 class (files written in its format; its MD5 check
    bypassed, test only); train = the 5 batches, val = test_batch. Missing files without network: one line
    naming the folder (this machine has no network, so the download attempt fails)."""
    import pickle

    from conftest import write_cifar10

    write_cifar10(tmp_path / "data", monkeypatch, train_per_batch=4, test=6)
    train = make_dataset("cifar10", str(tmp_path / "data"), "train", None)
    val = make_dataset("cifar10", str(tmp_path / "data"), "val", None)
    assert len(train) == 20 and len(val) == 6 and train.classes == [f"class{c}" for c in range(10)]
    with open(tmp_path / "data" / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        second = pickle.load(f)
    image, label = train[4]  # the first image of the second batch, HWC
    assert label == second["labels"][0]
    assert torch.equal(torch.as_tensor(np.asarray(image)).permute(2, 0, 1).flatten(), torch.as_tensor(second["data"][0]))
    with pytest.raises(UserError, match=r"no cifar-10-batches-py/ under .*empty.*download failed"):
        make_dataset("cifar10", str(tmp_path / "empty"), "train", None)
    with pytest.raises(UserError, match="needs --data"):
        make_dataset("cifar100", None, "train", None)


class Named(torch.utils.data.Dataset):
    """A dataset that is only a class-name list (what check_same_classes reads)."""

    def __init__(self, classes):
        self.classes = list(classes)

    def __len__(self):
        return 1


def test_check_same_classes_names_the_difference():
    ok = ["cat", "dog", "fox"]
    check_same_classes(Named(ok), Named(ok), "kNN")
    check_same_classes(torch.utils.data.Subset(Named(ok), [0]), Named(ok), "kNN")  # looks through Subset
    check_same_classes(SyntheticImages(20, 8), SyntheticImages(5, 8, seed=1), "kNN")
    cases = [
        (["cat", "fox"], r"^kNN: val classes differ from train's: missing in val \['dog'\];"),
        (["cat", "dgo", "fox"], r"missing in val \['dog'\], only in val \['dgo'\];"),
        (["cat", "fox", "dog"], r"same names in another order \(label 1 is 'dog' in train but 'fox' in val\)"),
        (["cat", "dog", "fox", "fox"], r"same names but 3 entries in train and 4 in val"),
    ]
    for val, pattern in cases:
        with pytest.raises(UserError, match=pattern) as caught:
            check_same_classes(torch.utils.data.Subset(Named(ok), [0]), Named(val), "kNN")
        assert "\n" not in str(caught.value)
    many = [f"n{i:04d}" for i in range(1000)]
    with pytest.raises(UserError, match=r"missing in val \['n0000', .*, \.\.\. \(1000 in all\)\]") as caught:
        check_same_classes(Named(many), Named(["images"]), "linear probe")
    assert str(caught.value).startswith("linear probe: ") and len(str(caught.value)) < 400
    with pytest.raises(UserError, match="the val split has no class-name list"):
        check_same_classes(Named(ok), torch.utils.data.TensorDataset(torch.zeros(1)), "kNN")
    check_same_classes(torch.utils.data.TensorDataset(torch.zeros(1)), torch.utils.data.TensorDataset(torch.zeros(1)),
                       "kNN")  # nothing to compare on either side (STL-10 without class_names.txt)


def test_check_same_classes_reads_imagefolder_and_cifar(tmp_path, monkeypatch):
    from conftest import write_cifar10

    for split, names in (("train", ["cat", "dog"]), ("val", ["cat", "dgo"])):
        for name in names:
            (tmp_path / "folders" / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "folders" / split / name / "a.png")
    train = make_dataset("imagefolder", str(tmp_path / "folders"), "train", None)
    with pytest.raises(UserError, match=r"missing in val \['dog'\], only in val \['dgo'\]"):
        check_same_classes(train, make_dataset("imagefolder", str(tmp_path / "folders"), "val", None), "kNN")
    write_cifar10(tmp_path / "cifar", monkeypatch, train_per_batch=2, test=2)
    check_same_classes(make_dataset("cifar10", str(tmp_path / "cifar"), "train", None),
                       make_dataset("cifar10", str(tmp_path / "cifar"), "val", None), "kNN")


def test_two_process_extraction_fails_on_every_rank_together(two_ranks):
    """Rank 1 cannot read one image: both ranks must raise the same error naming rank 1 (not hang in all_gather,
    not pair their collectives wrongly); a UserError cause stays a UserError; a healthy pass afterwards in the
    same process group still gives every image once, equal to a single-process pass."""
    tmp_path = two_ranks / "extract"
    results = [load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    corrupt = ("UserError", "kNN feature extraction failed on rank 1: UserError: cannot read image img3.jpg: broken")
    for result in results:  # the worker-raised UserError (third) reads as one line too, not a traceback
        assert result["outcomes"] == [
            ("RuntimeError", "kNN feature extraction failed on rank 1: OSError: image 3 is unreadable"),
            corrupt, corrupt]
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))
    single, labels = extract_features(net, SyntheticImages(7, 16, transform=eval_transform(16)), batch_size=2,
                                      device=torch.device("cpu"))
    for result in results:
        assert torch.allclose(result["feats"], single, atol=1e-6) and torch.equal(result["labels"], labels)
    assert labels.tolist() == [i % 10 for i in range(7)]


def test_single_process_extraction_raises_the_original_error():
    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            raise OSError("image is unreadable")

    with pytest.raises(OSError, match="^image is unreadable$"):
        extract_features(torch.nn.Flatten(), Broken(), batch_size=2, device=torch.device("cpu"))
