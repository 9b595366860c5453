"""linear_eval.py: the frozen backbone really is frozen (bitwise, grads None), the sanity check catches a moved or
tampered backbone, the probe learns a separable problem, LARS and the schedules against their formulas, the
kNN vote against a brute-force loop, the class-balanced subset, full-val accuracy across two processes
against a brute-force count, exports loadable into torchvision / in detectron2 naming, every accepted
checkpoint format and clear refusals of the rest, exact resume."""
import contextlib
import dataclasses
import importlib
import json
import math
import pickle
import re
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import linear_eval as le
from common import UserError, eval_transform, make_dataset
from conftest import ROOT, TINY, assert_state_equal, load, run_cli

TINY_KW = dict(dataset="synthetic", synthetic_images=64, arch="resnet18", image_size=32, batch_size=16, workers=0,
               seed=0)


# ---------------------------------------------------------------------------------------------------
# fixtures: one real moco_co2.py pre-training run (reused by every test that needs a checkpoint)
# ---------------------------------------------------------------------------------------------------
def pretrain(script, out_dir):
    """A TINY one-epoch run of a pre-training script, in-process (its main(Args)); banks/queues of 64."""
    module = importlib.import_module(script[:-3])
    fields = {f.name for f in dataclasses.fields(module.Args)}
    small = {name: 64 for name in ("queue_size", "bank_size", "num_negatives") if name in fields}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        module.main(module.Args(**TINY_KW, **small, epochs=1, out_dir=str(out_dir)))
    finally:
        torch.set_num_threads(threads)
    return out_dir / "last.pt"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return pretrain("moco_co2.py", tmp_path_factory.mktemp("pre"))


def backbone_of(ckpt_path):
    """The query encoder's backbone tensors, read independently of linear_eval.read_backbone."""
    state = load(ckpt_path)["encoder_q"]
    return {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}


