"""benchmarks/evidence.py: its recipes are docs/cifar10.md's commands; a tiny CPU run makes all five rows, continues
a run cut off by SIGTERM, skips finished rows on the next call, keeps its rows when a script fails, and refuses to
continue a run of another configuration."""
import json
import math
import shutil
import signal
import subprocess
import sys
import time

import pytest

import caco
import linear_eval
from conftest import ROOT, _env, load
from test_cifar_recipe import readme_recipe_commands

sys.path.insert(0, str(ROOT / "benchmarks"))
import evidence  # noqa: E402

# The smoke settings, plus --knn-every 0 (no kNN monitor) and the standard stem (a 4x smaller feature map than
# the recipe's small stem at 32 px) for speed: the file stays near 90 s on 2 cores.
SMOKE = ["--dataset", "synthetic", "--synthetic-images", "64", "--arch", "resnet18", "--image-size", "32",
         "--batch-size", "16", "--epochs", "1", "--workers", "0", "--negatives", "32", "--knn-every", "0",
         "--no-small-stem", "--random-init-seeds", "0", "1"]


def options(tokens: list[str]) -> dict:
    """{--flag: value, --switch: None} of a command line's arguments; a flag given twice fails."""
    out, i = {}, 0
    while i < len(tokens):
        flag = tokens[i]
        assert flag.startswith("--") and flag not in out, (flag, tokens)
        value = tokens[i + 1] if i + 1 < len(tokens) and not tokens[i + 1].startswith("--") else None
        out[flag] = value
        i += 1 if value is None else 2
    return out


def docs_method(tokens: list[str]) -> str:
    """Which row a pre-training command of docs/cifar10.md makes."""
    if tokens[1] == "moco_co2.py":
        return "moco" if options(tokens[2:])["--co2-alpha"] == "0" else "moco_co2"
    return tokens[1].removesuffix(".py")


def test_recipes_equal_the_docs_commands():
    """With its defaults, evidence.py runs docs/cifar10.md's commands: same script, same flags and values (only
    where they write differs, and --resume auto / --augment-on are added), so neither can drift alone."""
    defaults = evidence.Args()
    docs = readme_recipe_commands()
    pretrain = {docs_method(c): c for c in docs if c[1] != "linear_eval.py"}
    assert sorted(pretrain) == sorted(evidence.RECIPES) and len(pretrain) == 4
    for method, tokens in pretrain.items():
        ours = evidence.pretrain_command(method, defaults)
        assert ours[0] == sys.executable and ours[1] == tokens[1], method
        mine = options(ours[2:])
        assert (mine.pop("--out-dir"), mine.pop("--resume"), mine.pop("--augment-on")) == \
            (f"runs/evidence/{method}", "auto", "workers")
        theirs = options(tokens[2:])
        theirs.pop("--out-dir")
        if method == "caco":  # the warm-up is a flag of evidence.py (a short run scales it); the docs use the default
            theirs["--warmup-epochs"] = str(caco.Args().warmup_epochs)
        assert mine == theirs, method
    # the final kNN and the random-init baseline: the docs' flags, plus k and T written out (linear_eval's
    # defaults, which the docs leave implicit) and --workers
    knn = [c for c in docs if c[1] == "linear_eval.py"]
    assert len(knn) == 2
    implicit = {"--knn-k": str(linear_eval.Args().knn_k), "--knn-t": str(linear_eval.Args().knn_t),
                "--knn-train-fraction": str(linear_eval.Args().knn_train_fraction), "--workers": str(defaults.workers)}
    for tokens in knn:
        method = "random_init" if "--random-init" in tokens else "moco"
        ours = evidence.knn_command(method, defaults)
        if method == "random_init":
            implicit["--seed"] = str(linear_eval.Args().seed)
        assert ours[1] == "linear_eval.py"
        mine, theirs = options(ours[2:]), options(tokens[2:])
        for flag in ("--out-dir", "--checkpoint"):  # where it reads and writes
            assert (flag in mine) == (flag in theirs)
            mine.pop(flag, None)
            theirs.pop(flag, None)
        assert mine == {**theirs, **implicit}, method
    assert evidence.knn_command("moco", defaults)[3:5] == ["--checkpoint", "runs/evidence/moco/last.pt"]


