"""examples/auto_formats.py names each run's file by everything that changes the run."""

import importlib.util
from pathlib import Path

from fxcompile.training.reassign import Reassign

_PATH = Path(__file__).resolve().parents[1] / "examples" / "auto_formats.py"
_spec = importlib.util.spec_from_file_location("auto_formats_example", _PATH)
auto_formats = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(auto_formats)


def test_reassign_settings_give_distinct_run_files():
    schedules = [Reassign(every=200), Reassign(every=100), Reassign(every=200, rechoose=True),
                 Reassign(every=200, saturation=0.01), Reassign(every=200, headroom=2),
                 Reassign(every=200, headroom=0)]
    stems = [auto_formats._reassign_stem(r) for r in schedules]
    assert len(set(stems)) == len(stems), stems
    # runs made before the saturation and headroom options were recorded keep their names
    assert stems[0] == "-reassign200" and stems[2] == "-reassign200-rechoose"


def test_label_names_the_schedule():
    row = {"policy": "auto:3", "reassign": Reassign(every=200, saturation=0.01, headroom=2).to_dict()}
    label = auto_formats._label(row)
    assert "every 200" in label and "0.01" in label and "headroom 2" in label
    assert auto_formats._label({"policy": "auto:3"}) == "auto:3"
