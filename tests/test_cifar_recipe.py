"""The CIFAR-10 recipe of docs/cifar10.md: its commands run as printed (tiny sizes substituted), and the two things the
recipe changes in the code path behave as documented: --no-blur removes exactly the Gaussian blur, and small
images are evaluated whole."""
import shlex

import pytest
import torch
import torchvision.transforms as T
from PIL import Image

import adco
import caco
import moco_co2
from common import IMAGENET_MEAN, IMAGENET_STD, GaussianBlur, MultiCrop, TwoCrops, eval_transform, pil_views
from conftest import ROOT, load, run_cli, write_cifar10

SCRIPTS = {"moco_co2.py", "adco.py", "caco.py", "linear_eval.py"}
# Only sizes shrink; every other flag of the documented command is kept as printed.
TINY_SIZES = {"--epochs": "1", "--batch-size": "16", "--queue-size": "32", "--bank-size": "32", "--workers": "0",
              "--knn-every": "1"}


def readme_recipe_commands() -> list[list[str]]:
    """The commands of the first ```bash block after the "### CIFAR-10 recipe" heading of docs/cifar10.md,
    continuations joined."""
    text = (ROOT / "docs" / "cifar10.md").read_text()
    section = text[text.index("### CIFAR-10 recipe"):]
    block = section[section.index("```bash") + len("```bash"):]
    block = block[:block.index("```")]
    joined = block.replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        line = line.split("#")[0].strip()
        if line:
            commands.append(shlex.split(line))
    return commands


def shrink(tokens: list[str]) -> list[str]:
    out = list(tokens)
    for i, tok in enumerate(out[:-1]):
        if tok in TINY_SIZES:
            out[i + 1] = TINY_SIZES[tok]
    return out


def flatten(transform) -> list:
    """Every operator inside a crop transform (TwoCrops / MultiCrop of Compose pipelines), in order."""
    if isinstance(transform, TwoCrops):
        return flatten(transform.first) + flatten(transform.second)
    if isinstance(transform, MultiCrop):
        return [op for view in transform.pipelines for op in flatten(view)]
    if isinstance(transform, (T.Compose, T.RandomApply)):
        inner = [op for t in transform.transforms for op in flatten(t)]
        return inner if isinstance(transform, T.Compose) else [transform] + inner
    return [transform]


@pytest.mark.parametrize("make", [lambda b: pil_views(moco_co2.augmentations(32, blur=b)),
                                  lambda b: pil_views(adco.augmentations(32, False, blur=b)),
                                  lambda b: pil_views(adco.augmentations(32, True, blur=b)),
                                  lambda b: pil_views(caco.augmentations(32, False, blur=b)),
                                  lambda b: pil_views(caco.augmentations(32, True, blur=b))],
                         ids=["moco_co2", "adco", "adco-multi-crop", "caco", "caco-multi-crop"])
def test_no_blur_removes_only_the_blur(make):
    with_blur, without = flatten(make(True)), flatten(make(False))
    assert any(isinstance(op, GaussianBlur) for op in with_blur)
    assert not any(isinstance(op, GaussianBlur) for op in without)
    kept = [op for op in with_blur
            if not isinstance(op, GaussianBlur)
            and not (isinstance(op, T.RandomApply) and isinstance(op.transforms[0], GaussianBlur))]
    assert [repr(op) for op in kept] == [repr(op) for op in without]


def test_small_images_are_evaluated_whole_and_large_ones_as_imagenet():
    g = torch.Generator().manual_seed(0)
    small = Image.fromarray(torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy())
    whole = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(small))
    assert torch.equal(eval_transform(32)(small), whole)
    large = Image.fromarray(torch.randint(0, 256, (256, 320, 3), generator=g, dtype=torch.uint8).numpy())
    # 224 px: short side 256 (unchanged here), centre 224 x 224 crop of it
    crop = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(large.crop((48, 16, 272, 240))))
    assert torch.equal(eval_transform(224)(large), crop)


def test_readme_cifar_commands_run_as_printed(tmp_path, monkeypatch):
    """Each command through the script's own entry point, in this process (run_cli), from a folder holding `data`."""
    commands = readme_recipe_commands()
    scripts = [c[1] for c in commands if c[0] == "python" and c[1] in SCRIPTS]
    assert scripts.count("moco_co2.py") == 2 and {"adco.py", "caco.py", "linear_eval.py"} <= set(scripts)
    write_cifar10(tmp_path / "data", monkeypatch)  # the recipe reads --dataset cifar10 --data data
    ran = []
    for tokens in commands:
        assert tokens[0] == "python" and tokens[1] in SCRIPTS, tokens  # nothing but the four scripts
        proc = run_cli(tokens[1], *shrink(tokens[2:]), cwd=tmp_path)
        ran.append((tokens, proc.stdout))
    for tokens, _ in ran:
        if tokens[1] != "linear_eval.py":
            out = tmp_path / tokens[tokens.index("--out-dir") + 1]
            ckpt = load(out / "last.pt")
            assert ckpt["next_epoch"] == 1 and ckpt["args"]["blur"] is False and ckpt["args"]["small_stem"]
            assert ckpt["args"].get("bn_splits", 8) == 8  # moco_co2 and adco; caco has no ShuffleBN
            assert "knn_top1" in (out / "metrics.jsonl").read_text()
    knn_outputs = [stdout for tokens, stdout in ran if tokens[1] == "linear_eval.py"]
    assert len(knn_outputs) == 2 and all("kNN (k=200, T=0.1" in s for s in knn_outputs)
