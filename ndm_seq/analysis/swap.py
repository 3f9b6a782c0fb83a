"""The swap experiment: does a response attribute follow an NDM slot (or a latent subspace)?

For an attribute ``A`` (:data:`~ndm_seq.analysis.attributes.ATTRIBUTES`) take pairs of
test pairs ``(a, b)`` whose reference responses differ in ``A``. Each response's latent is
its posterior mean ``z = E[q(z | c, x)]`` (its own context and response). An *edit* builds
a latent for ``a`` from ``a``'s and ``b``'s:

* ``none``: ``a``'s own (the baseline);
* ``slot k`` (NDM, ``mode="slots"``): ``a``'s decomposition with slot ``k`` and its weight
  replaced by ``b``'s (``Decomposition.swap(index=[k])``); the decoder is conditioned on
  ``compose(slots, weights)`` and, with per-step reads, reads those slots;
* ``subspace k`` (``mode="subspaces"``, any Gaussian latent: the CVAE control):
  ``z_a + P_k (z_b - z_a)``, with ``P_k`` the orthogonal projector on the ``k``-th of
  ``N`` subspaces splitting ``R^{d_z}`` (random orthogonal, or random disjoint coordinate
  groups), ``d_z / N`` dimensions each: the share of one of ``N`` slots;
* ``all``: every slot (``mode="slots"``: ``b``'s slots and weights) or the whole latent
  (``z_b``): the upper bound.

Each edited latent is decoded greedily after ``a``'s context, and ``A`` is measured on the
generated text. The pairs of an attribute are distinct, drawn without replacement
(:func:`sample_pairs`): a small split gives fewer than asked, never a pair counted twice.
The **follow rate** of an edit is the share of pairs whose generated
response takes ``b``'s value of ``A``; its **effect** is its follow rate minus the follow
rate of ``none`` (what ``a``'s own latent already gives). ``effect`` is 0 for an edit
that carries nothing of ``A``; the paired standard error of the effect is
``std(f_edit - f_none) / sqrt(n)`` over the ``n`` pairs (``f``: 1 when the pair follows).
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ndm_seq.analysis.attributes import ATTRIBUTES, text_stats
from ndm_seq.evaluation.scoring import pad_rows
from ndm_seq.models.outputs import Decomposition, compose

__all__ = [
    "Latents",
    "distinct_pairs",
    "edit_names",
    "generate_edits",
    "part_shares",
    "posterior_latents",
    "sample_pairs",
    "subspace_projectors",
    "swap_experiment",
]

MODES = ("slots", "subspaces")
BASES = ("random", "coordinates")


@dataclass
class Latents:
    """Posterior latents of responses, and their NDM decompositions (``mode="slots"``)."""

    z: torch.Tensor
    """``(U, d_z)`` posterior means."""
    slots: torch.Tensor | None = None
    """``(U, N, d_z)`` the slots of each ``z`` (decomposed with its own context)."""
    weights: torch.Tensor | None = None
    """``(U, N)`` their weights."""


@torch.no_grad()
def posterior_latents(model, encoded, *, batch_size: int = 64, slots: bool = False) -> Latents:
    """The posterior means of tokenised pairs, decomposed into slots when ``slots``.

    Args:
        model: a cvae or ndm :class:`~ndm_seq.NDMForConversation` (eval mode).
        encoded: ``{"input_ids": [...], "labels": [...]}`` as
            :class:`~ndm_seq.data.tokenization.TokenizePairs` returns.
        batch_size: pairs per forward pass.
        slots: also decompose (ndm).
    """
    device, pad = model.device, model.config.pad_token_id
    zs, slot_list, weight_list = [], [], []
    n = len(encoded["input_ids"])
    for start in range(0, n, batch_size):
        ids = pad_rows(encoded["input_ids"][start : start + batch_size], pad, device)
        mask = (ids != pad).long()
        labels = pad_rows(encoded["labels"][start : start + batch_size], -100, device)
        out = model(input_ids=ids, attention_mask=mask, labels=labels, return_logits=False)
        zs.append(out.posterior_mean)
        if slots:
            d = model.decompose(ids, mask, latent=out.posterior_mean)
            slot_list.append(d.slots)
            weight_list.append(d.weights)
    if not slots:
        return Latents(torch.cat(zs))
    return Latents(torch.cat(zs), torch.cat(slot_list), torch.cat(weight_list))


def subspace_projectors(dim: int, n: int, basis: str, seed: int) -> torch.Tensor:
    """``(n, dim, dim)`` orthogonal projectors on ``n`` subspaces that split ``R^dim``.

    ``basis="random"``: the subspaces are spanned by consecutive column groups of a random
    orthogonal matrix (QR of a Gaussian one); ``"coordinates"``: by random disjoint groups
    of coordinates. Group sizes differ by at most one (``dim / n`` when it divides).
    Deterministic given ``seed``; the projectors sum to the identity.
    """
    if not 1 <= n <= dim:
        raise ValueError(f"subspaces must be between 1 and the latent size {dim}, got {n}")
    if basis not in BASES:
        raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
    gen = torch.Generator().manual_seed(seed)
    if basis == "random":
        q, r = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r))  # the Haar-distributed Q of this draw
    else:
        q = torch.eye(dim, dtype=torch.float64)[:, torch.randperm(dim, generator=gen)]
    groups = torch.arange(dim).tensor_split(n)
    return torch.stack([q[:, g] @ q[:, g].T for g in groups])  # (n, dim, dim)


def edit_names(mode: str, n: int) -> list[str]:
    """``["none", "slot 1", ..., "slot N", "all"]`` (``"subspace k"`` for subspaces)."""
    unit = "slot" if mode == "slots" else "subspace"
    return ["none", *(f"{unit} {k + 1}" for k in range(n)), "all"]


def _edited(lat: Latents, a, b, k, projectors) -> dict[str, torch.Tensor]:
    """The ``generate`` keyword arguments of edit ``k`` (None: none, -1: all) for rows ``a``, ``b``."""
    if projectors is None:  # NDM slots
        da, db = (
            Decomposition(
                lat.z[i], lat.slots[i], lat.weights[i], compose(lat.slots[i], lat.weights[i])
            )
            for i in (a, b)
        )
        d = da if k is None else da.swap(db, None if k == -1 else [k])[0]
        return {"slots": d.slots, "slot_weights": d.weights}
    za, zb = lat.z[a], lat.z[b]
    if k is None or k == -1:
        return {"latent": za if k is None else zb}
    p = projectors[k].to(za)  # the latents' dtype and device
    return {"latent": za + (zb - za) @ p}  # P symmetric: (z_b - z_a) P = P (z_b - z_a)


@torch.no_grad()
def generate_edits(
    model, tokenizer, context_ids, lat, a, b, edit, projectors, *, max_new_tokens, batch_size
) -> list[str]:
    """Greedy responses after ``a``'s contexts from the latents of one edit, one per row.

    Args:
        context_ids: token ids of every item's context (indexed by ``a``).
        lat: the items' :class:`Latents`.
        a, b: ``(R,)`` item indices of the rows.
        edit: the slot / subspace index, None for none, -1 for all.
        projectors: :func:`subspace_projectors` (``mode="subspaces"``), else None.
    """
    pad = model.config.pad_token_id
    texts: list[str] = []
    for start in range(0, len(a), batch_size):
        ra, rb = a[start : start + batch_size], b[start : start + batch_size]
        ids = pad_rows([context_ids[i] for i in ra.tolist()], pad, model.device)
        kwargs = _edited(lat, ra, rb, edit, projectors)
        out = model.generate(
            input_ids=ids, attention_mask=(ids != pad).long(), do_sample=False, num_beams=1,
            max_new_tokens=max_new_tokens, **kwargs,
        )  # fmt: skip
        texts.extend(tokenizer.batch_decode(out, skip_special_tokens=True))
    return texts


def part_shares(lat: Latents, projectors: torch.Tensor | None) -> torch.Tensor:
    """``(N,)`` how much of the latent each part carries: ``||v_k|| / sum_j ||v_j||``, mean
    over the responses, with ``v_k = w_k m_k`` (slot ``k`` as composed) or ``P_k z``
    (subspace ``k``). ``1 / N`` each when the parts weigh the same."""
    if projectors is None:
        parts = lat.weights.unsqueeze(-1) * lat.slots  # (U, N, d_z)
    else:
        parts = torch.einsum("kde,ue->ukd", projectors.to(lat.z), lat.z)  # (U, N, d_z)
    norms = parts.double().norm(dim=-1)  # (U, N)
    return (norms / norms.sum(-1, keepdim=True).clamp_min(1e-30)).mean(0)


def distinct_pairs(values: Sequence[str]) -> int:
    """How many distinct ordered pairs ``(a, b)`` with ``values[a] != values[b]`` there are:
    the most :func:`sample_pairs` can draw."""
    sizes = Counter(values).values()
    total = len(values)
    return sum(k * (total - k) for k in sizes)


def sample_pairs(values: Sequence[str], n: int, seed: int | str) -> list[tuple[int, int]]:
    """``min(n, distinct_pairs(values))`` distinct ordered pairs ``(a, b)`` of indices with
    ``values[a] != values[b]``, drawn without replacement, in a seeded random order.

    Balanced over ``a``'s value: each value that occurs starts the same number of pairs
    (give or take one), except a value whose items have fewer pairs than that, which
    starts all of its own and leaves the rest to the others. Within a value, the pairs
    are uniform among its ``(a, b)``. Empty when fewer than two values occur. Memory grows
    with the pairs drawn, never with ``n`` beyond them.
    """
    groups: dict[str, list[int]] = {}
    for i, v in enumerate(values):
        groups.setdefault(v, []).append(i)
    if len(groups) < 2:
        return []
    rng = random.Random(hashlib.sha256(f"ndm-seq:pairs:{seed}".encode()).hexdigest())
    keys = sorted(groups)
    available = {v: len(groups[v]) * (len(values) - len(groups[v])) for v in keys}
    quota = _balanced(min(n, sum(available.values())), available)
    pairs = []
    for v in keys:
        others = [i for i, w in enumerate(values) if w != v]
        # Pair index j of value v is (groups[v][j // len(others)], others[j % len(others)]).
        for j in rng.sample(range(available[v]), quota[v]):
            a, b = divmod(j, len(others))
            pairs.append((groups[v][a], others[b]))
    rng.shuffle(pairs)
    return pairs


def _balanced(n: int, available: dict[str, int]) -> dict[str, int]:
    """``n`` split as evenly as the capacities ``available`` allow (``n <= sum``)."""
    quota = dict.fromkeys(available, 0)
    open_keys = [v for v in available if available[v] > 0]
    left = n
    while left and open_keys:
        share, extra = divmod(left, len(open_keys))
        for i, v in enumerate(open_keys):
            take = min(share + (i < extra), available[v] - quota[v])
            quota[v] += take
            left -= take
        open_keys = [v for v in open_keys if quota[v] < available[v]]
    return quota


def _effects(follow: torch.Tensor, names: list[str]) -> dict[str, dict]:
    """Per edit: follows, rate, effect (rate - rate of none) and its paired standard error."""
    base = follow[0]
    out = {}
    for e, name in enumerate(names):
        diff = follow[e] - base
        n = len(diff)
        se = float(diff.std() / n**0.5) if n > 1 else float("nan")
        out[name] = {
            "follows": int(follow[e].sum()),
            "rate": float(follow[e].mean()),
            "effect": float(diff.mean()),
            "effect_se": se,
        }
    return out


def swap_experiment(
    model,
    tokenizer,
    contexts,
    responses,
    *,
    attributes,
    pairs: int = 200,
    mode: str = "slots",
    subspaces: int = 4,
    basis: str = "random",
    seed: int = 0,
    batch_size: int = 64,
    max_new_tokens: int = 30,
    max_context_tokens: int = 128,
    max_response_tokens: int = 64,
    examples: int = 3,
    progress: bool = False,
) -> dict:
    """Run the swap experiment (module docstring) on (context, response) pairs of a split.

    Args:
        model: a cvae or ndm model (``mode="slots"`` needs ndm), in eval mode.
        tokenizer: its tokenizer.
        contexts, responses: the split (each context a list of turns).
        attributes: names in :data:`ATTRIBUTES`.
        pairs: pairs per attribute, distinct (at most what the responses hold:
            :func:`distinct_pairs`).
        mode: ``"slots"`` (ndm) or ``"subspaces"`` (``subspaces`` random subspaces of
            ``basis``, :func:`subspace_projectors`).
        seed: seeds the pairs and the subspaces (greedy decoding of posterior means is
            deterministic).
        max_new_tokens: longest generated response; ``max_context_tokens`` and
            ``max_response_tokens``: the token limits of the contexts and of the
            references the posterior reads.
        examples: generated responses kept per attribute in the result.

    Returns:
        ``{"edits": [...], "attributes": {name: {"pairs" (drawn), "distinct_pairs"
        (available), "reference_counts",
        "edits": {edit: {"follows", "rate", "effect", "effect_se"}}, "examples"}},
        "median_words", "shares": {part: share}}`` (:func:`part_shares` of the paired
        responses' latents).
    """
    from ndm_seq.data.tokenization import TokenizePairs

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    stats = text_stats(responses)
    ref = {name: [ATTRIBUTES[name].measure(r, stats) for r in responses] for name in attributes}
    chosen = {name: sample_pairs(ref[name], pairs, f"{seed}:{name}") for name in attributes}
    items = sorted({i for p in chosen.values() for pair in p for i in pair})
    if not items:
        raise ValueError(f"no pairs: the responses do not differ in {', '.join(attributes)}")
    where = {item: u for u, item in enumerate(items)}
    encoded = TokenizePairs(tokenizer, max_context_tokens, max_response_tokens)(
        {"context": [list(contexts[i]) for i in items], "response": [responses[i] for i in items]}
    )
    lat = posterior_latents(model, encoded, batch_size=batch_size, slots=mode == "slots")
    n = model.config.num_slots if mode == "slots" else subspaces
    projectors = None if mode == "slots" else subspace_projectors(lat.z.shape[1], n, basis, seed)
    names = edit_names(mode, n)
    rows = [(name, pair) for name in attributes for pair in chosen[name]]
    a = torch.tensor([where[p[0]] for _, p in rows], dtype=torch.long)
    b = torch.tensor([where[p[1]] for _, p in rows], dtype=torch.long)
    generated = []  # per edit (none, each part, all), per row
    bar = tqdm(total=len(names) * len(rows), desc="swap", unit="response", disable=not progress)
    for e in [None, *range(n), -1]:
        generated.append(
            generate_edits(
                model, tokenizer, encoded["input_ids"], lat, a, b, e, projectors,
                max_new_tokens=max_new_tokens, batch_size=batch_size,
            )
        )  # fmt: skip
        bar.update(len(rows))
    bar.close()
    result = {"edits": names, "median_words": stats.median_words, "attributes": {}}
    result["shares"] = dict(zip(names[1:-1], part_shares(lat, projectors).tolist(), strict=True))
    start = 0
    for name in attributes:
        m = len(chosen[name])
        result["attributes"][name] = _attribute_result(
            name, chosen[name], ref[name], [g[start : start + m] for g in generated],
            names, stats, responses, examples,
        )  # fmt: skip
        start += m
    return result


def _attribute_result(name, pairs, ref, generated, names, stats, responses, examples) -> dict:
    """The counts, effects and examples of one attribute (``generated``: per edit, per pair)."""
    measure = ATTRIBUTES[name].measure
    values = ATTRIBUTES[name].values
    counts = {v: ref.count(v) for v in values}
    out = {
        "pairs": len(pairs),
        "distinct_pairs": distinct_pairs(ref),
        "reference_counts": counts,
        "edits": {},
        "examples": [],
    }
    if not pairs:
        return out
    follow = torch.tensor(
        [[float(measure(t, stats) == ref[b]) for t, (_, b) in zip(g, pairs, strict=True)]
         for g in generated],
        dtype=torch.float64,
    )  # (edits, pairs)  # fmt: skip
    out["edits"] = _effects(follow, names)
    for i, (a, b) in enumerate(pairs[:examples]):
        out["examples"].append({
            "a": responses[a], "a_value": ref[a], "b": responses[b], "b_value": ref[b],
            "generated": {e: generated[k][i] for k, e in enumerate(names)},
        })  # fmt: skip
    return out
