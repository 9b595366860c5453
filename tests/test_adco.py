"""adco.py: the closed-form bank gradient against autograd, the bank's momentum step against torch.optim.SGD,
sym / multi-crop gradients, labels and bank identity on two real torchrun nodes, bank initialisation, exact
resume, tiny end-to-end runs of every variant, bad inputs."""
import json

import pytest
import torch
import torch.nn.functional as F
import tyro

import adco
from common import UserError, pil_views
from conftest import TINY, assert_state_equal, final_state, load, run_cli, unit


def raw_bank(c, k, seed=3, dtype=torch.float64):
    """An un-normalised bank whose columns have very different norms (0.3 .. 3), so the 1/||W_k|| and the
    tangent-space term of the gradient both matter."""
    g = torch.Generator().manual_seed(seed)
    return unit(c, k, seed=seed, dim=0, dtype=dtype) * (0.3 + 2.7 * torch.rand(k, generator=g, dtype=dtype))


def autograd_bank_grad(terms, bank, labels, t):
    """Independent oracle: ∂/∂W of Σ w mean_i CE([q_i.k_allᵀ | q_i.normalize(W)] / t, labels) by autograd."""
    w = bank.clone().requires_grad_()
    loss = sum(weight * F.cross_entropy(torch.cat([q @ k_all.T, q @ F.normalize(w, dim=0)], 1) / t, labels)
               for q, k_all, weight in terms)
    (grad,) = torch.autograd.grad(loss, w)
    return grad


# ---------------------------------------------------------------------------------------------------
# the math
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,ranks,c,k,mem_t", [(4, 1, 8, 16, 0.02), (3, 2, 5, 7, 0.2), (5, 3, 16, 40, 1.0),
                                               (2, 4, 128, 64, 0.05)])
def test_bank_grad_is_minus_autograd_float64(n, ranks, c, k, mem_t):
    rank = ranks - 1  # the last rank: labels far from 0
    q, k_all, bank = unit(n, c, seed=1), unit(n * ranks, c, seed=2), raw_bank(c, k)
    labels = adco.own_key_labels(n, rank, "cpu")
    ours = adco.bank_grad(q, k_all, bank, labels, mem_t)
    expected = -autograd_bank_grad([(q, k_all, 1.0)], bank, labels, mem_t)
    assert ours.dtype == torch.float64 and ours.shape == (c, k)
    assert expected.abs().max() > 1e-6  # a real gradient, not zeros
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12)
    # the gradient is tangent: <G_k, W_k> = 0 (moving W_k along itself does not change n_k)
    assert (ours * bank).sum(0).abs().max() < 1e-12 * max(1.0, expected.abs().max().item())


def test_bank_grad_is_the_full_cross_entropy_gradient_even_for_a_bank_label():
    """AdCo's labels never point into the bank, but bank_grad keeps CE's one-hot term: with labels in the bank
    block it is still -autograd (so the p - onehot line is exercised, not dead)."""
    q, k_all, bank = unit(3, 6, seed=1), unit(4, 6, seed=2), raw_bank(6, 9)
    labels = torch.tensor([4, 7, 12])  # columns B + 0, B + 3, B + 8 of [keys | bank]
    expected = -autograd_bank_grad([(q, k_all, 1.0)], bank, labels, 0.1)
    torch.testing.assert_close(adco.bank_grad(q, k_all, bank, labels, 0.1), expected, rtol=1e-9, atol=1e-12)


