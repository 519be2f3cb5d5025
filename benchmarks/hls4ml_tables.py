"""How far are hls4ml's own activation tables from fxcompile's lookup tables?

hls4ml computes sigmoid and tanh (among others) from tables of its own: ``table_size``
entries (1024 by default) over [-8, 8) (sigmoid) or [-4, 4) (tanh), stored in ``table_t``
(``ap_fixed<18,8>`` by default), indexed by the input scaled to the table.  fxcompile's table
has one entry per input code, the output format's rounding of the float64 function.  This
script builds hls4ml's C simulation of one activation layer (``nn.Sigmoid``/``nn.Tanh``
converted by hls4ml's PyTorch front-end, input and result types from the formats), feeds it
every input code and counts the output codes that differ from fxcompile's table, with the
largest difference, for hls4ml's default table and for larger and more precise ones (``--table``)::

    python benchmarks/hls4ml_tables.py --results benchmarks/results/hls4ml_tables.json

Needs hls4ml and g++ (``pip install -e ".[hls]"``); each build takes a minute or two.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import tempfile

import numpy as np
import torch
from torch import nn

from fxcompile.core import nonlinear
from fxcompile.core.formats import as_format
from fxcompile.deploy.backends.hls4ml import hls_precision, require_hls4ml

FUNCTIONS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def hls_codes(name: str, fin, fout, table_size: int | None, out_dir: pathlib.Path,
              table_type: str | None = None) -> np.ndarray:
    """hls4ml's C simulation of the activation ``name`` on every code of ``fin``: output codes of ``fout``."""
    hls4ml = require_hls4ml()
    codes = np.arange(fin.code_min, fin.code_max + 1, dtype=np.float64)
    width = 256
    x = (codes * fin.scale).reshape(-1, width)
    model = nn.Sequential(FUNCTIONS[name]())
    config = hls4ml.utils.config_from_pytorch_model(model, (width,), granularity="name", backend="Vivado",
                                                    default_precision=hls_precision(fin), default_reuse_factor=1)
    layers = config["LayerName"]
    for layer, entry in layers.items():
        entry.setdefault("Precision", {})
        if layer != next(iter(layers)):  # the activation layer (the first is the input)
            entry["Precision"]["result"] = hls_precision(fout)
            if table_size:
                entry["table_size"] = table_size
            if table_type:
                entry["Precision"]["table"] = table_type
        else:
            entry["Precision"]["result"] = hls_precision(fin)
    hls_model = hls4ml.converters.convert_from_pytorch_model(
        model, hls_config=config, output_dir=str(out_dir), project_name="act", backend="Vivado",
        io_type="io_parallel")
    hls_model.compile()
    y = np.asarray(hls_model.predict(np.ascontiguousarray(x)), dtype=np.float64).reshape(-1)
    return np.round(y * 2.0 ** fout.frac).astype(np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", default="16.8")
    parser.add_argument("--output", default="16.8")
    parser.add_argument("--table", nargs="*", default=["1024", "4096", "4096:ap_fixed<32,8,AP_RND_CONV,AP_SAT>"],
                        help="table_size[:table_t] configurations (default: hls4ml's, then one entry per "
                             "16.8 code over its range, then with a 32-bit table_t)")
    parser.add_argument("--results", type=pathlib.Path, help="write this run's figures to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    fin, fout = as_format(args.input), as_format(args.output)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in FUNCTIONS:
            ours = nonlinear.table(name, (), tuple(fin.spec()), tuple(fout.spec())).numpy()
            for k, config in enumerate(args.table):
                size, _, table_type = config.partition(":")
                theirs = hls_codes(name, fin, fout, int(size), pathlib.Path(tmp) / f"{name}_{k}", table_type or None)
                diff = np.abs(theirs - ours)
                worst = int(np.argmax(diff))
                key = f"{name}, table_size {size}" + (f", table_t {table_type}" if table_type else "")
                rows[key] = {
                    "input_codes": len(ours), "differing_codes": int((diff > 0).sum()),
                    "largest_difference_codes": int(diff.max()),
                    "at_input": float((worst + fin.code_min) * fin.scale)}
                r = rows[key]
                print(f"{key} ({fin} -> {fout}): {r['differing_codes']} of "
                      f"{r['input_codes']} output codes differ from fxcompile's table, largest by "
                      f"{r['largest_difference_codes']} codes (at input {r['at_input']})")
    if args.results:
        command = "python " + " ".join(sys.argv)
        args.results.write_text(json.dumps({"command": command, "date": datetime.date.today().isoformat(),
                                            "formats": [str(fin), str(fout)], "runs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
