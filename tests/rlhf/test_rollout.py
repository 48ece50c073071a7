"""The rollout (alignment.rlhf.rollout): greedy decoding equals transformers' generate, sampled responses
do not depend on their batch, each sequence stops at its own stop token, truncated responses keep their
tokens and say so, the sampled log-probs are the training pass's, and padding never reaches a loss
(FAILURES rows 10, 11, 24, 25)."""

from __future__ import annotations

import pytest
import torch

from alignment.data import text
from alignment.core.modeling import response_logprobs
from alignment.core.models import load_model, load_tokenizer, resolve_model_path
from alignment.rlhf.ppo_losses import aggregate, policy_loss
from alignment.data.layout import episode_batch, predicting_positions
from alignment.rlhf.rollout import sample_batch

PROMPTS = [[{"role": "user", "content": "What is 7 + 5? Answer with just the number."}],
           [{"role": "user", "content": "Spell the word 'garden' backwards."}],
           [{"role": "user", "content": "How many minutes are in 3 hours? Answer with just the number."}]]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_model_path("tiny-llama"))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = load_model(resolve_model_path("tiny-llama")).eval()
    with torch.no_grad():  # a less uniform random model, so samples and greedy paths differ per prompt
        for p in m.parameters():
            p.mul_(4.0)
    return m


@pytest.fixture(scope="module")
def prompt_ids(tok):
    return [text.prompt_ids(tok, p) for p in PROMPTS]


def _options(tok, **kw):
    return dict(dict(max_new_tokens=12, stop_ids=text.stop_token_ids(tok), pad_id=tok.pad_token_id), **kw)


def test_greedy_equals_transformers_generate(model, tok, prompt_ids):
    from alignment.evaluate.gold import generate_ids

    ours = sample_batch(model, prompt_ids, [0, 0, 0], temperature=0.0, **_options(tok))
    theirs = generate_ids(model, tok, PROMPTS, max_new_tokens=12, batch_size=3, device=torch.device("cpu"))
    assert ours.response_ids == theirs
    assert len({tuple(r) for r in ours.response_ids}) > 1, "the prompts lead to different responses"


def test_a_sampled_response_does_not_depend_on_its_batch(model, tok, prompt_ids):
    together = sample_batch(model, prompt_ids, [11, 12, 13], **_options(tok))
    alone = sample_batch(model, prompt_ids[:1], [11], **_options(tok))
    reordered = sample_batch(model, prompt_ids[:0:-1], [13, 12], **_options(tok))
    assert alone.response_ids[0] == together.response_ids[0]
    assert reordered.response_ids == together.response_ids[:0:-1]
    other_seed = sample_batch(model, prompt_ids[:1], [99], **_options(tok))
    assert other_seed.response_ids[0] != together.response_ids[0], "the seed matters"


class ForcedStops(torch.nn.Module):
    """A model whose output layer makes row r emit EOS at decoding step stop_at[r] (None: EOS banned)."""

    def __init__(self, inner, eos: int, stop_at: list):
        super().__init__()
        self.inner, self.head = inner, ForcingHead(inner.get_output_embeddings(), eos, stop_at)

    def get_decoder(self):
        return self.inner.get_decoder()

    def get_output_embeddings(self):
        return self.head


class ForcingHead(torch.nn.Module):
    """Rows that stopped leave the decode batch (rollout.COMPACT_SHARE): when the batch shrinks, the head drops
    the rows it made stop, in order, as the decode loop does, to keep forcing the right original row."""

    def __init__(self, inner, eos: int, stop_at: list):
        super().__init__()
        self.inner, self.eos, self.stop_at, self.calls = inner, eos, stop_at, 0
        self.active = list(range(len(stop_at)))
        self.shapes = []

    def forward(self, hidden):
        self.calls += 1  # the first call gives the first generated token
        if hidden.shape[0] != len(self.active):
            self.active = [r for r in self.active if not (self.stop_at[r] is not None and self.stop_at[r] < self.calls)]
        assert hidden.shape[0] == len(self.active)
        self.shapes.append(hidden.shape[0])
        logits = self.inner(hidden).clone()
        for i, row in enumerate(self.active):
            at = self.stop_at[row]
            logits[i, self.eos] = 1e4 if at is not None and self.calls == at else -1e4
        return logits


def test_each_sequence_stops_at_its_own_stop_token_and_truncation_is_flagged(model, tok, prompt_ids):
    eos = tok.eos_token_id
    forced = ForcedStops(model, eos, [2, 6, None])
    out = sample_batch(forced, prompt_ids, [1, 2, 3], **_options(tok, max_new_tokens=8))
    assert [len(r) for r in out.response_ids] == [2, 6, 8]
    assert out.ended == [True, True, False]
    assert forced.head.shapes == [3, 3, 2, 2, 2, 2, 1, 1]  # stopped rows left the decode batch
    assert out.response_ids[0][-1] == eos and out.response_ids[1][-1] == eos
    assert eos not in out.response_ids[2], "a truncated response keeps its last token (no EOS put in its place)"
    batch = episode_batch(out.prompt_ids, out.response_ids, tok.pad_token_id)
    assert batch["response_mask"].tolist() == [[1] * 2 + [0] * 6, [1] * 6 + [0] * 2, [1] * 8]