def test_bank_grad_float32_needs_no_grad_and_leaves_inputs_alone():
    q = unit(8, 32, seed=1, dtype=torch.float32).requires_grad_()
    k_all = unit(16, 32, seed=2, dtype=torch.float32)
    bank = raw_bank(32, 64, dtype=torch.float32).requires_grad_()
    labels = adco.own_key_labels(8, 1, "cpu")
    before = bank.detach().clone()
    ours = adco.bank_grad(q, k_all, bank, labels, 0.02)
    assert ours.dtype == torch.float32 and not ours.requires_grad and bank.grad is None and q.grad is None
    assert torch.equal(bank.detach(), before)
    expected = -autograd_bank_grad([(q.detach().double(), k_all.double(), 1.0)], before.double(), labels, 0.02)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_rank_mean_of_bank_grads_is_the_global_batch_gradient():
    """2 simulated ranks with their own queries and labels r*N + i against the same gathered keys: the mean of
    the per-rank gradients (what the all-reduce computes) = -∂/∂W of the global-batch mean loss."""
    n, c, k, mem_t = 4, 8, 12, 0.05
    q_all, k_all, bank = unit(2 * n, c, seed=1), unit(2 * n, c, seed=2), raw_bank(c, k)
    per_rank = [adco.bank_grad(q_all[r * n:(r + 1) * n], k_all, bank, adco.own_key_labels(n, r, "cpu"), mem_t)
                for r in range(2)]
    expected = -autograd_bank_grad([(q_all, k_all, 1.0)], bank, torch.arange(2 * n), mem_t)
    torch.testing.assert_close((per_rank[0] + per_rank[1]) / 2, expected, rtol=1e-9, atol=1e-12)


def test_bank_momentum_step_equals_torch_sgd():
    """v <- μ v + G + λ W; W <- W - η v  ==  torch.optim.SGD(lr=η, momentum=μ, weight_decay=λ) fed G, 5 steps,
    with a fresh G = bank_grad(...) of the current bank at every step."""
    bank = raw_bank(8, 24)
    velocity = torch.zeros_like(bank)
    reference = bank.clone().requires_grad_()
    sgd = torch.optim.SGD([reference], lr=3.0, momentum=0.9, weight_decay=1e-4)
    k_all = unit(6, 8, seed=2)
    for step in range(5):
        q = unit(3, 8, seed=10 + step)
        labels = adco.own_key_labels(3, 1, "cpu")
        grad = adco.bank_grad(q, k_all, bank, labels, 0.1)
        adco.bank_momentum_step(bank, velocity, grad, 3.0, 0.9, 1e-4)
        reference.grad = adco.bank_grad(q, k_all, reference.detach(), labels, 0.1)
        sgd.step()
        torch.testing.assert_close(bank, reference.detach(), rtol=1e-12, atol=1e-12)
    assert (bank - raw_bank(8, 24)).abs().max() > 1e-3  # the bank really moved
    # the step ascends the loss at τ_m: L(W after one step) > L(W before), from the same features
    q, labels, before = unit(3, 8, seed=99), adco.own_key_labels(3, 1, "cpu"), raw_bank(8, 24)
    after = before.clone()
    adco.bank_momentum_step(after, torch.zeros_like(after), adco.bank_grad(q, k_all, before, labels, 0.1), 0.1, 0.9, 0)
    loss = lambda w: F.cross_entropy(adco.similarities(q, k_all, F.normalize(w, dim=0)) / 0.1, labels)  # noqa: E731
    assert loss(after) > loss(before)


