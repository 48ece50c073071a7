"""Tests for alignment.builtin.task: the built-in offline demo task and its gold reward."""
import json
import random

import pytest

from alignment.builtin.task import (FAMILIES, FORMAT_VERSION, Problem, bad_responses, generate_problems, main, score, write_task_data)

FILE_KEYS = ("sft_train", "sft_eval", "prefs_train", "prefs_eval", "prompts_train", "prompts_eval", "prompts_rl",
             "prompts_rl_constraints", "prompts_eval_constraints")


def _gold(expected, *, family="arithmetic", task="add", kind="number", fmt="plain",
          operands=(17, 25), case_sensitive=False):
    return {"family": family, "task": task, "kind": kind, "expected": str(expected),
            "format": fmt, "operands": list(operands), "case_sensitive": case_sensitive}


ADD = _gold(42)  # "What is 17 + 25?"
PREFIX = _gold(42, family="format", task="add_answer_prefix", fmt="answer_prefix")
JSON_GOLD = _gold(42, family="format", task="add_json", fmt="json")
UNITS = _gold(3000, family="units", task="to_smaller", operands=(3, 1000))
REVERSE = _gold("nedrag", family="words", task="reverse", kind="text", operands=())
UPPER = _gold("GARDEN", family="words", task="uppercase", kind="text", operands=(),
              case_sensitive=True)
INITIALS = _gold("rbg", family="words", task="initials", kind="text", operands=())


@pytest.fixture(scope="module")
def problems():
    return generate_problems(500, seed=0)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    first = write_task_data(tmp_path_factory.mktemp("a"), seed=3, n_train=300, n_eval=60, n_rl=100,
                            n_eval_constraints=40)
    second = write_task_data(tmp_path_factory.mktemp("b"), seed=3, n_train=300, n_eval=60, n_rl=100,
                             n_eval_constraints=40)
    return first, second


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------- generation

def test_generation_is_deterministic_and_seed_dependent():
    assert generate_problems(50, seed=1) == generate_problems(50, seed=1)
    assert generate_problems(50, seed=1) != generate_problems(50, seed=2)
    assert generate_problems(20, seed=1) == generate_problems(50, seed=1)[:20]


def test_families_evenly_mixed_and_all_present(problems):
    counts = {family: sum(p.family == family for p in problems) for family in FAMILIES}
    assert len(FAMILIES) >= 4
    assert set(counts) == {p.family for p in problems}
    assert max(counts.values()) - min(counts.values()) <= 1


def test_problem_fields(problems):
    assert all(isinstance(p, Problem) for p in problems)
    assert len({p.id for p in problems}) == len(problems)
    assert len({p.prompt for p in problems}) == len(problems)
    for p in problems:
        assert p.gold["family"] == p.family and p.id.startswith(("arith", "units", "words", "fmt", "cons"))
        assert {"family", "expected", "format"} <= set(p.gold)
        json.dumps(p.gold)  # must be serialisable into prompts_*.jsonl
        # short enough for a 135M model: rough token estimate via words/punctuation
        assert len(p.prompt.split()) < 25 and len(p.prompt) < 130, p.prompt
        assert len(p.answer) < (80 if p.family == "constraints" else 40), p.answer  # a sentence, or a number


def test_every_gold_answer_scores_full(problems):
    for p in problems:
        assert score(p.gold, p.answer) == 1.0, p


def test_bad_responses_score_strictly_lower(problems):
    rng = random.Random(0)
    kinds_seen = set()
    for p in problems:
        bads = bad_responses(p, rng)
        assert len(bads) >= (1 if p.family == "constraints" else 3)
        for bad in bads:
            assert bad != p.answer
            assert score(p.gold, bad) < score(p.gold, p.answer), (p, bad)
            kinds_seen.add(score(p.gold, bad))
    assert 0.0 in kinds_seen and any(0 < s < 1 for s in kinds_seen)


def test_bad_responses_deterministic_for_rng(problems):
    p = problems[7]
    assert bad_responses(p, random.Random(5)) == bad_responses(p, random.Random(5))


# -------------------------------------------------------------------- scoring

@pytest.mark.parametrize("response", [
    "42", " 42 ", "42.", "42\n", "42<|im_end|>", "42</s>", " 42.<|im_end|>\n",
    "The answer is 42.", "the answer is: 42", "42<|im_end|>garbage after end token",
])
def test_score_full_credit_variants(response):
    assert score(ADD, response) == 1.0


