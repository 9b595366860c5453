"""caco.py: the bank gradient against autograd and finite differences, the bank's momentum step against
torch.optim.SGD, LARS against a hand computation, labels from the other view's key, multi-crop pairs and
weights, schedules, two real processes (identical banks), exact resume, every variant end to end, bad inputs."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
import tyro

import caco
from common import UserError, pil_views
from conftest import TINY, assert_state_equal, final_state, load, run_cli, unit


def raw_bank(c, k, seed=3, dtype=torch.float64):
    """An un-normalised bank: columns of different lengths (0.5 .. 2.5), so the normalisation matters."""
    g = torch.Generator().manual_seed(seed)
    return unit(c, k, seed=seed, dim=0, dtype=dtype) * (0.5 + 2 * torch.rand(k, generator=g, dtype=dtype))


def surrogate_F(q, bank, labels, mem_t):
    """F = 1/(N τ_m) Σ_ik sg(p~_ik) q_i . n_k, written with plain exp / sum / abs (no softmax helper)."""
    n = bank / torch.sqrt((bank * bank).sum(dim=0))
    logits = q @ n
    e = torch.exp(logits / mem_t)
    p = e / e.sum(dim=1, keepdim=True)
    onehot = torch.zeros_like(p)
    onehot[torch.arange(q.shape[0]), labels] = 1.0
    p_tilde = (p - onehot).abs().detach()
    return (p_tilde * logits).sum() / (q.shape[0] * mem_t)


@pytest.mark.parametrize("n,c,k,mem_t", [(4, 8, 16, 0.08), (1, 3, 5, 0.2), (7, 16, 33, 0.05), (6, 4, 3, 1.0)])
def test_bank_grad_is_minus_the_autograd_gradient_of_F(n, c, k, mem_t):
    q = unit(n, c, seed=1)
    bank = raw_bank(c, k).requires_grad_()
    labels = torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(5))  # repeats allowed
    (dF,) = torch.autograd.grad(surrogate_F(q, bank, labels, mem_t), bank)
    ours = caco.bank_grad(q, bank.detach(), labels, mem_t)
    assert ours.dtype == torch.float64 and ours.shape == (c, k)
    assert dF.abs().max() > 1e-3
    assert torch.allclose(ours, -dF, rtol=1e-10, atol=1e-12)
    # tangent: the step never changes a column's length to first order
    assert ((ours * bank.detach()).sum(dim=0)).abs().max() < 1e-12
    # float32 in -> float32 out, close to the float64 result
    ours32 = caco.bank_grad(q.float(), bank.detach().float(), labels, mem_t)
    assert ours32.dtype == torch.float32 and torch.allclose(ours32.double(), -dF, rtol=1e-4, atol=1e-5)


def ce_at(q, bank, label, mem_t):
    """CE of one query against the bank at τ_m (float64), the loss the bank step is judged by."""
    n = bank / bank.norm(dim=0)
    return F.cross_entropy((q @ n / mem_t)[None], torch.tensor([label]))


def test_bank_step_is_descent_on_the_positive_and_ascent_on_every_negative():
    """Per query and per column (finite differences): moving ONLY column k by -ε G_k lowers the query's CE
    when k is its positive and raises it when k is a negative, at the rate the closed form predicts, and
    raises the logit q . n_k in both cases (every column is pulled toward the query)."""
    c, k, mem_t, eps = 6, 9, 0.5, 1e-5  # τ_m large enough that no p underflows
    bank, queries = raw_bank(c, k), unit(3, c, seed=1)
    for i, label in enumerate([2, 7, 0]):
        q = queries[i]
        G = caco.bank_grad(q[None], bank, torch.tensor([label]), mem_t)
        p = torch.softmax(q @ (bank / bank.norm(dim=0)) / mem_t, dim=0)
        for col in range(k):
            def moved(sign):
                b = bank.clone()
                b[:, col] -= sign * eps * G[:, col]
                return b
            d_loss = (ce_at(q, moved(1), label, mem_t) - ce_at(q, moved(-1), label, mem_t)) / (2 * eps)
            d_logit = ((q @ F.normalize(moved(1), dim=0))[col] - (q @ F.normalize(moved(-1), dim=0))[col]) / (2 * eps)
            assert d_logit > 0
            if col == label:
                assert d_loss < 0, (i, col)
            else:
                assert d_loss > 0, (i, col)
            # d L/d step = (p - δ) p~ ||(I - n nᵀ) q||² / (τ_m ||W_k||)², p~ = |p - δ|
            w = bank[:, col]
            n_col = w / w.norm()
            tangent = q - (q @ n_col) * n_col
            delta = 1.0 if col == label else 0.0
            expected = (p[col] - delta) * abs(p[col] - delta) * (tangent @ tangent) / (mem_t * w.norm()) ** 2
            assert torch.allclose(d_loss, expected, rtol=1e-4, atol=1e-9)


def test_bank_momentum_step_equals_torch_sgd():
    torch.manual_seed(0)
    bank = torch.randn(4, 10)
    velocity = torch.zeros_like(bank)
    param = torch.nn.Parameter(bank.clone())
    sgd = torch.optim.SGD([param], lr=3.0, momentum=0.9, dampening=0, nesterov=False, weight_decay=0)
    for _ in range(4):
        grad = torch.randn(4, 10)
        caco.bank_momentum_step(bank, velocity, grad, 3.0, 0.9)
        param.grad = grad.clone()
        sgd.step()
        assert torch.allclose(bank, param.detach(), rtol=1e-6, atol=1e-6)
    assert torch.allclose(velocity, sgd.state[param]["momentum_buffer"], rtol=1e-6, atol=1e-6)


def test_lars_step_equals_a_hand_computation():
    """Two steps on a weight matrix (weight decay + trust ratio), a 1-D parameter (neither) and a zero
    matrix (trust ratio 1), computed by hand with Python floats."""
    w0 = [[0.5, -1.0], [2.0, 0.25]]
    b0 = [0.3, -0.7]
    weight = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.tensor(b0, dtype=torch.float64))
    zero = torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    lr, wd, mom, trust = 0.7, 0.01, 0.9, 0.001
    opt = caco.LARS([weight, bias, zero], lr=lr, weight_decay=wd, momentum=mom, trust=trust)
    grads = [([[1.0, 2.0], [-3.0, 0.5]], [0.2, 0.4], [[1.0, 0.0], [0.0, 1.0]]),
             ([[-0.5, 1.0], [1.5, 2.0]], [-1.0, 0.1], [[0.0, 2.0], [0.0, 0.0]])]
    w, b, z = [row[:] for row in w0], b0[:], [[0.0, 0.0], [0.0, 0.0]]
    mu_w, mu_b, mu_z = [[0.0] * 2 for _ in range(2)], [0.0, 0.0], [[0.0] * 2 for _ in range(2)]
    for gw, gb, gz in grads:
        weight.grad, bias.grad = torch.tensor(gw, dtype=torch.float64), torch.tensor(gb, dtype=torch.float64)
        zero.grad = torch.tensor(gz, dtype=torch.float64)
        opt.step()
        # matrix: d = g + wd w; d *= trust ||w|| / ||d||; mu = mom mu + d; w -= lr mu
        d = [[gw[r][c] + wd * w[r][c] for c in range(2)] for r in range(2)]
        norm = lambda m: math.sqrt(sum(x * x for row in m for x in row))  # noqa: E731
        ratio = trust * norm(w) / norm(d)
        mu_w = [[mom * mu_w[r][c] + ratio * d[r][c] for c in range(2)] for r in range(2)]
        w = [[w[r][c] - lr * mu_w[r][c] for c in range(2)] for r in range(2)]
        # 1-D: plain momentum SGD, no weight decay, no trust ratio
        mu_b = [mom * mu_b[i] + gb[i] for i in range(2)]
        b = [b[i] - lr * mu_b[i] for i in range(2)]
        # zero matrix: ||w|| = 0 -> ratio 1 (z moves after the first step, so recompute)
        dz = [[gz[r][c] + wd * z[r][c] for c in range(2)] for r in range(2)]
        rz = 1.0 if norm(z) == 0 else trust * norm(z) / norm(dz)
        mu_z = [[mom * mu_z[r][c] + rz * dz[r][c] for c in range(2)] for r in range(2)]
        z = [[z[r][c] - lr * mu_z[r][c] for c in range(2)] for r in range(2)]
        assert torch.allclose(weight.detach(), torch.tensor(w, dtype=torch.float64), rtol=1e-12, atol=1e-15)
        assert torch.allclose(bias.detach(), torch.tensor(b, dtype=torch.float64), rtol=1e-12, atol=1e-15)
        assert torch.allclose(zero.detach(), torch.tensor(z, dtype=torch.float64), rtol=1e-12, atol=1e-15)


def test_labels_are_the_argmax_of_the_other_views_key():
    """Column 0 is long but points away; the nearest column by cosine wins. In the loss, query 0 takes the
    positive of key 1 and query 1 that of key 0 (which differ here), as an explicit formula says."""
    c, k, tau, mem_t = 8, 12, 0.08, 0.1
    bank = raw_bank(c, k)
    directions = F.normalize(bank, dim=0)
    t0 = F.normalize(directions[:, [3, 5]].T + 0.05 * unit(2, c, seed=8), dim=1)  # near columns 3 and 5
    t1 = F.normalize(directions[:, [9, 1]].T + 0.05 * unit(2, c, seed=9), dim=1)  # near columns 9 and 1
    bank[:, 0] = -100 * (directions[:, 3] + directions[:, 9])  # longest column, but far from both keys
    assert caco.positive_labels(t0, bank).tolist() == [3, 5]
    assert caco.positive_labels(t1, bank).tolist() == [9, 1]
    q0, q1 = unit(2, c, seed=1), unit(2, c, seed=2)
    loss, grad, pos_prob, _, pos_cols = caco.caco_loss_and_bank_grad([q0, q1], [t0, t1], bank, caco.crop_pairs(2, 0),
                                                                     tau, mem_t)
    n = bank / bank.norm(dim=0)
    y_from_t1, y_from_t0 = torch.tensor([9, 1]), torch.tensor([3, 5])
    expected = F.cross_entropy(q0 @ n / tau, y_from_t1) + F.cross_entropy(q1 @ n / tau, y_from_t0)  # no ½
    assert torch.allclose(loss, expected)
    own_key = F.cross_entropy(q0 @ n / tau, y_from_t0) + F.cross_entropy(q1 @ n / tau, y_from_t1)
    assert not torch.allclose(loss, own_key)
    assert torch.allclose(grad, caco.bank_grad(q0, bank, y_from_t1, mem_t) + caco.bank_grad(q1, bank, y_from_t0, mem_t))
    p0, p1 = torch.softmax(q0 @ n / mem_t, 1), torch.softmax(q1 @ n / mem_t, 1)
    assert torch.allclose(pos_prob, torch.cat([p0[[0, 1], y_from_t1], p1[[0, 1], y_from_t0]]).mean())
    assert pos_cols == 1.0  # 2 distinct positives of 2 queries, for each key crop
    t1 = F.normalize(directions[:, [9, 9]].T + 0.05 * unit(2, c, seed=9), dim=1)  # both keys of crop 1 near column 9
    assert caco.caco_loss_and_bank_grad([q0, q1], [t0, t1], bank, caco.crop_pairs(2, 0), tau, mem_t).pos_cols == 0.75


def test_multi_crop_pairs_weights_and_loss():
    assert caco.crop_pairs(2, 0) == [(0, 1, 1.0), (1, 0, 1.0)]
    pairs = caco.crop_pairs(2, 6)
    assert len(pairs) == 14 and all(i != j and j in (0, 1) for i, j, _ in pairs)
    assert {(i, j) for i, j, _ in pairs} == {(0, 1), (1, 0)} | {(i, j) for i in range(2, 8) for j in (0, 1)}
    assert all(w == (0.5 if i < 2 else 1 / 12) for i, _, w in pairs)
    c, k, tau = 8, 20, 0.08
    bank = raw_bank(c, k)
    queries = [unit(3, c, seed=10 + i) for i in range(8)]
    keys = [unit(3, c, seed=30), unit(3, c, seed=31)]
    loss, grad, *_ = caco.caco_loss_and_bank_grad(queries, keys, bank, pairs, tau, 0.08)
    n = bank / bank.norm(dim=0)
    y = [(keys[j] @ n).argmax(dim=1) for j in (0, 1)]
    ce = lambda i, j: F.cross_entropy(queries[i] @ n / tau, y[j])  # noqa: E731
    big = (ce(0, 1) + ce(1, 0)) / 2
    small = sum(ce(i, j) for i in range(2, 8) for j in (0, 1)) / 12
    assert torch.allclose(loss, big + small)
    g = lambda i, j: caco.bank_grad(queries[i], bank, y[j], 0.08)  # noqa: E731
    assert torch.allclose(grad, (g(0, 1) + g(1, 0)) / 2 + sum(g(i, j) for i in range(2, 8) for j in (0, 1)) / 12)


def test_crops_and_their_sizes():
    img = caco.make_dataset("synthetic", None, "train", None, 4, 32)[0][0]
    single = pil_views(caco.augmentations(32, multi_crop=False))(img)
    assert [tuple(v.shape) for v in single] == [(3, 32, 32)] * 2
    multi = pil_views(caco.augmentations(224, multi_crop=True))(img.resize((224, 224)))
    assert [v.shape[-1] for v in multi] == [224] * 2 + [96] * 6
    assert [v.shape[-1] for v in pil_views(caco.augmentations(32, multi_crop=True))(img)] == [32] * 2 + [14] * 6
    # the view pipelines of the single-crop recipe: blur 1.0 / 0.1, solarize none / 0.2
    first, second = pil_views(caco.augmentations(224, multi_crop=False)).pipelines
    assert "Solarize" not in repr(first) and "Solarize" in repr(second)
    probs = lambda pipe: [t.p for t in pipe.transforms if type(t).__name__ == "RandomApply"]  # noqa: E731
    assert probs(first) == [0.8, 1.0] and probs(second) == [0.8, 0.1, 0.2]


def test_schedules():
    # network lr: peak 1.2 (0.3 x 1024/256), 10 warm-up epochs, cosine to 0.012 over 200 epochs
    lr = [caco.warmup_cosine(e, 1.2, 0.012, 10, 200) for e in range(200)]
    assert lr[0] == pytest.approx(0.12) and lr[9] == pytest.approx(1.2) and lr[10] == pytest.approx(1.2)
    assert lr[105] == pytest.approx(0.012 + 0.5 * (1.2 - 0.012)) and lr[199] > 0.012
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))
    mem = [caco.warmup_cosine(e, 3.0, 3.0, 10, 200) for e in range(200)]
    assert mem[:3] == pytest.approx([0.3, 0.6, 0.9]) and set(mem[9:]) == {3.0}
    assert caco.warmup_cosine(105, 3.0, 0.03, 10, 200) == pytest.approx(0.03 + 0.5 * 2.97)
    assert caco.key_momentum(0, 0.99, 200, True) == pytest.approx(0.99)
    assert caco.key_momentum(100, 0.99, 200, True) == pytest.approx(0.995)
    assert caco.key_momentum(199, 0.99, 200, True) > 0.99999
    assert caco.key_momentum(100, 0.99, 200, False) == 0.99


def test_head_has_no_biases_and_bn_after_the_first_two_layers():
    encoder = caco.Encoder("resnet18", False, 64, 16)
    kinds = [type(m).__name__ for m in encoder.head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert all(m.bias is None for m in encoder.head if isinstance(m, torch.nn.Linear))
    assert encoder.head[-1].out_features == 16


def tiny_args(out, **overrides):
    fields = dict(dataset="synthetic", synthetic_images=64, arch="resnet18", image_size=32, batch_size=16,
                  workers=0, seed=0, epochs=2, bank_size=64, mlp_dim=512, knn_every=0, out_dir=str(out),
                  log_every=1)
    fields.update(overrides)
    return caco.Args(**fields)


def test_resume_is_bitwise_identical(tmp_path):
    """2 epochs straight == 1 epoch + --resume auto to 2 == stop mid-epoch at step 3 + --resume auto."""
    caco.main(tiny_args(tmp_path / "straight"))
    caco.main(tiny_args(tmp_path / "split", epochs=1))
    caco.main(tiny_args(tmp_path / "split", resume="auto"))
    caco.main(tiny_args(tmp_path / "mid", stop_at_step=3))
    assert load(tmp_path / "mid" / "last.pt")["next_batch"] == 3
    caco.main(tiny_args(tmp_path / "mid", resume="auto"))
    straight = final_state(tmp_path / "straight")
    assert straight["step"] == 8 and straight["bank_velocity"].abs().sum() > 0
    assert_state_equal(final_state(tmp_path / "split"), straight)
    assert_state_equal(final_state(tmp_path / "mid"), straight)
    losses = [[(r["step"], r.get("loss", r.get("bank_init_loss")))
               for r in map(json.loads, open(tmp_path / name / "metrics.jsonl"))]
              for name in ("straight", "split", "mid")]
    assert losses[0] == losses[1] == losses[2]


def test_multi_crop_and_no_bank_init_end_to_end(tmp_path):
    state = caco.main(tiny_args(tmp_path / "multi", epochs=1, multi_crop=True))
    ckpt = load(tmp_path / "multi" / "last.pt")
    assert torch.equal(ckpt["bank"], state["bank"]) and ckpt["step"] == 4
    records = [json.loads(line) for line in open(tmp_path / "multi" / "metrics.jsonl")]
    assert records[0]["bank_init_steps"] == 4 and math.isfinite(records[0]["bank_init_loss"])
    assert len(records) == 5 and all(math.isfinite(r["loss"]) for r in records[1:])
    # bank init with K % B != 0 (72 = 4 x 16 + 8): every column is a unit-norm key; η = 0 keeps it so
    caco.main(tiny_args(tmp_path / "init72", epochs=1, bank_size=72, mem_lr=0.0, mem_lr_final=0.0))
    init72 = load(tmp_path / "init72" / "last.pt")["bank"]
    assert torch.allclose(init72.norm(dim=0), torch.ones(72), atol=1e-5)
    # no init: the bank starts as seeded randn (not unit columns) and still trains
    torch.manual_seed(0)
    caco.Encoder("resnet18", False, 512, 256)  # the same draws as main's model construction
    randn = torch.randn(256, 64)
    caco.main(tiny_args(tmp_path / "noinit", epochs=1, bank_init=False, mem_lr=0.0, mem_lr_final=0.0))
    assert torch.equal(load(tmp_path / "noinit" / "last.pt")["bank"], randn)  # η = 0: untouched


def test_knn_failure_never_ends_training(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")
    monkeypatch.setattr(caco, "knn_accuracy", broken)
    caco.main(tiny_args(tmp_path, epochs=1, knn_every=1))
    assert load(tmp_path / "last.pt")["next_epoch"] == 1
    assert "kNN monitor failed, training continues" in capsys.readouterr().out


def test_two_processes_keep_identical_banks(two_ranks):
    """2 ranks (gloo) see different images; after bank initialisation and 4 steps (single crop) and again
    with --multi-crop, both hold the same bank and velocity (the all-reduced gradient), and the same
    query-encoder parameters (DDP)."""
    tmp_path = two_ranks / "caco"
    for variant in ("single", "multi"):
        r0, r1 = load(tmp_path / f"{variant}_rank0.pt"), load(tmp_path / f"{variant}_rank1.pt")
        assert torch.equal(r0["bank"], r1["bank"]) and torch.equal(r0["bank_velocity"], r1["bank_velocity"])
        assert r0["bank_velocity"].abs().sum() > 0
        params = lambda sd: {k: v for k, v in sd.items() if "running" not in k and "num_batches" not in k}  # noqa: E731
        assert_state_equal(params(r0["encoder_q"]), params(r1["encoder_q"]))
        ckpt = load(tmp_path / variant / "last.pt")
        assert torch.equal(ckpt["bank"], r0["bank"]) and len(ckpt["rng"]) == 2 and ckpt["step"] == 4


def test_tiny_end_to_end_as_a_user_runs_it(tmp_path):
    """The command line through caco.py's entry point, in-process (tests/test_evidence.py runs caco.py as its own
    process)."""
    out = tmp_path / "run"
    proc = run_cli("caco.py", *TINY, "--epochs", "2", "--bank-size", "64", "--mlp-dim", "512",
                   "--out-dir", out, "--knn-every", "1", "--log-every", "2")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6, 8] and [r["epoch"] for r in train] == [0, 0, 1, 1]
    for r in train:
        assert math.isfinite(r["loss"]) and 0 < r["pos_prob"] < 1 and r["neg_share"] == pytest.approx(1 - r["pos_prob"])
        assert 1 / 16 <= r["pos_cols"] <= 1  # distinct positives of a batch of 16
        # warm-up epochs 1 and 2 of 10: lr = 0.3 x 16/256 x (e+1)/10, bank lr 3 (e+1)/10, m = 0.99 -> 1
        assert r["lr"] == pytest.approx(0.01875 * (r["epoch"] + 1) / 10)
        assert r["mem_lr"] == pytest.approx(0.3 * (r["epoch"] + 1))
        assert r["key_m"] == pytest.approx([0.99, 0.995][r["epoch"]])
    assert [r["epoch"] for r in records if "knn_top1" in r] == [0, 1]
    ckpt = load(out / "last.pt")  # weights_only=True: plain types only
    assert ckpt["method"] == "caco" and ckpt["next_epoch"] == 2 and ckpt["step"] == 8
    assert ckpt["bank"].shape == (256, 64) and ckpt["bank_velocity"].shape == (256, 64)
    assert any(k.startswith("backbone.layer4") for k in ckpt["encoder_q"])
    assert "bank initialised: 64 momentum keys in 4 steps" in proc.stdout
    assert "plain BatchNorm" in proc.stdout and "done: 2 epochs" in proc.stdout


def test_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="--mem-t"):
        caco.main(tiny_args(tmp_path / "a", mem_t=0.0))
    out = tmp_path / "run"
    caco.main(tiny_args(out, epochs=1))
    with pytest.raises(UserError, match="bank-size"):
        caco.main(tiny_args(out, resume="auto", bank_size=128))
    with pytest.raises(UserError, match="already exists"):
        caco.main(tiny_args(out, epochs=1))
    other = tmp_path / "other.pt"
    torch.save({"method": "adco", "args": {}}, other)
    with pytest.raises(UserError, match="not a caco.py checkpoint"):
        caco.main(tiny_args(tmp_path / "x", resume=str(other)))


def test_help_lists_flags_with_their_docstrings(capsys):
    with pytest.raises(SystemExit):  # in-process (what `python caco.py --help` prints), saves a start-up
        tyro.cli(caco.Args, args=["--help"])
    help_text = capsys.readouterr().out
    for flag, words in [("--mem-t", "τ_m"), ("--moco-t", "τ"), ("--bank-size", "K"), ("--batch-size", "GLOBAL"),
                        ("--multi-crop", "pairs"), ("--init-lr", "peak"), ("--mem-lr-final", "constant")]:
        assert flag in help_text and words in help_text, flag


@pytest.mark.parametrize("bank_size,dead", [(1, True), (64, False)])
def test_a_dead_bank_is_reported(tmp_path, bank_size, dead):
    """neg_share (the τ_m-softmax mass on the negatives, 1 - pos_prob) is logged, and a run whose bank step has
    vanished says so. A bank of one column is every query's positive: no negatives, p = 1, G = 0 exactly (dead);
    with 64 columns the negatives keep most of the softmax of a barely trained network."""
    out = tmp_path / "run"
    proc = run_cli("caco.py", *TINY, "--epochs", "1", "--bank-size", bank_size, "--no-bank-init",
                   "--out-dir", out, "--log-every", "2")
    shares = [json.loads(line)["neg_share"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in line]
    assert len(shares) == 2 and all(0 <= s <= 1 for s in shares)
    assert ("WARNING: the negatives hold" in proc.stdout) == dead
    assert (shares[0] < caco.DEAD_BANK_SHARE) == dead
    assert proc.stdout.count("WARNING: the negatives hold") <= 1  # once per run