@pytest.mark.parametrize("sym,multi_crop", [(False, False), (True, False), (False, True)])
def test_loss_and_bank_grad_of_every_variant_match_autograd(sym, multi_crop):
    """adco_loss_and_bank_grad over crop_plan's terms: G = -autograd of the weighted SUMMED loss at τ_m
    (sym: ½ + ½; multi-crop: 5 crops summed), loss = Σ w CE at τ by the explicit formula, and q's gradient."""
    n, rank, c, k, moco_t, mem_t = 4, 1, 16, 32, 0.12, 0.02
    plan = adco.crop_plan(sym, multi_crop)
    assert [w for _, _, w in plan] == ([1.0] * 5 if multi_crop else [0.5, 0.5] if sym else [1.0])
    crops = 6 if multi_crop else 2
    queries = [unit(n, c, seed=20 + i).requires_grad_() for i in range(crops)]
    keys_all = [unit(2 * n, c, seed=40 + j) for j in range(crops)]
    bank, labels = raw_bank(c, k), adco.own_key_labels(n, rank, "cpu")
    terms = [(queries[i], keys_all[j], w) for i, j, w in plan]
    loss, grad, pos_prob, acc, bank_share = adco.adco_loss_and_bank_grad(terms, bank, labels, moco_t, mem_t)
    detached = [(q.detach(), k_all, w) for q, k_all, w in terms]
    torch.testing.assert_close(grad, -autograd_bank_grad(detached, bank, labels, mem_t), rtol=1e-9, atol=1e-12)
    # the network loss, written out with exp / log: -log exp(q.k_own/τ) / (Σ_b exp(q.k_b/τ) + Σ_k exp(q.n_k/τ))
    n_unit = bank / bank.norm(dim=0)
    expected, expected_pos, expected_share = 0.0, 0.0, 0.0
    for q, k_all, w in terms:
        own = torch.exp((q * k_all[labels]).sum(1) / moco_t)
        total = torch.exp(q @ k_all.T / moco_t).sum(1) + torch.exp(q @ n_unit / moco_t).sum(1)
        expected = expected + w * (-torch.log(own / total)).mean()
        own_m = torch.exp((q * k_all[labels]).sum(1) / mem_t)
        total_m = torch.exp(q @ k_all.T / mem_t).sum(1) + torch.exp(q @ n_unit / mem_t).sum(1)
        expected_pos = expected_pos + (own_m / total_m).mean().detach() / len(terms)
        expected_share = expected_share + (torch.exp(q @ n_unit / mem_t).sum(1) / total_m).mean().detach() / len(terms)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pos_prob, expected_pos, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bank_share, expected_share, rtol=1e-10, atol=1e-12)
    assert 0 <= acc <= 1
    used = sorted({i for i, _, _ in plan})
    grads = torch.autograd.grad(loss, [queries[i] for i in used])
    grads_ref = torch.autograd.grad(expected, [queries[i] for i in used])
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


def test_labels_fill_bank_init_logits_and_schedule():
    assert adco.own_key_labels(4, 3, "cpu").tolist() == [12, 13, 14, 15]
    bank = torch.zeros(2, 6)
    filled = 0
    for step in range(3):  # 3 global batches of 2 keys fill 6 columns in order
        filled = adco.fill_bank(bank, filled, torch.full((2, 2), float(step + 1)))
    assert filled == 6 and bank[0].tolist() == [1, 1, 2, 2, 3, 3]
    with pytest.raises(RuntimeError):  # a batch that overruns the bank is refused by torch
        adco.fill_bank(bank, 6, torch.ones(2, 2))
    q, key, w = unit(3, 4, seed=1), unit(3, 4, seed=2), raw_bank(4, 5)
    logits, labels = adco.init_logits(q.float(), key.float(), w, 0.12)
    assert logits.shape == (3, 6) and labels.tolist() == [0, 0, 0]
    torch.testing.assert_close(logits[:, 0].double(), (q * key).sum(1) / 0.12)
    torch.testing.assert_close(logits[:, 1:].double(), q @ (w / w.norm(dim=0)) / 0.12, rtol=1e-5, atol=1e-5)
    assert adco.cosine_lr(0, 0.03, 6e-4, 200) == pytest.approx(0.03)
    assert adco.cosine_lr(100, 0.03, 6e-4, 200) == pytest.approx((0.03 + 6e-4) / 2)
    assert adco.cosine_lr(200, 0.03, 6e-4, 200) == pytest.approx(6e-4)


@pytest.mark.parametrize("image_size,sizes", [(224, [224, 224, 192, 160, 128, 96]), (32, [32, 32, 27, 23, 18, 14])])
def test_multi_crop_views(image_size, sizes):
    from PIL import Image
    transform = pil_views(adco.augmentations(image_size, multi_crop=True))
    views = transform(Image.new("RGB", (image_size + 8, image_size + 8)))
    assert [v.shape[-1] for v in views] == sizes
    scales = [p.transforms[0].scale for p in transform.pipelines]
    assert scales[0] == (0.2, 1.0)  # the key crop
    for scale, size in zip(scales[1:], [224, 192, 160, 128, 96]):
        assert scale == pytest.approx((0.2 * size / 224, size / 224))
    assert len(pil_views(adco.augmentations(image_size, multi_crop=False))(Image.new("RGB", (40, 40)))) == 2