def test_truncation_is_the_same_in_both_generation_paths(model, tok, prompt_ids):
    """FAILURES row 11: the rollout (sample_batch) and transformers' generate (gold.generate_ids: `align pairs`,
    `align eval`, gold scores) cut at max_new_tokens alike: the same tokens, none replaced by EOS, flagged as not
    ended, and the rollout's log-probs are those of the tokens in the sequence."""
    from alignment.evaluate.gold import generate_ids

    stops = set(text.stop_token_ids(tok))
    ours = sample_batch(model, prompt_ids, [0, 0, 0], temperature=0.0, **_options(tok, max_new_tokens=4))
    theirs = generate_ids(model, tok, PROMPTS, max_new_tokens=4, batch_size=3, device=torch.device("cpu"))
    assert ours.response_ids == theirs
    assert ours.ended == [False] * 3 and all(len(r) == 4 and r[-1] not in stops for r in theirs), (
        "every response is cut by max_new_tokens, its last token kept")
    _assert_rollout_logprobs_are_the_training_passs(model, tok, ours)


def _assert_rollout_logprobs_are_the_training_passs(model, tok, out):
    """The log-prob the rollout recorded for every sampled token equals the training pass's (to 1e-4), and the
    training pass reads 0 off the response."""
    batch = episode_batch(out.prompt_ids, out.response_ids, tok.pad_token_id)
    with torch.no_grad():
        logp = response_logprobs(model, batch)
    mask = batch["response_mask"].bool()
    sampled = torch.zeros_like(logp)
    for i, row in enumerate(out.logprobs):
        sampled[i, : len(row)] = torch.tensor(row)
    torch.testing.assert_close(logp[mask], sampled[mask], atol=1e-4, rtol=0)
    assert (logp[~mask] == 0).all()


def test_rollout_logprobs_equal_the_training_pass(model, tok, prompt_ids):
    _assert_rollout_logprobs_are_the_training_passs(model, tok, sample_batch(model, prompt_ids, [5, 6, 7], **_options(tok)))


def test_an_eager_gqa_model_decodes_through_sdpa_with_the_same_tokens_and_logprobs(tok, prompt_ids):
    """decode_attention: eager attention copies the KV cache to every query head at every token; the rollout
    runs SDPA on the KV heads instead (tiny-llama: 4 query heads, 2 KV heads). Greedy tokens equal generate's
    through eager, the sampled log-probs equal eager's training pass, and the model is eager again after."""
    from alignment.evaluate.gold import generate_ids

    torch.manual_seed(0)
    eager = load_model(resolve_model_path("tiny-llama"), attn_implementation="eager").eval()
    with torch.no_grad():
        for p in eager.parameters():
            p.mul_(4.0)
    assert eager.config.num_key_value_heads < eager.config.num_attention_heads
    seen = []
    hook = eager.model.layers[0].self_attn.register_forward_hook(
        lambda module, args, out: seen.append(module.config._attn_implementation))
    greedy = sample_batch(eager, prompt_ids, [0, 0, 0], temperature=0.0, **_options(tok))
    sampled = sample_batch(eager, prompt_ids, [5, 6, 7], **_options(tok))
    hook.remove()
    assert seen and set(seen) == {"sdpa"} and eager.config._attn_implementation == "eager"
    assert greedy.response_ids == generate_ids(eager, tok, PROMPTS, max_new_tokens=12, batch_size=3,
                                               device=torch.device("cpu"))
    _assert_rollout_logprobs_are_the_training_passs(eager, tok, sampled)


@pytest.mark.parametrize("layout", ["rows", "groups"])
def test_tempered_rollout_logprobs_equal_the_tempered_training_pass(model, tok, prompt_ids, layout):
    """At temperature 0.6 the rollout samples softmax(logits / 0.6); the training pass with logit_temperature
    0.6 reads the same log-probs (and entropies of that distribution), and without it the untempered ones."""
    from alignment.core.modeling import full_logits
    from alignment.data.layout import group_batch

    grouped = [p for p in prompt_ids[:2] for _ in range(3)]
    out = sample_batch(model, grouped, list(range(20, 26)), **_options(tok, temperature=0.6))
    make = ((lambda: episode_batch(out.prompt_ids, out.response_ids, tok.pad_token_id)) if layout == "rows"
            else (lambda: group_batch(out.prompt_ids, out.response_ids, 3, tok.pad_token_id)))
    batch = dict(make(), logit_temperature=0.6)
    with torch.no_grad():
        logp, entropy = response_logprobs(model, batch, entropy="value")
        plain = response_logprobs(model, make())
    mask = batch["response_mask"].bool()
    sampled = torch.zeros_like(logp)
    for i, row in enumerate(out.logprobs):
        sampled[i, : len(row)] = torch.tensor(row)
    torch.testing.assert_close(logp[mask], sampled[mask], atol=1e-4, rtol=0)
    assert (plain[mask] - logp[mask]).abs().max() > 1e-2, "the temperature changes the log-probs"
    # By hand for the first episode: log_softmax(logits / T) at each response token.
    rows = episode_batch(out.prompt_ids[:1], out.response_ids[:1], tok.pad_token_id)
    start, n = int(rows["response_start"][0]), len(out.response_ids[0])
    with torch.no_grad():
        log_probs = torch.log_softmax(full_logits(model, rows["input_ids"]).float()[0] / 0.6, dim=-1)
    picked = log_probs[start - 1 : start - 1 + n]
    by_hand = picked.gather(1, torch.tensor(out.response_ids[0])[:, None])[:, 0]
    torch.testing.assert_close(logp[0, :n], by_hand, atol=1e-4, rtol=0)
    torch.testing.assert_close(entropy[0, :n], -(picked.exp() * picked).sum(-1), atol=1e-4, rtol=0)


