"""The project's evidence table in one command: the CIFAR-10 recipe of every method, then its final kNN.

For each method it runs, one after the other, as separate processes of this same Python interpreter from the
repository root:
    moco        moco_co2.py --co2-alpha 0 (MoCo v2)            then linear_eval.py --knn of its last.pt
    moco_co2    moco_co2.py --co2-alpha 1 (MoCo v2 + CO2)      then linear_eval.py --knn of its last.pt
    adco        adco.py                                        then linear_eval.py --knn of its last.pt
    caco        caco.py                                        then linear_eval.py --knn of its last.pt
    random_init linear_eval.py --knn --random-init: the same network untrained, the floor to beat
with the recipe of docs/cifar10.md ("### CIFAR-10 recipe"; tests/test_evidence.py checks that RECIPES below and
that block give the same commands) and a final kNN with k = 200, T = 0.1. It writes <out-dir>/results.json (one
row per method: kNN top-1/top-5, epochs, batch, wall time, device, commit, the exact commands; for AdCo and CaCo
the bank diagnostics of the last training log record) and <out-dir>/results.md (the same rows as a table).

It is made to be cut into pieces. A method whose row already holds the same configuration is skipped; a run
cut off by a time limit (its last.pt exists, its row does not) continues from last.pt (every pre-training run
gets --resume auto); SIGTERM / SIGINT / SIGUSR1 are passed to the running script, which stops after its
current step with a checkpoint, and this process then exits with the script's code. Run the same command again
until it prints the table. Wall times add up over all the calls that made a row.

    # CPU smoke run (about 2 minutes on 2 cores; generated images, so the numbers mean nothing)
    python benchmarks/evidence.py --dataset synthetic --synthetic-images 64 --batch-size 16 --epochs 1 \
        --negatives 32 --knn-every 0 --workers 0 --out-dir runs/evidence-smoke
    # the real table on one GPU (CIFAR-10 under data/); under a time limit, leave the scripts time to stop:
    timeout -s TERM 9m python benchmarks/evidence.py --augment-on device   # repeat until the table is printed

docs/benchmarks.md ("The evidence table") describes the flags, the outputs and the resume rules.
"""
import codecs
import ctypes
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Literal, Optional

import tyro
from rich.console import Console

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

Method = Literal["moco", "moco_co2", "adco", "caco", "random_init"]
METHODS: tuple[Method, ...] = ("moco", "moco_co2", "adco", "caco", "random_init")
NAMES = {"moco": "MoCo v2", "moco_co2": "MoCo v2 + CO2", "adco": "AdCo", "caco": "CaCo", "random_init": "random init"}

# The training flags of each command of docs/cifar10.md's CIFAR-10 recipe, minus those this script sets from its
# own flags (--dataset --data --arch --small-stem --image-size --batch-size --epochs, the queue/bank size,
# --knn-every, --workers, --out-dir). Values stay strings, exactly as printed in the docs.
RECIPES: dict[str, tuple[str, list[str]]] = {
    "moco": ("moco_co2.py", ["--no-blur", "--mlp-dim", "512", "--weight-decay", "5e-4", "--moco-m", "0.99",
                             "--moco-t", "0.1", "--co2-alpha", "0", "--bn-splits", "8"]),
    "moco_co2": ("moco_co2.py", ["--no-blur", "--mlp-dim", "512", "--weight-decay", "5e-4", "--moco-m", "0.99",
                                 "--moco-t", "0.1", "--co2-alpha", "1", "--co2-tau", "0.05", "--bn-splits", "8"]),
    "adco": ("adco.py", ["--no-blur", "--mlp-dim", "512", "--weight-decay", "5e-4", "--moco-m", "0.99",
                         "--mem-lr", "0.75", "--bn-splits", "8"]),
    # CaCo's kNN monitor defaults differ from the others', so its recipe sets them (docs/cifar10.md)
    "caco": ("caco.py", ["--no-blur", "--mlp-dim", "512", "--knn-k", "200", "--knn-t", "0.1",
                         "--knn-train-fraction", "1"]),
}
NEGATIVES_FLAG = {"moco_co2.py": "--queue-size", "adco.py": "--bank-size", "caco.py": "--bank-size"}
KNN_K, KNN_T = 200, 0.1  # the final kNN: InstDisc's weighted vote, as the kNN monitors and docs/cifar10.md
# Bank diagnostics read from the last training record of AdCo's / CaCo's metrics.jsonl: the negatives' share of the
# τ_m-softmax (AdCo: bank_share, CaCo: neg_share), the positive's probability, CaCo's distinct positive columns per
# query, the mean column norm. A method leaves the others' fields None.
BANK_FIELDS = ("bank_share", "neg_share", "pos_prob", "pos_cols", "bank_norm")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # the scripts' own stop signals


