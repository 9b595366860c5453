"""moco_co2.py: the CO2 term and InfoNCE against explicit formulas and autograd, the queue, the momentum
encoder, ShuffleBN and gathering across two real processes, end-to-end runs, exact resume, bad inputs."""
import json

import pytest
import torch
import torch.nn.functional as F

import moco_co2
from common import UserError
from conftest import TINY, assert_state_equal, final_state, load, run_cli, run_script, unit


def co2_reference(q, k, queue, tau):
    """Explicit formula with plain exp / sum / log (no softmax helpers): mean_i ½Σ_j (P-Q)(log P - log Q)."""
    a = torch.exp(q @ queue / tau)
    b = torch.exp(k @ queue / tau)
    P = a / a.sum(dim=1, keepdim=True)
    Q = b / b.sum(dim=1, keepdim=True)
    return (0.5 * (P - Q) * (torch.log(P) - torch.log(Q))).sum(dim=1).mean()


@pytest.mark.parametrize("n,c,k,tau", [(4, 8, 16, 0.05), (3, 5, 7, 0.2), (6, 16, 32, 1.0)])
def test_co2_loss_matches_explicit_formula_and_its_gradient(n, c, k, tau):
    q = unit(n, c, seed=1).requires_grad_()
    key = unit(n, c, seed=2)
    queue = unit(c, k, seed=3, dim=0)
    ours = moco_co2.co2_loss(q, key, queue, tau)
    expected = co2_reference(q, key, queue, tau)
    assert torch.allclose(ours.double(), expected, rtol=1e-6, atol=1e-9)
    (g_ours,) = torch.autograd.grad(ours, q)
    (g_ref,) = torch.autograd.grad(co2_reference(q, key, queue, tau), q)
    assert g_ours.abs().max() > 1e-4  # q really receives a gradient (lightly's version gives none)
    assert torch.allclose(g_ours.double(), g_ref, rtol=1e-5, atol=1e-9)


def test_co2_gradient_by_finite_differences():
    queue = unit(4, 6, seed=3, dim=0)
    key = unit(3, 4, seed=2)
    q = unit(3, 4, seed=1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: moco_co2.co2_loss(x, key, queue, 0.1).double(), (q,))


def test_co2_zero_when_query_equals_key_nonnegative_and_symmetric():
    q, key, queue = unit(5, 8, seed=1), unit(5, 8, seed=2), unit(8, 12, seed=3, dim=0)
    assert moco_co2.co2_loss(q, q.clone(), queue, 0.05).abs() < 1e-12
    value = moco_co2.co2_loss(q, key, queue, 0.05)
    assert value > 0
    assert torch.allclose(value, moco_co2.co2_loss(key, q, queue, 0.05))


def test_co2_sends_no_gradient_to_key_or_queue():
    q = unit(4, 8, seed=1, dtype=torch.float32).requires_grad_()
    key = unit(4, 8, seed=2, dtype=torch.float32).requires_grad_()
    queue = unit(8, 16, seed=3, dim=0, dtype=torch.float32).requires_grad_()
    moco_co2.co2_loss(q, key, queue, 0.05).backward()
    assert key.grad is None and queue.grad is None
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_infonce_logits_give_the_moco_loss():
    q, key, queue, tau = unit(4, 8, seed=1), unit(4, 8, seed=2), unit(8, 10, seed=3, dim=0), 0.2
    logits, labels = moco_co2.infonce_logits(q, key, queue, tau)
    assert logits.shape == (4, 11) and labels.tolist() == [0, 0, 0, 0]
    pos = torch.exp((q * key).sum(1) / tau)
    neg = torch.exp(q @ queue / tau).sum(1)
    expected = (-torch.log(pos / (pos + neg))).mean()
    assert torch.allclose(F.cross_entropy(logits, labels), expected)


def test_enqueue_is_fifo_and_wraps():
    queue = torch.zeros(2, 6)
    ptr = 0
    for step in range(4):  # 4 batches of 2 keys into 6 slots: the 4th batch overwrites the 1st
        keys = torch.full((2, 2), float(step + 1))
        ptr = moco_co2.enqueue(queue, ptr, keys)
    assert ptr == 2
    assert queue[0].tolist() == [4, 4, 2, 2, 3, 3]
    with pytest.raises(RuntimeError):  # a batch that overruns the queue is refused by torch, never wrapped silently
        moco_co2.enqueue(torch.zeros(2, 5), 4, torch.ones(2, 2))