def test_padding_never_reaches_the_loss(model, tok):
    """[a, b, c] (no EOS) and [a, EOS]: masks [1, 1, 1] and [1, 1, 0]; what stands in the padding changes
    neither the loss nor its gradient (FAILURES row 24)."""
    prompt = text.prompt_ids(tok, PROMPTS[0])
    a, b, c = tok("4 2 1", add_special_tokens=False).input_ids[:3]
    responses = [[a, b, c], [a, tok.eos_token_id]]
    losses, grads = [], []
    for filler in (tok.pad_token_id, a):
        batch = episode_batch([prompt, prompt], responses, filler)
        assert batch["response_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
        model.zero_grad()
        logp = response_logprobs(model, batch)
        pg, _ = policy_loss(logp, logp.detach(), torch.tensor([[1.0, -1.0, 0.5], [2.0, 1.0, 9.0]]), 0.2, 0.2)
        loss = aggregate(pg, batch["response_mask"], "token_mean") / batch["response_mask"].sum()
        loss.backward()
        losses.append(loss.item())
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    assert losses[0] == losses[1]
    torch.testing.assert_close(grads[0], grads[1], atol=0, rtol=0)


def test_values_and_logprobs_are_read_where_response_tokens_are_predicted():
    """values[i] = i over a row: the ones kept for response tokens are positions P - 1 .. P + R - 2, the
    state before each response token (FAILURES row 25), with P the prompt length and R the response's."""
    P, R = 5, 3
    positions = predicting_positions(torch.tensor([P, 2]), R)
    values = torch.arange(10.0)[None].expand(2, 10)
    kept = values.gather(1, positions)
    assert kept[0].tolist() == [4.0, 5.0, 6.0]  # P-1, P, P+1 = P-1 .. P+R-2
    assert kept[1].tolist() == [1.0, 2.0, 3.0]


def test_a_group_shares_its_prefill_and_samples_as_if_alone(model, tok, prompt_ids):
    from alignment.rlhf.rollout import repeated_runs

    grouped = [p for p in prompt_ids[:2] for _ in range(3)]
    assert repeated_runs(grouped) == 3 and repeated_runs(prompt_ids) == 1
    together = sample_batch(model, grouped, list(range(6)), **_options(tok))
    alone = [sample_batch(model, [p], [s], **_options(tok)).response_ids[0] for p, s in zip(grouped, range(6))]
    assert together.response_ids == alone


@pytest.mark.parametrize("row_tokens, rows", [(512, 1), (1, 2)], ids=["groups-in-one-row", "a-row-per-group"])
def test_packed_groups_give_the_log_probs_values_and_gradients_of_separate_episodes(model, tok, prompt_ids,
                                                                                    row_tokens, rows):
    """[prefix | prompt 1 | r1 | r2 | r3 | prompt 2 | ...], each response seeing the prefix, its prompt and
    itself: the same log-probs, critic values and gradients as the episodes laid out one per row (fp32)."""
    from alignment.core.models import load_model
    from alignment.data.layout import group_batch
    from reward.model import token_values

    grouped = [p for p in prompt_ids[:2] for _ in range(3)]
    out = sample_batch(model, grouped, list(range(10, 16)), **_options(tok))
    separate = episode_batch(out.prompt_ids, out.response_ids, tok.pad_token_id)
    packed = group_batch(out.prompt_ids, out.response_ids, 3, tok.pad_token_id, row_tokens=row_tokens)
    assert torch.equal(packed["response_mask"], separate["response_mask"])
    assert packed["input_ids"].shape[0] == rows
    assert packed["attention_mask"].sum() < separate["attention_mask"].sum()
    results = []
    for batch in (separate, packed):
        model.zero_grad()
        logp, entropy = response_logprobs(model, batch, entropy="value")
        (logp * torch.linspace(-1, 1, logp.shape[1])).sum().backward()
        results.append((logp.detach(), entropy.detach(), model.model.layers[1].mlp.down_proj.weight.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    critic = load_model(resolve_model_path("tiny-llama"), "reward").eval()
    with torch.no_grad():
        torch.testing.assert_close(token_values(critic, packed), token_values(critic, separate), atol=1e-5, rtol=1e-4)
