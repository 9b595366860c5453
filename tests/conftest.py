"""Shared test helpers: run a script as a user would (subprocess, its entry point in-process, two torchrun nodes),
tiny settings.

Every training script accepts TINY (a synthetic 64-image, 32 px, ResNet-18 run that takes seconds on CPU).
"""
import contextlib
import fcntl
import importlib
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests import the scripts' pure functions: `from moco_co2 import co2_loss`

TINY = ["--dataset", "synthetic", "--synthetic-images", "64", "--arch", "resnet18", "--image-size", "32",
        "--batch-size", "16", "--workers", "0", "--seed", "0"]


RAM_FOLDER, RAM_NEEDED = "/dev/shm", 8 * 2**30  # a tmpfs, and the room the runs' files need there at most


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Temporary files in RAM where there is room: the runs write ResNet-18 checkpoints (150 MB each, 20 GB in a
    session) that a test reads back within seconds and that are deleted when it passes, so on the tmpfs
    /dev/shm they never reach the disk. With pytest-xdist the workers get the controller's folder, one
    sub-folder each. --basetemp still chooses another place; without room in RAM pytest's default is used."""
    if config.option.basetemp is None and not hasattr(config, "workerinput") and os.path.isdir(RAM_FOLDER) \
            and shutil.disk_usage(RAM_FOLDER).free > RAM_NEEDED:
        config.option.basetemp = tempfile.mkdtemp(prefix="pytest-", dir=RAM_FOLDER)


def pytest_sessionfinish(session, exitstatus):
    """After a green run the session's temporary folder goes: the runs' checkpoints would fill a disk (pytest keeps
    three sessions' folders), and with pytest-xdist it holds the workers' folders and the shared two_ranks one.
    After a failure it is kept for inspection, and a folder in RAM says where it is."""
    if hasattr(session.config, "workerinput"):
        return
    folder = session.config._tmp_path_factory.getbasetemp()
    if exitstatus == 0:
        shutil.rmtree(folder, ignore_errors=True)
    elif str(folder).startswith(RAM_FOLDER + "/"):
        print(f"\nthe failed tests' files are kept in {folder} (in RAM: remove it when done)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test's tmp_path is removed as soon as the test has passed, set-up and teardown included (a failed test's
    stays for inspection): at most a few tests' checkpoints exist at once."""
    report = (yield).get_result()
    if report.failed:
        item.stash[FAILED] = True
    elif report.when == "call" and "tmp_path" in item.funcargs:
        item.stash[TMP_PATH] = item.funcargs["tmp_path"]
    if report.when == "teardown" and TMP_PATH in item.stash and not item.stash.get(FAILED, False):
        shutil.rmtree(item.stash[TMP_PATH], ignore_errors=True)


FAILED, TMP_PATH = pytest.StashKey[bool](), pytest.StashKey[Path]()


def _env(extra=None):
    env = dict(os.environ)
    env.pop("RANK", None)  # a plain `python` run must not think it is under torchrun
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def run_script(script, *args, check=True, timeout=600, env=None, cwd=ROOT):
    """`python <script> args...` from the repo root (or `cwd`). Returns the CompletedProcess (text output)."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=_env(env),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-4000:]}")
    return proc


class Ran(NamedTuple):
    """What run_cli returns: the fields of a CompletedProcess that the tests read."""
    returncode: int
    stdout: str
    stderr: str


def run_cli(script, *args, check=True, env=None, cwd=None) -> Ran:
    """`python <script> args...` inside this process: the script's own entry point (`cli(main, Args)`, argument
    parsing, one-line errors, exit codes) with sys.argv, the environment and the working folder set as a
    subprocess would have them, its stdout and stderr captured. It saves a Python start (~4 CPU-seconds) where the
    command line is under test but the process is not: signals, torchrun, kill -9 and the interpreter's own exit
    stay with run_script. An exception that the entry point does not turn into an exit code propagates; with
    `check`, so does a non-zero exit code, as an AssertionError with the output."""
    module = importlib.import_module(Path(script).stem)
    out, err, code = io.StringIO(), io.StringIO(), 0
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    try:
        os.environ.pop("RANK", None)
        os.environ.update(env or {})
        os.chdir(cwd or ROOT)
        sys.argv = [str(ROOT / script), *map(str, args)]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                module.cli(module.main, module.Args)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        sys.argv = saved_argv
    if check and code != 0:
        raise AssertionError(f"{script} exited {code}\nstdout:\n{out.getvalue()[-4000:]}\n"
                             f"stderr:\n{err.getvalue()[-4000:]}")
    return Ran(code, out.getvalue(), err.getvalue())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_nodes(script, *args, timeout=600, env=None):
    """Two torchrun 'nodes' of one process each on loopback (--nnodes 2 --node_rank 0/1), run concurrently.
    Returns the two CompletedProcess-like (returncode, stdout, stderr) tuples, node 0 first."""
    port = free_port()
    procs = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node_rank}",
               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
               str(ROOT / script), *map(str, args)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(env), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        results.append((p.returncode, out, err))
    for code, out, err in results:
        if code != 0:
            raise AssertionError(f"two-node {script} exited {code}\nstdout:\n{out[-4000:]}\nstderr:\n{err[-4000:]}")
    return results


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_state_equal(a, b, path="state"):
    """Recursively: tensors bitwise equal (torch.equal), everything else ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} differs (max abs diff {(a.double() - b.double()).abs().max()})"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {set(a) ^ set(b)}"
        for key in a:
            assert_state_equal(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_state_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def unit(*shape, seed=0, dim=-1, dtype=torch.float64):
    """Seeded random tensor normalised to unit length along `dim` (rows by default, columns with dim=0)."""
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype), dim=dim)


def final_state(out):
    """<out>/last.pt without its "args" (which differ in --epochs / --resume / --stop-at-step only)."""
    ckpt = load(os.path.join(out, "last.pt"))
    del ckpt["args"]
    return ckpt


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs use one intra-op thread, as the subprocess runs do (OMP_NUM_THREADS=1): on a small
    shared CPU, OpenMP threads waiting for a descheduled sibling can make a tiny ResNet step 5-50x slower.
    Restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_cifar10(root, monkeypatch, train_per_batch: int = 8, test: int = 8, seed: int = 0) -> None:
    """torchvision's CIFAR-10 files (cifar-10-batches-py: 5 pickled train batches, test_batch, batches.meta)
    under `root`, filled with generated images, labels 0..9 in turn. The files cannot match torchvision's MD5
    sums, so torchvision's check is skipped in this process for the test (monkeypatch undoes it)."""
    import pickle

    import torchvision.datasets.cifar

    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = test if name == "test_batch" else train_per_batch
        pixels = torch.randint(0, 256, (n, 3 * 32 * 32), generator=g, dtype=torch.uint8).numpy()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": pixels, "labels": [i % 10 for i in range(n)]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{c}" for c in range(10)]}, f)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)


@pytest.fixture(scope="session")
def two_ranks(tmp_path_factory):
    """The folder of one two-node launch of tests/dist_worker.py (every two-rank check of the method and common
    tests): <folder>/<job> holds each job's files. Made once per session: pytest-xdist's workers share their
    controller's folder, and the first to get here launches while the other waits on the lock."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if "PYTEST_XDIST_WORKER" in os.environ else base
    out = shared / "two_ranks"
    with open(shared / "two_ranks.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "done").exists():
            out.mkdir(exist_ok=True)
            run_two_nodes("tests/dist_worker.py", out, timeout=600)
            (out / "done").write_text("")
    return out
