"""Faults common on clusters, met as a user meets them: preemption signals (real subprocesses, real signals, to the
workers and to torchrun together as SLURM sends them), srun-style launch and rendezvous, the sbatch examples' requeue
rule, a full disk or /dev/shm, a file size limit, a damaged checkpoint, two jobs on one folder, a torn metrics line,
nonsense numbers.

The plumbing under test is the fenced blocks, identical in every script (tests/test_shared_blocks.py), so most
tests drive moco_co2.py. A run is its own process where the process is under test (signals, torchrun, srun steps,
kill -9, a private /dev/shm); the other runs go through the script's entry point in this process (run_cli)."""
import fcntl
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import caco
import moco_co2
from common import UserError
from conftest import ROOT, TINY, _env, assert_state_equal, final_state, free_port, load, run_cli

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
    run_cli(script, *args, "--out-dir", tmp_path / "whole")  # in-process: the cut alone needs its own process
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
    proc = run_cli(script, *args, "--out-dir", tmp_path / "cut", "--resume", "auto")
    assert "dropped 1 incomplete line" in proc.stdout
    assert_state_equal(final_state(tmp_path / "whole"), final_state(tmp_path / "cut"))
    assert metrics(tmp_path / "whole") == metrics(tmp_path / "cut")


def test_sigterm_stops_linear_eval_mid_epoch_and_resume_is_bitwise(tmp_path):
    """linear_eval.py too: a mid-epoch checkpoint on SIGTERM, resumed bitwise (frozen backbone, fc, optimizer)."""
    moco_co2.main(tiny(tmp_path / "pre"))
    args = ["--checkpoint", tmp_path / "pre" / "last.pt", *TINY, "--epochs", "2", "--log-every", "1"]
    run_cli("linear_eval.py", *args, "--out-dir", tmp_path / "whole")
    proc = start("linear_eval.py", *args, "--out-dir", tmp_path / "cut")
    wait_for_line(proc, "epoch 0 [2/4]")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in out, err[-2000:]
    assert 2 <= load(tmp_path / "cut" / "last.pt")["step"] < 8
    run_cli("linear_eval.py", *args, "--out-dir", tmp_path / "cut", "--resume", "auto")
    assert_state_equal(final_state(tmp_path / "whole"), final_state(tmp_path / "cut"))


