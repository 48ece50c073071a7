"""Tests for alignment.core.modeling on the tiny random Llama (fp32, CPU): packed forward
equivalence, agreement with a full-logits reference, and invariance to padding."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import alignment.core.modeling as modeling
from alignment.data.layout import IGNORE, collate, pack_examples
from alignment.data.sft import sft_example
from alignment.data.sources import Row
from alignment.core.modeling import sequence_logprobs, target_logprobs
from alignment.core.models import load_model, load_tokenizer, resolve_model_path

ATOL = 1e-5

CHATS = [
    ("What is 2+2?", "It is 4."),
    ("Name an animal that is quick and brown.", "The quick brown fox jumps over the lazy dog."),
    ("hi", "hello there, friend"),
]


@pytest.fixture(scope="module")
def tiny_path():
    return resolve_model_path("tiny-llama")


@pytest.fixture(scope="module")
def tok(tiny_path):
    return load_tokenizer(tiny_path)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request, tiny_path):
    m = load_model(tiny_path, attn_implementation=request.param).eval()
    assert m.config._attn_implementation == request.param
    assert next(m.parameters()).dtype == torch.float32
    return m


@pytest.fixture(scope="module")
def examples(tok):
    out = []
    for user, answer in CHATS:
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        out.append(sft_example(Row({"messages": msgs}, f"mem:{user[:6]}"), tok, "auto", assistant_only=True))
    assert len({len(e.input_ids) for e in out}) == 3
    assert all(e.labels[0] == IGNORE for e in out)
    return out


def _alone(model, ex, pad_id):
    with torch.no_grad():
        return target_logprobs(model, collate([ex], pad_id))


def _segments(packed, examples):
    """(row, start, example index) for every example inside the packed rows, in row/position order."""
    out = []
    for b, row in enumerate(packed):
        start = 0
        for n in row.lengths:
            seg = row.input_ids[start:start + n]
            matches = [k for k, e in enumerate(examples) if e.input_ids == seg and e.labels == row.labels[start:start + n]]
            assert matches, "a packed segment matches no example"
            out.append((b, start, matches[0]))
            start += n
    return out


# ---------------------------------------------------------------------------
# packed forward == separate forwards
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("max_length", [256, 64], ids=["one-row", "two-rows-padded"])
def test_packed_equals_separate(model, tok, examples, max_length):
    pad = tok.pad_token_id
    packed = pack_examples(examples, max_length)
    assert sum(len(r.lengths) for r in packed) == 3
    assert len(packed) == (1 if max_length == 256 else 2)
    batch = collate(packed, pad)
    with torch.no_grad():
        logp, where = target_logprobs(model, batch)
    assert logp.dtype == torch.float32

    expected_logp, expected_where = [], []
    for b, start, k in _segments(packed, examples):
        lp, w = _alone(model, examples[k], pad)
        assert w[:, 0].eq(0).all()
        expected_logp.append(lp)
        expected_where.append(torch.stack([torch.full_like(w[:, 0], b), w[:, 1] + start], dim=1))
    expected_logp = torch.cat(expected_logp)
    expected_where = torch.cat(expected_where)

    assert where.tolist() == expected_where.tolist()  # same targets, same positions
    assert logp.shape == expected_logp.shape and logp.numel() == sum(e.num_trainable for e in examples)
    torch.testing.assert_close(logp, expected_logp, atol=ATOL, rtol=0)

    # control: without the block mask the later examples see the earlier ones and the values move
    leaky = {"input_ids": batch["input_ids"], "labels": batch["labels"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        leaked, _ = target_logprobs(model, leaky)
    assert (leaked - expected_logp).abs().max() > 1e-3


def test_packed_gradients_equal_separate(tok, examples, tiny_path):
    """One backward through a packed row gives the gradient of the separate forwards."""
    pad = tok.pad_token_id
    m = load_model(tiny_path, attn_implementation="sdpa")
    m.train()  # no dropout in this model; train mode must not change the values
    params = [p for p in m.parameters() if p.requires_grad]

    m.zero_grad()
    logp, _ = target_logprobs(m, collate(pack_examples(examples, 256), pad))
    logp.sum().backward()
    packed_grads = [p.grad.clone() for p in params]

    m.zero_grad()
    for ex in examples:
        lp, _ = target_logprobs(m, collate([ex], pad))
        lp.sum().backward()
    for gp, p in zip(packed_grads, params):
        torch.testing.assert_close(gp, p.grad, atol=ATOL, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in packed_grads)


# ---------------------------------------------------------------------------
# agreement with a plain full-logits reference
# ---------------------------------------------------------------------------


def _reference(model, batch):
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logp_all = F.log_softmax(logits.float()[:, :-1], dim=-1)
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE
    per_token = logp_all.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return per_token[mask], mask


@pytest.mark.parametrize("chunk", [None, 5], ids=["default-chunk", "chunk-5"])
def test_matches_full_logits_reference(model, tok, examples, monkeypatch, chunk):
    if chunk is not None:
        monkeypatch.setattr(modeling, "LOGIT_CHUNK", chunk)
    short, long = examples[0], examples[1]
    batch = collate([short, long], tok.pad_token_id)  # right-padded, unequal lengths
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()
    ref, mask = _reference(model, batch)
    with torch.no_grad():
        logp, where = target_logprobs(model, batch)
    assert where.tolist() == [[b, t + 1] for b, t in mask.nonzero().tolist()]
    torch.testing.assert_close(logp, ref, atol=ATOL, rtol=0)
    # every target position really is a labelled token
    assert all(batch["labels"][b, t].item() != IGNORE for b, t in where.tolist())

    with torch.no_grad():
        total, count = sequence_logprobs(model, batch)
    per_token = torch.zeros(mask.shape)
    per_token[mask] = ref
    # a sum of n fp32 log-probs of size ~6 carries ~n ulps of rounding: scale the tolerance with n
    torch.testing.assert_close(total, per_token.sum(1), atol=ATOL * float(mask.sum(1).max()), rtol=0)
    assert count.tolist() == mask.sum(1).float().tolist()
    assert count.tolist() == [float(short.num_trainable - (short.labels[0] != IGNORE)),
                              float(long.num_trainable - (long.labels[0] != IGNORE))]


@pytest.mark.parametrize("entropy", [None, "value", "grad"])
def test_chunk_recompute_gradients_and_saved_memory(tok, examples, tiny_path, monkeypatch, entropy):
    """Under autograd each logit chunk is recomputed in backward: the log-probs, entropies and gradients are
    the full-logits reference's, and nothing vocabulary-wide is kept for backward (before, every chunk's fp32
    log-softmax was, plus the entropy's exp for PPO)."""
    from alignment.data.layout import episode_batch

    monkeypatch.setattr(modeling, "LOGIT_CHUNK", 4)  # several chunks per batch
    prompts = [tok.encode(user) for user, _ in CHATS[:2]]
    responses = [tok.encode(answer) for _, answer in CHATS[:2]]
    rows = episode_batch(prompts, responses, tok.pad_token_id)
    rows["logit_temperature"] = 0.7
    mask = rows["response_mask"].bool()
    weights = torch.linspace(-1, 1, mask.shape[1])
    results = []
    for how in ("chunked", "reference"):
        model = load_model(tiny_path).eval()
        vocab = model.config.vocab_size
        if how == "reference":
            logits = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits.float() / 0.7
            log_probs = F.log_softmax(logits[:, :-1], dim=-1)
            start = rows["response_start"]
            picked = torch.stack([log_probs[i, start[i] - 1 : start[i] - 1 + mask.shape[1]] for i in range(2)])
            targets = torch.stack([rows["input_ids"][i, start[i] : start[i] + mask.shape[1]] for i in range(2)])
            logp = picked.gather(-1, targets[..., None])[..., 0] * mask
            ent = -(picked.exp() * picked).sum(-1) * mask
        else:
            saved = []

            def pack(t):
                saved.append(tuple(t.shape))
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = modeling.response_logprobs(model, rows, entropy=entropy)
            logp, ent = out if entropy else (out, None)
            assert not [shape for shape in saved if shape and shape[-1] == vocab], saved
            if entropy:
                assert ent.requires_grad == (entropy == "grad")
        loss = (logp * weights).sum() + ((ent * weights).sum() if entropy == "grad" else 0)
        loss.backward()
        grad = model.model.layers[0].mlp.down_proj.weight.grad.clone()
        results.append((logp.detach(), None if ent is None else ent.detach(), grad, model.lm_head.weight.grad.clone()))
    (logp, ent, grad, head_grad), (ref_logp, ref_ent, ref_grad, ref_head_grad) = results
    torch.testing.assert_close(logp[mask], ref_logp[mask], atol=ATOL, rtol=0)
    if ent is not None:
        torch.testing.assert_close(ent[mask], ref_ent[mask], atol=ATOL, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(head_grad, ref_head_grad, atol=1e-6, rtol=1e-4)


def test_padded_row_equals_alone(model, tok, examples):
    """A short example inside a right-padded batch scores exactly as it does alone."""
    batch = collate(examples, tok.pad_token_id)
    with torch.no_grad():
        total, count = sequence_logprobs(model, batch)
        for b, ex in enumerate(examples):
            t1, c1 = sequence_logprobs(model, collate([ex], tok.pad_token_id))
            torch.testing.assert_close(total[b : b + 1], t1, atol=ATOL * ex.num_trainable, rtol=0)
            assert count[b].item() == c1.item() == ex.num_trainable


def test_no_targets_gives_empty():
    from alignment.data.sft import Example

    m = load_model(resolve_model_path("tiny-llama")).eval()
    batch = collate([Example([1, 5, 6], [IGNORE, IGNORE, IGNORE])], pad_id=3)
    with torch.no_grad():
        logp, where = target_logprobs(m, batch)
        total, count = sequence_logprobs(m, batch)
    assert logp.shape == (0,) and where.shape == (0, 2)
    assert total.tolist() == [0.0] and count.tolist() == [0.0]


# ---------------------------------------------------------------------------
# padding content is invisible
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed-padded"])
def test_padding_ids_do_not_matter(model, tok, examples, packed):
    items = pack_examples(examples, 64) if packed else examples
    batch = collate(items, tok.pad_token_id)
    pad_positions = batch["attention_mask"] == 0
    assert pad_positions.sum() > 0
    with torch.no_grad():
        logp, where = target_logprobs(model, batch)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        noisy = dict(batch)
        ids = batch["input_ids"].clone()
        ids[pad_positions] = torch.randint(4, len(tok), (int(pad_positions.sum()),), generator=g)
        assert not torch.equal(ids, batch["input_ids"])
        noisy["input_ids"] = ids
        with torch.no_grad():
            logp2, where2 = target_logprobs(model, noisy)
        assert torch.equal(where, where2)
        torch.testing.assert_close(logp2, logp, atol=1e-6, rtol=0)


def test_attention_choice():
    """model.attn_implementation unset: eager on CPU for rows up to 512 tokens, else transformers' default."""
    from alignment.core.models import EAGER_ATTENTION_MAX_ROW, attention_for

    assert attention_for(None, "cpu", 192) == "eager"
    assert attention_for(None, "cpu", EAGER_ATTENTION_MAX_ROW) == "eager"
    assert attention_for(None, "cpu", EAGER_ATTENTION_MAX_ROW + 1) is None
    assert attention_for(None, "cuda", 192) is None
    assert attention_for("sdpa", "cpu", 192) == "sdpa"  # the recipe's choice always wins
    assert attention_for("flash_attention_2", "cuda", 4096) == "flash_attention_2"
    # shared-prompt block masks (reward models): SDPA, faster there and without eager's saved probabilities
    assert attention_for(None, "cpu", 384, block_masked=True) is None
    assert attention_for("eager", "cpu", 384, block_masked=True) == "eager"


# ---------------------------------------------------------------------------
# a micro-batch's shared prefix (the chat template's system prompt) computed once
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def system_examples(tok):
    system = {"role": "system", "content": "You are a careful assistant who answers briefly."}
    out = []
    for user, answer in CHATS:
        msgs = [system, {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        out.append(sft_example(Row({"messages": msgs}, f"mem:{user[:6]}"), tok, "auto", assistant_only=True))
    return out


@pytest.mark.parametrize("row_tokens", [512, 1], ids=["one-row", "a-row-each"])
def test_shared_prefix_row_equals_padded_batch(model, tok, system_examples, row_tokens):
    from alignment.data.layout import collate_shared_prefix, shared_prefix_length

    pad = tok.pad_token_id
    p = shared_prefix_length(system_examples)
    assert p >= 8 and all(e.labels[p] == IGNORE for e in system_examples)
    shared = collate_shared_prefix(system_examples, pad, row_tokens=row_tokens)
    if row_tokens == 512:
        assert shared["input_ids"].shape == (1, p + sum(len(e.input_ids) - p for e in system_examples))
    else:  # each example in a row of its own, padded: the layout of the plain batch, through the block mask
        assert shared["input_ids"].shape[0] == 3 and int(shared["attention_mask"].sum()) == sum(
            len(e.input_ids) for e in system_examples)
    assert int(shared["example_tokens"]) == sum(len(e.input_ids) for e in system_examples)
    padded = collate(system_examples, pad)
    with torch.no_grad():
        logp, _ = target_logprobs(model, shared)
        expected, where = target_logprobs(model, padded)
    # the padded batch lists targets row by row, as the shared row lists its parts
    assert logp.numel() == expected.numel() == sum(e.num_trainable for e in system_examples)
    torch.testing.assert_close(logp, expected, atol=ATOL, rtol=0)

    if row_tokens != 512:
        return
    # control: without the parts, later examples see earlier ones and the values move
    leaky = dict(shared, block_mask=shared["block_mask"].clone())
    leaky["block_mask"][:] = torch.ones_like(leaky["block_mask"]).tril()
    with torch.no_grad():
        leaked, _ = target_logprobs(model, leaky)
    assert (leaked - expected).abs().max() > 1e-3


def test_shared_prefix_gradients_equal_padded_batch(tok, system_examples, tiny_path):
    from alignment.data.layout import collate_shared_prefix

    pad = tok.pad_token_id
    m = load_model(tiny_path, attn_implementation="sdpa")
    params = [p for p in m.parameters() if p.requires_grad]
    grads = []
    for batch in (collate_shared_prefix(system_examples, pad), collate(system_examples, pad)):
        m.zero_grad()
        logp, _ = target_logprobs(m, batch)
        logp.sum().backward()
        grads.append([p.grad.clone() for p in params])
    for shared, padded in zip(*grads):
        torch.testing.assert_close(shared, padded, atol=ATOL, rtol=1e-4)


def test_shared_prefix_never_holds_a_target():
    from alignment.data.layout import collate_shared_prefix, shared_prefix_length
    from alignment.data.sft import Example

    a = Example([1, 2, 3, 4, 5, 6], [IGNORE, IGNORE, IGNORE, 4, 5, 6])
    b = Example([1, 2, 3, 4, 7, 8], [IGNORE, IGNORE, IGNORE, IGNORE, 7, 8])
    # tokens 1-4 are common, but a's 4 is a target: the prefix stops before it
    assert shared_prefix_length([a, b]) == 2
    assert shared_prefix_length([a]) == 0
    same = Example([1, 2, 3], [IGNORE, IGNORE, 3])
    assert shared_prefix_length([same, same]) == 1  # each keeps a token after the prefix
    # below min_prefix: the plain padded batch, with the example token count
    batch = collate_shared_prefix([a, b], 0)
    assert batch["input_ids"].shape == (2, 6) and int(batch["example_tokens"]) == 12


# ---------------------------------------------------------------------------
# extra memory of the log-prob path with a large vocabulary (FAILURES row 27b, CPU part)
# ---------------------------------------------------------------------------


class _LiveTensorBytes:
    """Peak bytes of tensor storage that ops allocate inside the block and that are still alive.

    A TorchDispatchMode sees every aten op (below autograd) and its outputs. An output whose storage is none of
    the op's inputs' (not a view, not in-place) is a new allocation: its bytes are added, and a finalizer on its
    UntypedStorage subtracts them when the storage is freed (torch keeps a storage's Python object alive exactly
    as long as the C++ storage, so the finalizer runs at the real free, Python or C++ reference alike). The peak
    is read after every op, so an op's inputs and output are counted together (e.g. bf16 logits and their fp32
    copy during .float()). Kernel-internal scratch is not seen (oneDNN's matmul workspace here: ~150 KB).
    Unlike process RSS this ignores allocator caching; CPU torch has no memory_allocated() counter.
    """

    def __init__(self):
        self.live = self.peak = 0
        self.owned: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.owned.discard(key)
        self.live -= nbytes

    def __enter__(self):
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                inputs = {x.untyped_storage().data_ptr() for x in tree_leaves((args, kwargs))
                          if isinstance(x, torch.Tensor)}
                for x in tree_leaves(out):
                    if not isinstance(x, torch.Tensor):
                        continue
                    storage = x.untyped_storage()
                    key, nbytes = storage.data_ptr(), storage.nbytes()
                    if nbytes and key not in inputs and key not in tracker.owned:
                        tracker.owned.add(key)
                        tracker.live += nbytes
                        weakref.finalize(storage, tracker._free, key, nbytes)
                tracker.peak = max(tracker.peak, tracker.live)
                return out

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


class _BigVocabLM(torch.nn.Module):
    """What modeling needs of a causal LM (get_decoder, get_output_embeddings), with a bf16 [V, H] output head."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden, dtype=torch.bfloat16)
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False, dtype=torch.bfloat16)
        torch.nn.init.normal_(self.lm_head.weight, std=0.4)  # logits of std ~3, as a trained LM's

    def get_decoder(self):
        embed = self.embed

        def decoder(input_ids, use_cache=False, **_):
            return SimpleNamespace(last_hidden_state=embed(input_ids))

        return decoder

    def get_output_embeddings(self):
        return self.lm_head


def test_large_vocab_logprobs_extra_memory_stays_within_one_chunk_of_fp32_logits():
    """V = 32768, T = 4096, B = 1, bf16 head: target_logprobs never holds more than the fp32 logits and
    log-softmax of one LOGIT_CHUNK (8 bytes x chunk x V, whatever T), so at most 1.5x one bf16 [B, T, V] logits
    tensor (the row's bound; 1.0x here), and its log-probs equal the upcast-full-logits reference. The naive
    path, measured the same way, needs 4x (fp32 logits + their fp32 log-softmax), which is what OOMs."""
    V, H, T = 32768, 64, 4096
    torch.manual_seed(0)
    model = _BigVocabLM(V, H).eval()
    ids = torch.randint(0, V, (1, T))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    full_bf16 = T * V * 2  # one bf16 [1, T, V] logits tensor: 256 MiB
    chunk = min(modeling.LOGIT_CHUNK, T - 1)  # target positions per chunk: 1024, four chunks here

    with torch.no_grad(), _LiveTensorBytes() as ours:
        logp, where = target_logprobs(model, batch)
    with torch.no_grad(), _LiveTensorBytes() as naive:
        logits = model.lm_head(model.embed(ids)).float()  # the full [B, T, V] upcast the row warns about
        ref = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[0, :, 0]
        del logits

    assert where.tolist() == [[0, t] for t in range(1, T)]
    torch.testing.assert_close(logp, ref, atol=1e-5, rtol=0)  # same bf16 logits, fp32 log-softmax either way
    assert ours.peak <= 8 * chunk * V * 1.02 + (1 << 20), ours.peak / (8 * chunk * V)
    assert ours.peak <= 1.5 * full_bf16, ours.peak / full_bf16
    assert naive.peak >= 3.5 * full_bf16, naive.peak / full_bf16  # control: the method sees the failure