@dataclass
class Args:
    """The CIFAR-10 recipe of every method, its final kNN and the random-init baseline: results.json, results.md."""

    dataset: Literal["cifar10", "cifar100", "stl10", "imagefolder", "synthetic"] = "cifar10"
    """dataset of every run (the recipe: cifar10); synthetic: generated images, for a smoke run"""
    data: str = "data"
    """root folder of the dataset, as the scripts' --data (relative to the current folder); unused if synthetic"""
    synthetic_images: int = 256
    """--dataset synthetic: number of training images (a quarter as many val images)"""
    arch: Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"] = "resnet18"
    """backbone of every method and of the random-init baseline"""
    small_stem: bool = True
    """3x3 stride-1 stem without max-pool (the recipe's, for 32 px images)"""
    image_size: int = 32
    """crop size of pre-training, image size of the kNN"""
    batch_size: int = 512
    """global batch of pre-training (the recipe's 512)"""
    epochs: int = 200
    """pre-training epochs (the recipe's 200)"""
    caco_warmup_epochs: int = 10
    """CaCo's linear warm-up epochs (--warmup-epochs; the recipe's 10 of 200); a short run scales it down"""
    negatives: int = 4096
    """K: queue size (MoCo) or bank size (AdCo, CaCo); the recipe's 4096. MoCo needs a multiple of --batch-size"""
    knn_every: int = 10
    """pre-training's kNN monitor every this many epochs (the recipe's 10); 0 = off (the final kNN runs anyway)"""
    knn_train_fraction: float = 1.0
    """final kNN: fraction of the train split used as memory (every 1/f-th image; the recipe's 1)"""
    random_init_seeds: tuple[int, ...] = (0,)
    """seeds of the random-init baseline: one kNN each; its row holds their mean and the per-seed values"""
    workers: int = 15
    """DataLoader workers of every script (the recipe's 15, for a 16-core GPU machine)"""
    augment_on: Literal["workers", "device"] = "workers"
    """pre-training only: augment in the DataLoader workers, or on the GPU (passed to the scripts as is)"""
    methods: tuple[Method, ...] = METHODS
    """which rows to make, in this order"""
    out_dir: str = "runs/evidence"
    """results.json, results.md, logs/, a folder per run: <method> (pre-training), <method>-knn, random_init-s<seed>"""
    preset: Literal["gpu", "cpu"] = "gpu"
    """starting values of every other flag (flags given explicitly win): gpu = docs/cifar10.md's recipe, 200
    epochs on one GPU; cpu = the same recipes on a 2-core CPU budget (about 2 hours, docs/cifar10.md)"""


# --preset: the defaults above are the gpu preset. The cpu preset keeps every method's recipe flags (RECIPES) and
# shrinks the budget: the standard stem (a 16x smaller feature map at 32 px), batch 256, 5 epochs (CaCo's warm-up
# 1 of them), no kNN monitor, a 10,000-image kNN memory, and the random-init floor over 3 seeds.
PRESETS = {"gpu": Args(),
           "cpu": Args(dataset="imagefolder", data="data/cifar10", small_stem=False, batch_size=256, epochs=5,
                       caco_warmup_epochs=1, knn_every=0, knn_train_fraction=0.2, random_init_seeds=(0, 1, 2),
                       workers=1, out_dir="runs/evidence-cpu", preset="cpu")}