def test_momentum_update():
    torch.manual_seed(0)
    q_net, k_net = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.clone() for p in k_net.parameters()]
    moco_co2.momentum_update(q_net, k_net, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, k_net.parameters()))
    moco_co2.momentum_update(q_net, k_net, 0.9)
    for old, new, target in zip(before, k_net.parameters(), q_net.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * target)
    moco_co2.momentum_update(q_net, k_net, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(q_net.parameters(), k_net.parameters()))


def test_single_process_gather_is_identity_and_shuffle_a_local_permutation():
    x = torch.arange(16.0).view(16, 1, 1, 1).expand(16, 3, 2, 2).contiguous(memory_format=torch.channels_last)
    assert moco_co2.concat_all_gather(x) is x
    shuffled, idx = moco_co2.batch_shuffle(x)
    assert torch.equal(shuffled[:, 0, 0, 0].sort().values, torch.arange(16.0))  # a permutation of the batch
    assert not torch.equal(shuffled, x)  # that moves samples
    assert shuffled.is_contiguous(memory_format=torch.channels_last)  # in the caller's layout
    assert torch.equal(moco_co2.batch_unshuffle(shuffled, idx), x)


def split_bn_reference(x, weight, bias, mean, var, splits, momentum=0.1, eps=1e-5):
    """S separate plain training-mode BNs on x[j::S] (shared affine), outputs put back in place; running
    statistics = mean over j of each BN's own update."""
    out = torch.empty_like(x)
    means, vars_ = [], []
    for j in range(splits):
        m, v = mean.clone(), var.clone()
        out[j::splits] = F.batch_norm(x[j::splits], m, v, weight, bias, True, momentum, eps)
        means.append(m), vars_.append(v)
    return out, torch.stack(means).mean(0), torch.stack(vars_).mean(0)


@pytest.mark.parametrize("splits", [1, 2, 4])
def test_split_batchnorm_is_bn_per_interleaved_sub_batch(splits):
    g = torch.Generator().manual_seed(splits)
    x = torch.randn(8, 3, 5, 5, generator=g, dtype=torch.float64) * 2 + 1
    bn = torch.nn.BatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=g), bn.bias.uniform_(-1, 1, generator=g)
        bn.running_mean.uniform_(-1, 1, generator=g), bn.running_var.uniform_(0.5, 2, generator=g)
    split = moco_co2.SplitBatchNorm2d(bn, splits)
    assert set(split.state_dict()) == set(bn.state_dict()) and split.weight.dtype == torch.float64
    weight = bn.weight.detach().clone().requires_grad_()
    bias = bn.bias.detach().clone().requires_grad_()
    xr, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref, ref_mean, ref_var = split_bn_reference(xr, weight, bias, bn.running_mean, bn.running_var, splits)
    out = split(xs)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(split.running_mean, ref_mean)
    torch.testing.assert_close(split.running_var, ref_var)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (ref * w).sum().backward()
    (out * w).sum().backward()
    torch.testing.assert_close(xs.grad, xr.grad)
    torch.testing.assert_close(split.weight.grad, weight.grad)
    torch.testing.assert_close(split.bias.grad, bias.grad)
    if splits > 1:  # different from one BN over the whole batch
        assert not torch.allclose(out, F.batch_norm(x, None, None, bn.weight, bn.bias, True))
    split.eval(), bn.eval()
    split.running_mean.copy_(bn.running_mean), split.running_var.copy_(bn.running_var)
    torch.testing.assert_close(split(x), bn(x))  # eval: plain BN with the running statistics


def test_use_split_bn_keeps_every_weight_and_key():
    encoder = moco_co2.Encoder("resnet18", True, 64, 16)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    moco_co2.use_split_bn(encoder.backbone, 4)
    bns = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(isinstance(m, moco_co2.SplitBatchNorm2d) and m.splits == 4 for m in bns)
    assert_state_equal(encoder.state_dict(), before)


