"""Hugging Face text transformers (tiny configs, random weights, nothing downloaded) deploy
integer-only: token ids are int64 inputs gathered from the embedding's codes, a padding
attention mask and GPT-2's causal mask become a select of the score or the smallest code, and
ONNX Runtime, the integer reference and the simulation agree on every output code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompile as fxc
from fxcompile.core import ops
from fxcompile.deploy.backends.integer import run_integer
from fxcompile.deploy.export import export_onnx, integer_graph, onnx_session, verify
from fxcompile.frontend.gelu import tanh_gelu

transformers = pytest.importorskip("transformers")

VOCAB, LENGTH = 50, 8


class Logits(nn.Module):
    """The model's logits as one tensor output."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None):
        if attention_mask is None:
            return self.model(input_ids=input_ids).logits
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def _tokens(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    mask = torch.ones(n, LENGTH, dtype=torch.long)
    for i, keep in enumerate(torch.randint(LENGTH // 2, LENGTH + 1, (n,), generator=g)):
        mask[i, keep:] = 0
    return ids, mask


def _trained(model, inputs, loss_fn, target):
    q = fxc.compile(model, fxc.baseline(), example_inputs=inputs, loss_fn=loss_fn)
    opt = fxc.fixed_point_optimizer(torch.optim.SGD(q.parameters(), lr=0.05), q)
    q.loss(q(*inputs), target).backward()
    opt.step()
    return q.eval()


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32, num_labels=3,
                                  attn_implementation="eager")
    ids, mask = _tokens(4)
    return _trained(Logits(transformers.BertForSequenceClassification(cfg)), (ids, mask), nn.CrossEntropyLoss(),
                    torch.tensor([0, 1, 2, 0]))


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32, use_cache=False,
                                  bos_token_id=0, eos_token_id=0, attn_implementation="eager")  # gelu_new
    ids, _ = _tokens(4)
    return _trained(Logits(transformers.GPT2LMHeadModel(cfg)), (ids,),
                    lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten()), ids)


def test_bert_with_a_padding_mask_exports_bit_exactly(bert, tmp_path):
    targets = [getattr(n.target, "__name__", "") for n in bert.graph.nodes if n.op == "call_function"]
    assert "key_padding_mask" in targets and "fill_masked" in targets  # the mask arithmetic is gone
    ids, mask = _tokens(1)
    model = export_onnx(bert, tmp_path / "bert.onnx", (ids, mask))
    types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    assert types == {"input_ids": 7, "attention_mask": 7}  # int64 as they are, not quantized
    graph = integer_graph(bert, (ids, mask))
    assert {"gather", "padding_mask", "select"} <= {op.op for op in graph.ops}
    test = _tokens(16, seed=1)
    result = verify(bert, model, test)
    assert result["outputs"] == 48
    assert result["mismatches"] == 0 and result["simulation_mismatches"] == 0
    # tokens at padded positions change nothing
    other = test[0].clone()
    other[test[1] == 0] = (other[test[1] == 0] + 7) % VOCAB
    assert bool((test[1] == 0).any())
    (a,), (b,) = run_integer(graph, *test, codes=True), run_integer(graph, other, test[1], codes=True)
    assert torch.equal(a, b)


def test_gpt2_with_its_causal_mask_and_gelu_new_exports_bit_exactly(gpt2, tmp_path):
    names = {getattr(n.target, "__name__", "") for n in gpt2.graph.nodes if n.op == "call_function"}
    assert "fill_masked" in names and "pow" not in names  # gelu_new is one table, not x ** 3 ...
    assert any(n.args[1] == "gelu" for n in gpt2.graph.nodes if getattr(n.target, "__name__", "") == "lookup")
    ids, _ = _tokens(1)
    model = export_onnx(gpt2, tmp_path / "gpt2.onnx", (ids,))
    test, _ = _tokens(16, seed=1)
    result = verify(gpt2, model, (test,))
    assert result["outputs"] == 16 * LENGTH * VOCAB
    assert result["mismatches"] == 0 and result["simulation_mismatches"] == 0
    # the causal mask was evaluated for the example length: a later token changes no earlier logit
    graph = integer_graph(gpt2, (ids,))
    other = test.clone()
    other[:, -1] = (other[:, -1] + 1) % VOCAB
    (a,), (b,) = run_integer(graph, test, codes=True), run_integer(graph, other, codes=True)
    assert torch.equal(a[:, :-1], b[:, :-1]) and not torch.equal(a[:, -1], b[:, -1])
    with pytest.raises(Exception):  # the deployed graph runs that length only
        onnx_session(model).run(None, {"input_ids": test[:, :LENGTH - 1].numpy()})


