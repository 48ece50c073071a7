"""Export to a Hugging Face directory, then prove it loads: `final/` is what users ship.

Full fine-tunes are written as plain transformers directories; LoRA runs as a peft
adapter (plus `merged/` when asked). Weights are gathered from ZeRO-3 shards first,
tied weights included. After writing, a fresh process loads the directory with
plain transformers/peft and compares its output on a fixed input with the live
model's; a mismatch fails the run.

Run by hand: ``python -m alignment.core.export verify DIR --expected logits.pt --kind causal_lm``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

FIXED_CONVERSATION = [
    {"role": "user", "content": "What is 12 + 30? Answer with just the number."},
    {"role": "assistant", "content": "42"},
]
TOLERANCE = {"fp32": (1e-3, 1e-4), "bf16": (0.1, 0.02), "fp16": (0.05, 0.01)}  # (atol, rtol)


class ExportMismatch(RuntimeError):
    pass


def fixed_input(tokenizer) -> dict[str, torch.Tensor]:
    """The fixed conversation as the one tokenization path renders it (alignment.core.text)."""
    from alignment.core import text

    prompt, response = FIXED_CONVERSATION[:1], FIXED_CONVERSATION[1:]
    ids = torch.tensor([text.encode(tokenizer, prompt, response).reward_ids])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def model_outputs(model, inputs: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    out = model(**inputs, use_cache=False) if kind == "causal_lm" else model(**inputs)
    return out.logits.float()


@torch.no_grad()
def live_outputs(engine, model, tokenizer, kind: str) -> torch.Tensor:
    """Output of the live (possibly sharded) model on the fixed input; every rank must call."""
    from alignment.core.modeling import call

    inputs = {k: v.to(engine.dist.device) for k, v in fixed_input(tokenizer).items()}
    was_training = model.training
    model.eval()
    try:
        return call(model, model_outputs, inputs, kind).cpu()
    finally:
        model.train(was_training)


def export_model(engine, model, tokenizer, out_dir: Path, *, kind: str, base_path: str, lora_cfg, precision: str,
                 extra_config: dict | None = None) -> Path:
    """Gather, write and verify `out_dir`. Collective: every rank calls it."""
    out_dir = Path(out_dir)
    from alignment.core.modeling import unwrap, user_model

    module = user_model(model)
    expected = live_outputs(engine, model, tokenizer, kind)
    state = engine.full_state_dict(module)
    error = None
    if engine.dist.is_main:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            if extra_config:
                config = module.get_base_model().config if hasattr(module, "get_base_model") else module.config
                for key, value in extra_config.items():
                    setattr(config, key, value)
            module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(out_dir)
            is_lora = hasattr(module, "peft_config")
            if is_lora:
                _write_base_config(module, out_dir)
            torch.save(expected, out_dir.parent / f".{out_dir.name}-expected.pt")
            # Reload with the live model's attention kernel: the check is about the weights, and in bf16
            # eager and SDPA differ by more than its tolerance (0.1 + 2%) on many logits.
            attention = getattr(unwrap(module).config, "_attn_implementation", None)
            attention = attention if attention in ("eager", "sdpa") else None  # verify runs on CPU
            verify_in_fresh_process(out_dir, out_dir.parent / f".{out_dir.name}-expected.pt", kind, precision,
                                    attention)
            if is_lora and lora_cfg.merge_on_export:
                with engine.plain_init():
                    merge_adapter(out_dir, base_path, kind, out_dir / "merged", extra_config)
        except Exception as exc:  # reported on every rank below, so no rank waits forever
            error = f"{type(exc).__name__}: {exc}"
    error = engine.dist.broadcast_object(error)
    if error:
        raise ExportMismatch(f"export of {out_dir} failed: {error}")
    return out_dir


def _write_base_config(module, out_dir: Path) -> None:
    """Record the base model's config next to the adapter for tools that want it without the hub."""
    base = module.get_base_model()
    (out_dir / "base_model_config.json").write_text(json.dumps(base.config.to_dict(), indent=2, default=str))


def merge_adapter(adapter_dir: Path, base_path: str, kind: str, merged_dir: Path, extra_config: dict | None) -> None:
    from peft import PeftModel
    from transformers import AutoTokenizer

    from alignment.core.models import load_model

    base = load_model(base_path, kind)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    for key, value in (extra_config or {}).items():
        setattr(merged.config, key, value)
    merged.save_pretrained(merged_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(merged_dir)


def verify_in_fresh_process(out_dir: Path, expected_file: Path, kind: str, precision: str,
                            attention: str | None = None) -> None:
    cmd = [sys.executable, "-m", "alignment.core.export", "verify", str(out_dir), "--expected", str(expected_file),
           "--kind", kind, "--precision", precision] + (["--attn-implementation", attention] if attention else [])
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ExportMismatch(f"reloading {out_dir} in a fresh process failed:\n{result.stdout}{result.stderr[-3000:]}")


def load_exported(path: str | Path, kind: str, dtype: torch.dtype | None = None, attn_implementation: str | None = None):
    """Load an exported directory with plain transformers / peft, as a user would."""
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    adapter_config = Path(path) / "adapter_config.json"
    if adapter_config.exists():
        from peft import PeftModel

        base_path = json.loads(adapter_config.read_text())["base_model_name_or_path"]
        base = load_exported(base_path, kind, dtype, attn_implementation)
        # With an explicit dtype keep the adapter in it too (peft upcasts adapters to fp32 by default).
        return PeftModel.from_pretrained(base, path, autocast_adapter_dtype=dtype is None)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if kind == "causal_lm" else AutoModelForSequenceClassification
    return cls.from_pretrained(path, **kwargs)


def verify(path: Path, expected: torch.Tensor, kind: str, precision: str, attention: str | None = None) -> float:
    from transformers import AutoTokenizer

    from alignment.core.models import torch_dtype

    tokenizer = AutoTokenizer.from_pretrained(path)
    # Compare in the precision the model was trained in: a bf16-trained adapter on an fp32
    # base computes differently in fp32, which is not an export error.
    model = load_exported(path, kind, torch_dtype(precision), attention).eval()
    with torch.no_grad():
        got = model_outputs(model, fixed_input(tokenizer), kind)
    if got.shape != expected.shape:
        raise ExportMismatch(f"output shape {tuple(got.shape)} != live {tuple(expected.shape)}")
    atol, rtol = TOLERANCE[precision]
    diff = (got - expected).abs()
    bad = diff > atol + rtol * expected.abs()
    if bad.any():
        raise ExportMismatch(
            f"reloaded outputs differ from the live model: max |diff| {diff.max().item():.3g} "
            f"at {int(bad.sum())} of {bad.numel()} values (atol {atol}, rtol {rtol})"
        )
    return diff.max().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignment.core.export")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("verify", help="reload an exported directory and compare with saved live outputs")
    check.add_argument("path", type=Path)
    check.add_argument("--expected", type=Path, required=True)
    check.add_argument("--kind", choices=["causal_lm", "reward"], default="causal_lm")
    check.add_argument("--precision", choices=list(TOLERANCE), default="fp32")
    check.add_argument("--attn-implementation", default=None, help="the live model's (default: transformers')")
    args = parser.parse_args(argv)
    expected = torch.load(args.expected)
    max_diff = verify(args.path, expected, args.kind, args.precision, args.attn_implementation)
    print(f"export verified: {args.path} reloads with max |diff| {max_diff:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
