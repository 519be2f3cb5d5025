"""Hugging Face transformers models (small configs, random weights, nothing downloaded) compile
and train (the whole model zoo runs in tests/test_model_zoo.py under ``-m slow``)."""

import pytest
import torch
import torch.nn.functional as F

import fxcompile as fxc

transformers = pytest.importorskip("transformers")  # in the dev extra: skips only outside it

_SMALL = dict(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
              max_position_embeddings=32, use_cache=False,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # the mask check compares two runs


def _inputs(batch=2, length=8):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 60, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length // 2:] = 0
    return ids, mask


def _train_step(q, inputs, target=None):
    opt = fxc.fixed_point_optimizer(torch.optim.SGD(q.parameters(), lr=0.05), q)
    loss = q.loss(q(**inputs), target)
    loss.backward()
    opt.step()
    return loss.detach()


def test_bert_sequence_classifier_with_attention_mask():
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(**_SMALL, num_labels=3))
    ids, mask = _inputs()
    q = fxc.compile(model, fxc.baseline(), example_inputs={"input_ids": ids, "attention_mask": mask},
                    loss_fn=lambda out, y: F.cross_entropy(out["logits"], y))
    assert q.meta["fxc_frontend"] == "export"
    assert [n.meta["fxc_role"] for n in q.graph.nodes if n.op == "placeholder"] == [None, None]  # integers
    other = ids.clone()
    other[-1, 4:] = 5  # padded positions: masked out
    with torch.no_grad():
        assert torch.equal(q(input_ids=ids, attention_mask=mask).logits, q(input_ids=other, attention_mask=mask).logits)
    assert torch.isfinite(_train_step(q, {"input_ids": ids, "attention_mask": mask}, torch.tensor([0, 2])))
    ids, mask = _inputs(batch=5, length=11)
    assert q(input_ids=ids, attention_mask=mask).logits.shape == (5, 3)


def test_gpt2_language_model_with_its_own_loss():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=60, n_embd=16, n_layer=1, n_head=2, n_positions=32, use_cache=False,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    ids, _ = _inputs()
    q = fxc.compile(model, fxc.baseline(), example_inputs={"input_ids": ids, "labels": ids}, loss_fn="loss")
    loss = _train_step(q, {"input_ids": ids, "labels": ids})
    assert torch.isfinite(loss) and 2.0 < float(loss) < 6.0  # about log(60) for random weights
