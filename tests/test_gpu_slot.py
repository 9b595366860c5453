"""benchmarks/gpu_slot.py: a JPEG pack unpacks to the ImageFolder and the pixels it holds, the evidence plan fits the
time left, a child process past its time is stopped (SIGTERM, then SIGKILL), and the whole command runs in --smoke
mode on CPU (as CI runs it). No timing is asserted beyond the command's own budget."""
import json
import signal
import sys

import pytest
import torch
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image

from conftest import ROOT, run_script

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_slot  # noqa: E402

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec; they still work (docs/augment.md)
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


def test_a_jpeg_pack_unpacks_to_the_imagefolder_and_pixels_it_holds(tmp_path):
    images = torch.randint(0, 256, (12, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    files = [torchvision.io.encode_jpeg(image, quality=90) for image in images]
    labels, classes = [i % 3 for i in range(12)], ["bird", "cat", "dog"]
    gpu_slot.write_pack(str(tmp_path / "p.npz"), {"train": (files[:8], labels[:8]), "test": (files[8:], labels[8:])},
                        classes)
    pack = gpu_slot.read_pack(str(tmp_path / "p.npz"))
    gpu_slot.unpack(pack, str(tmp_path / "folder"))
    decoded = gpu_slot.decode_all(pack["train"][0], torch.device("cpu"))
    assert decoded.dtype == torch.uint8 and decoded.shape == (8, 3, 32, 32)
    for split, offset in (("train", 0), ("test", 8)):
        folder = torchvision.datasets.ImageFolder(str(tmp_path / "folder" / split))
        assert folder.classes == classes and len(folder) == len(pack[split][0])
        for path, label in folder.samples:
            i = offset + int(path[-9:-4])  # <index>.jpg
            assert label == labels[i] and open(path, "rb").read() == files[i].numpy().tobytes()  # bytes unchanged
            if split == "train":  # the decoder against PIL's, on the unpacked file
                assert (decoded[i].int() - TF.pil_to_tensor(Image.open(path)).int()).abs().max() <= 1
    gpu_slot.write_pack(str(tmp_path / "q.npz"), {"train": (files[:2], [0, 1]), "test": (files[2:4], [0, 1])},
                        ["b", "a"])
    with pytest.raises(SystemExit, match="not in sorted order"):
        gpu_slot.read_pack(str(tmp_path / "q.npz"))


def test_the_evidence_plan_fits_the_time_left():
    measured = {"workers": {"moco_co2": 1000, "adco": 1000, "caco": 500},
                "device": {"moco_co2": 2000, "adco": 2000, "caco": 1000}}
    everyone = ("moco", "moco_co2", "adco", "caco")

    def plan(seconds, epochs=None, methods=everyone, rates=measured):
        return gpu_slot.plan(methods, rates, 1000, seconds, 5, epochs, "workers")

    # device: one epoch of the four rows is 0.5 + 0.5 + 0.5 + 1 = 2.5 s; 0.7 x (100 - 4 x 5) = 56 s -> 22 epochs
    p = plan(100)
    assert (p["methods"], p["epochs"], p["augment_on"]) == (list(everyone), 22, "device")
    assert "22 epochs fit" in p["reason"] and "Cut" not in p["reason"]
    # 12 s: with 4 or 3 rows nothing is left after start-up; 2 rows: 0.7 x 2 = 1.4 s, one epoch of 1 s
    p = plan(12)
    assert (p["methods"], p["epochs"]) == (["moco", "moco_co2"], 1) and "Cut: adco, caco" in p["reason"]
    assert plan(1e6)["epochs"] == 200  # never more than the recipe
    assert plan(12, epochs=7)["epochs"] == 7  # --epochs wins
    assert plan(5)["methods"] == [] and "cut: moco, moco_co2, adco, caco" in plan(5)["reason"]
    assert plan(100, rates={"workers": {}, "device": {}})["methods"] == []  # nothing measured: no rows
    p = plan(100, epochs=3, rates={"workers": {}, "device": {}})
    assert (p["methods"], p["epochs"], p["augment_on"]) == (list(everyone), 3, "workers")
    # a path that misses a method's rate is not used
    assert plan(100, rates={"workers": measured["workers"], "device": {"moco_co2": 9e9}})["augment_on"] == "workers"


@pytest.mark.parametrize("obeys", [True, False])
def test_a_child_past_its_time_is_stopped(tmp_path, monkeypatch, obeys):
    """SIGTERM at the end of its time (a script then stops with a checkpoint); SIGKILL if still there after the
    grace period. The slot itself goes on."""
    monkeypatch.setattr(gpu_slot, "STOP_GRACE_S", 1)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT)}
    clock = gpu_slot.Clock(120)
    on_term = "lambda *a: (print('stopping', flush=True), sys.exit(3))" if obeys else "signal.SIG_IGN"
    child = f"import signal, sys, time; signal.signal(signal.SIGTERM, {on_term}); print('up', flush=True); " \
            "time.sleep(60)"
    try:
        code, cut = clock.run_child([sys.executable, "-c", child], 2, str(tmp_path / "out.txt"))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, handler in handlers.items():
            signal.signal(s, handler)
    assert cut == "cut after its 2 s" and clock.child is None and clock.stop_reason is None
    assert (code, open(tmp_path / "out.txt").read()) == ((3, "up\nstopping\n") if obeys else (-9, "up\n"))


def test_the_slot_runs_in_smoke_mode(tmp_path):
    """The whole command on CPU, as a user runs it: every phase done within the budget, the six files written."""
    run_script("benchmarks/gpu_slot.py", "--smoke", "--methods", "moco", "--epochs", "1", "--budget-s", "170",
               "--out-dir", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evidence.json", "evidence.md", "log.txt", "summary.json",
                                                          "summary.md", "test_gpu.txt"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    phases = summary["phases"]
    assert list(phases) == list(gpu_slot.PHASES) and all(p["status"] == "done" for p in phases.values())
    assert summary["elapsed_s"] <= 170 and "stopped" not in summary
    assert phases["data"]["decoded"] == [64, 3, 32, 32] and phases["tests"]["exit_code"] == 0
    assert "skipped" in (tmp_path / "test_gpu.txt").read_text()  # no GPU here
    rows = phases["throughput"]["rows"]
    assert len(rows) == len(gpu_slot.throughput_rows(gpu_slot.sizes(True))) and all(r["img_per_s"] > 0 for r in rows)
    assert [(r["augment_on"], r.get("source")) for r in phases["dataloading"]["rows"]] == [
        ("workers", None), ("device", "jpeg files"), ("device", "memory uint8")]
    plan = phases["evidence"]["plan"]
    assert plan["methods"] == ["moco"] and plan["epochs"] == 1 and "epochs fit" in plan["reason"]
    made = {r["method"]: r for r in json.loads((tmp_path / "evidence.json").read_text())}
    assert set(made) == {"random_init", "moco"} and made["moco"]["epochs"] == 1
    assert all(0 <= r["knn_top1"] <= 100 for r in made.values())
    assert "Left for the next slot" in (tmp_path / "summary.md").read_text()