# ---------------------------------------------------------------------------------------------------------------
# The commands
# ---------------------------------------------------------------------------------------------------------------
def from_root(path: str) -> str:
    """A path given relative to the current folder, as seen from the repository root (where the scripts run, and
    where main() moves to): relative to the root when inside it (short commands), absolute otherwise."""
    path = os.path.abspath(path)
    inside = os.path.commonpath([path, ROOT]) == ROOT
    return os.path.relpath(path, ROOT) if inside else path


def data_flags(args: Args) -> list[str]:
    if args.dataset == "synthetic":
        return ["--dataset", "synthetic", "--synthetic-images", str(args.synthetic_images)]
    return ["--dataset", args.dataset, "--data", args.data]


def pretrain_command(method: str, args: Args) -> list[str]:
    """The recipe's pre-training command of `method` with this script's sizes, as run (argv)."""
    script, recipe = RECIPES[method]
    warmup = ["--warmup-epochs", str(args.caco_warmup_epochs)] if method == "caco" else []
    return [sys.executable, script, *data_flags(args), "--arch", args.arch,
            "--small-stem" if args.small_stem else "--no-small-stem", "--image-size", str(args.image_size),
            "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), *warmup,
            NEGATIVES_FLAG[script], str(args.negatives), *recipe, "--knn-every", str(args.knn_every),
            "--workers", str(args.workers), "--augment-on", args.augment_on,
            "--out-dir", run_dir(args, method), "--resume", "auto"]


def knn_command(method: str, args: Args, seed: int = 0) -> list[str]:
    """The final kNN of `method`'s last.pt, or (random_init) of the untrained network initialised from `seed`. No
    --resume: a kNN evaluation keeps no state between calls; one cut off simply runs again."""
    if method == "random_init":
        backbone = ["--random-init", "--arch", args.arch, "--small-stem" if args.small_stem else "--no-small-stem",
                    "--seed", str(seed)]
        out = f"{run_dir(args, method)}-s{seed}"
    else:  # arch and stem come from the checkpoint
        backbone = ["--checkpoint", os.path.join(run_dir(args, method), "last.pt")]
        out = run_dir(args, method) + "-knn"
    return [sys.executable, "linear_eval.py", "--knn", *backbone, *data_flags(args),
            "--image-size", str(args.image_size), "--knn-k", str(KNN_K), "--knn-t", str(KNN_T),
            "--knn-train-fraction", str(args.knn_train_fraction), "--workers", str(args.workers), "--out-dir", out]


def run_dir(args: Args, method: str) -> str:
    return os.path.join(args.out_dir, method)


def config_of(method: str, args: Args) -> dict:
    """Everything that can change a row's numbers or its wall time. A row with another configuration is made
    again; a half-trained run of another configuration is refused (it would mix two recipes in one row)."""
    config = {"dataset": args.dataset, "arch": args.arch, "small_stem": args.small_stem,
              "image_size": args.image_size, "workers": args.workers, "knn_k": KNN_K, "knn_t": KNN_T,
              "knn_train_fraction": args.knn_train_fraction}
    config.update({"synthetic_images": args.synthetic_images} if args.dataset == "synthetic"
                  else {"data": args.data})
    if method == "random_init":
        config["seeds"] = list(args.random_init_seeds)
    else:
        script, recipe = RECIPES[method]
        config.update({"script": script, "recipe": " ".join(recipe), "batch_size": args.batch_size,
                       **({"warmup_epochs": args.caco_warmup_epochs} if method == "caco" else {}),
                       "epochs": args.epochs, "negatives": args.negatives, "knn_every": args.knn_every,
                       "augment_on": args.augment_on})
    return config


# ---------------------------------------------------------------------------------------------------------------
# Files: every write is atomic (a temporary file, then os.replace), so a kill never leaves a torn file
# ---------------------------------------------------------------------------------------------------------------
def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str, default):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def read_records(path: str) -> list[dict]:
    """The JSON lines of a metrics.jsonl; a torn last line (a process killed while writing) is skipped."""
    records = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return records


