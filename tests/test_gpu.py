"""GPU-only checks (skipped without CUDA; CI has no GPU): bf16 autocast numerics against fp32 on a fixed
batch, channels_last, and the AMP setup. Run them on a GPU machine with `python -m pytest tests/test_gpu.py`."""
import pytest
import torch
import torch.nn.functional as F

import adco
import caco
import moco_co2

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def embeddings(module, x, dtype, channels_last):
    torch.manual_seed(0)
    encoder = module.Encoder("resnet18", True, 512, 128).cuda().eval()
    if channels_last:
        encoder, x = encoder.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        out = encoder(x)
    return F.normalize(out.float(), dim=1)


@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_losses_match_fp32(channels_last):
    x = torch.randn(32, 3, 32, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    bank = F.normalize(torch.randn(128, 4096, device="cuda"), dim=0)
    results = {}
    for dtype in (None, torch.bfloat16):
        q = embeddings(moco_co2, x, dtype, channels_last)
        k = embeddings(moco_co2, x.flip(-1), dtype, channels_last)
        logits, labels = moco_co2.infonce_logits(q, k, bank, 0.2)
        labels_adco = adco.own_key_labels(32, 0, "cuda")
        caco_loss, caco_grad, _, _ = caco.caco_loss_and_bank_grad([q, k], [k, q], bank, caco.crop_pairs(2, 0), 0.08, 0.08)
        results[dtype] = {
            "ins": F.cross_entropy(logits, labels), "co2": moco_co2.co2_loss(q, k, bank, 0.05),
            "adco_grad": adco.bank_grad(q, k, bank, labels_adco, 0.02), "caco": caco_loss, "caco_grad": caco_grad}
    for name, ref in results[None].items():
        got = results[torch.bfloat16][name]
        assert got.dtype == torch.float32, name  # the loss/bank math stays fp32 under AMP
        assert torch.allclose(got, ref, rtol=0.05, atol=0.05 * ref.abs().max().item()), name


def test_amp_picks_bf16_on_gpus_that_support_it():
    autocast, scaler, dtype = moco_co2.setup_amp(torch.device("cuda"), True)
    assert dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    assert scaler.is_enabled() == (dtype == torch.float16)
    assert moco_co2.setup_amp(torch.device("cuda"), False)[2] is None


def test_split_bn_under_bf16_and_channels_last_matches_fp32():
    """--bn-splits on a GPU: the same numbers with channels_last input, and bf16 autocast within 5 %."""
    torch.manual_seed(0)
    bn = moco_co2.SplitBatchNorm2d(torch.nn.BatchNorm2d(16), 8).cuda()
    x = torch.randn(64, 16, 8, 8, device="cuda") * 3 + 1
    ref = bn(x)
    torch.testing.assert_close(bn(x.to(memory_format=torch.channels_last)), ref)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # as inside the encoder: a bf16 conv output comes in
        low = bn(x.bfloat16().to(memory_format=torch.channels_last))
    assert low.dtype == torch.bfloat16 and bn.running_mean.dtype == torch.float32
    assert torch.allclose(low.float(), ref, rtol=0.05, atol=0.05 * ref.abs().max().item())
