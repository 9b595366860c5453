"""The benchmarks stay runnable (tiny CPU settings). They measure; nothing here asserts a timing."""
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import ROOT, TINY, run_cli

sys.path.insert(0, str(ROOT / "benchmarks"))
import dataloading  # noqa: E402
import embedding_stats  # noqa: E402
import throughput  # noqa: E402

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec; they still work (docs/augment.md)
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


@pytest.mark.parametrize("method", ["moco_co2", "adco", "caco"])
def test_throughput_reports_every_field(method):
    args = throughput.Args(method=method, arch="resnet18", image_size=32, batch=8, bank_size=64, device="cpu",
                           steps=1, warmup=1, json=True)
    (row,) = throughput.main(args)
    assert row["img_per_s"] > 0 and row["tflop_per_step"] > 0 and 0 < row["mfu"]
    assert abs(sum(row["share"].values()) - 1) < 1e-6
    assert {"encoders", "loss", "queue/bank", "collectives"} <= set(row["share"])
    assert (row["bank_grad_ms"] is None) == (method == "moco_co2")
    assert row["augment_on"] == "workers" and row["augment_ms"] is None and "augment" not in row["share"]


@pytest.mark.parametrize("method,blur", [("moco_co2", False), ("caco", True)])
def test_throughput_augments_on_the_device_in_every_step(method, blur):
    args = throughput.Args(method=method, arch="resnet18", image_size=32, batch=4, bank_size=64, device="cpu",
                           steps=1, warmup=1, json=True, augment_on="device", blur=blur, source_size=40)
    (row,) = throughput.main(args)
    assert row["augment_on"] == "device" and row["source_size"] == 40 and row["blur"] is blur
    assert row["augment_ms"] > 0 and 0 < row["augment_share"] and 0 < row["share"]["augment"] < 1
    assert abs(sum(row["share"].values()) - 1) < 1e-6 and row["tflop_per_step"] > 0
    # the default source: CIFAR-like images of the crop's size; 256 px for 224 px crops
    assert throughput.source_size(throughput.Args(image_size=32)) == 32
    assert throughput.source_size(throughput.Args(image_size=224)) == 256


def test_throughput_times_the_cifar_recipe_step():
    args = throughput.Args(method="adco", arch="resnet18", small_stem=True, mlp_dim=64, bn_splits=4, image_size=16,
                           batch=8, bank_size=64, device="cpu", steps=1, warmup=1, json=True)
    (row,) = throughput.main(args)
    assert row["small_stem"] and row["bn_splits"] == 4 and row["img_per_s"] > 0


def test_dataloading_times_each_pipeline(tmp_path):
    for c in range(2):
        (tmp_path / "train" / f"c{c}").mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (40, 40), (30 * i, 20 * c, 90)).save(tmp_path / "train" / f"c{c}" / f"{i}.jpg")
    args = dataloading.Args(data=str(tmp_path), methods=["moco_co2", "adco-multi-crop", "caco-multi-crop"],
                            image_size=32, augment_on=["workers"], workers=[0], batch_size=2, batches=2, json=True)
    rows = dataloading.main(args)
    assert [r["views"] for r in rows] == [2, 6, 8] and all(r["img_per_s"] > 0 for r in rows)
    assert all(r["augment_on"] == "workers" and r["cpu_us_per_image"] > 0 for r in rows)
    args.blur, args.methods, args.workers = False, ["caco"], [1]  # one worker: its CPU time is read from /proc
    (row,) = dataloading.main(args)
    assert row["blur"] is False and row["views"] == 2 and row["workers"] == 1
    if row["worker_cpu_us_per_image"] is not None:  # None where /proc is unreadable (not Linux); clock ticks
        assert row["cpu_us_per_image"] >= row["worker_cpu_us_per_image"] >= 0  # of 10 ms: 4 images may read 0


def test_dataloading_times_the_device_executor_on_files_and_in_memory(tmp_path, capsys):
    for c in range(2):
        (tmp_path / "train" / f"c{c}").mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (40, 40), (30 * i, 20 * c, 90)).save(tmp_path / "train" / f"c{c}" / f"{i}.jpg")
    args = dataloading.Args(data=str(tmp_path), methods=["moco_co2", "caco-multi-crop"], image_size=32,
                            augment_on=["device"], device="cpu", threads=[1], workers=[0], batch_size=2,
                            batches=2)
    rows = dataloading.main(args)
    assert [(r["pipeline"], r["source"], r["views"]) for r in rows] == [
        ("moco_co2", "jpeg files", 2), ("moco_co2", "memory uint8", 2),
        ("caco-multi-crop", "jpeg files", 8), ("caco-multi-crop", "memory uint8", 8)]
    assert all(r["augment_on"] == "device" and r["device"] == "cpu" and r["torch_threads"] == 1 for r in rows)
    assert all(r["img_per_s_per_process"] == r["img_per_s"] > 0 and r["cpu_us_per_image"] > 0 for r in rows)
    assert "memory uint8" in capsys.readouterr().out  # the table
    # images of several sizes: the files still run (cropped per size group); no single in-memory tensor
    Image.new("RGB", (48, 36), (10, 200, 90)).save(tmp_path / "train" / "c0" / "0.jpg")
    args.methods, args.json = ["adco"], True
    (row,) = dataloading.main(args)
    assert row["source"] == "jpeg files" and row["views"] == 2
    assert "no in-memory source" in capsys.readouterr().err


