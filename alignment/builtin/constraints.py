"""Verifiable instruction constraints: the built-in task's family where online RL has something to teach.

A prompt asks for a short sentence about a topic under one or two constraints that a program checks (the RLVR
stage of Tulu 3 trains on such IFEval-style constraints: a model learns quickly to do reliably what it already
does sometimes). The constraints, each a type with its parameter:

    caps        "Write your whole answer in capital letters."        every letter upper case
    words N     "Answer in exactly N words."                         N words (letters, digits, apostrophes)
    include W   "Use the word 'W' in your answer."                   W appears as a word (any case)
    avoid W     "Do not use the word 'W'."                           W does not appear; at least 2 words
    end C       "End your answer with 'C'."  (C = ! or ?)            the last character is C
    no_commas   "Do not use any commas."                             no comma; at least 2 words
    quoted      "Wrap your whole answer in double quotes."           starts and ends with "
    json K      'Reply with a JSON object whose key is "K".'        a JSON object with the key K, a non-empty value
    start W     "Start your answer with the word 'W'."               the first word is W (any case)

A response's score is the share of its prompt's constraints it meets (0, 0.5 or 1 for two), after the task's
normalisation (cut at the chat end token, stripped). Splits, fixed before any tuning (docs/experiments.md):
- SFT demonstrations (split "train") cover single constraints of SFT_TYPES only: caps, include, end, no_commas,
  start. The other four types (words, avoid, quoted, json) never appear in a demonstration.
- RL prompts (split "rl") hold single constraints of every type and the pairs in TRAIN_PAIRS.
- Held-out evaluation prompts (split "eval") hold single constraints of every type and the pairs in
  HELD_OUT_PAIRS, which no training split contains.
The same checks serve user prompts that carry a `constraints` list (alignment.evaluate.rewards:constraints).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

TYPES = ("caps", "words", "include", "avoid", "end", "no_commas", "quoted", "json", "start")
SFT_TYPES = ("caps", "include", "end", "no_commas", "start")
TRAIN_PAIRS = (("caps", "end"), ("include", "no_commas"), ("start", "words"), ("avoid", "end"),
               ("caps", "words"), ("include", "quoted"), ("json", "no_commas"), ("start", "no_commas"))
HELD_OUT_PAIRS = (("caps", "include"), ("words", "end"), ("start", "avoid"), ("quoted", "no_commas"),
                  ("json", "avoid"))
assert not set(TRAIN_PAIRS) & set(HELD_OUT_PAIRS)

TOPICS = ("rivers", "winter", "gardens", "music", "the ocean", "bread", "trains", "cats", "mountains", "rain",
          "libraries", "bicycles", "the moon", "coffee", "forests", "birds", "cities", "tea", "snow", "boats")
REQUESTS = ("Write a short sentence about {topic}.", "Tell me something about {topic} in one sentence.",
            "Describe {topic} briefly.", "Say one thing you like about {topic}.")
WORD_CHOICES = ("bright", "quiet", "green", "simple", "happy", "gentle", "small", "warm", "calm", "clear")
START_WORDS = ("Today", "Often", "Yes", "Honestly", "Truly", "Sometimes")
JSON_KEYS = ("answer", "text", "reply")
# Sentence pieces: a topic phrase, then filler words, so that any length from 3 to 10 words can be made.
FILLERS = ("are", "truly", "very", "nice", "to", "see", "every", "single", "day", "here")
_WORD = re.compile(r"[A-Za-z0-9']+")


@dataclass(frozen=True)
class Spec:
    type: str
    value: object = None

    def as_dict(self) -> dict:
        return {"type": self.type, **({"value": self.value} if self.value is not None else {})}


def instruction(spec: Spec) -> str:
    return {
        "caps": "Write your whole answer in capital letters.",
        "words": f"Answer in exactly {spec.value} words.",
        "include": f"Use the word '{spec.value}' in your answer.",
        "avoid": f"Do not use the word '{spec.value}'.",
        "end": f"End your answer with '{spec.value}'.",
        "no_commas": "Do not use any commas.",
        "quoted": "Wrap your whole answer in double quotes.",
        "json": f'Reply with a JSON object whose key is "{spec.value}".',
        "start": f"Start your answer with the word '{spec.value}'.",
    }[spec.type]


def words_of(text: str) -> list[str]:
    return _WORD.findall(text)


def met(spec: dict, text: str) -> bool:
    """Whether `text` (normalised) meets one constraint, given as a dict {"type", "value"}."""
    kind, value = spec["type"], spec.get("value")
    words = words_of(text)
    if kind == "caps":
        letters = [c for c in text if c.isalpha()]
        return bool(letters) and all(c.isupper() for c in letters)
    if kind == "words":
        return len(words) == int(value)
    if kind == "include":
        return any(w.lower() == str(value).lower() for w in words)
    if kind == "avoid":
        return len(words) >= 2 and all(w.lower() != str(value).lower() for w in words)
    if kind == "end":
        return text.rstrip().endswith(str(value))
    if kind == "no_commas":
        return len(words) >= 2 and "," not in text
    if kind == "quoted":
        stripped = text.strip()
        return len(stripped) > 2 and stripped[0] == '"' and stripped[-1] == '"'
    if kind == "json":
        try:
            obj = json.loads(text)
        except ValueError:
            return False
        return isinstance(obj, dict) and value in obj and bool(str(obj[value]).strip())
    if kind == "start":
        return bool(words) and words[0].lower() == str(value).lower()
    raise ValueError(f"unknown constraint type {kind!r}; known: {', '.join(TYPES)}")


def score(constraints: list[dict], text: str) -> float:
    """The share of `constraints` that `text` (normalised) meets."""
    if not constraints:
        raise ValueError("a constraints row needs at least one constraint")
    return sum(met(c, text) for c in constraints) / len(constraints)


# ---------------------------------------------------------------------------- generation


def _param(kind: str, rng: random.Random, topic: str) -> object:
    if kind == "words":
        return rng.randint(4, 9)
    if kind in ("include", "avoid"):
        return rng.choice([w for w in WORD_CHOICES])
    if kind == "end":
        return rng.choice("!?")
    if kind == "json":
        return rng.choice(JSON_KEYS)
    if kind == "start":
        return rng.choice(START_WORDS)
    return None


def specs_for(split: str, rng: random.Random, topic: str) -> list[Spec]:
    """One or two constraints for a prompt of `split` (module docstring)."""
    if split == "train":
        kinds: tuple = (rng.choice(SFT_TYPES),)
    elif rng.random() < 0.5:
        kinds = (rng.choice(TYPES),)
    else:
        kinds = rng.choice(TRAIN_PAIRS if split == "rl" else HELD_OUT_PAIRS)
    specs = [Spec(kind, _param(kind, rng, topic)) for kind in kinds]
    words = {s.type: s.value for s in specs}
    if "include" in words and "avoid" in words and words["include"] == words["avoid"]:
        return specs_for(split, rng, topic)
    return specs


def reference(specs: list[Spec], topic: str, rng: random.Random) -> str:
    """A response meeting every constraint: a sentence about the topic ("I like rivers a lot") built to the asked
    length, first word and included word, then cased, ended, quoted or wrapped in JSON."""
    by = {s.type: s.value for s in specs}
    first = [str(by["start"])] if "start" in by else []
    included = ["because", "they", "are", str(by["include"])] if "include" in by else []
    words = first + ["I", "like", *topic.split()] + (included or ["a", "lot"])
    if "words" in by:
        n = int(by["words"])
        kept = [w for w in words if w in first or w == by.get("include")]
        rest = [w for w in words if w not in kept]
        words = first + rest[: max(0, n - len(kept))] + ([str(by["include"])] if "include" in by else [])
        words += [w for w in FILLERS if w != by.get("avoid")][: n - len(words)]
    text = " ".join(words)
    if "caps" in by:
        text = text.upper()
    if "end" in by:
        text += str(by["end"])
    elif "json" not in by and "quoted" not in by:
        text += "."
    if "quoted" in by:
        text = f'"{text}"'
    if "json" in by:
        text = json.dumps({by["json"]: text})
    return text


def violations(specs: list[Spec], topic: str, rng: random.Random) -> list[str]:
    """Responses that break the first constraint and keep the others where they can: rejected answers for the
    built-in preference pairs."""
    good = reference(specs, topic, rng)
    first = specs[0]
    if first.type == "caps":
        broken = good.lower()
    elif first.type == "words":
        broken = good.rstrip('.!?"') + " indeed" + ("." if good.endswith(".") else "")
    elif first.type == "include":
        broken = good.replace(str(first.value), "fine").replace(str(first.value).upper(), "FINE")
    elif first.type == "avoid":
        broken = good.rstrip(".!?") + f" and {first.value}" + (good[-1] if good[-1] in ".!?" else "")
    elif first.type == "end":
        broken = good[:-1] + "."
    elif first.type == "no_commas":
        parts = good.split(" ")
        broken = ", ".join([" ".join(parts[:2]), " ".join(parts[2:])]) if len(parts) > 2 else good + ", yes"
    elif first.type == "quoted":
        broken = good.strip('"')
    elif first.type == "json":
        broken = json.loads(good)[first.value]
    else:  # start
        broken = "Well " + good[0].lower() + good[1:]
    dicts = [s.as_dict() for s in specs]
    return [v for v in (broken, "Hmm, I'm not sure what to say about that.") if score(dicts, v) < 1.0]