@pytest.mark.parametrize("gold, response", [
    (ADD, "41"), (ADD, "43"), (ADD, ""), (ADD, "   "), (ADD, "<|im_end|>"),
    (ADD, "I'm not sure, you could use a calculator."), (ADD, "41 or 42"),
    (ADD, "42 or maybe 43"), (ADD, "It is 42, not 24."), (ADD, "42.5"),
    (PREFIX, "Answer: 41"), (JSON_GOLD, '{"answer": 41}'), (UNITS, "300"),
    (REVERSE, "garden"), (UPPER, "garden"), (UPPER, "Garden"), (INITIALS, "rgb"),
    (INITIALS, "I do not know"),
])
def test_score_zero_for_wrong_conflicting_or_evasive(gold, response):
    assert score(gold, response) == 0.0


def test_two_different_numbers_never_full_credit():
    for response in ["42 43", "42, 43", "17 + 25 = 42", "42 (or 41)", "Answer: 42, 42.0"]:
        assert score(ADD, response) < 1.0, response


@pytest.mark.parametrize("gold, response", [
    (ADD, "Answer: 42"), (ADD, "42 apples"), (ADD, "**42**"), (PREFIX, "42"),
    (PREFIX, "The answer is 42"), (JSON_GOLD, "42"), (JSON_GOLD, '{"answer": "42"}'),
    (JSON_GOLD, "Answer: 42"), (UNITS, "3000 meters"), (REVERSE, "'nedrag'"),
    (UPPER, "G A R D E N"), (INITIALS, "R, B, G"),
])
def test_score_partial_for_right_value_wrong_format(gold, response):
    assert score(gold, response) == 0.5


def test_score_rambling_gets_less_than_concise_format_error():
    filler = "Great question, let me think. Problems like this are common. I hope this helps."
    rambling = f"{filler} The sum 17 + 25 = 42."
    assert score(ADD, rambling) == 0.25
    assert 0 < score(ADD, rambling) < score(ADD, "Answer: 42") < score(ADD, "42")
    assert score(ADD, f"{filler} Maybe 41 or 42.") == 0.0


def test_score_exact_formats():
    assert score(PREFIX, "Answer: 42") == 1.0
    assert score(PREFIX, "answer:42.") == 1.0
    assert score(JSON_GOLD, '{"answer": 42}') == 1.0
    assert score(JSON_GOLD, '```json\n{"answer": 42}\n```') == 1.0
    assert score(JSON_GOLD, '{"answer": 42, "note": 1}') < 1.0
    assert score(JSON_GOLD, '{"answer": 42.0}') < 1.0
    assert score(UNITS, "3,000") == 1.0
    assert score(REVERSE, "Nedrag") == 1.0
    assert score(UPPER, "GARDEN<|im_end|>") == 1.0
    assert score(INITIALS, "rbg.") == 1.0


def test_score_range(problems):
    rng = random.Random(1)
    for p in problems[:100]:
        for response in bad_responses(p, rng) + [p.answer, "", "blah 1 2 3"]:
            assert 0.0 <= score(p.gold, response) <= 1.0


# -------------------------------------------------------------------- writing

def test_write_returns_all_paths(written):
    paths, _ = written
    assert set(paths) == set(FILE_KEYS) | {"manifest"}
    assert all(path.exists() for path in paths.values())
    assert not [f for f in paths["manifest"].parent.iterdir() if f.name.endswith(".tmp")]


def test_written_files_byte_identical(written):
    first, second = written
    for key in first:
        assert first[key].read_bytes() == second[key].read_bytes(), key


def test_train_eval_disjoint(written):
    paths, _ = written
    for kind in ("sft", "prefs", "prompts"):
        train, held_out = _read_jsonl(paths[f"{kind}_train"]), _read_jsonl(paths[f"{kind}_eval"])
        assert (len(train), len(held_out)) == (300, 60)
        assert not {r["id"] for r in train} & {r["id"] for r in held_out}
    prompts_of = lambda key: {r["prompt"][0]["content"] for r in _read_jsonl(paths[key])}
    assert not prompts_of("prompts_train") & prompts_of("prompts_eval")
    assert len(prompts_of("prompts_train")) == 300 and len(prompts_of("prompts_eval")) == 60
    # The RL prompts are new to SFT and to the held-out split, and carry what the verifier needs.
    rl = _read_jsonl(paths["prompts_rl"])
    assert len(prompts_of("prompts_rl")) == len(rl) == 100
    assert not prompts_of("prompts_rl") & (prompts_of("prompts_train") | prompts_of("prompts_eval"))
    assert all(set(r) == {"prompt", "gold", "id"} and "-rl3-" in r["id"] for r in rl)


