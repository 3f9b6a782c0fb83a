"""VMED's DNC memory (ndm_seq/models/dnc.py): each addressing rule against numbers worked out by hand.

Every example is small enough to check on paper; the expected values are
written out below each call, in float64.
"""

import math

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from test_model import batch, make_model

from ndm_seq import NDMConfig, NDMForConversation
from ndm_seq.models import dnc
from ndm_seq.models.latents import DNCVMEDLatent, VMEDLatent
from ndm_seq.models.state import DecoderState

F64 = torch.float64


def t(values):
    return torch.tensor(values, dtype=F64)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_content_weights_are_a_softmax_of_strength_times_cosine():
    memory = t([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])[None]  # (1, 3, 2)
    keys = t([[3.0, 0.0], [1.0, 1.0]])[None]  # two heads
    strengths = t([2.0, 1.0])[None]
    got = dnc.content_weights(memory, keys, strengths)
    # head 0: cosines (1, 0, 1/sqrt 2), times 2; head 1: cosines (1/sqrt 2, 1/sqrt 2, 1), times 1
    s = math.sqrt(2)
    e0 = [math.exp(2), 1.0, math.exp(s)]
    e1 = [math.exp(1 / s), math.exp(1 / s), math.e]
    want = t([[x / sum(e0) for x in e0], [x / sum(e1) for x in e1]])[None]
    close(got, want)
    # A zero memory word has similarity 0 (no division by zero).
    zero = dnc.content_weights(torch.zeros(1, 2, 2, dtype=F64), keys[:, :1], strengths[:, :1])
    close(zero, t([[[0.5, 0.5]]]))


def test_allocation_weights_follow_the_sorted_free_list():
    usage = t([[0.5, 0.2, 0.9], [0.0, 1.0, 0.0]])
    got = dnc.allocation_weights(usage)
    # Row 0, ascending usage: word 1 (0.2), word 0 (0.5), word 2 (0.9):
    # a[1] = 1 - 0.2; a[0] = (1 - 0.5) * 0.2; a[2] = (1 - 0.9) * 0.2 * 0.5.
    # Row 1: ties broken by index: word 0 gets 1, word 2 gets (1 - 0) * 0 = 0.
    close(got, t([[0.1, 0.8, 0.01], [1.0, 0.0, 0.0]]))


def test_usage_counts_the_previous_write_and_the_free_gates_release_reads():
    usage = t([[0.5, 0.2, 0.9]])
    write = t([[0.2, 0.0, 0.5]])
    reads = t([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])[None]  # (1, K=2, N=3)
    free = t([[1.0, 0.5]])
    got = dnc.update_usage(usage, write, reads, free)
    # u + w - u w = (0.6, 0.2, 0.95); retention = (1 - 1 r_0)(1 - 0.5 r_1) = (0, 0.75, 0.75)
    close(got, t([[0.0, 0.15, 0.7125]]))
    # Free gates at 0: nothing is released.
    close(dnc.update_usage(usage, write, reads, t([[0.0, 0.0]])), t([[0.6, 0.2, 0.95]]))


def test_write_weights_interpolate_allocation_and_content_under_the_write_gate():
    content, allocation = t([[0.2, 0.3, 0.5]]), t([[0.1, 0.8, 0.01]])
    got = dnc.write_weights(content, allocation, t([[0.5]]), t([[0.25]]))
    # 0.5 * (0.25 a + 0.75 c)
    close(got, t([[0.0875, 0.2125, 0.18875]]))


def test_erase_then_add():
    memory = t([[1.0, 2.0], [3.0, 4.0]])[None]
    got = dnc.erase_and_add(memory, t([[1.0, 0.5]]), t([[1.0, 0.0]]), t([[10.0, 20.0]]))
    # row 0 (w 1): erased in column 0 only, then + (10, 20); row 1 (w 0.5): 3 * 0.5 + 5, 4 + 10
    close(got, t([[10.0, 22.0], [6.5, 14.0]])[None])