# ---------------------------------------------------------------------------------------------------
# distributed: 2 torchrun nodes x 1 process
# ---------------------------------------------------------------------------------------------------
def test_two_nodes_labels_point_at_own_keys_and_banks_stay_identical(two_ranks):
    """LOCAL_RANK is 0 on both nodes (where upstream's label is wrong). The loop's labels must be r*N + i
    and select each rank's own keys from the gathered keys; bank and velocity bitwise equal on both ranks,
    with bank initialisation and with the seeded random bank (--no-bank-init), single crop and --sym."""
    tmp_path = two_ranks / "adco"
    for variant in ("single", "sym_noinit"):
        r0, r1 = load(tmp_path / f"{variant}_rank0.pt"), load(tmp_path / f"{variant}_rank1.pt")
        assert r0["world"] == 2 and r0["local_rank"] == r1["local_rank"] == 0
        assert r0["labels"].tolist() == list(range(8)) and r1["labels"].tolist() == list(range(8, 16))
        assert torch.equal(r0["keys_all"], r1["keys_all"])
        for r in (r0, r1):
            assert torch.equal(r["keys_all"][r["labels"]], r["keys"])  # the positive is the own key
        assert not torch.equal(r1["keys_all"][:8], r1["keys"])  # the local-index label would pick rank 0's
        assert torch.equal(r0["bank"], r1["bank"]) and torch.equal(r0["bank_velocity"], r1["bank_velocity"])
        assert r0["bank_velocity"].abs().max() > 0  # the bank was really updated
        ckpt = load(tmp_path / variant / "last.pt")
        assert torch.equal(ckpt["bank"], r0["bank"]) and torch.equal(ckpt["bank_velocity"], r0["bank_velocity"])
        assert len(ckpt["rng"]) == 2


# ---------------------------------------------------------------------------------------------------
# runs: bank initialisation, resume, end-to-end, bad inputs
# ---------------------------------------------------------------------------------------------------
def tiny_args(out, **overrides):
    fields = dict(dataset="synthetic", synthetic_images=64, arch="resnet18", image_size=32, batch_size=16,
                  workers=0, seed=0, epochs=2, bank_size=64, out_dir=str(out), log_every=1)
    fields.update(overrides)
    return adco.Args(**fields)


class Initialised(Exception):
    """Carries the checkpoint state of a run at the end of bank initialisation, before its first step."""


def state_after_bank_init(monkeypatch, args) -> dict:
    """adco.main up to the end of bank initialisation (--epochs must be >= 1, so the run is cut where main()
    builds its step tail: the first thing after the initialisation). Returns checkpoint_state() there."""
    class StopHere(adco.StepTail):
        def __init__(self, args, run, steps_per_epoch, metrics, checkpoint_state, *rest, **kwargs):
            raise Initialised(checkpoint_state(0, 0))
    monkeypatch.setattr(adco, "StepTail", StopHere)
    with pytest.raises(Initialised) as caught:
        adco.main(args)
    return caught.value.args[0]


def test_bank_init_fills_exactly_k_columns_with_unit_keys(tmp_path, monkeypatch):
    """K = 128, B = 16: 8 init steps (the 64-image loader is cycled); every column is a unit key (the randn
    columns it replaces have norm about sqrt(128)); θ_k = θ_q afterwards."""
    state = state_after_bank_init(monkeypatch, tiny_args(tmp_path / "init", epochs=1, bank_size=128))
    bank = state["bank"]
    assert bank.shape == (128, 128)
    torch.testing.assert_close(bank.norm(dim=0), torch.ones(128), rtol=0, atol=1e-5)
    assert torch.cdist(bank.T, bank.T).add(torch.eye(128)).min() > 1e-3  # 128 distinct keys
    records = [json.loads(line) for line in open(tmp_path / "init" / "metrics.jsonl")]
    assert records[0]["bank_init_steps"] == 8
    parameters = {name for name, _ in adco.Encoder("resnet18", False, 2048, 128).named_parameters()}
    for name in parameters:
        assert torch.equal(state["encoder_q"][name], state["encoder_k"][name])
    assert not torch.equal(state["encoder_q"]["head.0.weight"],
                           adco.Encoder("resnet18", False, 2048, 128).head[0].weight)
    randn = state_after_bank_init(monkeypatch, tiny_args(tmp_path / "noinit", epochs=1, bank_init=False,
                                                         bank_size=72))  # any K
    assert randn["bank"].norm(dim=0).mean() > 5  # untouched seeded randn


