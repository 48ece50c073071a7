"""The verifiable instruction constraints: each check on hand-written answers, the splits, and the reward
function that serves a user's own annotated prompts."""

import random

import pytest

from alignment.builtin import constraints as C
from alignment.builtin.task import generate_problems, score
from alignment.evaluate.rewards import constraints as constraints_reward


@pytest.mark.parametrize("spec,good,bad", [
    ({"type": "caps"}, "I LIKE RIVERS!", "I like RIVERS"),
    ({"type": "words", "value": 4}, "I like rivers a", "I like rivers"),
    ({"type": "include", "value": "calm"}, "Rivers are CALM.", "Rivers are calmer."),
    ({"type": "avoid", "value": "calm"}, "Rivers are quiet.", "Rivers are calm."),
    ({"type": "end", "value": "!"}, "Rivers flow!", "Rivers flow."),
    ({"type": "no_commas"}, "Rivers flow fast.", "Rivers flow, fast."),
    ({"type": "quoted"}, '"Rivers flow."', 'Rivers "flow."'),
    ({"type": "json", "value": "reply"}, '{"reply": "Rivers flow."}', '{"answer": "Rivers flow."}'),
    ({"type": "start", "value": "Today"}, "today rivers flow.", "Rivers flow today."),
])
def test_each_check_by_hand(spec, good, bad):
    assert C.met(spec, good) and not C.met(spec, bad)


def test_a_pair_scores_the_share_met_and_empty_answers_meet_nothing_they_must_contain():
    pair = [{"type": "caps"}, {"type": "end", "value": "?"}]
    assert C.score(pair, "WHY?") == 1.0 and C.score(pair, "WHY!") == 0.5 and C.score(pair, "why.") == 0.0
    assert not C.met({"type": "avoid", "value": "calm"}, "") and not C.met({"type": "no_commas"}, "Ok")


def test_splits_hold_what_the_docstring_says():
    types = {split: set() for split in ("train", "rl", "eval")}
    pairs = {split: set() for split in ("train", "rl", "eval")}
    for split in types:
        for p in generate_problems(1500, 0, split=split):
            if p.family != "constraints":
                continue
            kinds = tuple(c["type"] for c in p.gold["constraints"])
            types[split].update(kinds)
            if len(kinds) == 2:
                pairs[split].add(kinds)
            assert score(p.gold, p.answer) == 1.0
    assert types["train"] == set(C.SFT_TYPES) and not pairs["train"]
    assert types["rl"] == types["eval"] == set(C.TYPES)
    assert pairs["rl"] == set(C.TRAIN_PAIRS) and pairs["eval"] == set(C.HELD_OUT_PAIRS)


def test_the_reward_function_reads_a_users_own_annotations():
    rows = [{"prompt": "Say hi.", "constraints": [{"type": "caps"}, {"type": "words", "value": 2}]}]
    assert constraints_reward(["Say hi."], ["HELLO THERE<|im_end|>"], rows) == [1.0]
    assert constraints_reward(["Say hi."], ["hello there"], rows) == [0.5]
    with pytest.raises(ValueError, match="prompt 0 has no 'constraints' list"):
        constraints_reward(["Say hi."], ["x"], [{"prompt": "Say hi."}])


def test_generation_is_deterministic():
    rng_a, rng_b = random.Random(3), random.Random(3)
    assert [C.specs_for("rl", rng_a, "rain") for _ in range(20)] == [C.specs_for("rl", rng_b, "rain") for _ in range(20)]
