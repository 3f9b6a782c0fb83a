"""The packed (unpadded) transformer path computes what the padded one does (issue 6).

With enough padding the transformer runs its linear layers on the real tokens
only (``Unpadded``); these tests force each path through
``ndm_seq.models.layers.UNPAD_MIN_PADDING`` and compare losses, every term, logits at
the scored positions, encoder states at real positions, and all gradients.

The claim is "the same computation", so the models run in float64 (issue 11):
in float32 the two paths sum in different orders and the least-squares read
amplifies that round-off to 1.2e-5 (AMD, default kernels), 2.0e-5
(``ATEN_CPU_CAPABILITY=avx2``) and 4.1e-5 (an Intel Xeon) in the NDM logits,
so any float32 tolerance is a guess about the CPU. In float64 the measured
worst case over default/avx2/avx512 kernels and 1-2 threads is 4e-14 (logits)
and 9e-14 (relative gradient norm); ``TOL`` leaves a margin of over 1000x and
is still ten orders of magnitude below what a dropped mask or term changes.
"""

import pytest
import torch
from test_model import COMBOS, IDS, make_model

from ndm_seq.models import layers
from ndm_seq.models.layers import Unpadded

NEVER, ALWAYS = 1.01, 0.0  # UNPAD_MIN_PADDING values forcing either path
TOL = dict(rtol=1e-10, atol=1e-10)  # float64; measured worst case 4e-14 (see above)
REAL_INIT = Unpadded.__init__


def padded_batch(seed=0, left_context=False):
    """Contexts of 2-9 tokens (padded to 9), responses of 1-6 (to 6, -100 after)."""
    g = torch.Generator().manual_seed(seed)
    ctx_len = torch.tensor([9, 2, 5, 7])
    resp_len = torch.tensor([6, 1, 3, 4])
    ids = torch.randint(5, 64, (4, 9), generator=g)
    pos = torch.arange(9)[None, :]
    mask = pos >= 9 - ctx_len[:, None] if left_context else pos < ctx_len[:, None]
    ids = ids.masked_fill(~mask, 0)
    labels = torch.randint(5, 64, (4, 6), generator=g)
    labels[torch.arange(4), resp_len - 1] = 3
    labels = labels.masked_fill(torch.arange(6)[None, :] >= resp_len[:, None], -100)
    return ids, mask.long(), labels


def count_packing(monkeypatch) -> list:
    """Record the mask shape of every ``Unpadded`` built from now on."""
    calls = []

    def counting(self, m):
        calls.append(tuple(m.shape))
        REAL_INIT(self, m)

    monkeypatch.setattr(Unpadded, "__init__", counting)
    return calls


def run(model, monkeypatch, setting, ids, mask, labels, train=False):
    monkeypatch.setattr(layers, "UNPAD_MIN_PADDING", setting)
    calls = count_packing(monkeypatch)
    model.zero_grad(set_to_none=True)
    model.train(train)
    torch.manual_seed(1)  # the posterior sample in training mode
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    enc = model.encoder(ids, mask)
    if train:
        out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, enc, grads, calls


TERMS = ("loss", "nll", "kl", "kl_loss", "bow", "recon", "orth", "key_reg")


@pytest.mark.parametrize("variant,backbone", COMBOS, ids=IDS)
@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_packed_equals_padded(variant, backbone, left, monkeypatch):
    model = make_model(variant, backbone).double()
    ids, mask, labels = padded_batch(left_context=left)
    scored = labels != -100
    for train in (False, True):
        a, enc_a, grad_a, calls_a = run(model, monkeypatch, NEVER, ids, mask, labels, train)
        b, enc_b, grad_b, calls_b = run(model, monkeypatch, ALWAYS, ids, mask, labels, train)
        assert not calls_a
        assert calls_b, "the packed path did not run"
        assert a.logits.dtype == b.logits.dtype == a.loss.dtype == torch.float64
        for term in TERMS:
            got, want = getattr(b, term), getattr(a, term)
            torch.testing.assert_close(got, want, **TOL, msg=term)
        torch.testing.assert_close(b.logits[scored], a.logits[scored], **TOL)
        real = mask.bool()
        torch.testing.assert_close(
            enc_b.last_hidden_state[real], enc_a.last_hidden_state[real], **TOL
        )
        torch.testing.assert_close(enc_b.summary, enc_a.summary, **TOL)
        if train:
            assert grad_a.keys() == grad_b.keys() and grad_a
            for name in grad_a:  # sums in another order: compare at the tensor's scale
                diff = (grad_b[name] - grad_a[name]).norm()
                assert diff <= 1e-10 * grad_a[name].norm() + 1e-12, (name, diff)