# ---------------------------------------------------------------------------------------------------------------
# Provenance
# ---------------------------------------------------------------------------------------------------------------
def git_commit() -> str:
    """Short HEAD, "+dirty" when tracked files differ from it. --no-optional-locks: a read-only look that never
    takes the index lock (another git command may be running in this tree)."""
    def git(*argv):
        return subprocess.run(["git", "--no-optional-locks", *argv], cwd=ROOT, capture_output=True, text=True)
    head = git("rev-parse", "--short", "HEAD")
    if head.returncode != 0:
        return "unknown (no git)"
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + ("+dirty" if dirty else "")


def device_name() -> str:
    """Where the scripts run: they take the first visible GPU when there is one, else the CPU."""
    import torch  # here, not at the top: a call that only skips finished rows never needs it
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu ({cores} cores)"


# ---------------------------------------------------------------------------------------------------------------
# Running a script: output to the console and a log, stop signals passed on
# ---------------------------------------------------------------------------------------------------------------
class Stopped(Exception):
    """A stop signal ended the call (the running script, if any, stopped with a checkpoint)."""

    def __init__(self, code: int):
        self.code = code


class Failed(Exception):
    """A script exited non-zero on its own."""

    def __init__(self, code: int):
        self.code = code


class Runner:
    """Runs the scripts one at a time. A stop signal to this process is passed to the running script, once per
    signal received: the scripts treat the first as "checkpoint after this step and exit" and a second as "exit
    now", so this process must not add signals of its own. That is also why each script runs in its own
    session: a terminal's Ctrl-C or `timeout` signals the whole foreground process group, and a script in that
    group would get every signal twice (directly and passed on)."""

    def __init__(self, console: Console, log_dir: str):
        self.console, self.log_dir = console, log_dir
        self.child: Optional[subprocess.Popen] = None
        self.signal = 0  # the last stop signal received, 0 if none
        self.forwarded = False  # whether the handler passed it to the running script
        for s in STOP_SIGNALS:
            signal.signal(s, self.handler)

    def handler(self, signum, frame) -> None:
        # Only a flag between two scripts: the bookkeeping of the one that just ended (seconds, row) finishes,
        # and run() refuses to start the next one.
        self.signal = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)
            self.forwarded = True

    def run(self, argv: list[str], log_name: str, on_start, on_exit) -> None:
        """Runs argv from the repository root, its output (stdout and stderr) appended to
        <log-dir>/<log_name>.log and shown on the console as it comes. Calls on_start() once it runs and
        on_exit(wall seconds, exit code) however it ended, then raises Stopped (a stop signal came) or Failed
        (it exited non-zero by itself)."""
        if self.signal:
            raise Stopped(128 + self.signal)
        command = shlex.join(argv)
        os.makedirs(self.log_dir, exist_ok=True)
        log_path = os.path.join(self.log_dir, f"{log_name}.log")
        self.console.print(f"$ {command}", markup=False, highlight=False, style="bold")
        start, self.forwarded = time.perf_counter(), False
        # The script writes into the log file itself, and this process shows what is added to it (rather than
        # a pipe through this process): if this process dies, the script's next print does not fail on a
        # broken pipe, so it can still stop with a checkpoint (see stop_with_parent).
        with open(log_path, "ab") as log:
            log.write(f"# {datetime.now(timezone.utc).isoformat(timespec='seconds')}  {command}\n".encode())
            log.flush()
            offset = log.tell()
            self.child = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
                                          preexec_fn=stop_with_parent)
        if self.signal and not self.forwarded:  # it came while the process was being started (before self.child)
            self.child.send_signal(self.signal)
        on_start()
        decode = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a read can end inside a character
        with open(log_path, "rb") as follow:
            follow.seek(offset)
            while True:
                code = self.child.poll()  # before the read: once it has exited, this read gets all the rest
                sys.stdout.write(decode.decode(follow.read()))
                sys.stdout.flush()
                if code is not None:
                    break
                time.sleep(0.2)
        self.child = None
        if code < 0:  # killed by a signal (e.g. -9): report it as a shell would
            code = 128 - code
        on_exit(time.perf_counter() - start, code)
        if code != 0 and self.signal:
            self.console.print(f"stopped by {signal.Signals(self.signal).name}: {log_name} exited {code}; run "
                               f"the same command again to continue", markup=False)
            raise Stopped(code)
        if code != 0:
            with open(log_path, "rb") as f:
                f.seek(offset)
                last_lines = f.read().decode(errors="replace").splitlines()[-30:]
            self.console.print(f"{log_name} failed (exit code {code}); its last lines ({log_path} has all):",
                               markup=False, style="bold red")
            sys.stdout.write("\n".join(last_lines) + "\n")
            self.console.print(f"command: {command}", markup=False, highlight=False)
            raise Failed(code)


