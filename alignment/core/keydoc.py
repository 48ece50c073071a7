"""The recipe-key reference (docs/recipe-keys.md), generated from the schema itself: every key of every section,
its type, its default and the docstring under its field in alignment/core/config.py and recipes.py.

    python -m alignment.core.keydoc > docs/recipe-keys.md

tests/test_docs.py fails when the committed page differs from what this prints.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import typing

from alignment.core import config, recipes

HEADER = """# Recipe keys

Every key a recipe may set, by section: its type, its default, and what it does. Generated from the schema
(`python -m alignment.core.keydoc > docs/recipe-keys.md`; a test fails when this page is stale). Unknown keys
are errors; `--set section.key=value` overrides any of them on the command line; `???` marks a key the recipe must
set. Cross-field checks (batch arithmetic, ZeRO options, each stage's own) run when the recipe loads.
"""


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (a string literal right after the annotated assignment),
    its base classes' included."""
    docs: dict[str, str] = {}
    for base in cls.__mro__[1:]:
        if dataclasses.is_dataclass(base):
            docs.update(field_docs(base))
    body = ast.parse(inspect.getsource(cls).lstrip()).body[0].body
    for node, after in zip(body, body[1:] + [None]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _type(tp) -> str:
    text = str(tp).replace("typing.", "").replace("NoneType", "None")
    return getattr(tp, "__name__", text) if not typing.get_args(tp) else text


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return None if dataclasses.is_dataclass(value) else value
    return None


def section(cls: type, prefix: str, seen: set) -> list[str]:
    """Lines for the keys of `cls` under `prefix` (dotted), then its subsections, each documented once."""
    if (cls, prefix) in seen:
        return []
    seen.add((cls, prefix))
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    lines, subsections = [], []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(tp):
            subsections.append((tp, key))
            continue
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list and typing.get_args(tp) else None
        if item is not None and dataclasses.is_dataclass(item):  # a list of sections: ppo.rewards
            subsections.append((item, f"{key}[]"))
        default = _default(f)
        doc = docs.get(f.name, "").replace("|", "\\|")
        lines.append(f"| `{key}` | `{_type(tp)}` | `{default!r}` | {doc} |".replace("\n", " "))
    out = []
    if lines:
        out += [f"### `{prefix or '(top level)'}`", "", "| key | type | default | meaning |", "|---|---|---|---|",
                *lines, ""]
    for tp, key in subsections:
        out += section(tp, key, seen)
    return out


def reference() -> str:
    out = [HEADER]
    seen: set = set()
    out += ["## Every stage (sft, rm, dpo, kto, ppo)", ""] + section(config.RecipeBase, "", seen)
    for stage, cls in recipes.RECIPES.items():
        if stage == "pipeline":
            continue
        own = [f for f in dataclasses.fields(cls) if f.name not in {g.name for g in dataclasses.fields(config.RecipeBase)}]
        out += [f"## `align {stage}`", ""]
        for f in own:
            out += section(typing.get_type_hints(cls)[f.name], f.name, seen)
    out += ["## `align pipeline`", ""] + section(recipes.PipelineRecipe, "", seen)
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(reference())
