"""Do Hugging Face text transformers export integer-only under ``baseline``, bit-exactly?

Builds a BERT sequence classifier (``BertForSequenceClassification``, 3 labels) and a GPT-2
language model (``GPT2LMHeadModel``, its LM head tied to the token embedding, ``gelu_new``)
from tiny configs with random weights (2 layers, width 64, 4 heads, vocabulary 1,000, 64
positions), with ``attn_implementation="eager"``; the model's ``logits`` are the output.  Each is
compiled under ``baseline`` (captured by ``torch.export``), takes one SGD step on a random
batch of 8 sequences of ``--length`` tokens, switches to eval and exports the three flavours
for one example sequence.  BERT gets an ``attention_mask`` input with padded positions (each
sequence keeps a random length from half to all of its tokens); GPT-2 its causal mask, which
the export evaluates for the example length.  On ``--inputs`` random sequences it reports the
differing output codes ORT vs integer reference and simulation vs integer reference
(``fxcompile.deploy.export.verify``) and how far the QDQ flavour (ORT, on the same inputs) and
the QONNX flavour (qonnx's executor, on the first ``--qonnx-inputs``) are from the integer
graph: differing output codes and the largest difference in codes.  ``gpt2_attention_mask`` is
GPT-2 given BERT's padded ``attention_mask`` as well (padding and causal masks together)::

    python benchmarks/text_transformer_exports.py --threads 1 --results benchmarks/results/text_transformer_exports.json
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

import fxcompile as fxc
from fxcompile.deploy.export import export_onnx

from transformer_exports import _write, flavour_figures, print_record  # noqa: E402 - benchmarks/ is the script's directory

VOCAB, WIDTH, LAYERS, HEADS, POSITIONS = 1000, 64, 2, 4, 64


class Logits(nn.Module):
    """A Hugging Face model's ``logits`` as the one output."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None):
        if attention_mask is None:
            return self.model(input_ids=input_ids).logits
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def _bert():
    import transformers
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS,
                                  num_attention_heads=HEADS, intermediate_size=2 * WIDTH,
                                  max_position_embeddings=POSITIONS, num_labels=3, attn_implementation="eager")
    return Logits(transformers.BertForSequenceClassification(cfg)), True, False


def _gpt2(masked: bool):
    def build():
        import transformers
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS,
                                      n_positions=POSITIONS, use_cache=False, bos_token_id=0, eos_token_id=0,
                                      attn_implementation="eager")
        return Logits(transformers.GPT2LMHeadModel(cfg)), masked, True
    return build


# name: builder returning (model, whether it takes an attention_mask, whether it is a language model)
MODELS = {"bert": _bert, "gpt2": _gpt2(False), "gpt2_attention_mask": _gpt2(True)}


def tokens(n: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids and an attention mask keeping a random length (half to all) of each sequence."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    for i, keep in enumerate(torch.randint(length // 2, length + 1, (n,), generator=g)):
        mask[i, keep:] = 0
    return ids, mask


def run(name: str, inputs: int, length: int, qonnx_inputs: int) -> dict:
    torch.manual_seed(0)
    model, masked, lm = MODELS[name]()
    ids, mask = tokens(8, length, seed=0)
    train = (ids, mask) if masked else (ids,)
    if lm:
        loss, target = (lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten())), ids
    else:
        loss, target = nn.CrossEntropyLoss(), torch.randint(0, 3, (8,))
    start = time.perf_counter()
    q = fxc.compile(model, fxc.baseline(), loss_fn=loss, example_inputs=train)
    opt = fxc.fixed_point_optimizer(torch.optim.SGD(q.parameters(), lr=0.01), q)
    opt.zero_grad()
    q.loss(q(*train), target).backward()
    opt.step()
    q.eval()
    example = tuple(t[:1] for t in train)
    test = tokens(inputs, length, seed=1)[:len(train)]
    result = {"model": type(model.model).__name__, "inputs": f"{inputs}x{length} token ids" +
              (" + attention_mask" if masked else ""), "parameters": sum(p.numel() for p in model.parameters())}
    if masked:
        result["padded_positions"] = int((test[1] == 0).sum())
    with tempfile.TemporaryDirectory() as tmp:
        try:
            models = {f: export_onnx(q, f"{tmp}/{f}.onnx", example, flavour=f) for f in ("integer", "qdq", "qonnx")}
        except fxc.ExportError as e:
            return {**result, "exported": False, "error": str(e)[:500]}
        result["exported"] = True
        result.update(flavour_figures(q, models, example, test, qonnx_inputs, "inputs"))
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--inputs", type=int, default=64, help="random token sequences to verify on")
    parser.add_argument("--length", type=int, default=32, help="tokens per sequence (the exported length)")
    parser.add_argument("--qonnx-inputs", type=int, default=8,
                        help="sequences to run the QONNX flavour on (qonnx's executor is slow; 0: skip)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    parser.add_argument("--results", type=pathlib.Path, help="write this run's figures to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for name in args.models:
        r = results[name] = run(name, args.inputs, args.length, args.qonnx_inputs)
        _write(args.results, {"models": results})  # each model as it finishes
        print_record(name, r, 20)


if __name__ == "__main__":
    main()
