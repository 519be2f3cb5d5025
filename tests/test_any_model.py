"""Models beyond plain CNNs: batch sizes other than the example's, encoders with attention
masks, causal decoders computing their own loss, integer inputs, attention and recurrent leaves."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompile as fxc
from fxcompile.frontend.roles import named_outputs


def _step(q, inputs, target=None, lr=0.05):
    """One SGD step; returns the loss and how far the parameters moved."""
    params = [p for p in q.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = fxc.fixed_point_optimizer(torch.optim.SGD(params, lr=lr), q)
    out = q(**inputs) if isinstance(inputs, dict) else q(*inputs)
    loss = q.loss(out, target)
    loss.backward()
    opt.step()
    return loss.detach(), sum(float((p.detach() - b).abs().sum()) for p, b in zip(params, before))


class Flattening(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        return self.fc(h.view(h.shape[0], -1))


def test_a_model_compiled_at_batch_1_trains_at_batch_2_and_32_through_export():
    torch.manual_seed(0)
    q = fxc.compile(Flattening(), fxc.baseline(), loss_fn=nn.CrossEntropyLoss(), frontend="export",
                    example_inputs=(torch.randn(1, 1, 8, 8),))
    assert q.meta["fxc_frontend"] == "export"
    for batch in (2, 32):
        x, y = torch.randn(batch, 1, 8, 8), torch.randint(0, 3, (batch,))
        assert q(x).shape == (batch, 3)
        loss, moved = _step(q, (x,), y)
        assert torch.isfinite(loss) and moved > 0


class SamePadNet(nn.Module):
    """Padding computed from the input's size: fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3, stride=2), nn.Linear(4, 3)

    def forward(self, x):
        pad = max((math.ceil(x.shape[-1] / 2) - 1) * 2 + 3 - x.shape[-1], 0)
        x = F.pad(x, [pad // 2, pad - pad // 2, pad // 2, pad - pad // 2])
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


def test_auto_captures_a_size_dependent_padding_model_and_it_trains_at_other_batch_sizes():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="Falling back"):
        q = fxc.compile(SamePadNet(), fxc.baseline(), loss_fn=nn.CrossEntropyLoss(),
                        example_inputs=(torch.randn(2, 1, 9, 9),))
    assert q.meta["fxc_frontend"] == "export"
    assert "graph captured by: export (torch.fx failed" in fxc.inspect(q)
    loss, moved = _step(q, (torch.randn(5, 1, 9, 9),), torch.randint(0, 3, (5,)))
    assert torch.isfinite(loss) and moved > 0


class Encoder(nn.Module):
    """BERT-style: token and position embeddings, masked self-attention written with einsum, a
    GELU feed-forward, LayerNorms, classification from the first token."""

    def __init__(self, vocab=50, dim=16, heads=2, classes=3, max_len=32):
        super().__init__()
        self.heads = heads
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids, attention_mask):
        b, t = input_ids.shape
        h = self.tok(input_ids) + self.pos(torch.arange(t, device=input_ids.device))
        q, k, v = self.qkv(h).view(b, t, 3, self.heads, -1).unbind(2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
        scores = scores + (1.0 - attention_mask[:, None, None, :].to(scores.dtype)) * -1e4
        att = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, t, -1)
        h = self.norm1(h + self.proj(att))
        h = self.norm2(h + self.ff(h))
        return {"logits": self.head(h[:, 0]), "hidden": h}


