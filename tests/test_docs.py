"""The docs' figures come from the checked-in results, never from hand copies.

Pages include named parts of result files (``--8<-- "FILE:PART"``, pymdownx
snippets); ``mkdocs build --strict`` in ``.ci/test`` fails on a missing file.
These fast checks also catch a missing part, and a results page that no longer
matches the raw numbers it was rendered from.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks.speed import floor, run

REPO = Path(__file__).resolve().parent.parent
SPEED_RESULTS = REPO / "benchmarks" / "speed" / "results"
INCLUDE = re.compile(r'^\s*-{1,}8<-{1,}\s+"([^"]+)"\s*$')
PART = re.compile(r"--8<-- \[(start|end):([a-z][-_0-9a-z]*)\]")


def _includes():
    for page in sorted((REPO / "docs").glob("*.md")):
        for number, line in enumerate(page.read_text().splitlines(), 1):
            match = INCLUDE.match(line)
            if match:
                yield page.name, number, match.group(1)


def _parts(path: Path) -> dict:
    parts: dict = {}
    for kind, name in PART.findall(path.read_text()):
        parts.setdefault(name, []).append(kind)
    return parts


def test_every_included_part_exists():
    includes = list(_includes())
    assert includes, "no page includes a results file"
    for page, number, target in includes:
        path, _, part = target.partition(":")
        assert (REPO / path).is_file(), f"docs/{page}:{number}: no file {path}"
        if part and not part[0].isdigit():
            found = _parts(REPO / path).get(part)
            assert found == ["start", "end"], f"docs/{page}:{number}: no part {part!r} in {path}"


@pytest.mark.parametrize("name", sorted(p.stem for p in SPEED_RESULTS.glob("*.json")))
def test_speed_results_page_is_rendered_from_its_numbers(name):
    results = json.loads((SPEED_RESULTS / f"{name}.json").read_text())
    page = (SPEED_RESULTS / f"{name}.md").read_text()
    if name == "floor":  # the kernel-against-the-floor page has its own renderer
        assert page == floor.markdown(results), f"{name}.md differs from its JSON"
        assert _parts(SPEED_RESULTS / f"{name}.md")["speeds"] == ["start", "end"]
        return
    assert page == run._markdown(results), (
        f"{name}.md differs from its JSON: re-render it with "
        f"python -m benchmarks.speed.run --render benchmarks/speed/results/{name}.json --name {name}"
    )
    assert _parts(SPEED_RESULTS / f"{name}.md")["machine"] == ["start", "end"]


def test_drop_rate_table_matches_the_formula():
    """The algorithm page's drop-rate table is what ``drop_rates`` returns."""
    from circuit_merge_plugin import drop_rates

    page = (REPO / "docs" / "algorithm.md").read_text()
    rows = re.findall(r"^\s*\| (\d) \| ([\d., ]+) \| ([\d., ]+) \| `b`", page, re.M)
    assert [int(n) for n, _, _ in rows] == [1, 2, 3, 4]
    for n, defaults, preset in rows:
        for text, (temperature, base_droprate) in ((defaults, (0.0, 0.5)), (preset, (0.5, 0.25))):
            shown = [float(x) for x in text.split(",")]
            assert shown == drop_rates(int(n), temperature, base_droprate), (n, text)
    for n in range(1, 6):
        assert drop_rates(n, 1.0, 0.3) == pytest.approx([0.3] * n, abs=1e-12)  # `b` each
