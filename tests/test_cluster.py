"""Faults common on clusters, met as a user meets them: preemption signals (real subprocesses, real signals),
srun-style launch, a full disk, two jobs on one folder, a torn metrics line, nonsense numbers.

The plumbing under test is the fenced blocks, identical in every script (tests/test_shared_blocks.py), so most
tests drive moco_co2.py; the resume-after-signal test runs all three methods."""
import fcntl
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import caco
import moco_co2
from common import UserError
from conftest import ROOT, TINY, _env, assert_state_equal, final_state, free_port, load, run_script

SIZES = {"moco_co2.py": ["--queue-size", "64"], "adco.py": ["--bank-size", "64"], "caco.py": ["--bank-size", "64"]}


def start(script, *args, env=None, torchrun=False):
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else \
        [sys.executable]
    return subprocess.Popen([*prefix, str(ROOT / script), *map(str, args)], cwd=ROOT, env=_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_line(proc, prefix: str) -> list:
    """Reads the process's stdout until a line starts with `prefix`; returns the lines read."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"no line starting with {prefix!r}:\n{''.join(lines)}\n{proc.stderr.read()[-3000:]}")


def metrics(out):
    return [{k: v for k, v in json.loads(line).items() if k != "img_per_s"} for line in open(out / "metrics.jsonl")]


@pytest.mark.parametrize("script", ["moco_co2.py"])  # the stop is fenced plumbing, the same in adco.py / caco.py
def test_sigterm_saves_the_current_step_and_resume_is_bitwise(tmp_path, script):
    """SIGTERM in mid-epoch: one line, exit 128 + 15, last.pt at that step. A torn last metrics line (a crash in
    mid-write) is dropped on resume with a message. The resumed run equals an uninterrupted one bitwise. (Each
    method's own state across a mid-epoch checkpoint is tested by its --stop-at-step resume test.)"""
    args = [*TINY, *SIZES[script], "--epochs", "1", "--log-every", "1"]
    run_script(script, *args, "--out-dir", tmp_path / "whole")
    proc = start(script, *args, "--out-dir", tmp_path / "cut")
    wait_for_line(proc, "epoch 0 [2/4]")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM at step" in out and "--resume auto" in out and "Traceback" not in err
    stopped = load(tmp_path / "cut" / "last.pt")
    assert 2 <= stopped["step"] <= 4 and not list((tmp_path / "cut").glob("*.tmp*"))
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 0, "step": 9, "lo')  # what a crash in mid-write leaves
    proc = run_script(script, *args, "--out-dir", tmp_path / "cut", "--resume", "auto")
    assert "dropped 1 incomplete line" in proc.stdout
    assert_state_equal(final_state(tmp_path / "whole"), final_state(tmp_path / "cut"))
    assert metrics(tmp_path / "whole") == metrics(tmp_path / "cut")


def test_sigterm_stops_linear_eval_mid_epoch_and_resume_is_bitwise(tmp_path):
    """linear_eval.py too: a mid-epoch checkpoint on SIGTERM, resumed bitwise (frozen backbone, fc, optimizer)."""
    run_script("moco_co2.py", *TINY, "--queue-size", "64", "--epochs", "1", "--out-dir", tmp_path / "pre")
    args = ["--checkpoint", tmp_path / "pre" / "last.pt", *TINY, "--epochs", "2", "--log-every", "1"]
    run_script("linear_eval.py", *args, "--out-dir", tmp_path / "whole")
    proc = start("linear_eval.py", *args, "--out-dir", tmp_path / "cut")
    wait_for_line(proc, "epoch 0 [2/4]")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in out, err[-2000:]
    assert 2 <= load(tmp_path / "cut" / "last.pt")["step"] < 8
    run_script("linear_eval.py", *args, "--out-dir", tmp_path / "cut", "--resume", "auto")
    assert_state_equal(final_state(tmp_path / "whole"), final_state(tmp_path / "cut"))


def test_kill_9_leaves_no_lock_behind(tmp_path):
    """The out-dir lock is an OS lock: a job killed with SIGKILL holds nothing, so --resume auto continues."""
    args = [*TINY, "--queue-size", "64", "--epochs", "2", "--log-every", "1", "--ckpt-every-steps", "1"]
    proc = start("moco_co2.py", *args, "--out-dir", tmp_path / "run")
    wait_for_line(proc, "epoch 0 [3/4]")
    proc.kill()
    proc.communicate(timeout=60)
    run_script("moco_co2.py", *args, "--out-dir", tmp_path / "run", "--resume", "auto")
    assert load(tmp_path / "run" / "last.pt")["next_epoch"] == 2


def test_a_signal_to_one_torchrun_rank_stops_every_rank_at_the_same_step(tmp_path):
    """SIGUSR1 to rank 1 only: rank 0 (which prints) stops too, at the same step, and last.pt holds that step."""
    proc = start("moco_co2.py", *TINY, "--queue-size", "64", "--epochs", "4", "--log-every", "1",
                 "--out-dir", tmp_path / "run", torchrun=True)
    wait_for_line(proc, "epoch 0 [2/4]")
    children = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()
    def rank(pid):
        env = dict(v.split("=", 1) for v in open(f"/proc/{pid}/environ").read().split("\0") if "=" in v)
        return env.get("RANK")
    rank1 = [pid for pid in children if rank(pid) == "1"]
    assert len(children) == 2 and len(rank1) == 1
    os.kill(int(rank1[0]), signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "stopped by SIGUSR1 at step" in out, err[-3000:]
    step = int(out.split("stopped by SIGUSR1 at step ")[1].split(";")[0])
    ckpt = load(tmp_path / "run" / "last.pt")
    assert ckpt["step"] == step and len(ckpt["rng"]) == 2 and step < 4 * 2


def test_first_host_of_a_slurm_node_list():
    assert moco_co2.first_host("gpu[07-09,12],cpu1") == "gpu07"
    assert moco_co2.first_host("node1,node2") == "node1"
    assert moco_co2.first_host("n[1-2]-ib") == "n1-ib"
    assert moco_co2.first_host("solo") == "solo"


def test_srun_style_launch_trains_as_one_job(tmp_path):
    """Two processes with SLURM's variables and no RANK (as `srun --ntasks 2 python moco_co2.py` starts them):
    one process group of 2, one checkpoint with both ranks' RNG, only rank 0 prints. MASTER_ADDR comes from
    the node list (127.0.0.[1-2] -> 127.0.0.1), MASTER_PORT from the environment."""
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = {"SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank), "SLURM_JOB_ID": "77",
               "SLURM_JOB_NODELIST": "127.0.0.[1-2]", "MASTER_PORT": port}
        procs.append(start("moco_co2.py", *TINY, "--queue-size", "64", "--epochs", "1", "--out-dir", tmp_path / "run",
                           env=env))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert "world size" in outs[0][0] and "done: 1 epochs" in outs[0][0] and outs[1][0].strip() == ""
    ckpt = load(tmp_path / "run" / "last.pt")
    assert len(ckpt["rng"]) == 2 and ckpt["step"] == 4  # 64 images / global batch 16


def tiny(out, module=moco_co2, **overrides):
    fields = dict(dataset="synthetic", synthetic_images=64, arch="resnet18", image_size=32, batch_size=16,
                  workers=0, seed=0, epochs=1, out_dir=str(out), log_every=1)
    fields.update({"queue_size": 64} if module is moco_co2 else {"bank_size": 64})
    fields.update(overrides)
    return module.Args(**fields)


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_how_much_is_needed(tmp_path, monkeypatch):
    out = tmp_path / "run"
    moco_co2.main(tiny(out))
    before = (out / "last.pt").read_bytes()
    monkeypatch.setattr(moco_co2.shutil, "disk_usage", lambda path: type("usage", (), {"free": 10 * 2**20})())
    with pytest.raises(UserError, match=r"cannot write .*last.pt: 0.01 GiB free in .*run, a checkpoint needs about"):
        moco_co2.main(tiny(out, epochs=2, resume="auto"))
    assert (out / "last.pt").read_bytes() == before and not list(out.glob("*.tmp*"))
    monkeypatch.undo()

    def full(state, path):  # what torch.save does when the disk fills in mid-write
        with open(path, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 0")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError, match="RuntimeError") as error:
        moco_co2.main(tiny(out, epochs=2, resume="auto"))
    assert "\n" not in str(error.value) and "the previous checkpoint is kept" in str(error.value)
    assert (out / "last.pt").read_bytes() == before and not list(out.glob("*.tmp*"))


def test_one_job_per_out_dir(tmp_path):
    """A live job's lock refuses a second job in one line; --resume PATH never writes into another run's folder."""
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a+") as held:  # another live job
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = run_script("moco_co2.py", *TINY, "--queue-size", "64", "--epochs", "1", "--out-dir", out, check=False)
    assert proc.returncode == 2 and "is in use by another job" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (out / "last.pt").exists()
    run_script("moco_co2.py", *TINY, "--queue-size", "64", "--epochs", "1", "--out-dir", out)
    other = tmp_path / "other"
    run_script("moco_co2.py", *TINY, "--queue-size", "64", "--epochs", "1", "--out-dir", other)
    files = {p.name: p.read_bytes() for p in other.iterdir()}
    proc = run_script("moco_co2.py", *TINY, "--queue-size", "64", "--epochs", "2", "--resume", out / "last.pt",
                      "--out-dir", other, check=False)
    assert proc.returncode == 2 and "already holds another run" in proc.stderr
    assert {p.name: p.read_bytes() for p in other.iterdir()} == files
    run_script("moco_co2.py", *TINY, "--queue-size", "64", "--epochs", "2", "--resume", out / "last.pt",
               "--out-dir", tmp_path / "fresh")  # an empty (new) folder is fine


@pytest.mark.parametrize("module,flag,value,words", [
    (moco_co2, "epochs", 0, "--epochs 0 is out of range: it must be >= 1"),
    (moco_co2, "batch_size", 0, "--batch-size 0 is out of range"),
    (moco_co2, "image_size", 0, "--image-size 0 is out of range: it must be >= 8"),
    (moco_co2, "moco_t", 0.0, "--moco-t 0.0 is out of range: it must be > 0"),
    (moco_co2, "knn_train_fraction", 1.5, "it must be (0, 1]"),
    (caco, "lr", -0.1, "--lr -0.1 is out of range: it must be >= 0"),
    (caco, "epochs", 0, "--epochs 0"),
])
def test_nonsense_numbers_are_refused_before_anything_is_written(tmp_path, module, flag, value, words):
    out = tmp_path / "run"
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace("]", r"\]")):
        module.main(tiny(out, module, **{flag: value}))
    assert not out.exists()


def test_a_finished_in_process_run_releases_its_folder(tmp_path):
    """main() called in-process (as tests and notebooks do) unlocks --out-dir when it ends."""
    out = tmp_path / "run"
    moco_co2.main(tiny(out))
    with open(out / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # would raise BlockingIOError if still held


def test_stop_at_step_below_the_checkpoint_trains_nothing(tmp_path):
    out = tmp_path / "run"
    moco_co2.main(tiny(out, epochs=2, stop_at_step=3))
    before = (out / "last.pt").read_bytes()
    assert moco_co2.main(tiny(out, epochs=2, stop_at_step=2, resume="auto")) == {}
    assert (out / "last.pt").read_bytes() == before


def test_text_or_random_bytes_as_a_checkpoint_get_one_plain_line(tmp_path):
    for name, data in (("notes.pt", b"hello, this is text\n" * 20), ("noise.pt", os.urandom(4096))):
        (tmp_path / name).write_bytes(data)
        proc = run_script("moco_co2.py", *TINY, "--queue-size", "64", "--resume", tmp_path / name,
                          "--out-dir", tmp_path / f"run-{name}", check=False)
        assert proc.returncode == 2 and "not a complete torch.save file" in proc.stderr
        assert "weights_only" not in proc.stderr and proc.stderr.count("\n") == 1


def test_a_data_error_or_a_read_only_out_dir_leaves_nothing_behind(tmp_path):
    proc = run_script("moco_co2.py", "--data", tmp_path / "missing", "--out-dir", tmp_path / "run", check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and not (tmp_path / "run").exists()
    (tmp_path / "a-file").write_text("")  # a folder that cannot be made (root may write even read-only folders)
    proc = run_script("moco_co2.py", *TINY, "--queue-size", "64", "--out-dir", tmp_path / "a-file" / "run", check=False)
    assert proc.returncode == 2 and "cannot make --out-dir" in proc.stderr and "Traceback" not in proc.stderr