def test_resume_is_bitwise_identical(tmp_path):
    """2 epochs straight == 1 epoch + --resume auto --epochs 2 == stop mid-epoch at step 3 + --resume auto,
    bank and bank velocity included; and for --multi-crop (6 crops of RNG) a mid-epoch stop within 1 epoch."""
    adco.main(tiny_args(tmp_path / "straight"))
    adco.main(tiny_args(tmp_path / "split", epochs=1))
    adco.main(tiny_args(tmp_path / "split", resume="auto"))
    adco.main(tiny_args(tmp_path / "mid", stop_at_step=3))
    assert load(tmp_path / "mid" / "last.pt")["next_batch"] == 3
    adco.main(tiny_args(tmp_path / "mid", resume="auto"))
    straight = final_state(tmp_path / "straight")
    assert straight["bank_velocity"].abs().max() > 0 and straight["step"] == 8
    assert_state_equal(final_state(tmp_path / "split"), straight)
    assert_state_equal(final_state(tmp_path / "mid"), straight)
    losses = [[(r.get("step"), r.get("loss"), r.get("bank_norm")) for r in map(json.loads, open(tmp_path / d / "metrics.jsonl"))]
              for d in ("straight", "split", "mid")]
    assert losses[0] == losses[1] == losses[2]

    adco.main(tiny_args(tmp_path / "mc_straight", epochs=1, multi_crop=True))
    adco.main(tiny_args(tmp_path / "mc_mid", epochs=1, multi_crop=True, stop_at_step=2))
    adco.main(tiny_args(tmp_path / "mc_mid", epochs=1, multi_crop=True, resume="auto"))
    assert_state_equal(final_state(tmp_path / "mc_mid"), final_state(tmp_path / "mc_straight"))


def test_tiny_end_to_end_single_crop_as_a_user_runs_it(tmp_path):
    """The command line through adco.py's entry point, in-process (tests/test_evidence.py runs adco.py as its own
    process)."""
    out = tmp_path / "run"
    proc = run_cli("adco.py", *TINY, "--epochs", "2", "--bank-size", "64", "--out-dir", out,
                   "--knn-every", "1", "--log-every", "2")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["bank_init_steps"] == 4  # K / B = 64 / 16
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6, 8] and [r["epoch"] for r in train] == [0, 0, 1, 1]
    peak, final = 0.03 * 16 / 256, 6e-4 * 16 / 256
    assert [r["lr"] for r in train] == pytest.approx([peak, peak, (peak + final) / 2, (peak + final) / 2])
    assert all(r["mem_lr"] == 3.0 and 0 <= r["pos_prob"] <= 1 and torch.isfinite(torch.tensor(r["loss"]))
               for r in train)
    assert [r["epoch"] for r in records if "knn_top1" in r] == [0, 1]
    ckpt = load(out / "last.pt")  # weights_only=True: plain types only
    assert ckpt["method"] == "adco" and ckpt["next_epoch"] == 2 and ckpt["step"] == 8
    assert ckpt["bank"].shape == ckpt["bank_velocity"].shape == (128, 64)
    assert any(k.startswith("backbone.layer4") for k in ckpt["encoder_q"]) and ckpt["args"]["arch"] == "resnet18"
    assert "ShuffleBN" in proc.stdout and "bank initialised" in proc.stdout and "done: 2 epochs" in proc.stdout