def start(out, *extra, log):
    """evidence.py with the smoke settings as a subprocess, its output in the file `log` (a pipe could fill up
    while the test waits)."""
    return subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "evidence.py"), *SMOKE, "--out-dir",
                             str(out), *extra], cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)


def run(out, *extra, log_path):
    with open(log_path, "w") as log:
        proc = start(out, *extra, log=log)
        code = proc.wait(timeout=600)
    return code, log_path.read_text()


@pytest.fixture(scope="module")
def cut_then_finished(tmp_path_factory):
    """Call 1 gets SIGTERM while MoCo (the first method) trains; call 2, the same command, finishes every row.
    Returns the out-dir and what call 1 left behind."""
    out, calls = tmp_path_factory.mktemp("evidence"), tmp_path_factory.mktemp("evidence-calls")
    with open(calls / "call1.txt", "w") as log:
        first = start(out, log=log)
        # args.json is written once the script's stop handler is installed and training is about to start
        args_json, deadline = out / "moco" / "args.json", time.monotonic() + 120
        while not args_json.exists():
            assert first.poll() is None and time.monotonic() < deadline, (calls / "call1.txt").read_text()
            time.sleep(0.05)
        first.send_signal(signal.SIGTERM)
        code = first.wait(timeout=120)
    cut = {"code": code, "output": (calls / "call1.txt").read_text(),
           "step": load(out / "moco" / "last.pt")["step"], "results": (out / "results.json").exists(),
           "state": json.loads((out / "moco.state.json").read_text())}
    code, output = run(out, log_path=calls / "call2.txt")
    assert code == 0, output[-4000:]
    return out, cut


