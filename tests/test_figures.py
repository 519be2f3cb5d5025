"""Every measured figure in README.md and benchmarks/README.md is backed by a results file.

A figure is a number with a unit of measurement (%, ×, µs, ms, MiB, CPU-seconds) or a count
"N of M".  It passes when its numbers appear, at the precision written, in a JSON file under
``benchmarks/results/`` (written by the script that measured it, with the command and date),
or when its section (the text between two headings) says "no results file": a figure
measured before results files existed, marked as such for the reader.  Settings and
thresholds that are not measurements are listed below with the reason.
"""

import json
import re
from pathlib import Path

import pytest

from tests.helpers import REPO

RESULTS = REPO / "benchmarks" / "results"
DOCS = [REPO / "README.md", REPO / "benchmarks" / "README.md"]
UNBACKED_MARK = "no results file"

FIGURE = re.compile(r"\d[\d,]*(?:\.\d+)?(?:\s*(?:–|-|to)\s*\d[\d,]*(?:\.\d+)?)?"
                    r"\s*(?:%|×(?!\s*\d)(?!\s*[su]\d)|µs|ms\b|MiB|CPU-seconds)"   # not 64×64 or u8 × s8
                    r"|\b\d[\d,]* of [\d,]+\b")
NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")

# (document, figure as written): why it is not a measurement
NOT_MEASUREMENTS = {
    ("README.md", "1 %"): "the saturation-warning threshold, a setting",
    ("README.md", "95 %"): "the confidence level of the report's intervals, a setting",
}


def _sections(text):
    """(heading, body) pairs; the body runs to the next heading (a `#` line inside a code
    block is a shell comment, not a heading)."""
    sections, fenced = [["", []]], False
    for line in text.splitlines():
        fenced ^= line.startswith("```")
        if not fenced and re.match(r"#{1,6} ", line):
            sections.append([line, []])
        else:
            sections[-1][1].append(line)
    return [(heading, "\n".join(body)) for heading, body in sections]


def _results_numbers():
    """Every number in every results file, as floats."""
    found = []

    def walk(v):
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            found.append(float(v))
    for path in sorted(RESULTS.glob("*.json")):
        data = json.loads(path.read_text())
        assert {"command", "date"} <= set(data), f"{path.name}: a results file names its command and date"
        walk(data)
    return found


def _backed(number: str, values) -> bool:
    """``number`` as written (e.g. "1.07", "100", "100,000") equals some value rounded to its
    precision, or that value as a percentage."""
    x = float(number.replace(",", ""))
    decimals = len(number.split(".")[1]) if "." in number else 0
    return any(round(v, decimals) == x or round(100 * v, decimals) == x for v in values)


def _figures(doc: Path):
    for heading, body in _sections(doc.read_text()):
        marked = UNBACKED_MARK in body
        for m in FIGURE.finditer(body):
            yield heading, m.group(0), marked


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_figure_is_backed_by_a_results_file_or_marked(doc):
    values = _results_numbers()
    bad = []
    for heading, figure, marked in _figures(doc):
        if marked or (doc.name if doc.parent == REPO else str(doc.relative_to(REPO)), figure) in NOT_MEASUREMENTS:
            continue
        if not all(_backed(n, values) for n in NUMBER.findall(figure)):
            bad.append(f"{heading or '(top)'}: {figure!r}")
    assert not bad, (f"figures in {doc.name} that no file in benchmarks/results/ holds and whose section does not "
                     f"say '{UNBACKED_MARK}':\n" + "\n".join(bad))


def test_the_check_can_fail(tmp_path):
    values = [0.9199, 1.07]
    assert _backed("91.99", values) and _backed("1.07", values)
    assert _backed("1.1", values) and not _backed("92.5", values) and not _backed("1.2", values)
    text = "Costs 1.07× and 13.7 %; 1 of 100,000 codes; a 64×64 input; u8 × s8 products; 2× step time.\n"
    assert [f for _, f, _ in _figures_of(text, tmp_path)] == ["1.07×", "13.7 %", "1 of 100,000", "2×"]


def _figures_of(text, tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(text)
    return list(_figures(doc))


def test_docs_name_no_absolute_machine_path():
    for doc in DOCS + sorted((REPO / "benchmarks").glob("*.md")) + sorted((REPO / "examples").rglob("*.md")):
        assert not re.search(r"(?<![\w.])/(work|home|root|Users)/", doc.read_text()), doc


def _table_rows(text: str, after: str) -> dict:
    """The rows (first cell → cells) of the first Markdown table after the line holding ``after``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if after in line)
    rows, seen = {}, False
    for line in lines[start + 1:]:
        if line.startswith("|"):
            seen = True
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0].strip("`")] = cells[1:]
        elif seen:
            break
    return rows


def test_deploy_trained_table_is_its_results_file():
    """README's table of trained CNNs deployed on the full test set holds, row for row, what
    ``examples/deploy_trained.py --results benchmarks/results/deploy_trained.json`` wrote."""
    models = json.loads((RESULTS / "deploy_trained.json").read_text())["models"]
    rows = _table_rows((REPO / "README.md").read_text(), "benchmarks/results/deploy_trained.json")
    assert set(models) <= set(rows)
    for name, rec in models.items():
        pct = lambda v: f"{100 * v:.2f} %"  # noqa: E731
        codes = lambda n: f"{n:,} of {rec['output_codes']:,}"  # noqa: E731
        assert rows[name] == [f"{rec['train_size']:,}", pct(rec["simulation_eval_accuracy"]), pct(rec["ort_accuracy"]),
                              codes(rec["ort_vs_integer"]), codes(rec["simulation_vs_integer"])], name