@pytest.mark.parametrize("variant", ["sym", "multi_crop"])
def test_tiny_end_to_end_sym_and_multi_crop(tmp_path, variant):
    state = adco.main(tiny_args(tmp_path, epochs=1, **{variant: True}))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train = [r for r in records if "loss" in r]
    assert len(train) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    if variant == "multi_crop":  # a SUM of 5 cross-entropies: above log(B + K) = log 80 at the start
        assert train[0]["loss"] > 2 * torch.log(torch.tensor(80.0))
    assert torch.isfinite(state["bank"]).all() and state["bank_velocity"].abs().max() > 0
    assert load(tmp_path / "last.pt")["args"][variant] is True


def test_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="multiple of the global --batch-size"):
        adco.main(tiny_args(tmp_path / "a", bank_size=72))
    with pytest.raises(UserError, match="--sym with --multi-crop"):
        adco.main(tiny_args(tmp_path / "a", sym=True, multi_crop=True))
    with pytest.raises(UserError, match="--mem-t"):
        adco.main(tiny_args(tmp_path / "a", mem_t=0.0))
    out = tmp_path / "run"
    adco.main(tiny_args(out, epochs=1, bank_size=16))
    with pytest.raises(UserError, match="already exists"):
        adco.main(tiny_args(out, epochs=1, bank_size=16))
    with pytest.raises(UserError, match="--mem-t 0.02 -> 0.03"):
        adco.main(tiny_args(out, resume="auto", bank_size=16, mem_t=0.03))
    assert adco.main(tiny_args(out, epochs=1, bank_size=16, resume="auto")) == {}  # finished: nothing to do
    other = tmp_path / "other.pt"
    torch.save({"method": "caco", "args": {}}, other)
    with pytest.raises(UserError, match="not a adco.py checkpoint.*caco"):
        adco.main(tiny_args(tmp_path / "x", resume=str(other)))


def test_cli_error_is_one_line_and_help_documents_the_bank(tmp_path, capsys):
    proc = run_cli("adco.py", *TINY, "--sym", "--multi-crop", "--out-dir", tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "--sym with --multi-crop" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    with pytest.raises(SystemExit):
        tyro.cli(adco.Args, args=["--help"])
    text = capsys.readouterr().out
    for flag, words in [("--mem-lr", "η"), ("--mem-t", "τ_m"), ("--mem-momentum", "μ"), ("--mem-wd", "λ"),
                        ("--bank-size", "K"), ("--no-bank-init", "randn"), ("--batch-size", "GLOBAL")]:
        assert flag in text and words in text, flag


def test_bn_splits_reaches_both_encoders(tmp_path):
    result = adco.main(tiny_args(tmp_path / "run", bn_splits=2, epochs=1, bank_size=32))
    for name in ("encoder_q", "encoder_k"):
        bns = [m for m in result[name].modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert bns and all(isinstance(m, adco.SplitBatchNorm2d) and m.splits == 2 for m in bns), name


@pytest.mark.parametrize("mem_t,dead", [(0.02, True), (1.0, False)])
def test_a_dead_bank_is_reported(tmp_path, mem_t, dead):
    """bank_share (the τ_m-softmax mass on the bank) is logged, and a run whose bank has gone silent says so.
    A randn bank (--no-bank-init) sits at q.n ~ 0 while a random network's keys sit at q.k ~ 1, so at τ_m = 0.02
    the bank gets ~e^-40 of the softmax (dead); at τ_m = 1 it keeps most of it (64 of 80 logits)."""
    out = tmp_path / "run"
    proc = run_cli("adco.py", *TINY, "--epochs", "1", "--bank-size", "64", "--no-bank-init", "--mem-t", mem_t,
                   "--out-dir", out, "--log-every", "2")
    shares = [json.loads(line)["bank_share"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in line]
    assert len(shares) == 2 and all(0 <= s <= 1 for s in shares)
    assert ("WARNING: the bank holds" in proc.stdout) == dead
    assert (shares[0] < adco.DEAD_BANK_SHARE) == dead
    assert proc.stdout.count("WARNING: the bank holds") <= 1  # once per run