def test_a_run_cut_off_by_sigterm_continues_with_resume_auto(cut_then_finished):
    out, cut = cut_then_finished
    # call 1: the signal reached the script, which stopped mid-epoch with a checkpoint; evidence.py exited with
    # the script's code (128 + SIGTERM) and wrote no row
    assert cut["code"] == 128 + signal.SIGTERM, cut["output"][-4000:]
    assert "stopped by SIGTERM" in cut["output"] and 1 <= cut["step"] < 4  # 64 images / 16 = 4 steps
    assert not cut["results"] and [p["exit_code"] for p in cut["state"]["processes"]] == [128 + signal.SIGTERM]
    # call 2 continued it from that step, and the row counts the time of both calls
    log = (out / "logs" / "moco.log").read_text()
    assert sum(line.startswith("# ") for line in log.splitlines()) == 2 and "resumed from" in log  # two calls
    records = [json.loads(line) for line in (out / "moco" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [cut["step"], 4]  # the stop's record, then the end's
    (row,) = [r for r in json.loads((out / "results.json").read_text()) if r["method"] == "moco"]
    processes = json.loads((out / "moco.state.json").read_text())["processes"]
    # the cut training process, the continued one (same command), the kNN: all three in the row's wall time
    assert processes[0] == cut["state"]["processes"][0] and [p["command"] for p in processes] == [0, 0, 1]
    assert [p["exit_code"] for p in processes[1:]] == [0, 0] and all(p["seconds"] > 0 for p in processes)
    assert row["wall_s"] == pytest.approx(sum(p["seconds"] for p in processes))
    assert row["command"] == cut["state"]["commands"] + [row["command"][-1]]  # training, then kNN
    assert load(out / "moco" / "last.pt")["next_epoch"] == 1


def test_every_row_and_the_table(cut_then_finished):
    out, _ = cut_then_finished
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["moco", "moco_co2", "adco", "caco", "random_init"]
    for r in rows:
        assert all(math.isfinite(r[k]) and 0 <= r[k] <= 100 for k in ("knn_top1", "knn_top5")), r
        assert r["knn_top1"] <= r["knn_top5"] and r["wall_s"] > 0 and r["wall_s_complete"]
        assert r["device"].startswith("cpu (")
        assert r["commit"] and all(c.startswith(sys.executable) for c in r["command"])
        assert (r["epochs"], r["batch"]) == ((0, None) if r["method"] == "random_init" else (1, 16))
        assert "--augment-on workers" in r["command"][0] or r["method"] == "random_init"
    adco_row, caco_row, floor = rows[2], rows[3], rows[4]
    assert all(math.isfinite(adco_row[k]) for k in ("bank_share", "pos_prob", "bank_norm"))
    assert all(math.isfinite(caco_row[k]) for k in ("neg_share", "pos_prob", "pos_cols", "bank_norm"))
    assert adco_row["neg_share"] is None and caco_row["bank_share"] is None and "bank_share" not in rows[0]
    # the floor: one kNN per seed (each seed's own run folder and network), their mean in knn_top1
    assert floor["seeds"] == [0, 1] and len(floor["knn_top1_seeds"]) == 2
    assert floor["knn_top1"] == pytest.approx(sum(floor["knn_top1_seeds"]) / 2)
    assert [("--seed 0" in c, "--seed 1" in c) for c in floor["command"]] == [(True, False), (False, True)]
    assert all((out / f"random_init-s{s}" / "metrics.jsonl").exists() for s in (0, 1))
    table = (out / "results.md").read_text()
    assert "| method | data | network | epochs | batch | kNN top-1 | vs random init | kNN top-5 |" in table
    for r in rows:
        assert f"| {r['name']} | synthetic (64 images) |" in table and f"| {r['knn_top1']:.2f} |" in table
        assert all(c in table for c in r["command"])
        margin = f"{r['knn_top1'] - floor['knn_top1']:+.2f}" if r is not floor else \
            "seeds " + " / ".join(f"{v:.2f}" for v in floor["knn_top1_seeds"])
        assert f"| {r['knn_top1']:.2f} | {margin} |" in table, r["method"]
    spread = max(floor["knn_top1_seeds"]) - min(floor["knn_top1_seeds"])
    assert f"mean {floor['knn_top1']:.2f} over 2 seeds, spread (max − min) {spread:.2f}" in table


def test_a_second_call_skips_every_row(cut_then_finished, tmp_path):
    out, _ = cut_then_finished
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    rows = (out / "results.json").read_text()
    started = time.monotonic()
    code, output = run(out, log_path=tmp_path / "call3.txt")
    assert code == 0 and output.count("kept (results.json holds its row") == 5, output[-4000:]
    assert time.monotonic() - started < 30  # no script ran (each takes seconds to start)
    assert (out / "results.json").read_text() == rows
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert after == before  # no checkpoint, log, state or result file touched


def test_a_failing_script_stops_the_call_and_keeps_the_rows(cut_then_finished, tmp_path):
    out, _ = cut_then_finished
    shutil.copy(out / "results.json", tmp_path / "results.json")
    rows = (tmp_path / "results.json").read_text()
    # MoCo's queue must be a multiple of the batch: moco_co2.py refuses --queue-size 24 with batch 16
    code, output = run(tmp_path, "--methods", "moco", "--negatives", "24", log_path=tmp_path / "call.txt")
    assert code == 2, output[-4000:]
    assert "moco failed (exit code 2)" in output and "must be a multiple" in output
    assert "command: " + sys.executable in output and "--queue-size 24" in output
    assert (tmp_path / "results.json").read_text() == rows


def test_a_run_of_another_configuration_is_not_continued(cut_then_finished, tmp_path):
    out, _ = cut_then_finished
    code, output = run(out, "--methods", "moco", "--epochs", "2", log_path=tmp_path / "other.txt")
    assert code == 2 and "belongs to a run of another configuration (epochs 1 -> 2)" in output, output[-4000:]
    assert json.loads((out / "results.json").read_text())[0]["epochs"] == 1


def test_presets_set_defaults_and_explicit_flags_win():
    """--preset cpu: the budget of docs/cifar10.md's CPU table; a flag given with it still wins; no --preset is the
    gpu recipe (the dataclass defaults, which test_recipes_equal_the_docs_commands ties to the docs)."""
    assert evidence.parse_args([]) == evidence.Args()
    cpu = evidence.parse_args(["--preset", "cpu"])
    assert (cpu.dataset, cpu.small_stem, cpu.batch_size, cpu.epochs, cpu.knn_train_fraction) == \
        ("imagefolder", False, 256, 5, 0.2)
    assert cpu.random_init_seeds == (0, 1, 2) and cpu.caco_warmup_epochs == 1 and cpu.preset == "cpu"
    assert evidence.parse_args(["--epochs", "3", "--preset=cpu"]).epochs == 3
    command = evidence.pretrain_command("caco", cpu)
    assert command[command.index("--warmup-epochs") + 1] == "1" and "--no-small-stem" in command
    assert "--warmup-epochs" not in evidence.pretrain_command("moco", cpu)
    with pytest.raises(SystemExit):
        evidence.parse_args(["--preset", "tpu"])