def test_links_and_precedence_record_the_order_of_writes():
    link, p = torch.zeros(1, 3, 3, dtype=F64), torch.zeros(1, 3, dtype=F64)
    for w in ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0]):
        w = t([w])
        link, p = dnc.update_links(link, p, w), dnc.update_precedence(p, w)
    # word 1 was written after word 0
    close(link, t([[0, 0, 0], [1, 0, 0], [0, 0, 0.0]])[None])
    close(p, t([[0.0, 1.0, 0.0]]))
    w = t([[0.0, 0.5, 0.5]])
    link, p = dnc.update_links(link, p, w), dnc.update_precedence(p, w)
    # L[1,0] = (1 - 0.5 - 0) * 1 + 0.5 * p[0] = 0.5; L[2,1] = (1 - 0.5 - 0.5) * 0 + 0.5 * p[1] = 0.5;
    # L[1,2] = 0 + 0.5 * p[2] = 0; the diagonal stays 0 (L[2,2] would be 0.5 * p[2] = 0 anyway).
    close(link, t([[0, 0, 0], [0.5, 0, 0], [0, 0.5, 0.0]])[None])
    close(p, t([[0.0, 0.5, 0.5]]))  # sum w = 1: the old precedence is reset
    close(dnc.update_precedence(t([[0.2, 0.3, 0.0]]), t([[0.0, 0.1, 0.4]])), t([[0.1, 0.25, 0.4]]))
    # A self-link is never recorded: writing word 0 again after itself.
    again = dnc.update_links(torch.zeros(1, 2, 2, dtype=F64), t([[1.0, 0.0]]), t([[1.0, 0.0]]))
    close(again, torch.zeros(1, 2, 2, dtype=F64))


def test_forward_and_backward_reads_follow_the_links():
    link = t([[0, 0, 0], [1, 0, 0], [0, 1, 0.0]])[None]  # written 0, then 1, then 2
    previous = t([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])[None]  # head 0 read word 0, head 1 word 1
    forward, backward = dnc.directional_weights(link, previous)
    close(forward, t([[0, 1, 0], [0, 0, 1.0]])[None])  # the word written next
    close(backward, t([[0, 0, 0], [1, 0, 0.0]])[None])  # the word written before
    content = t([[0.1, 0.6, 0.3], [0.1, 0.6, 0.3]])[None]
    modes = t([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])[None]  # (backward, content, forward)
    got = dnc.read_weights(content, link, previous, modes)
    # head 0: 0.2 * 0 + 0.3 * c + 0.5 * (0, 1, 0); head 1: all backward, word 0
    close(got, t([[0.03, 0.68, 0.09], [1.0, 0.0, 0.0]])[None])


def test_read_steps_continue_from_the_previous_read_weights():
    torch.manual_seed(0)
    memory, link = torch.randn(2, 4, 3, dtype=F64), torch.rand(2, 4, 4, dtype=F64)
    previous = torch.rand(2, 2, 4, dtype=F64).softmax(-1)
    keys, strengths = torch.randn(2, 3, 2, 3, dtype=F64), 1 + torch.rand(2, 3, 2, dtype=F64)
    modes = torch.rand(2, 3, 2, 3, dtype=F64).softmax(-1)
    weights, vectors = dnc.read_steps(memory, link, previous, keys, strengths, modes)
    w = previous
    for i in range(3):  # one step at a time, as incremental decoding does
        c = dnc.content_weights(memory, keys[:, i], strengths[:, i])
        w = dnc.read_weights(c, link, w, modes[:, i])
        close(weights[:, i], w)
        close(vectors[:, i], w @ memory)


def test_padded_context_positions_write_nothing():
    torch.manual_seed(0)
    memory = dnc.DNCMemory(4, 6, words=3, width=2, heads=2).double()
    states = torch.randn(2, 3, 4, dtype=F64)
    right = memory.write(states, torch.tensor([[1, 1, 0], [1, 1, 0]]))
    alone = memory.write(states[:, :2], torch.ones(2, 2))
    left = memory.write(states.roll(1, dims=1), torch.tensor([[0, 1, 1], [0, 1, 1]]))
    for name, value in vars(alone).items():
        close(getattr(right, name), value)
        close(getattr(left, name), value)
    assert alone.memory.abs().sum() > 0 and alone.link.abs().sum() > 0


def test_a_dnc_vmed_scores_the_same_with_extra_context_padding():
    model = make_model("vmed_dnc", "gru").double().eval()
    ids, mask, labels = batch()
    pad = torch.zeros(3, 2, dtype=ids.dtype)
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, labels=labels)
        b = model(
            input_ids=torch.cat([ids, pad], 1),
            attention_mask=torch.cat([mask, pad], 1),
            labels=labels,
        )
    close(a.loss, b.loss)