# ---------------------------------------------------------------------------------------------------
# the probe on a toy problem: frozen means frozen, and it learns
# ---------------------------------------------------------------------------------------------------
def blobs(n, seed):
    """4 classes at (±3, ±3) with noise 0.3: linearly separable."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    centres = torch.tensor([[3.0, 3.0], [-3.0, 3.0], [-3.0, -3.0], [3.0, -3.0]])
    return centres[labels] + 0.3 * torch.randn(n, 2, generator=g), labels


def test_frozen_probe_learns_a_separable_problem_and_the_backbone_does_not_move():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(2, 32), nn.BatchNorm1d(32))  # linear map: separability is kept
    backbone[1].running_mean.normal_()  # non-trivial BN statistics, so drift would show
    backbone[1].running_var.uniform_(0.5, 2.0)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = le.Classifier(backbone, 32, 4, frozen=True)
    assert model.fc.bias.abs().sum() == 0 and 0.005 < model.fc.weight.std() < 0.015  # N(0, 0.01²), b = 0
    model.train()
    assert not model.backbone.training and model.fc.training  # BN stays in eval mode
    optimizer = torch.optim.SGD(model.fc.parameters(), lr=0.5, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x, y = blobs(512, seed=1)
    for epoch in range(3):
        for i in range(0, 512, 32):
            le.train_step(model, x[i:i + 32], y[i:i + 32], optimizer, scaler, contextlib.nullcontext, 0.0, 0.0)
    test_x, test_y = blobs(400, seed=2)
    top1, top5 = le.evaluate(model, torch.utils.data.TensorDataset(test_x, test_y), 64, torch.device("cpu"))
    assert top1 >= 99.0 and top5 == 100.0
    assert_state_equal(backbone.state_dict(), before)  # weights, BN mean/var, num_batches_tracked: bitwise
    assert all(p.grad is None and not p.requires_grad for p in backbone.parameters())
    assert model.fc.weight.grad is not None and model.fc.weight.grad.abs().sum() > 0


def test_evaluate_counts_every_image_once():
    """top-1 / top-5 against a hand count on logits chosen so that the answer is known."""
    logits = torch.tensor([[9.0, 1, 2, 3, 4, 5, 0], [0, 9, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0, 9]])
    labels = torch.tensor([0, 6, 5])  # correct@1, wrong (6 is 2nd), wrong (5 is the lowest: not in top-5)
    model = nn.Identity()
    top1, top5 = le.evaluate(model, torch.utils.data.TensorDataset(logits, labels), 2, torch.device("cpu"))
    assert top1 == pytest.approx(100 / 3) and top5 == pytest.approx(200 / 3)


def test_larc_scaling_matches_the_formula():
    torch.manual_seed(0)
    weight, bias = nn.Parameter(torch.randn(5, 4)), nn.Parameter(torch.zeros(5))
    weight.grad, bias.grad = torch.randn(5, 4), torch.randn(5)
    w, g, b_g = weight.detach().double(), weight.grad.double(), bias.grad.clone()
    trust, wd, eps = 0.001, 0.01, 1e-8
    le.larc_scale_([weight, bias], trust, wd, eps)
    w_norm, g_norm = math.sqrt((w ** 2).sum()), math.sqrt((g ** 2).sum())
    expected = (g + wd * w) * trust * w_norm / (g_norm + wd * w_norm + eps)
    assert torch.allclose(weight.grad.double(), expected, rtol=1e-5)
    assert torch.equal(bias.grad, b_g)  # ‖w‖ = 0: untouched, no weight decay added (LARC skips it)


def test_protocols_and_schedules():
    moco = le.resolve_recipe(le.Args())
    assert (moco.lr, moco.batch_size, moco.epochs, moco.momentum, moco.weight_decay) == (30.0, 256, 100, 0.9, 0.0)
    assert [le.lr_at_epoch(e, moco, 30.0) for e in (0, 59, 60, 79, 80, 99)] == pytest.approx([30, 30, 3, 3, 0.3, 0.3])
    adco = le.resolve_recipe(le.Args(protocol="adco"))
    assert le.lr_at_epoch(0, adco, 10.0) == pytest.approx(10.0)
    assert le.lr_at_epoch(50, adco, 10.0) == pytest.approx(0.01 + (10 - 0.01) * 0.5)  # ½(1+cos(π/2)) = ½
    assert le.lr_at_epoch(100, adco, 10.0) == pytest.approx(0.01)
    caco = le.resolve_recipe(le.Args(protocol="caco"))
    assert caco.lr * caco.batch_size / 256 == pytest.approx(0.4) and caco.lars_trust == 0.001
    assert le.lr_at_epoch(25, caco, 0.4) == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi / 4)))
    override = le.resolve_recipe(le.Args(protocol="caco", lr=0.1, epochs=5))  # explicit values win
    assert (override.lr, override.epochs, override.lars_trust) == (0.1, 5, 0.001)
    semi = le.resolve_recipe(le.Args(finetune=True))
    assert (semi.protocol, semi.lr, semi.head_lr_mult, semi.weight_decay, semi.lr_steps) == ("semi", 0.01, 100.0,
                                                                                             5e-4, (12, 16))


# ---------------------------------------------------------------------------------------------------
# kNN and the labelled subset
# ---------------------------------------------------------------------------------------------------
def brute_force_knn(train, train_labels, test, classes, k, t):
    """Plain loops: sort all similarities (Python sorted, no topk), sum exp(s/t) per class over the k best."""
    scores = torch.zeros(len(test), classes, dtype=torch.float64)
    for i, z in enumerate(test.double()):
        sims = [(float(z @ m), j) for j, m in enumerate(train.double())]
        for s, j in sorted(sims, reverse=True)[:k]:
            scores[i, int(train_labels[j])] += math.exp(s / t)
    return scores


def test_knn_vote_matches_brute_force():
    from common import knn_predict
    g = torch.Generator().manual_seed(0)
    train = F.normalize(torch.randn(50, 8, generator=g), dim=1)
    labels = torch.randint(0, 5, (50,), generator=g)
    test = F.normalize(torch.randn(7, 8, generator=g), dim=1)
    for k in (1, 10, 200):  # 200 > 50: capped at the memory size
        ours = knn_predict(train, labels, test, 5, k=k, t=0.1)
        assert torch.allclose(ours.double(), brute_force_knn(train, labels, test, 5, k, 0.1), rtol=1e-4)


def test_knn_runs_match_a_hand_computation(pretrained, tmp_path):
    out = tmp_path / "knn"
    result = le.main(le.Args(**TINY_KW, checkpoint=str(pretrained), knn=True, out_dir=str(out)))
    # independent: features of the pre-training backbone, eval transform, brute-force vote, top-1
    backbone, _ = le.build_resnet("resnet18")
    backbone.load_state_dict(backbone_of(pretrained))
    backbone.eval()
    feats = {}
    for split in ("train", "val"):
        ds = make_dataset("synthetic", None, split, eval_transform(32), 64, 32, 0)
        images, labels = zip(*[ds[i] for i in range(len(ds))])
        with torch.no_grad():
            feats[split] = (F.normalize(backbone(torch.stack(images)), dim=1), torch.tensor(labels))
    scores = brute_force_knn(*feats["train"], feats["val"][0], 10, 200, 0.1)
    expected = (scores.argmax(dim=1) == feats["val"][1]).double().mean().item() * 100
    assert result["top1"] == pytest.approx(expected)
    # the random-init baseline appends its own line to the same metrics file
    le.main(le.Args(**TINY_KW, knn=True, random_init=True, out_dir=str(out)))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["backbone"] for r in records] == ["moco_co2.py checkpoint", "random init (resnet18)"]
    assert all(0 <= r["knn_top1"] <= 100 and r["k"] == 200 and r["t"] == 0.1 for r in records)


def test_class_balanced_subset_counts():
    g = torch.Generator().manual_seed(0)
    labels = sum(([c] * (100 + 37 * c) for c in range(6)), [])  # imbalanced: 100, 137, ..., 285 images
    labels = [labels[i] for i in torch.randperm(len(labels), generator=g).tolist()]
    for fraction in (0.01, 0.1):
        chosen = le.class_balanced_subset(labels, fraction, seed=3)
        assert len(set(chosen)) == len(chosen)
        for c in range(6):
            n_c = 100 + 37 * c
            assert sum(labels[i] == c for i in chosen) == max(1, math.floor(fraction * n_c + 0.5))  # 28.5 -> 29
        assert chosen == le.class_balanced_subset(labels, fraction, seed=3)  # seeded
        assert chosen != le.class_balanced_subset(labels, fraction, seed=4)


def test_subset_file(tmp_path):
    from PIL import Image
    for c in ("cat", "dog"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8)).save(tmp_path / "train" / c / f"{c}_{i}.png")
    ds = make_dataset("imagefolder", str(tmp_path), "train", None)
    listing = tmp_path / "list.txt"
    listing.write_text("cat_2.png\ndog_0.png\n\n")
    assert le.subset_from_file(str(listing), ds) == [2, 3]
    listing.write_text("cat_2.png\nbird_0.png\n")
    with pytest.raises(UserError, match="1 of 2 listed images are not in the train split"):
        le.subset_from_file(str(listing), ds)


def image_folders(root, train_classes, val_classes):
    """An ImageNet-layout tree: 4 train and 2 val images per class, each class its own colour."""
    from PIL import Image
    for split, classes, count in (("train", train_classes, 4), ("val", val_classes, 2)):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (32, 32), (40 * c, 255 - 40 * c, 20 * i)).save(root / split / name / f"{i}.png")
    return root


IMAGEFOLDER_KNN = ["--dataset", "imagefolder", "--knn", "--random-init", "--arch", "resnet18", "--image-size", "32",
                   "--batch-size", "8", "--workers", "0"]


@pytest.mark.parametrize("val_classes,named", [
    (["ant", "bee", "dog", "elk"], r"missing in val \['cat'\]"),  # labels of dog and elk would shift by one
    (["ant", "bee", "kat", "dog", "elk"], r"missing in val \['cat'\], only in val \['kat'\]"),  # same count
])
def test_knn_refuses_val_classes_that_differ_from_train(tmp_path, val_classes, named):
    """ImageFolder numbers the sorted folder names: a class folder missing or renamed in val silently shifts the
    labels (8.9 % instead of 19.0 % in the report). The run must stop with one line naming the class."""
    root = image_folders(tmp_path / "data", ["ant", "bee", "cat", "dog", "elk"], val_classes)
    proc = run_cli("linear_eval.py", *IMAGEFOLDER_KNN, "--data", root, "--out-dir", tmp_path / "knn", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert re.search(r"^error: kNN: val classes differ from train's: " + named, proc.stderr.strip()), proc.stderr
    assert not (tmp_path / "knn" / "metrics.jsonl").exists()


def test_equal_classes_are_accepted_and_the_probe_checks_names_too(tmp_path):
    classes = ["ant", "bee", "cat", "dog", "elk"]
    same = image_folders(tmp_path / "same", classes, classes)
    result = le.main(le.Args(**{**TINY_KW, "dataset": "imagefolder", "batch_size": 8}, data=str(same), knn=True,
                             random_init=True, out_dir=str(tmp_path / "knn")))
    assert 0 <= result["top1"] <= 100
    renamed = image_folders(tmp_path / "renamed", classes, ["ant", "bee", "kat", "dog", "elk"])
    with pytest.raises(UserError, match=r"^linear probe: val classes differ from train's: missing in val \['cat'\], "
                                        r"only in val \['kat'\]"):
        le.main(le.Args(**{**TINY_KW, "dataset": "imagefolder", "batch_size": 8}, data=str(renamed),
                        random_init=True, epochs=1, out_dir=str(tmp_path / "lin")))


# ---------------------------------------------------------------------------------------------------
# end to end on a real moco_co2.py checkpoint
# ---------------------------------------------------------------------------------------------------
def test_contract_run_writes_top1_and_counts_the_whole_val_set(pretrained, tmp_path):
    out = tmp_path / "lin"  # the entry point in-process; tests/test_cluster.py runs linear_eval.py as a process
    run_cli("linear_eval.py", *TINY, "--checkpoint", pretrained, "--epochs", "1", "--out-dir", out)
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"epoch", "loss", "lr", "top1", "top5"} <= set(record) and record["lr"] == 30.0 * 16 / 256
    # brute force: the saved model on every val image, one by one
    model = le.Classifier(le.build_resnet("resnet18")[0], 512, 10, frozen=True)
    model.load_state_dict(load(out / "last.pt")["model"])
    model.eval()
    val = make_dataset("synthetic", None, "val", eval_transform(32), 64, 32, 0)
    hits1 = hits5 = 0
    with torch.no_grad():
        for image, label in (val[i] for i in range(len(val))):
            order = model(image[None])[0].argsort(descending=True).tolist()
            hits1 += order[0] == label
            hits5 += label in order[:5]
    assert record["top1"] == pytest.approx(100 * hits1 / len(val))
    assert record["top5"] == pytest.approx(100 * hits5 / len(val))
    saved = load(out / "last.pt")["model"]
    assert_state_equal(backbone_of(pretrained), {k[9:]: v for k, v in saved.items() if k.startswith("backbone.")})


def test_in_process_probe_is_frozen_and_resume_is_exact(pretrained, tmp_path):
    kw = dict(TINY_KW, checkpoint=str(pretrained), protocol="adco", epochs=2)
    whole = le.main(le.Args(**kw, out_dir=str(tmp_path / "whole")))
    model = whole["model"]
    assert_state_equal(model.backbone.state_dict(), backbone_of(pretrained))  # BN statistics included
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.fc.weight.grad is not None
    le.main(le.Args(**kw, stop_at_epoch=1, out_dir=str(tmp_path / "split")))  # an interrupted job
    le.main(le.Args(**kw, out_dir=str(tmp_path / "split"), resume="auto"))
    a, b = load(tmp_path / "whole" / "last.pt"), load(tmp_path / "split" / "last.pt")
    assert_state_equal(a["model"], b["model"])
    assert_state_equal(a["optimizer"], b["optimizer"])
    lines = lambda d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
    assert [r["top1"] for r in lines("whole")] == [r["top1"] for r in lines("split")]
    with pytest.raises(UserError, match="already exists"):
        le.main(le.Args(**kw, out_dir=str(tmp_path / "whole")))
    with pytest.raises(UserError, match="--lr"):
        le.main(le.Args(**dict(kw, lr=1.0), out_dir=str(tmp_path / "whole"), resume="auto"))


def test_sanity_check_catches_a_moved_or_tampered_backbone(pretrained, tmp_path, monkeypatch):
    state, arch, small_stem, _ = le.read_backbone(str(pretrained))
    backbone, _ = le.build_resnet(arch, small_stem)
    le.load_into_backbone(backbone, state, "x")
    le.sanity_check(backbone, le.read_backbone(str(pretrained))[0], "file")  # passes
    # a tampered file: one BN statistic changed
    tampered = load(pretrained)
    tampered["encoder_q"]["backbone.layer2.0.bn1.running_var"][3] += 1e-3
    torch.save(tampered, tmp_path / "tampered.pt")
    with pytest.raises(UserError, match="layer2.0.bn1.running_var differs"):
        le.sanity_check(backbone, le.read_backbone(str(tmp_path / "tampered.pt"))[0], "tampered.pt")
    # a backbone that ran one forward in train mode: BN statistics drifted
    backbone.train()
    with torch.no_grad():
        backbone(torch.randn(4, 3, 32, 32))
    with pytest.raises(UserError, match="sanity check failed"):
        le.sanity_check(backbone, state, "file")
    # and a full run whose file changes after loading fails at the end of the first epoch
    real_read, calls = le.read_backbone, []

    def read_then_tamper(path):  # the second read (the sanity check's) sees a changed conv1
        calls.append(path)
        result = real_read(path)
        if len(calls) == 2:
            result[0]["conv1.weight"][0, 0, 0, 0] += 1.0
        return result
    monkeypatch.setattr(le, "read_backbone", read_then_tamper)
    with pytest.raises(UserError, match="conv1.weight differs"):
        le.main(le.Args(**TINY_KW, checkpoint=str(pretrained), epochs=1, out_dir=str(tmp_path / "o")))
    assert len(calls) == 2


def test_finetune_trains_the_whole_network_on_a_balanced_subset(pretrained, tmp_path):
    out = tmp_path / "semi"
    result = le.main(le.Args(**TINY_KW, checkpoint=str(pretrained), finetune=True, label_fraction=0.5, epochs=1,
                             out_dir=str(out)))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2  # 0.5 x 7 -> 4 (classes 0-3), 0.5 x 6 -> 3: 34 images, 2 batches of 16
    assert 0 <= result["top1"] <= 100 and result["top5"] >= result["top1"]
    moved = result["model"].backbone.state_dict()
    assert not torch.equal(moved["conv1.weight"], backbone_of(pretrained)["conv1.weight"])  # the backbone trained
    assert result["model"].backbone.training  # BN in train mode when fine-tuning


def test_export_torchvision_and_detectron2(pretrained, tmp_path):
    """Only --checkpoint and the output paths are needed (arch and stem come from the checkpoint)."""
    tv, d2 = tmp_path / "r18.pth", tmp_path / "r18.pkl"
    code, _, err = run_cli("linear_eval.py", "--checkpoint", pretrained, "--export-torchvision", tv,
                           "--export-detectron2", d2, check=False)
    assert code == 0, err
    net = torchvision.models.resnet18()
    missing, unexpected = net.load_state_dict(load(tv), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    net.fc = nn.Identity()
    # the same features as the pre-training backbone (moco_co2's own Encoder, loaded from the checkpoint)
    import moco_co2
    encoder = moco_co2.Encoder("resnet18", False, 2048, 128)
    encoder.load_state_dict(load(pretrained)["encoder_q"])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), encoder.backbone.eval()(x))
    # detectron2 naming, enumerated from detectron2's ResNet-18 structure (stem, res2..res5, 2 BasicBlocks each)
    with open(d2, "rb") as f:
        exported = pickle.load(f)
    assert exported["matching_heuristics"] is True and "__author__" in exported
    bn = ("weight", "bias", "running_mean", "running_var")
    expected = {"stem.conv1.weight"} | {f"stem.conv1.norm.{p}" for p in bn}
    for stage in (2, 3, 4, 5):
        for block in (0, 1):
            for conv in (1, 2):
                prefix = f"res{stage}.{block}.conv{conv}"
                expected |= {f"{prefix}.weight"} | {f"{prefix}.norm.{p}" for p in bn}
        if stage > 2:
            expected |= {f"res{stage}.0.shortcut.weight"} | {f"res{stage}.0.shortcut.norm.{p}" for p in bn}
    model = exported["model"]
    assert set(model) == expected
    source = backbone_of(pretrained)
    for d2_name, tv_name in [("stem.conv1.weight", "conv1.weight"),
                             ("stem.conv1.norm.running_mean", "bn1.running_mean"),
                             ("res2.0.conv1.norm.running_var", "layer1.0.bn1.running_var"),
                             ("res3.0.shortcut.weight", "layer2.0.downsample.0.weight"),
                             ("res4.0.shortcut.norm.bias", "layer3.0.downsample.1.bias"),
                             ("res5.1.conv2.weight", "layer4.1.conv2.weight")]:
        assert torch.equal(torch.from_numpy(model[d2_name]), source[tv_name]), d2_name


# ---------------------------------------------------------------------------------------------------
# checkpoint formats: accepted and refused
# ---------------------------------------------------------------------------------------------------
def fake_pretraining_checkpoint(method, arch="resnet18", small_stem=True):
    """The format adco.py / caco.py write (moco_co2.py's checkpoint_state): method, args, encoder_q with
    backbone.* and head.* keys, plus other state that must be ignored."""
    backbone, dim = le.build_resnet(arch, small_stem)
    encoder_q = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    encoder_q.update({"head.0.weight": torch.randn(16, dim), "head.0.bias": torch.zeros(16)})
    return {"method": method, "args": {"arch": arch, "small_stem": small_stem}, "next_epoch": 1, "next_batch": 0,
            "step": 4, "encoder_q": encoder_q, "encoder_k": dict(encoder_q), "bank": torch.randn(16, 64)}, backbone


@pytest.mark.parametrize("method", ["adco", "caco", "my_fork"])
def test_fake_adco_caco_and_forked_checkpoints_are_accepted(method, tmp_path):
    ckpt, backbone = fake_pretraining_checkpoint(method)
    torch.save(ckpt, tmp_path / "last.pt")
    state, arch, small_stem, source = le.read_backbone(str(tmp_path / "last.pt"))
    assert (arch, small_stem, source) == ("resnet18", True, f"{method}.py checkpoint")
    assert_state_equal(state, backbone.state_dict())
    if method == "caco":  # and a whole (small-stem) probe run on it, with the CaCo protocol (LARS)
        result = le.main(le.Args(**TINY_KW, checkpoint=str(tmp_path / "last.pt"), protocol="caco", epochs=1,
                                 out_dir=str(tmp_path / "lin")))
        assert_state_equal(result["model"].backbone.state_dict(), backbone.state_dict())


def test_a_forked_method_checkpoint_is_accepted_and_a_backbone_less_one_refused(pretrained, tmp_path):
    """The checkpoint format decides, not the method's name: a fork of moco_co2.py (SCRIPT_NAME = "my_fork") is
    evaluated as is, with the same kNN result as the original file; a method checkpoint whose encoder_q has no
    backbone.* tensors is refused in one line."""
    forked = load(pretrained)
    forked["method"] = "my_fork"
    torch.save(forked, tmp_path / "fork.pt")
    run_cli("linear_eval.py", *TINY, "--checkpoint", tmp_path / "fork.pt", "--knn", "--out-dir", tmp_path / "knn")
    record = json.loads((tmp_path / "knn" / "metrics.jsonl").read_text())
    assert record["backbone"] == "my_fork.py checkpoint"
    original = le.main(le.Args(**TINY_KW, checkpoint=str(pretrained), knn=True, out_dir=str(tmp_path / "knn0")))
    assert (record["top1"], record["top5"]) == (original["top1"], original["top5"])
    headless = {"method": "my_fork", "args": {"arch": "resnet18", "small_stem": False},
                "encoder_q": {k: v for k, v in forked["encoder_q"].items() if not k.startswith("backbone.")}}
    assert headless["encoder_q"]  # the head is still there
    torch.save(headless, tmp_path / "headless.pt")
    code, _, err = run_cli("linear_eval.py", *TINY, "--checkpoint", tmp_path / "headless.pt", "--knn",
                           "--out-dir", tmp_path / "o", check=False)
    assert code == 2 and "method 'my_fork' whose encoder_q has no backbone.* tensors" in err, err
    assert len(err.strip().splitlines()) == 1


def test_torchvision_and_official_state_dicts_are_accepted(tmp_path):
    net = torchvision.models.resnet50()
    torch.save(net.state_dict(), tmp_path / "tv.pth")
    state, arch, small_stem, _ = le.read_backbone(str(tmp_path / "tv.pth"))
    assert (arch, small_stem) == ("resnet50", False) and not any(k.startswith("fc.") for k in state)
    r18 = torchvision.models.resnet18().state_dict()
    official = {"arch": "resnet18", "epoch": 200, "state_dict": {
        **{f"module.encoder_q.{k}": v for k, v in r18.items() if not k.startswith("fc.")},
        "module.encoder_q.fc.0.weight": torch.randn(8, 512), "module.encoder_k.conv1.weight": torch.randn(1),
        "module.queue": torch.randn(4, 4)}}
    torch.save(official, tmp_path / "official.pth.tar")
    state, arch, _, source = le.read_backbone(str(tmp_path / "official.pth.tar"))
    assert arch == "resnet18" and source == "official encoder_q checkpoint"
    assert_state_equal(state, {k: v for k, v in r18.items() if not k.startswith("fc.")})


def test_wrong_files_are_refused_clearly(pretrained, tmp_path):
    cases = {
        "other_method.pt": ({"method": "simclr", "encoder_q": {}}, "method 'simclr'"),
        "linear.pt": ({"method": "linear_eval", "model": {}}, "method 'linear_eval'"),
        "random_dict.pt": ({"weights": torch.randn(3), "epoch": 3}, "keys ['epoch', 'weights']"),
        "tensor.pt": (torch.randn(3), "a Tensor"),
    }
    for name, (obj, what) in cases.items():
        torch.save(obj, tmp_path / name)
        code, _, err = run_cli("linear_eval.py", "--checkpoint", tmp_path / name, "--export-torchvision",
                               tmp_path / "x.pth", check=False)
        assert code == 2 and "is neither a pre-training checkpoint" in err, err
        assert what in err, err
        assert len(err.strip().splitlines()) == 1  # one line, no traceback
    (tmp_path / "text.pt").write_text("not a checkpoint")
    code, _, err = run_cli("linear_eval.py", "--checkpoint", tmp_path / "text.pt", "--export-torchvision",
                           tmp_path / "x.pth", check=False)
    assert code == 2 and "cannot read checkpoint" in err
    code, _, err = run_cli("linear_eval.py", "--checkpoint", pretrained, "--arch", "resnet50",
                           "--export-torchvision", tmp_path / "x.pth", check=False)
    assert code == 2 and "--arch resnet50 but" in err and "resnet18" in err
    code, _, err = run_cli("linear_eval.py", "--checkpoint", pretrained, "--export-detectron2", tmp_path / "x.pth",
                           check=False)
    assert code == 2 and ".pkl" in err
    code, _, err = run_cli("linear_eval.py", "--dataset", "synthetic", "--out-dir", tmp_path / "o", check=False)
    assert code == 2 and "--checkpoint PRE/last.pt is required" in err
    assert not (tmp_path / "x.pth").exists()


# ---------------------------------------------------------------------------------------------------
# two processes: the val set is counted once (15 images, odd: no padding duplicates), the probe stays frozen
# ---------------------------------------------------------------------------------------------------
def test_two_processes_count_the_full_val_set(two_ranks):
    """linear_eval.main on 2 ranks (tests/dist_worker.py) probing the moco job's checkpoint there."""
    out, pretrained = two_ranks / "linear_eval", two_ranks / "moco" / "last.pt"
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    model = le.Classifier(le.build_resnet("resnet18")[0], 512, 10, frozen=True)
    model.load_state_dict(load(out / "last.pt")["model"])
    val = make_dataset("synthetic", None, "val", eval_transform(32), 60, 32, 0)
    assert len(val) == 15
    with torch.no_grad():
        logits = model.eval()(torch.stack([val[i][0] for i in range(15)]))
    labels = torch.tensor([val[i][1] for i in range(15)])
    top5 = [set(row.argsort(descending=True)[:5].tolist()) for row in logits]
    assert record["top1"] == pytest.approx(100 * (logits.argmax(1) == labels).sum().item() / 15)
    assert record["top5"] == pytest.approx(100 * sum(int(l) in s for l, s in zip(labels.tolist(), top5)) / 15)
    assert_state_equal(backbone_of(pretrained), {k[9:]: v for k, v in load(out / "last.pt")["model"].items()
                                                 if k.startswith("backbone.")})


# ---------------------------------------------------------------------------------------------------
# the real adco.py / caco.py, when they exist
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", ["adco.py", "caco.py"])
@pytest.mark.skipif(not ((ROOT / "adco.py").exists() or (ROOT / "caco.py").exists()), reason="no adco.py / caco.py yet")
def test_real_pretraining_checkpoints_are_accepted(script, tmp_path):
    if not (ROOT / script).exists():
        pytest.skip(f"{script} does not exist yet")
    ckpt = pretrain(script, tmp_path / "pre")
    assert load(ckpt)["method"] == script[:-3]
    result = le.main(le.Args(**TINY_KW, checkpoint=str(ckpt), epochs=1, out_dir=str(tmp_path / "lin")))
    assert_state_equal(result["model"].backbone.state_dict(), backbone_of(ckpt))
    assert 0 <= result["top1"] <= 100