def _ids_and_mask(batch=2, length=8, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length // 2:] = 0
    return ids, mask


@pytest.mark.parametrize("frontend", ["auto", "export"])
def test_bert_style_encoder_with_an_attention_mask(frontend):
    torch.manual_seed(0)
    ids, mask = _ids_and_mask()
    q = fxc.compile(Encoder(), fxc.baseline(), example_inputs={"input_ids": ids, "attention_mask": mask},
                    loss_fn=lambda out, y: F.cross_entropy(out["logits"], y), frontend=frontend)
    edges = fxc.assignment(q)
    # token ids and the integer mask are not cast; the embedding tables are weights
    inputs = [n for n in q.graph.nodes if n.op == "placeholder"]
    assert [n.meta["fxc_role"] for n in inputs] == [None, None]
    assert not any(u.op == "call_module" and u.target.startswith("casts.") for n in inputs for u in n.users)
    tables = [e for e in edges if e.producer.replace("_", ".").startswith(("tok.weight", "pos.weight"))]
    assert tables and all(e.role == "weight" for e in tables)
    # what padded positions hold does not matter: the mask works through the casts
    other = ids.clone()
    other[-1, 4:] = 7
    with torch.no_grad():
        assert torch.equal(q(ids, mask)["logits"], q(other, mask)["logits"])
    loss, moved = _step(q, {"input_ids": ids, "attention_mask": mask}, torch.tensor([0, 2]))
    assert torch.isfinite(loss) and moved > 0
    ids5, mask5 = _ids_and_mask(batch=5, length=12, seed=1)  # another batch and sequence length
    assert q(input_ids=ids5, attention_mask=mask5)["logits"].shape == (5, 3)


class Decoder(nn.Module):
    """GPT-2-style: causal scaled-dot-product attention, a tied output embedding, and its own
    next-token loss in a dict output."""

    def __init__(self, vocab=50, dim=16, heads=2, max_len=32):
        super().__init__()
        self.heads = heads
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.ln1, self.ln2, self.ln_f = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def forward(self, input_ids, labels):
        b, t = input_ids.shape
        h = self.wte(input_ids) + self.wpe(torch.arange(t, device=input_ids.device))
        q, k, v = self.qkv(self.ln1(h)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1)
        h = h + self.proj(att)
        h = h + self.mlp(self.ln2(h))
        logits = F.linear(self.ln_f(h), self.wte.weight)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return {"loss": loss, "logits": logits}


@pytest.mark.parametrize("frontend", ["auto", "export"])
def test_gpt2_style_decoder_takes_its_loss_from_a_named_output(frontend):
    torch.manual_seed(0)
    ids, _ = _ids_and_mask()
    q = fxc.compile(Decoder(), fxc.baseline(), example_inputs={"input_ids": ids, "labels": ids}, loss_fn="loss",
                    frontend=frontend)
    cast = named_outputs(q)["loss"]  # the loss output leaves through a cast in the loss format
    assert cast.meta["fxc_edge"].role == "loss" and cast.meta["fxc_edge"].forward == fxc.fixed(16, 10)
    assert "scaled_dot_product_attention" in fxc.inspect(q)  # quantized at its boundary, and said so
    with torch.no_grad():  # causal: a later token does not change earlier logits
        changed = ids.clone()
        changed[:, -1] = 3
        assert torch.equal(q(ids, ids)["logits"][:, :-1], q(changed, ids)["logits"][:, :-1])
    loss, moved = _step(q, {"input_ids": ids, "labels": ids})
    assert torch.isfinite(loss) and moved > 0
    with pytest.raises(ValueError, match="'nll' names no output.*'logits', 'loss'"):
        fxc.compile(Decoder(), fxc.baseline(), example_inputs={"input_ids": ids, "labels": ids}, loss_fn="nll")


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.gru, self.lstm = nn.GRU(8, 8, batch_first=True), nn.LSTM(8, 8, batch_first=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.attn(h, h, h)[0]  # need_weights=True: a leaf (self-attention without weights is written out)
        h, _ = self.gru(h)
        h, _ = self.lstm(h)
        return self.fc(h[:, -1])


def test_attention_and_recurrent_modules_train_as_leaves_and_inspect_names_them():
    torch.manual_seed(0)
    ids = torch.randint(0, 20, (3, 6))
    q = fxc.compile(Recurrent(), fxc.baseline(), loss_fn=nn.CrossEntropyLoss(), example_inputs=(ids,))
    line = next(ln for ln in fxc.inspect(q).splitlines() if ln.startswith("quantized at their boundary only"))
    assert "attn (MultiheadAttention)" in line and "gru (GRU)" in line and "lstm (LSTM)" in line
    assert "emb" not in line  # a table lookup: exact, nothing inside to round
    loss, moved = _step(q, (ids,), torch.tensor([0, 1, 1]))
    assert torch.isfinite(loss) and moved > 0
