"""Export to a Hugging Face directory, then prove it loads: `final/` is what users ship.

Full fine-tunes are written as plain transformers directories; LoRA runs as a peft
adapter (plus `merged/` when asked). Weights are gathered from ZeRO-3 shards first,
tied weights included. After writing, a fresh process loads the directory with
plain transformers/peft and compares its output on a fixed input with the live
model's; a mismatch fails the run.

Run by hand: ``python -m alignment.core.export verify DIR --expected outputs.safetensors [--merged DIR/merged]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from alignment.core.modeling import call, unwrap, user_model
from alignment.core.models import torch_dtype
from alignment.data import text

BASE_CONFIG = "base_model_config.json"  # next to a LoRA adapter: the live base model's config
FIXED_CONVERSATION = [
    {"role": "user", "content": "What is 12 + 30? Answer with just the number."},
    {"role": "assistant", "content": "42"},
]
# bf16-mixed keeps fp32 weights, compared with autocast off (model_outputs): fp32's tolerance.
TOLERANCE = {"fp32": (1e-3, 1e-4), "bf16": (0.1, 0.02), "bf16-mixed": (1e-3, 1e-4), "fp16": (0.05, 0.01)}  # (atol, rtol)


class ExportMismatch(RuntimeError):
    pass


def fixed_input(tokenizer) -> dict[str, torch.Tensor]:
    """The fixed conversation as the one tokenization path renders it (alignment.data.text)."""
    prompt, response = FIXED_CONVERSATION[:1], FIXED_CONVERSATION[1:]
    ids = torch.tensor([text.encode(tokenizer, prompt, response).reward_ids])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def model_outputs(model, inputs: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    # Autocast off: a bf16-mixed engine's forward would compare its bf16 matmuls with the fp32 weights written.
    with torch.autocast(inputs["input_ids"].device.type, enabled=False):
        out = model(**inputs, use_cache=False) if kind == "causal_lm" else model(**inputs)
    return out.logits.float()


@torch.no_grad()
def live_outputs(engine, model, tokenizer, kind: str) -> torch.Tensor:
    """Output of the live (possibly sharded) model on the fixed input; every rank must call."""
    inputs = {k: v.to(engine.dist.device) for k, v in fixed_input(tokenizer).items()}
    was_training = model.training
    model.eval()
    try:
        return call(model, model_outputs, inputs, kind).cpu()
    finally:
        model.train(was_training)


def export_model(engine, model, tokenizer, out_dir: Path, *, kind: str, base_path: str, lora_cfg, precision: str,
                 model_cfg=None, extra_config: dict | None = None) -> Path:
    """Gather, write and verify `out_dir` (and `out_dir/merged` for LoRA). Collective: every rank calls it.

    `model_cfg` (the recipe's model section) gives the base's revision and trust_remote_code to every
    reload; `extra_config` goes into the exported config (a reward model's statistics).
    """
    out_dir = Path(out_dir)
    module = user_model(model)
    revision = getattr(model_cfg, "revision", None)
    remote_code = bool(getattr(model_cfg, "trust_remote_code", False))
    expected = live_outputs(engine, model, tokenizer, kind)
    fp32_masters = getattr(model_cfg, "export_dtype", "auto") == "fp32"
    state = engine.full_state_dict(module, fp32_masters=fp32_masters)
    error = None
    if engine.dist.is_main:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            is_lora = hasattr(module, "peft_config")
            base_config = module.get_base_model().config if is_lora else module.config
            for key, value in (extra_config or {}).items():
                setattr(base_config, key, value)
            if is_lora:  # recorded in adapter_config.json, so the base reloads at the revision it trained from
                for peft_config in module.peft_config.values():
                    peft_config.revision = revision
            masters = fp32_masters and not is_lora and precision not in ("fp32", "bf16-mixed")
            if masters:  # fp32 master weights of a bf16/fp16 run (Engine.full_state_dict): the model in fp32
                state = _as_fp32(state)
            module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
            if masters:
                _set_config_dtype(out_dir / "config.json", "float32")
            tokenizer.save_pretrained(out_dir)
            if is_lora:
                # The live base's config (a reward head's single label, the distinct pad token, reward
                # statistics): the adapter alone does not carry it, and the hub base does not have it.
                (out_dir / BASE_CONFIG).write_text(json.dumps(base_config.to_dict(), indent=2, default=str))
            expected_file = out_dir.parent / f".{out_dir.name}-expected.safetensors"
            save_file({"outputs": expected.contiguous()}, str(expected_file))
            # Reload with the live model's attention kernel: the check is about the weights, and in bf16
            # eager and SDPA differ by more than its tolerance (0.1 + 2%) on many logits.
            attention = getattr(unwrap(module).config, "_attn_implementation", None)
            attention = attention if attention in ("eager", "sdpa") else None  # verify runs on CPU
            merged = None
            if is_lora and lora_cfg.merge_on_export:
                merged = out_dir / "merged"
                with engine.plain_init():
                    merge_adapter(out_dir, kind, merged, remote_code)
            verify_in_fresh_process(out_dir, expected_file, kind, precision, attention, remote_code, merged)
        except Exception as exc:  # reported on every rank below, so no rank waits forever
            error = f"{type(exc).__name__}: {exc}"
    error = engine.dist.broadcast_object(error)
    if error:
        raise ExportMismatch(f"export of {out_dir} failed: {error}")
    return out_dir


def _as_fp32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every floating tensor in fp32 (exact for bf16/fp16 values), tied tensors still one tensor."""
    done: dict[int, torch.Tensor] = {}
    out = {}
    for name, value in state.items():
        if id(value) not in done:
            done[id(value)] = value.float() if value.is_floating_point() else value
        out[name] = done[id(value)]
    return out


def _set_config_dtype(path: Path, dtype: str) -> None:
    """Record the weights' dtype, so that transformers' default load (dtype='auto') keeps them as written."""
    config = json.loads(path.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = dtype
    config.setdefault("dtype", dtype)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def merge_adapter(adapter_dir: Path, kind: str, merged_dir: Path, trust_remote_code: bool = False) -> None:
    """Base weights with the adapter merged in, as a plain transformers directory with the live config."""
    from transformers import AutoTokenizer

    merged = load_exported(adapter_dir, kind, torch.float32, trust_remote_code=trust_remote_code).merge_and_unload()
    merged.save_pretrained(merged_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=trust_remote_code).save_pretrained(merged_dir)


def verify_in_fresh_process(path: Path, expected_file: Path, kind: str, precision: str, attention: str | None = None,
                            trust_remote_code: bool = False, merged: Path | None = None) -> None:
    """Reload the export (and merged/) in one new process: nothing of this one's state can help it load."""
    cmd = ([sys.executable, "-m", "alignment.core.export", "verify", str(path), "--expected", str(expected_file),
            "--kind", kind, "--precision", precision] + (["--attn-implementation", attention] if attention else [])
           + (["--trust-remote-code"] if trust_remote_code else []) + (["--merged", str(merged)] if merged else []))
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        shown = f"{path}" + (f" and {merged}" if merged else "")
        raise ExportMismatch(f"reloading {shown} in a fresh process failed:\n{result.stdout}{result.stderr[-3000:]}")


def load_exported(path: str | Path, kind: str, dtype: torch.dtype | None = None, attn_implementation: str | None = None,
                  *, trust_remote_code: bool = False, revision: str | None = None):
    """Load a model directory (or hub id) with plain transformers / peft, as a user would.

    A LoRA export loads its base at the revision recorded in adapter_config.json, with the live
    base config written next to the adapter (a reward model's one-label head and pad token).
    """
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if kind == "reward":
        kwargs["num_labels"] = 1
    adapter_config = Path(path) / "adapter_config.json"
    if adapter_config.exists():
        from peft import PeftModel

        adapter = json.loads(adapter_config.read_text())
        base = load_exported(adapter["base_model_name_or_path"], kind, dtype, attn_implementation,
                             trust_remote_code=trust_remote_code, revision=adapter.get("revision"))
        saved = Path(path) / BASE_CONFIG
        if saved.exists():
            live = json.loads(saved.read_text())
            for key in ("pad_token_id", *[k for k in live if k.startswith("reward_")]):
                if key in live:
                    setattr(base.config, key, live[key])
        # With an explicit dtype keep the adapter in it too (peft upcasts adapters to fp32 by default).
        return PeftModel.from_pretrained(base, path, autocast_adapter_dtype=dtype is None)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if kind == "causal_lm" else AutoModelForSequenceClassification
    return cls.from_pretrained(path, revision=revision, **kwargs)


def exported_outputs(path: Path, kind: str, dtype: torch.dtype, attention: str | None = None,
                     trust_remote_code: bool = False) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = load_exported(path, kind, dtype, attention, trust_remote_code=trust_remote_code).eval()
    with torch.no_grad():
        return model_outputs(model, fixed_input(tokenizer), kind)


def compare(got: torch.Tensor, expected: torch.Tensor, precision: str, what: str) -> float:
    if got.shape != expected.shape:
        raise ExportMismatch(f"{what}: output shape {tuple(got.shape)} != {tuple(expected.shape)}")
    atol, rtol = TOLERANCE[precision]
    diff = (got - expected).abs()
    bad = diff > atol + rtol * expected.abs()
    if bad.any():
        raise ExportMismatch(f"{what}: max |diff| {diff.max().item():.3g} at {int(bad.sum())} of {bad.numel()} "
                             f"values (atol {atol}, rtol {rtol})")
    return diff.max().item()


def verify(path: Path, expected: torch.Tensor, kind: str, precision: str, attention: str | None = None,
           trust_remote_code: bool = False) -> float:
    """The export's outputs against the live model's, in the precision it trained in: a bf16-trained adapter on
    an fp32 base computes differently in fp32, which is not an export error."""
    got = exported_outputs(path, kind, torch_dtype(precision), attention, trust_remote_code)
    return compare(got, expected, precision, "reloaded outputs differ from the live model")


def verify_merged(merged: Path, adapter: Path, kind: str, attention: str | None = None,
                  trust_remote_code: bool = False) -> float:
    """merged/ against the adapter it was merged from, both in fp32, where merging is exact. (In bf16 the
    merged weights round differently from base + adapter at every weight, so merged/ is a slightly different
    bf16 model than the live one; the chain live = final/ (training precision), final/ = merged/ (fp32) holds.)"""
    got = exported_outputs(merged, kind, torch.float32, attention, trust_remote_code)
    want = exported_outputs(adapter, kind, torch.float32, attention, trust_remote_code)
    return compare(got, want, "fp32", f"{merged} differs from the adapter it merges")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignment.core.export")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("verify", help="reload an exported directory and compare with saved live outputs")
    check.add_argument("path", type=Path, help="the exported directory (final/)")
    check.add_argument("--merged", type=Path, default=None, help="also check this merged/ against the adapter in fp32")
    check.add_argument("--expected", type=Path, required=True)
    check.add_argument("--kind", choices=["causal_lm", "reward"], default="causal_lm")
    check.add_argument("--precision", choices=list(TOLERANCE), default="fp32")
    check.add_argument("--attn-implementation", default=None, help="the live model's (default: transformers')")
    check.add_argument("--trust-remote-code", action="store_true", help="the model ships its own modelling code")
    args = parser.parse_args(argv)
    expected = load_file(str(args.expected))["outputs"]
    max_diff = verify(args.path, expected, args.kind, args.precision, args.attn_implementation, args.trust_remote_code)
    print(f"export verified: {args.path} reloads with max |diff| {max_diff:.3g}")
    if args.merged is not None:
        max_diff = verify_merged(args.merged, args.path, args.kind, args.attn_implementation, args.trust_remote_code)
        print(f"export verified: {args.merged} = the adapter merged, max |diff| {max_diff:.3g} (fp32)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