def test_kill_9_leaves_no_lock_behind(tmp_path):
    """The out-dir lock is an OS lock: a job killed with SIGKILL holds nothing, so --resume auto continues."""
    args = [*TINY, "--queue-size", "64", "--epochs", "2", "--log-every", "1", "--ckpt-every-steps", "1"]
    proc = start("moco_co2.py", *args, "--out-dir", tmp_path / "run")
    wait_for_line(proc, "epoch 0 [3/4]")
    proc.kill()
    proc.communicate(timeout=60)
    run_cli("moco_co2.py", *args, "--out-dir", tmp_path / "run", "--resume", "auto")
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
    """A live job's lock refuses a second job in one line and its temporary checkpoint is left alone; once the lock is
    free, such a file is a dead writer's and is removed. --resume PATH never writes into another run's folder."""
    out = tmp_path / "run"
    out.mkdir()
    temp = out / "last.pt.tmp.othernode.4242"  # being written by that job, or left by a process killed meanwhile
    temp.write_bytes(b"partial")
    with open(out / ".lock", "a+") as held:  # another live job
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = run_cli("moco_co2.py", *TINY, "--queue-size", "64", "--epochs", "1", "--out-dir", out, check=False)
    assert proc.returncode == 2 and "is in use by another job" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (out / "last.pt").exists() and temp.exists()  # a live job's file is never touched
    proc = run_cli("moco_co2.py", *TINY, "--queue-size", "64", "--epochs", "1", "--out-dir", out)
    assert not temp.exists() and f"removed {temp}" in proc.stdout  # the lock is free: its writer is dead
    other = tmp_path / "other"
    moco_co2.main(tiny(other))
    files = {p.name: p.read_bytes() for p in other.iterdir()}
    proc = run_cli("moco_co2.py", *TINY, "--queue-size", "64", "--epochs", "2", "--resume", out / "last.pt",
                   "--out-dir", other, check=False)
    assert proc.returncode == 2 and "already holds another run" in proc.stderr
    assert {p.name: p.read_bytes() for p in other.iterdir()} == files
    run_cli("moco_co2.py", *TINY, "--queue-size", "64", "--epochs", "2", "--resume", out / "last.pt",
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
        proc = run_cli("moco_co2.py", *TINY, "--queue-size", "64", "--resume", tmp_path / name,
                       "--out-dir", tmp_path / f"run-{name}", check=False)
        assert proc.returncode == 2 and "not a complete torch.save file" in proc.stderr
        assert "weights_only" not in proc.stderr and proc.stderr.count("\n") == 1


def test_a_data_error_or_a_read_only_out_dir_leaves_nothing_behind(tmp_path):
    proc = run_cli("moco_co2.py", "--data", tmp_path / "missing", "--out-dir", tmp_path / "run", check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and not (tmp_path / "run").exists()
    (tmp_path / "a-file").write_text("")  # a folder that cannot be made (root may write even read-only folders)
    proc = run_cli("moco_co2.py", *TINY, "--queue-size", "64", "--out-dir", tmp_path / "a-file" / "run",
                   check=False)
    assert proc.returncode == 2 and "cannot make --out-dir" in proc.stderr and "Traceback" not in proc.stderr


# ---- launchers under SLURM: signals, requeue, rendezvous -----------------------------------------------------------
def test_sigterm_to_torchrun_and_to_its_workers_stops_every_rank_with_a_checkpoint(tmp_path):
    """SLURM signals every process of a step: each torchrun worker gets SIGTERM directly, and again when torchrun
    forwards its own copy. The repeat must not turn the graceful stop into a hard exit. torchrun itself then exits 1,
    not 143: the sbatch example in docs/checkpoints.md relies on that."""
    proc = start("moco_co2.py", *TINY, "--queue-size", "64", "--epochs", "4", "--log-every", "1",
                 "--out-dir", tmp_path / "run", torchrun=True)
    wait_for_line(proc, "epoch 0 [1/4]")
    for pid in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split():
        os.kill(int(pid), signal.SIGTERM)  # SLURM's copy, straight to each worker
    wait_for_line(proc, "epoch 0 [2/4]")  # a step later: both workers have handled it
    proc.send_signal(signal.SIGTERM)  # SLURM's copy to torchrun, which forwards a second one to each worker
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "stopped by SIGTERM at step" in out, err[-3000:]
    step = int(out.split("stopped by SIGTERM at step ")[1].split(";")[0])
    ckpt = load(tmp_path / "run" / "last.pt")
    assert ckpt["step"] == step and len(ckpt["rng"]) == 2


def test_a_repeated_sigterm_or_sigusr1_asks_again_and_a_second_ctrl_c_ends_at_once():
    """Real signals to a process holding the scripts' handler, one after the other (each handled before the next)."""
    code = ("import os, signal, moco_co2\n"
            "stop = moco_co2.GracefulStop()\n"
            "for s in (signal.SIGTERM, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR1, signal.SIGINT):\n"
            "    os.kill(os.getpid(), s)\n"
            "print('still running, stopping for', stop.agreed(), flush=True)\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "print('not reached')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert proc.stdout == f"still running, stopping for {int(signal.SIGINT)}\n", proc.stderr[-2000:]
    assert proc.returncode == -signal.SIGINT


def sbatch_examples() -> dict:
    """The sbatch scripts of docs/checkpoints.md, by their first comment line (the launcher)."""
    text = (ROOT / "docs" / "checkpoints.md").read_text()
    blocks = [b.split("```")[0] for b in text.split("```bash\n")[1:] if "#SBATCH" in b.split("```")[0]]
    return {b.splitlines()[1].lstrip("# "): b for b in blocks}


def run_sbatch(script: str, tmp_path, code: int, signal_shell: bool = False) -> tuple:
    """Runs an sbatch script with stand-ins for srun / torchrun (exiting with `code`, or with 1 once SIGTERM
    reaches them, as torchrun does) and scontrol (logging its arguments). Returns (exit code, scontrol calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("srun", "torchrun"):
        (bin_dir / name).write_text(f'#!/bin/bash\ntrap "exit 1" TERM\ntouch "{tmp_path}/started"\n'
                                    f'[ "$WAIT" ] || exit {code}\nwhile :; do sleep 0.05; done\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> "{tmp_path}/scontrol"\n')
    for path in bin_dir.iterdir():
        path.chmod(0o755)
    (tmp_path / "scontrol").write_text("")
    (tmp_path / "started").unlink(missing_ok=True)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77", **({"WAIT": "1"} if signal_shell else {})}
    proc = subprocess.Popen(["bash", "-c", script], cwd=tmp_path, env=_env(env))
    if signal_shell:  # what --signal=B:TERM does: SIGTERM to the batch shell only
        while not (tmp_path / "started").exists():
            assert proc.poll() is None
        time.sleep(0.5)  # the shell has also run `pid=$!`, the line after `&` (a signal before it reaches no child)
        proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    return proc.returncode, (tmp_path / "scontrol").read_text()


def test_the_sbatch_examples_requeue_only_after_a_stop_by_a_signal(tmp_path):
    """The requeue policy of docs/checkpoints.md, run as written: srun passes its tasks' exit codes on, so only the
    stop codes 130 / 138 / 143 requeue; torchrun exits 1 after a stop and after a crash alike, so the shell
    requeues only when it passed a signal on itself. 0, a refusal (2) or a crash (1, 137) never loops."""
    examples = sbatch_examples()
    assert set(examples) == {"srun, one task per GPU", "torchrun inside sbatch, one node"}
    srun, torchrun = examples["srun, one task per GPU"], examples["torchrun inside sbatch, one node"]
    assert "--signal=USR1@" in srun and "--signal=B:TERM@" in torchrun and "USR1" not in torchrun
    for code in (0, 1, 2, 130, 137, 138, 143):
        exit_code, calls = run_sbatch(srun, tmp_path, code)
        assert calls == ("requeue 77\n" if code in (130, 138, 143) else "") and (calls or exit_code == code), code
    for code in (0, 1, 2):
        assert run_sbatch(torchrun, tmp_path, code) == (code, ""), code
    assert run_sbatch(torchrun, tmp_path, 0, signal_shell=True) == (1, "requeue 77\n")


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def slurm_env(rank: int, step: int) -> dict:
    """What srun sets for task `rank` of a 2-task step (SLURM_STEP_ID = step), on loopback."""
    return {"SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank), "SLURM_STEP_ID": str(step),
            "SLURM_JOB_NODELIST": "127.0.0.1"}


def slurm_task(rank: int, step: int, *args, env=None):
    """One task of a 2-task `srun` step of moco_co2.py, as its own process."""
    return start("moco_co2.py", *TINY, "--queue-size", "64", *args, env={**slurm_env(rank, step), **(env or {})})


def test_srun_style_launch_trains_as_one_job_while_another_step_rendezvouses_apart(tmp_path):
    """Two processes with SLURM's variables and no RANK (as `srun --ntasks 2 python moco_co2.py` starts them):
    one process group of 2, one checkpoint with both ranks' RNG, only rank 0 prints. MASTER_ADDR comes from the
    node list (127.0.0.[1-2] -> 127.0.0.1), MASTER_PORT from the job and step ids: step 1 of the same job, 2 more
    tasks started at the same time, gets its own port and its own group (its ranks then stop, each alone, at a
    missing --resume file, so that they train nothing)."""
    job = next(j for j in range(1000, 10000, 7) if all(port_is_free(20000 + (j + 1000 * s) % 10000) for s in (0, 1)))
    env = {"SLURM_JOB_ID": str(job), "SLURM_JOB_NODELIST": "127.0.0.[1-2]", "RENDEZVOUS_TIMEOUT": "60"}
    train = [slurm_task(rank, 0, "--epochs", "1", "--out-dir", tmp_path / "run", env=env) for rank in (0, 1)]
    other = [slurm_task(rank, 1, "--resume", tmp_path / "missing.pt", "--out-dir", tmp_path / "other", env=env)
             for rank in (0, 1)]
    for proc in other:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2 and err.strip().endswith("missing.pt: no such file"), err[-3000:]
    outs = [p.communicate(timeout=300) for p in train]
    assert [p.returncode for p in train] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert "world size" in outs[0][0] and "done: 1 epochs" in outs[0][0] and outs[1][0].strip() == ""
    ckpt = load(tmp_path / "run" / "last.pt")
    assert len(ckpt["rng"]) == 2 and ckpt["step"] == 4  # 64 images / global batch 16


def test_a_rank_without_its_peers_says_what_it_waits_for(tmp_path):
    """Plain `python` inside a 2-task allocation used to wait forever without a word: rank 0 of 2 now waits
    RENDEZVOUS_TIMEOUT seconds, then names the address, the port, its rank and the world size in one line."""
    port = free_port()
    proc = run_cli("moco_co2.py", *TINY, "--queue-size", "64", "--out-dir", tmp_path / "run",
                   env={**slurm_env(0, 0), "SLURM_JOB_ID": "77", "MASTER_PORT": str(port), "RENDEZVOUS_TIMEOUT": "2"},
                   check=False)
    err = proc.stderr
    assert proc.returncode == 2 and err.count("\n") == 1 and "Traceback" not in err, err[-3000:]
    assert f"rank 0 of 2 found no rendezvous at 127.0.0.1:{port}" in err and "within 2 s" in err
    assert not (tmp_path / "run").exists()


# ---- checkpoints that can be trusted, and the smaller faults -------------------------------------------------------
def test_a_checkpoint_damaged_in_place_is_refused_in_one_line(tmp_path):
    """4 KiB overwritten inside last.pt, same size: torch.load would read it; the checksums written with it do not
    match, so --resume refuses it in one line and the run neither starts nor changes a file."""
    out = tmp_path / "run"
    moco_co2.main(tiny(out))
    data = bytearray((out / "last.pt").read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = os.urandom(4096)
    (out / "last.pt").write_bytes(data)
    assert load(out / "last.pt")["step"] == 4  # what made it dangerous: it still loads
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = run_cli("moco_co2.py", *TINY, "--queue-size", "64", "--epochs", "2", "--resume", "auto",
                   "--out-dir", out, check=False)
    assert proc.returncode == 2 and "last.pt is damaged" in proc.stderr and "CRC-32" in proc.stderr
    assert proc.stderr.count("\n") == 1 and {p.name: p.read_bytes() for p in out.iterdir()} == files


def test_the_non_finite_message_names_only_files_that_exist(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError, match="non-finite") as error:  # lr 1e30: diverges before the first checkpoint
        moco_co2.main(tiny(out, lr=1e30))
    named = [word.strip(",;()") for word in str(error.value).split() if str(out) in word]
    assert named and all(os.path.exists(path) for path in named) and not (out / "last.pt").exists()
    assert "no checkpoint was written before" in str(error.value)


def test_a_file_size_limit_is_named(tmp_path):
    """`ulimit -f` (RLIMIT_FSIZE) below a checkpoint's size: torch.save fails with a message that does not say why;
    the line names "File too large" and the limit, and no temporary file is left."""
    out = tmp_path / "run"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**24, hard))  # 16 MiB: a ResNet-18 checkpoint needs ~90 MiB
    try:
        with pytest.raises(UserError, match=r"cannot write .*last.pt: .*\(File too large: this process may write "
                                            r"files of at most 0.02 GiB\); the previous checkpoint is kept"):
            moco_co2.main(tiny(out, stop_at_step=1))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert not (out / "last.pt").exists() and not list(out.glob("*.tmp*"))


def test_a_full_dev_shm_is_one_line_saying_what_to_do(tmp_path):
    """DataLoader workers under a 64 KiB /dev/shm (a private mount namespace: the machine's /dev/shm is untouched)."""
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare -rm (user and mount namespaces) to give the run its own small /dev/shm")
    cmd = ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs /dev/shm && exec "$0" "$@"',
           sys.executable, ROOT / "moco_co2.py", *TINY[:-4], "--workers", "1", "--queue-size", "64",
           "--out-dir", tmp_path / "run"]
    proc = subprocess.run(list(map(str, cmd)), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert "ran out of shared memory" in proc.stderr and "fewer --workers" in proc.stderr


def test_linear_eval_knn_shows_progress_and_stops_on_sigterm_with_one_line(tmp_path):
    """--knn extracts features for a long time: a progress bar in a terminal (FORCE_COLOR makes the pipe one), and
    SIGTERM stops it after the current batch with a line and exit 143 (100,000 lazily made images: never finished)."""
    proc = start("linear_eval.py", "--knn", "--random-init", "--arch", "resnet18", "--dataset", "synthetic",
                 "--synthetic-images", "100000", "--image-size", "32", "--batch-size", "16", "--workers", "0",
                 "--out-dir", tmp_path / "knn", env={"FORCE_COLOR": "1", "COLUMNS": "200"})
    for line in proc.stdout:  # rich redraws the bar with \r, which the text pipe reads as line ends
        if "kNN features" in line and "/125000" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-3000:]
    assert "stopped by SIGTERM during the kNN feature extraction" in out and not (tmp_path / "knn").exists()