def stop_with_parent() -> None:
    """In the child, before the script starts (Linux): the kernel sends it SIGTERM when this process dies, even
    by SIGKILL, so a script never trains on orphaned, holding its run folder's lock: it stops after the current
    step with a checkpoint, which the next call continues from. Elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))


# ---------------------------------------------------------------------------------------------------------------
# One row: pre-training (continued if cut off), then the final kNN
# ---------------------------------------------------------------------------------------------------------------
class EvidenceError(Exception):
    """A refusal or an inconsistency, printed as one line (exit code 2, as the scripts' UserError)."""


def state_path(args: Args, method: str) -> str:
    """<out-dir>/<method>.state.json: the configuration of the run under way, and every script process that
    worked on it (command, wall seconds, exit code), with the devices and commits of those calls: a row counts
    them all."""
    return os.path.join(args.out_dir, f"{method}.state.json")


def refuse_other_configuration(method: str, args: Args) -> None:
    """Before anything runs: a pre-training run folder holding a checkpoint of another configuration would be
    continued by --resume auto (the scripts allow e.g. more --epochs) into a row that mixes two recipes."""
    state, config = read_json(state_path(args, method), None), config_of(method, args)
    last = os.path.join(run_dir(args, method), "last.pt")
    if state is not None and state["config"] != config and os.path.exists(last):
        old = state["config"]
        changed = ", ".join(f"{k} {old.get(k)!r} -> {config.get(k)!r}" for k in sorted(set(old) | set(config))
                            if old.get(k) != config.get(k))
        raise EvidenceError(f"{last} belongs to a run of another configuration ({changed}): use another --out-dir, "
                            f"or delete {run_dir(args, method)} and {state_path(args, method)} to start it again")


def make_row(method: str, args: Args, runner: Runner, console: Console) -> dict:
    """Pre-trains `method` (or continues its cut-off run), runs its final kNN, and returns its row."""
    config = config_of(method, args)
    path = state_path(args, method)
    state = read_json(path, None)
    if state is None or state["config"] != config:  # (another configuration without a checkpoint: start over)
        state = {"config": config, "commands": [], "devices": [], "commits": [], "processes": [], "wall_s": 0.0}
    for seen, value in ((state["devices"], device_name()), (state["commits"], git_commit())):
        if value not in seen:
            seen.append(value)

    def run(argv: list[str], log_name: str) -> None:
        command = shlex.join(argv)
        if command not in state["commands"]:
            state["commands"].append(command)

        # Each process is recorded when it starts, and completed when it ends: one that never ends here (this
        # process killed by SIGKILL) keeps "seconds": null, and the row's wall time is then a lower bound.
        process = {"command": state["commands"].index(command), "seconds": None, "exit_code": None}

        def on_start() -> None:
            state["processes"].append(process)
            write_atomic(path, json.dumps(state, indent=2) + "\n")

        def on_exit(seconds: float, code: int) -> None:
            process.update(seconds=seconds, exit_code=code)
            state["wall_s"] = sum(p["seconds"] or 0.0 for p in state["processes"])
            write_atomic(path, json.dumps(state, indent=2) + "\n")

        runner.run(argv, log_name, on_start, on_exit)

    row = {"method": method, "name": NAMES[method]}
    if method == "random_init":
        row.update(epochs=0, batch=None)
    else:
        last = os.path.join(run_dir(args, method), "last.pt")
        what = f"continuing {last} (--resume auto)" if os.path.exists(last) else f"pre-training, --epochs {args.epochs}"
        console.print(f"== {NAMES[method]}: {what}", markup=False, style="bold")
        run(pretrain_command(method, args), method)
        # The last training record (kNN-monitor records have no loss). Its epoch must be the last: a checkpoint
        # trained longer (by hand) makes the script say "nothing to do" and exit 0. AdCo's and CaCo's bank
        # diagnostics come from it.
        records = [r for r in read_records(os.path.join(run_dir(args, method), "metrics.jsonl")) if "loss" in r]
        if not records or records[-1]["epoch"] != args.epochs - 1:
            raise EvidenceError(f"{last}: its last training record is of epoch "
                                f"{records[-1]['epoch'] if records else None}, not {args.epochs - 1}")
        row.update(epochs=args.epochs, batch=args.batch_size)
        if method in ("adco", "caco"):
            row.update({name: records[-1].get(name) for name in BANK_FIELDS})
    seeds = args.random_init_seeds if method == "random_init" else (0,)
    results = []  # the (top-1, top-5) of each seed's kNN
    for seed in seeds:
        console.print(f"== {NAMES[method]}: final kNN (k = {KNN_K}, T = {KNN_T})"
                      + (f", seed {seed}" if method == "random_init" else ""), markup=False, style="bold")
        argv = knn_command(method, args, seed)
        run(argv, f"{method}-knn" if method != "random_init" else f"{method}-s{seed}")
        knn_dir = argv[argv.index("--out-dir") + 1]
        # linear_eval.py appends its result, so the last kNN record is this call's
        knn = [r for r in read_records(os.path.join(knn_dir, "metrics.jsonl")) if r.get("mode") == "knn"]
        if not knn or not all(math.isfinite(knn[-1][k]) for k in ("knn_top1", "knn_top5")):
            raise EvidenceError(f"{knn_dir}/metrics.jsonl holds no finite kNN result after a successful run")
        results.append((knn[-1]["knn_top1"], knn[-1]["knn_top5"]))
    if method == "random_init":  # the floor: the mean over seeds, and each seed's value for its spread
        row.update(knn_top1_seeds=[top1 for top1, _ in results], seeds=list(seeds))
    row.update(knn_top1=sum(r[0] for r in results) / len(results),
               knn_top5=sum(r[1] for r in results) / len(results), wall_s=state["wall_s"],
               wall_s_complete=all(p["seconds"] is not None for p in state["processes"]),
               device=", ".join(state["devices"]), commit=", ".join(state["commits"]), command=state["commands"],
               config=config, finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return row


# ---------------------------------------------------------------------------------------------------------------
# results.md
# ---------------------------------------------------------------------------------------------------------------
def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


def results_markdown(rows: list[dict]) -> str:
    """The rows as a table in the style of docs/cifar10.md's "CIFAR-10 kNN (ours)", then their commands."""
    def number(value, spec):
        return "–" if value is None else format(value, spec)

    lines = ["# Evidence table (benchmarks/evidence.py)", "",
             f"Final kNN (k = {KNN_K}, T = {KNN_T}) of each method's backbone: pooled features, the train split as "
             "memory, the val/test split as queries. Bank diagnostics: the last training log record of the run "
             "(bank_share / neg_share: the negatives' share of the τ_m-softmax, AdCo / CaCo; pos_prob: the "
             "positive's probability; pos_cols: CaCo's distinct positive columns per query; bank_norm: the mean "
             "bank column norm). Random init: the mean over its seeds. Wall time: every process of the row, over "
             "all calls (≥: a call was killed without a chance to count its running process). "
             "Written by benchmarks/evidence.py; every number comes from the commands below the table.", "",
             "| method | data | network | epochs | batch | kNN top-1 | vs random init | kNN top-5 "
             "| bank diagnostics | wall time | device | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    floor = next((r for r in rows if r["method"] == "random_init"), None)
    for r in rows:
        c = r["config"]
        data = f"synthetic ({c['synthetic_images']} images)" if c["dataset"] == "synthetic" else \
            f"{c['dataset']} (`{c['data']}`)"
        network = f"{c['arch']}{', small stem' if c['small_stem'] else ''}, {c['image_size']} px"
        bank = ", ".join(f"{k} {r[k]:.3g}" for k in BANK_FIELDS if r.get(k) is not None) or "–"
        wall = ("" if r["wall_s_complete"] else "≥ ") + duration(r["wall_s"])
        if r is floor:
            versus = "seeds " + " / ".join(f"{v:.2f}" for v in r["knn_top1_seeds"])
        else:
            versus = "–" if floor is None else f"{r['knn_top1'] - floor['knn_top1']:+.2f}"
        lines.append(f"| {r['name']} | {data} | {network} | {r['epochs']} | {number(r['batch'], 'd')} "
                     f"| {r['knn_top1']:.2f} | {versus} | {r['knn_top5']:.2f} | {bank} | {wall} "
                     f"| {r['device']} | {r['commit']} |")
    if floor is not None and len(floor["knn_top1_seeds"]) > 1:
        seeds = floor["knn_top1_seeds"]
        lines += ["", f"Random init: mean {floor['knn_top1']:.2f} over {len(seeds)} seeds, spread (max − min) "
                      f"{max(seeds) - min(seeds):.2f}; a margin within the spread is not evidence of learning."]
    lines += ["", "```bash"]
    for r in rows:
        lines += [f"# {r['name']}", *r["command"]]
    return "\n".join(lines + ["```", ""])


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------
def main(args: Args) -> list[dict]:
    """Makes the missing rows of --methods; returns all rows of <out-dir>/results.json."""
    console = Console(soft_wrap=True, highlight=False)
    # the scripts run from the repository root; so does everything here, with the paths seen from there
    args = replace(args, data=from_root(args.data), out_dir=from_root(args.out_dir))
    os.chdir(ROOT)
    results, table = os.path.join(args.out_dir, "results.json"), os.path.join(args.out_dir, "results.md")
    rows = read_json(results, [])
    todo = []
    for method in dict.fromkeys(args.methods):  # in the order given, once each
        done = next((r for r in rows if r["method"] == method), None)
        if done is not None and done["config"] == config_of(method, args):
            console.print(f"{NAMES[method]}: kept (results.json holds its row, same configuration)")
        else:
            refuse_other_configuration(method, args)
            todo.append(method)
    runner = Runner(console, os.path.join(args.out_dir, "logs"))
    for method in todo:
        row = make_row(method, args, runner, console)
        rows = sorted([r for r in rows if r["method"] != method] + [row], key=lambda r: METHODS.index(r["method"]))
        os.makedirs(args.out_dir, exist_ok=True)
        write_atomic(results, json.dumps(rows, indent=2) + "\n")
        write_atomic(table, results_markdown(rows))
        console.print(f"{NAMES[method]}: kNN top-1 {row['knn_top1']:.2f}, top-5 {row['knn_top5']:.2f} "
                      f"({duration(row['wall_s'])}); row written to {results}")
    if rows:
        text = results_markdown(rows)
        if not os.path.exists(table) or open(table).read() != text:  # e.g. deleted by hand; else left untouched
            write_atomic(table, text)
        console.print(f"\n{table}:\n")
        console.print(text, markup=False)
    return rows


def parse_args(argv: list[str]) -> Args:
    """tyro's parse, with the defaults of the --preset given (else gpu)."""
    name = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--preset"), None)
    name = next((a.split("=", 1)[1] for a in argv if a.startswith("--preset=")), name)
    return tyro.cli(Args, args=argv, default=PRESETS.get(name, PRESETS["gpu"]))  # tyro refuses an unknown name


if __name__ == "__main__":
    try:
        main(parse_args(sys.argv[1:]))
    except (Stopped, Failed) as e:  # rows already made stay in results.json
        sys.exit(e.code)
    except EvidenceError as e:
        Console(stderr=True, soft_wrap=True).print(f"error: {e}", markup=False, highlight=False)
        sys.exit(2)
