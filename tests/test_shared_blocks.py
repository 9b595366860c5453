"""The fenced plumbing blocks (# >>> shared: NAME ... # <<< shared: NAME) must be byte-identical in every
script that carries them, so a fix lands everywhere at once while each file stays self-contained."""
import re

from conftest import ROOT

SCRIPTS = ["moco_co2.py", "adco.py", "caco.py", "linear_eval.py"]
EXPECTED_IN_MOCO = {"distributed", "shuffle-bn", "amp", "checkpoint", "console", "entry"}


def blocks(path):
    """{name: text} of the fenced blocks of one file; fails on unclosed, nested or duplicated fences."""
    found, current, lines = {}, None, []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        opening = re.match(r"^# >>> shared: (\S+)\s*$", line)
        closing = re.match(r"^# <<< shared: (\S+)\s*$", line)
        if opening:
            assert current is None, f"{path.name}:{number}: block {opening[1]} opens inside {current}"
            assert opening[1] not in found, f"{path.name}:{number}: block {opening[1]} appears twice"
            current, lines = opening[1], []
        elif closing:
            assert closing[1] == current, f"{path.name}:{number}: closes {closing[1]} but {current} is open"
            found[current], current = "\n".join(lines), None
        elif current is not None:
            lines.append(line)
    assert current is None, f"{path.name}: block {current} is never closed"
    return found


def test_shared_blocks_identical():
    per_file = {name: blocks(ROOT / name) for name in SCRIPTS if (ROOT / name).exists()}
    assert set(per_file["moco_co2.py"]) == EXPECTED_IN_MOCO
    reference = {}
    for name, found in per_file.items():
        for block, text in found.items():
            reference.setdefault(block, (name, text))
            first, first_text = reference[block]
            assert text == first_text, f"shared block {block!r} differs between {first} and {name}"


def test_fence_parser_detects_a_difference(tmp_path):
    """The check above can fail: an edited copy is reported."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("# >>> shared: x\ny = 1\n# <<< shared: x\n")
    b.write_text("# >>> shared: x\ny = 2\n# <<< shared: x\n")
    assert blocks(a) != blocks(b)


def sync_from(source: str) -> None:
    """Copy every fenced block of `source` into the other scripts that carry a block of the same name."""
    reference = blocks(ROOT / source)
    for name in SCRIPTS:
        path = ROOT / name
        if name == source or not path.exists():
            continue
        text = path.read_text()
        for block, body in reference.items():
            pattern = re.compile(rf"(^# >>> shared: {re.escape(block)}\n).*?(^# <<< shared: {re.escape(block)}$)",
                                 re.S | re.M)
            text = pattern.sub(lambda m: m[1] + body + "\n" + m[2], text)
        path.write_text(text)
        print(f"synced {name} from {source}")


if __name__ == "__main__":
    # After fixing a shared block in one file:  python tests/test_shared_blocks.py --sync moco_co2.py
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--sync":
        sync_from(sys.argv[2])
    else:
        sys.exit("usage: python tests/test_shared_blocks.py --sync SOURCE.py")
