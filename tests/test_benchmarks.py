"""The benchmarks stay runnable (tiny CPU settings). They measure; nothing here asserts a timing."""
import sys

import pytest
from PIL import Image

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import dataloading  # noqa: E402
import throughput  # noqa: E402


@pytest.mark.parametrize("method", ["moco_co2", "adco", "caco"])
def test_throughput_reports_every_field(method):
    args = throughput.Args(method=method, arch="resnet18", image_size=32, batch=8, bank_size=64, device="cpu",
                           steps=1, warmup=1, json=True)
    (row,) = throughput.main(args)
    assert row["img_per_s"] > 0 and row["tflop_per_step"] > 0 and 0 < row["mfu"]
    assert abs(sum(row["share"].values()) - 1) < 1e-6
    assert {"encoders", "loss", "queue/bank", "collectives"} <= set(row["share"])
    assert (row["bank_grad_ms"] is None) == (method == "moco_co2")


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
                            image_size=32, workers=[0], batch_size=2, batches=2, json=True)
    rows = dataloading.main(args)
    assert [r["views"] for r in rows] == [2, 6, 8] and all(r["img_per_s"] > 0 for r in rows)
    args.blur, args.methods = False, ["caco"]
    (row,) = dataloading.main(args)
    assert row["blur"] is False and row["views"] == 2


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
