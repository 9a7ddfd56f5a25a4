"""The README's quick start and the demo job run and hold what they claim."""

from __future__ import annotations

import re
from pathlib import Path

from costream.demo import run_demo

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)  # the quick start asserts itself
    assert namespace["net"].receptive_field == 9
    assert namespace["net"].delay == 5
    exec(compile(blocks[1], str(README), "exec"), namespace)  # a custom forward, traced
    assert isinstance(namespace["net"], namespace["cs"].Graph)


def test_readme_starts_with_the_two_setup_commands():
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1).strip().splitlines()
    assert len(first_block) == 2
    assert first_block[0].startswith("pip install torch==2.13.0")
    assert first_block[0] == "pip install torch==2.13.0 && pip install -e . && costream bench"
    assert "pytest" in first_block[1]


def test_readme_references_every_committed_result_with_its_command():
    text = README.read_text()
    for page in sorted((README.parent / "benchmarks" / "results").glob("*.md")):
        if page.stem.endswith("_quick"):
            continue
        assert f"benchmarks/results/{page.name}" in text, f"README does not link {page.name}"
        command = re.search(r"`((?:costream|python) [^`]+)`", page.read_text()).group(1)
        program = command.split(" --")[0]  # options such as --wait-quiet vary between runs
        assert program in text, f"README does not give the command of {page.name}: {command}"


def test_readme_results_are_the_committed_ones():
    text = README.read_text()
    results = README.parent / "benchmarks" / "results"
    for name in ("bench.md", "moving_digits.md"):
        page = (results / name).read_text()
        rows = [line for line in page.splitlines() if line.startswith("| ")]
        assert rows, name
        missing = [row for row in rows if row not in text]
        assert not missing, f"README tables differ from benchmarks/results/{name}: {missing}"


def test_demo_is_exact(capsys):
    result = run_demo(frames=32)
    assert result["max_abs_diff"] < 1e-5
    assert "max |step - offline|" in capsys.readouterr().out