@pytest.mark.parametrize("backbone", ["transformer", "gru"])
def test_inner_ignored_label_positions_are_still_decoded(backbone, monkeypatch):
    """A -100 before the last label (e.g. a masked token) keeps its decoder position."""
    model = make_model("cvae", backbone).double().eval()
    ids, mask, labels = padded_batch()
    labels[0, 1] = -100  # inside row 0, which runs to the last column
    labels[2, 0] = -100
    a = run(model, monkeypatch, NEVER, ids, mask, labels)[0]
    b = run(model, monkeypatch, ALWAYS, ids, mask, labels)[0]
    torch.testing.assert_close(b.loss, a.loss, **TOL)
    scored = labels != -100
    torch.testing.assert_close(b.logits[scored], a.logits[scored], **TOL)


def test_unpadded_round_trip_and_layout():
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    x = torch.arange(3 * 4 * 2, dtype=torch.float32).view(3, 4, 2)
    where = Unpadded(mask)
    packed = where.pack(x)
    assert packed.shape == (5, 2)
    torch.testing.assert_close(packed, x[mask])  # row-major order of the real tokens
    assert where.row.tolist() == [0, 0, 1, 1, 1]
    back = where.unpack(packed)
    torch.testing.assert_close(back[mask], x[mask])
    assert (back[~mask] == 0).all()


def test_heavy_padding_takes_the_packed_path_by_default(monkeypatch):
    """The default threshold packs a typical dialogue batch and leaves a dense one alone."""
    model = make_model("ndm", "transformer").eval()
    ids, mask, labels = padded_batch()
    calls = count_packing(monkeypatch)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, labels=labels)
    assert (4, 9) in calls and (4, 6) in calls  # encoder and decoder packed
    calls.clear()
    dense = torch.ones_like(mask)
    full = labels.masked_fill(labels == -100, 7)
    with torch.no_grad():
        model(input_ids=ids.clamp_min(5), attention_mask=dense, labels=full)
    assert not calls


@pytest.mark.parametrize("setting", [NEVER, ALWAYS], ids=["padded", "packed"])
def test_return_logits_false_gives_the_same_loss_without_logits(setting, monkeypatch):
    monkeypatch.setattr(layers, "UNPAD_MIN_PADDING", setting)
    model = make_model("ndm", "transformer").eval()
    ids, mask, labels = padded_batch()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, labels=labels)
        lean = model(input_ids=ids, attention_mask=mask, labels=labels, return_logits=False)
    assert lean.logits is None and full.logits is not None
    for term in TERMS:
        assert getattr(lean, term).item() == getattr(full, term).item(), term


def _pad_columns(t: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)


@pytest.mark.parametrize("variant,backbone", COMBOS, ids=IDS)
def test_length_bucket_padding_changes_no_loss_or_gradient(variant, backbone):
    # training.pad_to_multiple_of pads contexts and responses further (masked ids,
    # -100 labels): eval-mode losses and gradients stay those of the tight batch.
    # (Training mode draws dropout masks of the padded shape: other random numbers.)
    model = make_model(variant, backbone).double().eval()
    ids, mask, labels = padded_batch()
    results = []
    for width in (None, 16):
        batch = (ids, mask, labels)
        if width:
            batch = (_pad_columns(ids, width, 0), _pad_columns(mask, width, 0),
                     _pad_columns(labels, width, -100))  # fmt: skip
        model.zero_grad(set_to_none=True)
        out = model(input_ids=batch[0], attention_mask=batch[1], labels=batch[2])
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (a, grad_a), (b, grad_b) = results
    for term in TERMS:
        got, want = getattr(b, term), getattr(a, term)
        if want is None:
            assert got is None, term
            continue
        torch.testing.assert_close(got, want, **TOL, msg=term)
    assert grad_a.keys() == grad_b.keys() and grad_a
    for name in grad_a:
        diff = (grad_b[name] - grad_a[name]).norm()
        assert diff <= 1e-10 * grad_a[name].norm() + 1e-12, (name, diff)
