"""Golden runs: record tiny CPU runs of every script, then compare two recordings bitwise.

    python tests/golden.py record OUTDIR    # every run below into OUTDIR/<run>/ (about 5 minutes on 2 cores)
    python tests/golden.py compare A B      # one verdict line per run; exit 1 on any difference

Use it around a refactor that must not change a number: record from the unmodified code, edit, record again,
compare. Every tensor of every checkpoint must be torch.equal; every other value ==, except the few that name
the run's own folder or time. metrics.jsonl must hold the same keys and values (times excepted). Not a pytest
test (its name does not start with test_): it is run by hand.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "synthetic", "--synthetic-images", "64", "--arch", "resnet18", "--image-size", "32",
        "--batch-size", "16", "--workers", "0", "--seed", "0"]
TWO = ["--epochs", "2"]

# run name -> list of commands (a resumed run is two commands into the same folder); "{out}" is the run folder,
# "{golden}" the recording's root (the linear-eval runs read a pre-training checkpoint recorded before them).
RUNS = {
    "moco": [["moco_co2.py", *TINY, *TWO, "--queue-size", "64", "--co2-alpha", "0"]],  # plain MoCo v2
    "moco_co2": [["moco_co2.py", *TINY, *TWO, "--queue-size", "64"]],  # CO2 is on by default (alpha 1)
    "moco_resumed": [["moco_co2.py", *TINY, *TWO, "--queue-size", "64", "--co2-alpha", "1.0", "--stop-at-step", "5"],
                     ["moco_co2.py", *TINY, *TWO, "--queue-size", "64", "--co2-alpha", "1.0", "--resume", "auto"]],
    "moco_device": [["moco_co2.py", *TINY, *TWO, "--queue-size", "64", "--augment-on", "device"]],
    "adco": [["adco.py", *TINY, *TWO, "--bank-size", "64"]],
    "adco_sym": [["adco.py", *TINY, *TWO, "--bank-size", "64", "--sym"]],
    "adco_multicrop": [["adco.py", *TINY, *TWO, "--bank-size", "64", "--multi-crop"]],
    "adco_resumed": [["adco.py", *TINY, *TWO, "--bank-size", "64", "--stop-at-step", "5"],
                     ["adco.py", *TINY, *TWO, "--bank-size", "64", "--resume", "auto"]],
    "adco_device": [["adco.py", *TINY, *TWO, "--bank-size", "64", "--augment-on", "device"]],
    "caco": [["caco.py", *TINY, *TWO, "--bank-size", "64"]],
    "caco_multicrop": [["caco.py", *TINY, *TWO, "--bank-size", "64", "--multi-crop"]],
    "caco_resumed": [["caco.py", *TINY, *TWO, "--bank-size", "64", "--stop-at-step", "5"],
                     ["caco.py", *TINY, *TWO, "--bank-size", "64", "--resume", "auto"]],
    "caco_device": [["caco.py", *TINY, *TWO, "--bank-size", "64", "--augment-on", "device"]],
    "probe": [["linear_eval.py", *TINY, *TWO, "--checkpoint", "{golden}/adco/last.pt"]],
    "probe_resumed": [["linear_eval.py", *TINY, *TWO, "--checkpoint", "{golden}/adco/last.pt", "--stop-at-epoch", "1"],
                      ["linear_eval.py", *TINY, *TWO, "--checkpoint", "{golden}/adco/last.pt", "--resume", "auto"]],
    "finetune": [["linear_eval.py", *TINY, "--epochs", "1", "--checkpoint", "{golden}/moco_co2/last.pt",
                  "--finetune", "--label-fraction", "0.5"]],
    "knn": [["linear_eval.py", *TINY, "--knn", "--checkpoint", "{golden}/caco/last.pt"]],
}
# Values that name the run's folder, a time or a host, not a number the method computes.
IGNORED = {"out_dir", "checkpoint", "resume", "img_per_s", "time", "elapsed", "seconds", "path", "host", "date"}


def record(golden: Path) -> None:
    golden.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RANK", None)
    for name, commands in RUNS.items():
        out = golden / name
        for command in commands:
            args = [a.format(out=out, golden=golden) for a in command]
            proc = subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:], "--out-dir", str(out)],
                                  cwd=ROOT, env=env, capture_output=True, text=True)
            (out / "stdout.txt").parent.mkdir(parents=True, exist_ok=True)
            with open(out / "stdout.txt", "a") as f:
                f.write(proc.stdout + proc.stderr)
            if proc.returncode != 0:
                sys.exit(f"{name}: {' '.join(args)} exited {proc.returncode}\n{proc.stderr[-3000:]}")
        print(f"recorded {name}", flush=True)


def differences(a, b, where: str) -> list:
    """Every place where two loaded objects differ (tensors bitwise, other values ==), ignoring IGNORED keys."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
        return [] if same else [f"{where}: tensor differs"]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(map(str, set(a) ^ set(b)))} in one only"]
        return [d for k in a if k not in IGNORED for d in differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            return [f"{where}: {type(a).__name__}[{len(a)}] vs {type(b).__name__}[{len(b)}]"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b or (a != a and b != b) else [f"{where}: {a!r} != {b!r}"]


def metrics(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def compare(a: Path, b: Path) -> int:
    failed = 0
    for name in RUNS:
        problems = [] if (a / name).is_dir() and (b / name).is_dir() else ["the run is missing in one recording"]
        files = sorted({p.relative_to(a / name) for p in (a / name).rglob("*") if p.is_file()}
                       | {p.relative_to(b / name) for p in (b / name).rglob("*") if p.is_file()})
        for rel in files:
            fa, fb = a / name / rel, b / name / rel
            if not (fa.exists() and fb.exists()):
                problems.append(f"{rel}: in one recording only")
            elif rel.suffix in (".pt", ".pth"):
                problems += differences(torch.load(fa, map_location="cpu", weights_only=False),
                                        torch.load(fb, map_location="cpu", weights_only=False), str(rel))
            elif rel.suffix == ".jsonl":
                problems += differences(metrics(fa), metrics(fb), str(rel))
            elif rel.suffix == ".json":
                problems += differences(json.loads(fa.read_text()), json.loads(fb.read_text()), str(rel))
        checked = sum(1 for rel in files if rel.suffix in (".pt", ".pth", ".jsonl", ".json"))
        verdict = "EQUAL" if not problems else "DIFFERS: " + "; ".join(problems[:5])
        print(f"{name:16s} {checked} files  {verdict}")
        failed += bool(problems)
    print("all runs bitwise equal" if not failed else f"{failed} run(s) differ")
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "record":
        record(Path(sys.argv[2]).resolve())
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        sys.exit(__doc__)