def test_constraint_files_are_the_rl_split_and_a_disjoint_held_out_set(written):
    """RL on constraints reads the RL split's constraint rows; the larger held-out constraint set shares no prompt
    with any other file and holds the eval split's pairs, which no training split holds."""
    paths, _ = written
    rl, rl_cons = _read_jsonl(paths["prompts_rl"]), _read_jsonl(paths["prompts_rl_constraints"])
    assert rl_cons == [r for r in rl if r["gold"]["family"] == "constraints"] and len(rl_cons) == 20
    held = _read_jsonl(paths["prompts_eval_constraints"])
    assert len(held) == 40 and all(r["gold"]["family"] == "constraints" for r in held)
    assert all(r["id"].startswith("cons-evalcons3-") for r in held)
    texts = lambda key: {r["prompt"][0]["content"] for r in _read_jsonl(paths[key])}
    others = set().union(*(texts(k) for k in ("prompts_train", "prompts_eval", "prompts_rl")))
    assert len(texts("prompts_eval_constraints")) == 40 and not texts("prompts_eval_constraints") & others
    pairs = [tuple(c["type"] for c in r["gold"]["constraints"]) for r in held if len(r["gold"]["constraints"]) == 2]
    assert pairs and all(r["gold"]["held_out_pair"] == (len(r["gold"]["constraints"]) == 2) for r in held)
    assert not {tuple(c["type"] for c in r["gold"]["constraints"]) for r in rl_cons} & set(pairs)


def test_jsonl_schemas(written):
    paths, _ = written
    user = lambda msgs: len(msgs) == 1 and msgs[0]["role"] == "user" and msgs[0]["content"]
    assistant = lambda msgs: len(msgs) == 1 and msgs[0]["role"] == "assistant"
    for split in ("train", "eval"):
        sft = _read_jsonl(paths[f"sft_{split}"])
        prefs = _read_jsonl(paths[f"prefs_{split}"])
        prompts = _read_jsonl(paths[f"prompts_{split}"])
        for s, pref, prompt in zip(sft, prefs, prompts):
            assert set(s) == {"messages", "id"}
            assert [m["role"] for m in s["messages"]] == ["user", "assistant"]
            assert set(pref) == {"prompt", "chosen", "rejected", "id"}
            assert user(pref["prompt"]) and assistant(pref["chosen"]) and assistant(pref["rejected"])
            assert set(prompt) == {"prompt", "gold", "id"} and user(prompt["prompt"])
            assert s["id"] == pref["id"] == prompt["id"]
            gold, answer = prompt["gold"], s["messages"][1]["content"]
            assert pref["chosen"][0]["content"] == answer
            assert score(gold, answer) == 1.0
            assert score(gold, pref["rejected"][0]["content"]) < 1.0


def test_manifest(written):
    paths, _ = written
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["seed"] == 3
    assert manifest["counts"] == {"train": 300, "eval": 60, "rl": 100, "eval_constraints": 40}
    assert sum(manifest["family_counts"]["train"].values()) == 300
    assert set(manifest["family_counts"]["eval"]) == set(FAMILIES)


def test_eval_split_independent_of_train_size(tmp_path):
    small = write_task_data(tmp_path / "small", seed=3, n_train=40, n_eval=60)
    large = write_task_data(tmp_path / "large", seed=3, n_train=80, n_eval=60)
    assert small["prompts_eval"].read_bytes() == large["prompts_eval"].read_bytes()


def test_cli(tmp_path, capsys):
    main([str(tmp_path / "out"), "--seed", "1", "--n-train", "20", "--n-eval", "8"])
    assert "20 train / 8 eval" in capsys.readouterr().out
    assert len(_read_jsonl(tmp_path / "out" / "sft_eval.jsonl")) == 8