def test_dataloading_per_operator_times_every_operator(tmp_path):
    (tmp_path / "train" / "c0").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (40, 40), (60 * i, 20, 90)).save(tmp_path / "train" / "c0" / f"{i}.jpg")
    args = dataloading.Args(data=str(tmp_path), methods=["moco_co2", "caco"], image_size=32, per_op=True,
                            per_op_images=3, json=True)
    moco, caco = dataloading.main(args)
    assert moco["views"] == 2 and abs(sum(moco["share"].values()) - 1) < 1e-9
    assert {"ColorJitter (p=0.8)", "GaussianBlur (p=0.5)", "RandomResizedCrop", "read + decode JPEG",
            "Normalize"} <= set(moco["us_per_image"])
    assert "Solarize (p=0.2)" in caco["us_per_image"]


def test_embedding_geometry_matches_explicit_formulas():
    """A collapsed batch (every q and k = e) against negatives at -e, then a random one vs per-element loops."""
    n, c, k, t = 4, 8, 6, 0.5
    e = F.normalize(torch.ones(c), dim=0)
    out = embedding_stats.geometry(e.repeat(n, 1), e.repeat(n, 1), -e[:, None].repeat(1, k), {"tau": t})
    assert out["q.q_mean"] == pytest.approx(1) and out["q.k_own"] == pytest.approx(1)
    assert out["q.k_other"] == pytest.approx(1) and out["q.n_mean"] == pytest.approx(-1)
    batch = n * math.exp(1 / t) / (n * math.exp(1 / t) + k * math.exp(-1 / t))
    assert out["share_batch@tau"] == pytest.approx(batch) and out["share_own@tau"] == pytest.approx(batch / n)
    assert out["share_negatives@tau"] == pytest.approx(1 - batch)
    g = torch.Generator().manual_seed(0)
    q, key = (F.normalize(torch.randn(n, c, generator=g, dtype=torch.float64), dim=1) for _ in range(2))
    neg = F.normalize(torch.randn(c, k, generator=g, dtype=torch.float64), dim=0)
    out = embedding_stats.geometry(q, key, neg, {"tau": t})
    own = [math.exp(q[i] @ key[i] / t) / (sum(math.exp(q[i] @ key[j] / t) for j in range(n))
                                          + sum(math.exp(q[i] @ neg[:, m] / t) for m in range(k))) for i in range(n)]
    assert out["share_own@tau"] == pytest.approx(sum(own) / n)
    assert out["q.n_nearest"] == pytest.approx(sum(max((q[i] @ neg).tolist()) for i in range(n)) / n)
    assert out["n.n_mean"] == pytest.approx(sum(float(neg[:, a] @ neg[:, b]) for a in range(k) for b in range(k)
                                                if a != b) / (k * (k - 1)))


@pytest.mark.parametrize("script,extra", [("adco.py", ["--bank-size", "64"]), ("moco_co2.py", ["--queue-size", "64"])])
def test_embedding_stats_reads_a_real_checkpoint(tmp_path, script, extra):
    run_cli(script, *TINY, "--epochs", "1", *extra, "--out-dir", tmp_path / "run")
    out = embedding_stats.main(embedding_stats.Args(checkpoint=str(tmp_path / "run" / "last.pt"), json=True))
    assert out["batch"] == 16 and out["step"] == 4 and -1 <= out["q.n_mean"] <= 1
    shares = [v for key, v in out.items() if key.startswith("share_")]
    assert len(shares) == (6 if script == "adco.py" else 3) and all(0 <= v <= 1 for v in shares)
    torch.save({"encoder_q": {}}, tmp_path / "plain.pt")
    with pytest.raises(SystemExit, match="not a moco_co2.py or adco.py checkpoint"):
        embedding_stats.main(embedding_stats.Args(checkpoint=str(tmp_path / "plain.pt")))