def test_vmed_memory_field_defaults_and_old_folders():
    assert NDMConfig().vmed_memory == "dnc"
    assert isinstance(make_model("vmed_dnc", "gru").latent, DNCVMEDLatent)
    old = NDMForConversation.from_pretrained("tests/fixtures/layout_v1/vmed-gru")
    assert old.config.vmed_memory == "simplified" and type(old.latent) is VMEDLatent
    with pytest.raises(StrictDataclassError, match="vmed_memory_words"):
        NDMConfig(vmed_memory_words=0)
    with pytest.raises(StrictDataclassError, match="vmed_memory"):
        NDMConfig(vmed_memory="ntm")


@pytest.mark.parametrize("memory", ["simplified", "dnc"])
def test_vmed_free_bits_floor_the_kl_per_response_not_per_step(memory):
    ids, mask, labels = batch()
    for free_bits in (0.01, 1.0, 100.0):
        model = make_model("vmed" if memory == "simplified" else "vmed_dnc", "gru")
        model.config.free_bits = free_bits
        torch.manual_seed(0)
        out = model.train()(input_ids=ids, attention_mask=mask, labels=labels)
        floor = torch.tensor(free_bits * 8)  # latent_dim 8, once per response
        close(out.kl_loss.double(), torch.maximum(out.kl, floor).double())


def test_beam_reordering_selects_the_dnc_state_rows():
    model = make_model("vmed_dnc", "gru").eval()
    ids, mask, _ = batch()
    dec = torch.full((3, 1), 2)
    with torch.no_grad():
        state = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).cache
    latent = state.latent
    assert latent.memory.shape == (3, 4, 8) and latent.reads.shape == (3, 2, 4)
    order = torch.tensor([2, 2, 0])
    reordered = DecoderState(latent, state.hidden, length=1)
    reordered.reorder_cache(order)
    for name in ("memory", "link", "reads", "prefix"):
        assert torch.equal(getattr(reordered.latent, name), getattr(latent, name)[order]), name


def test_resuming_a_vmed_run_keeps_the_memory_of_its_checkpoint(tmp_path):
    import json

    from ndm_seq.training.config import ConfigError, RunConfig, build_model_config
    from ndm_seq.training.run import _keep_checkpoint_vmed_memory

    section = {"preset": "tiny", "variant": "vmed"}
    run = RunConfig(output_dir=str(tmp_path), model=section)
    config = build_model_config(section)
    _keep_checkpoint_vmed_memory(run, config)  # no checkpoint: a fresh run
    assert config.vmed_memory == "dnc"
    checkpoint = tmp_path / "checkpoints" / "checkpoint-5"
    make_model("vmed", "gru").save_pretrained(checkpoint)
    raw = json.loads((checkpoint / "config.json").read_text())
    del raw["vmed_memory"]  # saved before the field existed
    (checkpoint / "config.json").write_text(json.dumps(raw))
    # The trainer's checkpoint check needs more files than save_pretrained writes:
    # name the checkpoint explicitly, as training.resume=PATH does.
    run.training.resume = str(checkpoint)
    _keep_checkpoint_vmed_memory(run, config)
    assert config.vmed_memory == "simplified"
    explicit = {**section, "vmed_memory": "dnc"}
    with pytest.raises(ConfigError, match=r"resume with model\.vmed_memory=simplified"):
        _keep_checkpoint_vmed_memory(
            RunConfig(output_dir=str(tmp_path), model=explicit, training=run.training),
            build_model_config(explicit),
        )
    run.training.resume = "never"
    fresh = build_model_config(section)
    _keep_checkpoint_vmed_memory(run, fresh)
    assert fresh.vmed_memory == "dnc"


# Recorded once (issue 13) from the DNC memory as committed, float64, portable weights;
# the same bits under ATEN_CPU_CAPABILITY default and avx2: (eval loss, train loss, grad norm).
RECORDED_DNC = {
    "gru": (27.07223825938339, 27.04998275464827, 22.096388286143437),
    "transformer": (26.053004829855922, 25.514035503331975, 19.601844872092144),
}


@pytest.mark.parametrize("backbone", sorted(RECORDED_DNC))
def test_seeded_dnc_vmed_losses_match_recorded(backbone):
    from test_model_regression import portable_init

    model = portable_init(make_model("vmed_dnc", backbone)).double()
    ids, mask, labels = batch()
    with torch.no_grad():
        eval_loss = model.eval()(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    torch.manual_seed(1)
    out = model.train()(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = [p.grad.double() for p in model.parameters() if p.grad is not None]
    norm = torch.sqrt(sum((g**2).sum() for g in grads)).item()
    got = (eval_loss, out.loss.item(), norm)
    assert got == pytest.approx(RECORDED_DNC[backbone], rel=1e-10)