def test_bn_splits_reaches_both_encoders_and_a_resume(tmp_path):
    out = tmp_path / "run"
    result = moco_co2.main(tiny_args(out, bn_splits=4, epochs=1))
    for name in ("encoder_q", "encoder_k"):
        bns = [m for m in result[name].modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert bns and all(isinstance(m, moco_co2.SplitBatchNorm2d) and m.splits == 4 for m in bns), name
    with pytest.raises(UserError, match="--bn-splits 1 -> 4|--bn-splits 4 -> 1"):
        moco_co2.main(tiny_args(out, resume="auto", epochs=2))  # a run's BN grouping is part of its recipe


def test_a_checkpoint_without_a_recipe_flag_is_refused(tmp_path):
    """A checkpoint whose args lack a flag of MUST_MATCH (no released version wrote one) is another recipe."""
    out = tmp_path / "run"
    moco_co2.main(tiny_args(out, epochs=1))
    ckpt = load(out / "last.pt")
    del ckpt["args"]["blur"], ckpt["args"]["bn_splits"]
    torch.save(ckpt, out / "last.pt")
    with pytest.raises(UserError, match="other arguments") as refused:
        moco_co2.main(tiny_args(out, epochs=2, resume="auto"))
    assert "--blur None -> True" in str(refused.value) and "--bn-splits None -> 1" in str(refused.value)


def test_two_processes(two_ranks):
    """2 ranks (gloo): identical queues, keys gathered in rank order, ShuffleBN is an exact inverse that
    really mixes samples across ranks, kNN extraction sees each image once."""
    tmp_path = two_ranks / "moco"
    r0, r1 = load(tmp_path / "rank0.pt"), load(tmp_path / "rank1.pt")
    assert torch.equal(r0["queue"], r1["queue"]) and r0["queue_ptr"] == r1["queue_ptr"] == 0
    assert torch.allclose(r0["queue"].norm(dim=0), torch.ones(64), atol=1e-5)
    # DDP keeps the query encoders' parameters identical (BN running stats are per rank, as in official
    # MoCo: DDP re-broadcasts rank 0's buffers before each forward, then each rank updates its own)
    params = lambda sd: {k: v for k, v in sd.items() if "running" not in k and "num_batches" not in k}  # noqa: E731
    assert_state_equal(params(r0["encoder_q"]), params(r1["encoder_q"]))
    expected = torch.tensor([0.0] * 3 + [1.0] * 3)
    assert torch.equal(r0["gathered"][:, 0], expected) and torch.equal(r1["gathered"][:, 0], expected)
    for r in (r0, r1):
        assert torch.equal(r["restored"], r["x"]) and r["images_ok"]
    ids = torch.cat([r0["shuffled"], r1["shuffled"]]).flatten().sort().values
    assert torch.equal(ids, torch.arange(16.0))  # a permutation of the global batch
    assert not torch.equal(r0["shuffled"], r0["x"])  # which actually moved samples
    assert torch.equal(r0["feats"], r1["feats"]) and r0["labels"].tolist() == [i % 10 for i in range(7)]
    ckpt = load(tmp_path / "last.pt")
    assert torch.equal(ckpt["queue"], r0["queue"]) and len(ckpt["rng"]) == 2


def test_tiny_end_to_end_as_a_user_runs_it(tmp_path):
    out = tmp_path / "run"
    proc = run_script("moco_co2.py", *TINY, "--epochs", "2", "--queue-size", "64", "--out-dir", out,
                      "--knn-every", "1", "--log-every", "2")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6, 8] and [r["epoch"] for r in train] == [0, 0, 1, 1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    for r in train:
        assert r["loss"] == pytest.approx(r["loss_ins"] + 1.0 * r["loss_co2"], rel=1e-5)
    assert [r["epoch"] for r in records if "knn_top1" in r] == [0, 1]
    ckpt = load(out / "last.pt")  # weights_only=True: plain types only
    assert ckpt["method"] == "moco_co2" and ckpt["next_epoch"] == 2 and ckpt["step"] == 8
    assert ckpt["queue_ptr"] == (8 * 16) % 64 and ckpt["queue"].shape == (128, 64)
    assert any(k.startswith("backbone.layer4") for k in ckpt["encoder_q"])
    assert "ShuffleBN" in proc.stdout and "done: 2 epochs" in proc.stdout


def tiny_args(out, **overrides):
    fields = dict(dataset="synthetic", synthetic_images=64, arch="resnet18", image_size=32, batch_size=16,
                  workers=0, seed=0, epochs=2, queue_size=64, out_dir=str(out), log_every=1)
    fields.update(overrides)
    return moco_co2.Args(**fields)


def test_resume_is_bitwise_identical(tmp_path):
    """2 epochs straight == 1 epoch + --resume auto to 2 == stop mid-epoch at step 3 + --resume auto."""
    moco_co2.main(tiny_args(tmp_path / "straight"))
    moco_co2.main(tiny_args(tmp_path / "split", epochs=1))
    moco_co2.main(tiny_args(tmp_path / "split", resume="auto"))
    moco_co2.main(tiny_args(tmp_path / "mid", stop_at_step=3))
    assert load(tmp_path / "mid" / "last.pt")["next_batch"] == 3
    moco_co2.main(tiny_args(tmp_path / "mid", resume="auto"))
    straight = final_state(tmp_path / "straight")
    assert_state_equal(final_state(tmp_path / "split"), straight)
    assert_state_equal(final_state(tmp_path / "mid"), straight)
    losses = [[(r["step"], r["loss"]) for r in map(json.loads, open(tmp_path / name / "metrics.jsonl"))]
              for name in ("straight", "split", "mid")]
    assert losses[0] == losses[1] == losses[2]


def test_refuses_to_overwrite_or_mix_runs(tmp_path):
    out = tmp_path / "run"
    moco_co2.main(tiny_args(out, epochs=1))
    before = (out / "last.pt").read_bytes()
    with pytest.raises(UserError, match="already exists"):
        moco_co2.main(tiny_args(out, epochs=1))
    with pytest.raises(UserError, match="queue-size"):
        moco_co2.main(tiny_args(out, resume="auto", queue_size=128))
    assert moco_co2.main(tiny_args(out, epochs=1, resume="auto")) == {}  # finished: nothing to do
    assert (out / "last.pt").read_bytes() == before
    other = tmp_path / "other.pt"
    torch.save({"method": "adco", "args": {}}, other)
    with pytest.raises(UserError, match="not a moco_co2.py checkpoint.*adco"):
        moco_co2.main(tiny_args(tmp_path / "x", resume=str(other)))
    torch.save({"conv1.weight": torch.zeros(1)}, other)
    with pytest.raises(UserError, match="not a moco_co2.py checkpoint"):
        moco_co2.main(tiny_args(tmp_path / "x", resume=str(other)))
    with pytest.raises(UserError, match="no such file"):
        moco_co2.main(tiny_args(tmp_path / "x", resume=str(tmp_path / "missing.pt")))


def test_size_errors(tmp_path):
    with pytest.raises(UserError, match="multiple of the global --batch-size"):
        moco_co2.main(tiny_args(tmp_path, queue_size=72))
    with pytest.raises(UserError, match="fewer than one global batch"):
        moco_co2.main(tiny_args(tmp_path, synthetic_images=8))
    with pytest.raises(UserError, match="does not exist"):
        moco_co2.main(tiny_args(tmp_path, dataset="imagefolder", data=str(tmp_path / "imagenet")))
    with pytest.raises(UserError, match="--bn-splits 3 must be >= 1 and divide the per-process batch 16"):
        moco_co2.main(tiny_args(tmp_path, bn_splits=3))
    with pytest.raises(UserError, match="sub-batches of at least 2 images"):
        moco_co2.main(tiny_args(tmp_path, bn_splits=16))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError, match="non-finite loss"):  # lr 1e30: the weights explode after one step
        moco_co2.main(tiny_args(out, lr=1e30, ckpt_every_steps=1))
    good = load(out / "last.pt")
    bad = list(out.glob("nonfinite_step*.pt"))
    assert len(bad) == 1 and load(bad[0])["step"] > good["step"]
    assert all(torch.isfinite(v).all() for v in good["encoder_q"].values())


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "broken.jpg").write_bytes(b"garbage")
    proc = run_cli("moco_co2.py", "--dataset", "imagefolder", "--data", tmp_path, "--arch", "resnet18",
                   "--image-size", "32", "--batch-size", "1", "--queue-size", "4", "--workers", "1",
                   "--out-dir", tmp_path / "out", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "broken.jpg" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr


def test_batch_must_divide_by_world_size(two_ranks):
    """moco_co2.py's entry point with a global batch of 15 on 2 ranks (tests/dist_worker.py): each rank exits 2 with
    one line naming itself, and nothing is written."""
    for rank in (0, 1):
        result = load(two_ranks / "refusal" / f"rank{rank}.pt")
        assert result["code"] == 2 and result["stderr"].count("\n") == 1, result["stderr"]
        assert result["stderr"].startswith(f"[rank {rank}] error: --batch-size 15 is the global batch and must divide "
                                           "by the 2 processes")
        assert not result["wrote"]


def test_help_lists_every_flag_with_its_docstring():
    proc = run_cli("moco_co2.py", "--help")
    for flag, words in [("--co2-alpha", "α"), ("--co2-tau", "τ_con"), ("--moco-t", "τ"), ("--queue-size", "K"),
                        ("--batch-size", "GLOBAL"), ("--resume", "auto")]:
        assert flag in proc.stdout and words in proc.stdout, flag