def test_gpt2_with_padding_and_causal_masks_together_exports_bit_exactly(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32, use_cache=False,
                                  bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    ids, mask = _tokens(4)
    q = fxc.compile(Logits(transformers.GPT2LMHeadModel(cfg)), fxc.baseline(), example_inputs=(ids, mask)).eval()
    masked = [n for n in q.graph.nodes if getattr(n.target, "__name__", "") == "fill_masked"]
    assert masked and all(len(n.args) == 4 for n in masked)  # the padding mask and the causal mask's constant
    model = export_onnx(q, tmp_path / "gpt2.onnx", (ids[:1], mask[:1]))
    test = _tokens(16, seed=3)
    result = verify(q, model, test)
    assert result["mismatches"] == 0 and result["simulation_mismatches"] == 0
    graph = integer_graph(q, (ids[:1], mask[:1]))
    other = test[0].clone()
    other[:, -1] = (other[:, -1] + 1) % VOCAB  # a later token changes no earlier logit
    (a,), (b,) = run_integer(graph, *test, codes=True), run_integer(graph, other, test[1], codes=True)
    assert torch.equal(a[:, :-1], b[:, :-1])
    assert torch.equal(ops.fill_masked(torch.zeros(1, 2), torch.tensor([[True, True]]), fxc.fixed(16, 8).spec(),
                                       torch.tensor([[True, False]])), torch.tensor([[0.0, -128.0]]))


@pytest.mark.parametrize("flavour", ["qdq", "qonnx"])
def test_text_transformers_export_the_other_flavours(bert, gpt2, tmp_path, flavour):
    for name, q, inputs in (("bert", bert, _tokens(1)), ("gpt2", gpt2, _tokens(1)[:1])):
        model = export_onnx(q, tmp_path / f"{name}.onnx", inputs, flavour=flavour)
        assert [i.type.tensor_type.elem_type for i in model.graph.input] == [7] * len(inputs)
        if flavour == "qdq":
            test = _tokens(8, seed=2)[:len(inputs)]
            session = onnx_session(model)
            (out,) = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), test)})
            graph = integer_graph(q, inputs)
            (ref,) = run_integer(graph, *test, codes=True)
            frac = graph.op_of(graph.outputs[0]).frac
            codes = np.round(out.astype(np.float64) * 2.0 ** frac)
            assert np.abs(codes - ref.numpy()).max() <= 8  # float ops between the pairs: near, not on


def test_masked_scores_take_the_smallest_code_whatever_the_score():
    spec = fxc.fixed(16, 8).spec()
    x = torch.tensor([[100.0, -3.0, 5.0]])
    keep = torch.tensor([[True, False, True]])
    y = ops.fill_masked(x, keep, spec)
    assert y.tolist() == [[100.0, -128.0, 5.0]]
    masked = ops.fill_masked(torch.tensor([[-3.0, 100.0]]), torch.tensor([[True, False]]), spec)
    assert masked[0, 1] == -128.0  # a large masked score too (an added -128 would leave it at -28)


class _OtherMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.q = nn.Embedding(VOCAB, 8), nn.Linear(8, 8)

    def forward(self, ids, mask):
        h = self.emb(ids)
        scores = self.q(h) @ h.transpose(-1, -2)
        keep = mask[:, None, :] > 1  # not a padding mask: no key is kept where the mask is 1
        scores = scores + torch.where(keep, 0.0, torch.finfo(torch.float32).min)
        return torch.softmax(scores, dim=-1) @ h


def test_a_mask_computed_otherwise_from_an_input_is_refused_naming_the_node(tmp_path):
    ids, mask = _tokens(2)
    q = fxc.compile(_OtherMask(), fxc.baseline(), frontend="export", example_inputs=(ids, mask))
    q.eval()
    with pytest.raises(fxc.ExportError, match=r"'where' \(where\).*keeps the keys where a \(batch, length\) "
                                              r"integer input is non-zero"):
        export_onnx(q, tmp_path / "m.onnx", (ids[:1], mask[:1]))
    assert not (tmp_path / "m.onnx").exists()


def test_tanh_gelu_written_out_becomes_one_call():
    class NewGelu(nn.Module):
        def forward(self, x):
            return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * torch.pow(x, 3.0))))

    gm = tanh_gelu(torch.fx.symbolic_trace(NewGelu()))
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert [n.target for n in calls] == [F.gelu] and calls[0].kwargs == {"approximate": "tanh"}
    x = torch.linspace(-6, 6, 101)
    assert torch.allclose(gm(x), NewGelu()(x), atol=1e-6)

    class Other(nn.Module):  # another constant: not GELU, left alone
        def forward(self, x):
            return 0.5 * x * (1.0 + torch.tanh(0.8 * (x + 0.044715 * torch.pow(x, 3.0))))

    gm = tanh_gelu(torch.fx.symbolic_trace(Other()))
    assert F.gelu not in [n.target for n in gm.graph.nodes]
