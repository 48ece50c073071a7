"""Built-in offline demo task: short, program-checkable chat problems.

The task exists so the whole SFT -> reward model -> DPO/PPO pipeline can be
demonstrated on a small model (SmolLM2-135M-Instruct) on CPU with a *gold*
reward that a program computes exactly. Problems are short (prompt well under
40 tokens, answer under 20) and come in five families, evenly mixed:

* ``arithmetic``: add / subtract / multiply small integers -> ``"42"``
* ``units``: integer unit conversions (km->m, hours->minutes, m->km, ...) -> ``"3000"``
* ``words``: reverse a word, uppercase a word, count letters, join the first
  letters of three words -> ``"nedrag"``, ``"GARDEN"``, ``"6"``, ``"rbg"``
* ``format``: an arithmetic or units question whose answer must be written as
  ``"Answer: <n>"`` or as the JSON object ``{"answer": <n>}``
* ``constraints``: a sentence about a topic under one or two verifiable instructions (all capitals, exactly
  N words, include or avoid a word, end with ! or ?, no commas, quoted, a JSON object with a key, start with a
  word); alignment.builtin.constraints has the types, the checks and which split holds which

Each :class:`Problem` carries a ``gold`` dict (family, task, kind, expected
value, required format, operands, case sensitivity) that :func:`score` needs.

Gold reward rules of :func:`score` (result in [0, 1]):

1. Normalise the response: cut it at the first chat end token (``<|im_end|>``,
   ``</s>``, ``<|endoftext|>``, ``<|eot_id|>``, ``<|end|>``), strip whitespace,
   unwrap a whole-response ``` code fence, drop a leading "The answer is" /
   "Answer is", drop one trailing period.
2. **1.0** if what remains is exactly the answer in the requested format:
   plain number (thousands commas allowed), ``Answer: <n>``, a JSON object
   whose only key ``"answer"`` holds the integer, or the expected word
   (case-insensitive except for the uppercase task). Nothing else may remain.
3. Otherwise partial credit if the right value is present *unambiguously*:
   for numbers, the expected value appears and every other number in the
   response is one of the problem's operands (so "17 + 25 = 42" qualifies but
   "41 or 42" does not); for words, the expected word appears as a token or
   the response's letters alone spell it (initials: letters only).
   **0.5** if the response is concise (at most 3x the gold answer's length,
   minimum 24 characters), **0.25** if it rambles (longer than that).
4. **0.0** for anything else: wrong value, conflicting values, empty, evasive.

A ``constraints`` response is cut at its end token and stripped, and scores the share of its constraints it
meets (alignment.builtin.constraints.score).

Run ``python -m alignment.builtin.task OUT_DIR --seed 0 --n-train 2000 --n-eval 200``
to write SFT / preference / prompt JSONL files (see :func:`write_task_data`).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from alignment.builtin import constraints

FORMAT_VERSION = "alignment-task/v5"
FAMILIES = ("arithmetic", "units", "words", "format", "constraints")
ID_PREFIX = {"arithmetic": "arith", "units": "units", "words": "words", "format": "fmt", "constraints": "cons"}
FULL_CREDIT, FORMAT_ERROR_CREDIT, RAMBLING_CREDIT = 1.0, 0.5, 0.25
RAMBLE_FACTOR, RAMBLE_MIN_CHARS = 3, 24
END_TOKENS = ("<|im_end|>", "</s>", "<|endoftext|>", "<|eot_id|>", "<|end|>")
JUST_NUMBER = "Answer with just the number."
# Weights of bad_responses()' entries when one is picked as the rejected response:
# two wrong values, then evasive, rambling, wrong format.
REJECTED_WEIGHTS = (3, 3, 1, 1, 1)

# (larger unit, smaller unit, how many smaller units in one larger unit)
CONVERSIONS = (
    ("kilometers", "meters", 1000), ("meters", "centimeters", 100),
    ("hours", "minutes", 60), ("minutes", "seconds", 60),
    ("kilograms", "grams", 1000), ("days", "hours", 24), ("weeks", "days", 7),
    ("liters", "milliliters", 1000), ("dollars", "cents", 100),
    ("years", "months", 12), ("feet", "inches", 12),
)
# Short common words, none a palindrome (a reversed palindrome would equal itself).
WORDS = tuple("""
apple river stone garden planet window yellow orange silver forest candle bridge
pencil rabbit summer winter castle dragon jungle marble pocket basket button
cookie dinner flower guitar hammer island jacket kitten ladder market needle
parrot puzzle rocket saddle tomato violin walnut zebra anchor bottle cactus
desert engine finger goblet helmet insect lemon magnet nickel object pepper
quartz ribbon shadow tunnel velvet wizard blue green black white brown cloud
storm light night smile heart house horse mouse plant chair table bread cheese
water music paper glass train plane truck beach ocean grape melon peach cherry
tiger eagle shark whale snake lion bear wolf frog duck lamp desk ring coin book
fish tree sand rain snow moon star ship road gold salt milk corn rose leaf
""".split())
assert not any(word == word[::-1] for word in WORDS)

EVASIVE_RESPONSES = (
    "I'm not sure, you could use a calculator.",
    "I cannot answer that question.",
    "That depends on several factors, so it is hard to say.",
    "Sorry, I don't know.",
    "Please check a reliable reference for this.",
)
FILLER_SENTENCES = (
    "Great question, let me think about it carefully.",
    "Problems like this come up all the time in everyday life.",
    "It is always a good idea to double check your work.",
    "There are a few ways to approach this kind of question.",
    "I hope this explanation helps you understand it better.",
)


@dataclass(frozen=True)
class Problem:
    id: str        # e.g. "arith-train0-000123": family prefix, split+seed, index
    family: str
    prompt: str    # the user message text
    answer: str    # canonical gold response (concise, correct, in the requested format)
    gold: dict     # everything score() needs


# ----------------------------------------------------------------- generation

def render_answer(expected: str, fmt: str) -> str:
    """The canonical response text for an expected value in a required format."""
    if fmt == "answer_prefix":
        return f"Answer: {expected}"
    if fmt == "json":
        return json.dumps({"answer": int(expected)})
    return expected


def reference_answer(gold: dict) -> str:
    """The canonical right response to a prompt with this gold spec (what SFT demonstrates)."""
    return render_answer(gold["expected"], gold["format"])


def _gold(family, task, expected, kind="number", fmt="plain", operands=(), case_sensitive=False):
    return {"family": family, "task": task, "kind": kind, "expected": str(expected),
            "format": fmt, "operands": list(operands), "case_sensitive": case_sensitive}


def _arithmetic_question(rng: random.Random, hard: bool = True):
    """(question without answer instruction, task name, value, operands)."""
    tasks = ["add", "subtract", "multiply"] + (["multiply_large"] if hard else [])
    task = rng.choice(tasks)
    if task == "add":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        return f"What is {a} + {b}?", task, a + b, (a, b)
    if task == "subtract":
        a = rng.randint(10, 99)
        b = rng.randint(1, a - 1)
        return f"What is {a} - {b}?", task, a - b, (a, b)
    if task == "multiply":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
    else:
        a, b = rng.randint(11, 49), rng.randint(3, 9)
    return f"What is {a} * {b}?", task, a * b, (a, b)


def _units_question(rng: random.Random):
    big, small, factor = rng.choice(CONVERSIONS)
    quantity = rng.randint(2, 99)
    if rng.random() < 0.5:
        return f"How many {small} are in {quantity} {big}?", "to_smaller", quantity * factor, (quantity, factor)
    return (f"How many {big} are in {quantity * factor} {small}?", "to_larger", quantity,
            (quantity * factor, factor))


def _make_arithmetic(rng, split):
    question, task, value, operands = _arithmetic_question(rng)
    return f"{question} {JUST_NUMBER}", _gold("arithmetic", task, value, operands=operands)


def _make_units(rng, split):
    question, task, value, operands = _units_question(rng)
    return f"{question} {JUST_NUMBER}", _gold("units", task, value, operands=operands)


def _make_words(rng, split):
    task = rng.choice(["reverse", "uppercase", "length", "count_letter", "initials"])
    word = rng.choice(WORDS)
    if task == "reverse":
        prompt = f"Spell the word '{word}' backwards. Reply with just the reversed word."
        return prompt, _gold("words", task, word[::-1], kind="text")
    if task == "uppercase":
        prompt = f"Write the word '{word}' in all capital letters. Reply with just the word."
        return prompt, _gold("words", task, word.upper(), kind="text", case_sensitive=True)
    if task == "length":
        return f"How many letters are in the word '{word}'? {JUST_NUMBER}", _gold("words", task, len(word))
    if task == "count_letter":
        letter = rng.choice(sorted(set(word)))
        prompt = f"How many times does the letter '{letter}' appear in '{word}'? {JUST_NUMBER}"
        return prompt, _gold("words", task, word.count(letter))
    chosen = rng.sample(WORDS, 3)
    prompt = (f"Take the first letter of each word: {', '.join(chosen)}. "
              "Write them together as one lowercase word.")
    return prompt, _gold("words", task, "".join(w[0] for w in chosen), kind="text")


def _make_format(rng, split):
    if rng.random() < 0.7:
        question, base_task, value, operands = _arithmetic_question(rng, hard=False)
    else:
        question, base_task, value, operands = _units_question(rng)
    if rng.random() < 0.5:
        fmt, instruction = "answer_prefix", "Reply in the form 'Answer: <number>'."
    else:
        fmt, instruction = "json", 'Reply with only a JSON object like {"answer": <number>}.'
    return f"{question} {instruction}", _gold("format", f"{base_task}_{fmt}", value, fmt=fmt, operands=operands)


def _make_constraints(rng, split):
    """A short sentence about a topic under one or two verifiable constraints (alignment.builtin.constraints:
    which types and pairs each split holds)."""
    topic = rng.choice(constraints.TOPICS)
    specs = constraints.specs_for(split, rng, topic)
    prompt = rng.choice(constraints.REQUESTS).format(topic=topic) + " " + " ".join(
        constraints.instruction(spec) for spec in specs)
    kinds = tuple(spec.type for spec in specs)
    gold = _gold("constraints", "+".join(kinds), constraints.reference(specs, topic, rng), kind="constraints")
    gold.update(constraints=[spec.as_dict() for spec in specs], topic=topic,
                held_out_pair=kinds in constraints.HELD_OUT_PAIRS)
    return prompt, gold


FAMILY_MAKERS = {"arithmetic": _make_arithmetic, "units": _make_units,
                 "words": _make_words, "format": _make_format, "constraints": _make_constraints}
FALLBACK_AFTER_ATTEMPTS, MAX_ATTEMPTS = 50, 1000


def generate_problems(n: int, seed: int, *, split: str = "train", exclude_prompts=(),
                      families: tuple[str, ...] = FAMILIES, stream: str | None = None) -> list[Problem]:
    """``n`` problems with distinct prompts, deterministic for (n, seed, split, families, stream).

    ``families`` cycle in order, so they are mixed evenly; problem ``i`` depends only
    on (seed, stream, i) and the prompts already taken, so a longer list extends a
    shorter one. ``stream`` (default: the split's name) names the random stream, so a second
    set of the same split draws other prompts. Prompts in ``exclude_prompts`` (e.g. a held-out
    split) are never produced. If a family's prompt space runs dry, a random one of ``families``
    is used instead.
    """
    stream = stream or split
    seen = set(exclude_prompts)
    problems = []
    for index in range(n):
        for attempt in range(MAX_ATTEMPTS):
            rng = random.Random(f"{seed}:{stream}:{index}:{attempt}")
            family = families[index % len(families)]
            if attempt >= FALLBACK_AFTER_ATTEMPTS:
                family = rng.choice(families)
            prompt, gold = FAMILY_MAKERS[family](rng, split)
            if prompt not in seen:
                break
        else:
            raise RuntimeError(f"could not find a new prompt for problem {index}")
        seen.add(prompt)
        problem_id = f"{ID_PREFIX[family]}-{stream}{seed}-{index:06d}"
        answer = reference_answer(gold)
        problems.append(Problem(problem_id, family, prompt, answer, gold))
    return problems


# -------------------------------------------------------------------- scoring

_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?")
_PLAIN_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+|-?\d+")
_ANSWER_IS = re.compile(r"^(?:the\s+)?(?:final\s+)?answer\s+is\s*:?\s*", re.IGNORECASE)
_ANSWER_PREFIX = re.compile(r"answer:\s*(-?\d+)", re.IGNORECASE)
_CODE_FENCE = re.compile(r"^```[\w-]*\s*(.*?)\s*```$", re.DOTALL)


def normalize_response(response: str) -> str:
    """Apply rule 1 of the module docstring."""
    text = response or ""
    for token in END_TOKENS:
        text = text.split(token, 1)[0]
    text = text.strip()
    fenced = _CODE_FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    text = _ANSWER_IS.sub("", text, count=1).strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


def _numbers_in(text: str) -> list[float]:
    return [float(match.replace(",", "")) for match in _NUMBER.findall(text)]


def _is_exact(gold: dict, text: str) -> bool:
    expected, fmt = gold["expected"], gold["format"]
    if gold["kind"] == "text":
        return text == expected if gold["case_sensitive"] else text.lower() == expected.lower()
    if fmt == "plain":
        return bool(_PLAIN_NUMBER.fullmatch(text)) and int(text.replace(",", "")) == int(expected)
    if fmt == "answer_prefix":
        match = _ANSWER_PREFIX.fullmatch(text)
        return bool(match) and int(match.group(1)) == int(expected)
    if fmt == "json":
        try:
            obj = json.loads(text)
        except ValueError:
            return False
        return (isinstance(obj, dict) and list(obj) == ["answer"]
                and type(obj["answer"]) is int and obj["answer"] == int(expected))
    raise ValueError(f"unknown format {fmt!r}")


def _value_present(gold: dict, text: str) -> bool:
    """Right value present, with no conflicting candidate (rule 3)."""
    if gold["kind"] == "number":
        expected = float(gold["expected"])
        allowed = {expected} | {float(x) for x in gold.get("operands", ())}
        numbers = _numbers_in(text)
        return expected in numbers and all(number in allowed for number in numbers)
    expected = gold["expected"]
    if not gold["case_sensitive"]:
        expected, text = expected.lower(), text.lower()
    letters_only = re.sub(r"[^A-Za-z]", "", text)
    if letters_only == expected:
        return True
    return gold["task"] != "initials" and expected in re.findall(r"[A-Za-z]+", text)


def cut_at_end(response: str) -> str:
    """A response cut at its first chat end token and stripped (rule 1's first step)."""
    text = response or ""
    for token in END_TOKENS:
        text = text.split(token, 1)[0]
    return text.strip()


def score(gold: dict, response: str) -> float:
    """Gold reward in [0, 1]; the rules are in the module docstring (constraints: the share met)."""
    if gold.get("kind") == "constraints":
        return constraints.score(gold["constraints"], cut_at_end(response))
    text = normalize_response(response)
    if not text:
        return 0.0
    if _is_exact(gold, text):
        return FULL_CREDIT
    if not _value_present(gold, text):
        return 0.0
    canonical = reference_answer(gold)
    concise_limit = max(RAMBLE_FACTOR * len(canonical), RAMBLE_MIN_CHARS)
    return FORMAT_ERROR_CREDIT if len(text) <= concise_limit else RAMBLING_CREDIT


# -------------------------------------------------------------- bad responses

def _wrong_values(problem: Problem, rng: random.Random, count: int = 2) -> list[str]:
    """Plausible wrong answers, modelled on the errors small models make on this task:
    echoing an operand, a magnitude slip (x10, /10), and near misses."""
    gold = problem.gold
    expected = gold["expected"]
    if gold["kind"] == "number":
        value = int(expected)  # never negative (no answer here is), never the expected value
        near = {value + d for d in (-10, -3, -2, -1, 1, 2, 3, 10)}
        slips = {value * 10, value // 10} | {int(x) for x in gold.get("operands", ())}
        candidates = sorted(v for v in near | slips if v >= 0 and v != value)
        return [str(wrong) for wrong in rng.sample(candidates, count)]
    wrong = []
    for _ in range(count):  # shift one letter along the alphabet: always a different word
        position = rng.randrange(len(expected))
        letter = expected[position]
        base = ord("A") if letter.isupper() else ord("a")
        shifted = chr((ord(letter) - base + rng.randint(1, 25)) % 26 + base)
        wrong.append(expected[:position] + shifted + expected[position + 1:])
    if gold["task"] == "uppercase":
        wrong[-1] = expected.lower()
    return wrong


def bad_responses(problem: Problem, rng: random.Random) -> list[str]:
    """Wrong, evasive and rambling responses; each scores below ``problem.answer``."""
    gold = problem.gold
    if gold["kind"] == "constraints":
        specs = [constraints.Spec(c["type"], c.get("value")) for c in gold["constraints"]]
        return constraints.violations(specs, gold["topic"], rng)
    expected, fmt = gold["expected"], gold["format"]
    wrong = [render_answer(value, fmt) for value in _wrong_values(problem, rng)]
    evasive = rng.choice(EVASIVE_RESPONSES)
    filler = rng.sample(FILLER_SENTENCES, 3)
    rambling = f"{filler[0]} {filler[1]} I believe the result is {expected}. {filler[2]}"
    if fmt == "plain":
        wrong_format = f"Answer: {expected}" if gold["kind"] == "number" else f"'{expected}'"
    else:  # right value, but not in the requested Answer:/JSON format
        wrong_format = expected
    return wrong + [evasive, rambling, wrong_format]


# -------------------------------------------------------------------- writing

def _message(role: str, content: str) -> list[dict]:
    return [{"role": role, "content": content}]


def _write_atomic(path: Path, text: str) -> None:
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as tmp_file:
            tmp_file.write(text)
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def _write_jsonl(path: Path, records: list[dict]) -> None:
    _write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_task_data(out_dir: str | Path, seed: int = 0, n_train: int = 2000,
                    n_eval: int = 200, n_rl: int = 4000, n_eval_constraints: int = 256) -> dict[str, Path]:
    """Write SFT, preference and prompt JSONL files for train / eval, plus a manifest, and
    ``prompts_rl.jsonl``: prompts for online RL and on-policy pairs that neither the SFT
    demonstrations nor the held-out split contain (RL on the prompts SFT memorised learns
    little that carries over to new ones).

    The eval split is generated first (so it does not change with ``n_train``)
    and train excludes its prompts: ids and prompt texts are disjoint; the RL split
    excludes both. Output is byte-identical for the same arguments. Returns name -> path.

    For the constraints family, where online RL has the most to teach (alignment.builtin.constraints):
    ``prompts_rl_constraints.jsonl`` holds the RL split's constraint rows, and
    ``prompts_eval_constraints.jsonl`` ``n_eval_constraints`` more held-out constraint prompts (the eval
    split's types and pairs, a stream of their own, no prompt of any other file), so that a constraint
    score is measured on more than the 1 in 5 rows of ``prompts_eval``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    eval_problems = generate_problems(n_eval, seed, split="eval")
    train_problems = generate_problems(n_train, seed, split="train",
                                       exclude_prompts={p.prompt for p in eval_problems})
    rl_problems = generate_problems(n_rl, seed, split="rl",
                                    exclude_prompts={p.prompt for p in eval_problems + train_problems})
    eval_constraints = generate_problems(
        n_eval_constraints, seed, split="eval", families=("constraints",), stream="evalcons",
        exclude_prompts={p.prompt for p in eval_problems + train_problems + rl_problems})
    paths: dict[str, Path] = {}
    for split, problems in (("train", train_problems), ("eval", eval_problems)):
        rng = random.Random(f"{seed}:prefs:{split}")
        sft, prefs, prompts = [], [], []
        for problem in problems:
            bad_options = bad_responses(problem, rng)
            gold_score = score(problem.gold, problem.answer)  # checked even under python -O
            if gold_score != FULL_CREDIT or any(score(problem.gold, b) >= gold_score for b in bad_options):
                raise AssertionError(f"gold answer not strictly best for {problem}")
            user, gold_reply = _message("user", problem.prompt), _message("assistant", problem.answer)
            # Wrong answers are the rejected response two times in three: they are the
            # mistakes a fine-tuned model still makes; evasion and rambling it unlearns fast.
            weights = REJECTED_WEIGHTS if len(bad_options) == len(REJECTED_WEIGHTS) else None
            rejected = _message("assistant", rng.choices(bad_options, weights=weights)[0])
            sft.append({"messages": user + gold_reply, "id": problem.id})
            prefs.append({"prompt": user, "chosen": gold_reply, "rejected": rejected, "id": problem.id})
            prompts.append({"prompt": user, "gold": problem.gold, "id": problem.id})
        for kind, records in (("sft", sft), ("prefs", prefs), ("prompts", prompts)):
            paths[f"{kind}_{split}"] = out_dir / f"{kind}_{split}.jsonl"
            _write_jsonl(paths[f"{kind}_{split}"], records)
    for name, problems in (("prompts_rl", rl_problems),
                           ("prompts_rl_constraints", [p for p in rl_problems if p.family == "constraints"]),
                           ("prompts_eval_constraints", eval_constraints)):
        paths[name] = out_dir / f"{name}.jsonl"
        _write_jsonl(paths[name], [{"prompt": _message("user", p.prompt), "gold": p.gold, "id": p.id}
                                   for p in problems])
    manifest = {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "counts": {"train": len(train_problems), "eval": len(eval_problems), "rl": len(rl_problems),
                   "eval_constraints": len(eval_constraints)},
        "family_counts": {
            "train": dict(sorted(Counter(p.family for p in train_problems).items())),
            "eval": dict(sorted(Counter(p.family for p in eval_problems).items())),
        },
        "files": {name: path.name for name, path in paths.items()},
    }
    paths["manifest"] = out_dir / "manifest.json"
    _write_atomic(paths["manifest"], json.dumps(manifest, indent=2) + "\n")
    return paths


def main(argv=None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description="Write the built-in demo task data.")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-eval", type=int, default=200)
    parser.add_argument("--n-rl", type=int, default=4000)
    args = parser.parse_args(argv)
    paths = write_task_data(args.out_dir, seed=args.seed, n_train=args.n_train, n_eval=args.n_eval, n_rl=args.n_rl)
    manifest = json.loads(paths["manifest"].read_text(encoding="utf-8"))
    print(f"wrote {len(paths)} files to {args.out_dir} (seed {args.seed}, "
          f"{manifest['counts']['train']} train / {manifest['counts']['eval']} eval / {manifest['counts']['rl']} RL prompts)")
    for split, counts in manifest["family_counts"].items():
        print(f"  {split}: " + ", ".join(f"{family}={n}" for family, n in counts.items()))
    return paths


if __name__ == "__main__":
    main()
