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
        caco_loss, caco_grad, *_ = caco.caco_loss_and_bank_grad([q, k], [k, q], bank, caco.crop_pairs(2, 0), 0.08, 0.08)
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


def test_device_augmentation_on_cuda_equals_the_cpu_executor_and_decodes_with_nvjpeg(tmp_path):
    """--augment-on device on a GPU: the same params give the same views as on the CPU (TF32 blur: 1e-3), and
    a JPEG folder is decoded by nvjpeg into the same pixels as the CPU decoder (within JPEG decoder rounding)."""
    import io

    import torchvision.transforms.functional as TF

    import common as C
    views = caco.augmentations(32, multi_crop=True)  # solarize, blur, two sizes
    images = (torch.rand(64, 3, 40, 48, generator=torch.Generator().manual_seed(0)) * 255).byte()
    for view in views[:1] + views[2:3]:
        sizes = torch.tensor([[40.0, 48.0]]).expand(64, 2)
        params = C.draw_params(view, sizes[:, 0], sizes[:, 1])
        cpu = C.apply_view(C.resized_crop(images.float() / 255, params["top"], params["left"], params["height"],
                                          params["width"], view.size), view, params)
        p = {k: v.cuda() for k, v in params.items()}
        gpu = C.apply_view(C.resized_crop(images.cuda().float() / 255, p["top"], p["left"], p["height"],
                                          p["width"], view.size), view, p)
        torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-2, rtol=0)
    data = []
    for im in images[:8]:
        buf = io.BytesIO()
        TF.to_pil_image(im).save(buf, format="JPEG", quality=90)
        data.append(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8))
    on_gpu = C.decode_images(data, [f"img{i}" for i in range(8)], torch.device("cuda"))
    on_cpu = C.decode_images(data, [f"img{i}" for i in range(8)], torch.device("cpu"))
    for a, b in zip(on_gpu, on_cpu):
        assert a.is_cuda and (a.cpu().int() - b.int()).abs().max() <= 3
