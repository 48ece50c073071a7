"""`align estimate RECIPE.yaml [--nproc N]`: memory per rank for each role of a stage, before running it.

Every term is printed with its formula. Symbols: P = a model's parameters, Pt = the trainable ones
(LoRA adapters, or the top layers left unfrozen), W = ranks, b = bytes per value of the training
precision (2 for bf16/fp16, 4 for fp32), L = decoder layers, h = hidden size, kv = key/value
width (kv heads x head dim), I = MLP width, a = attention heads, V = vocabulary, T = tokens of
one micro-batch (micro batch x its longest row, read from the recipe's own data; rows of
max_length when packed), s = that row length, N = tokens with a log-prob target in it.

Per trainable role (DeepSpeed, as alignment.core.engine configures it):
  weights     b*P                (ZeRO-3: b*P/W, plus one layer gathered)
  gradients   b*Pt               (ZeRO-2/3: b*Pt/W)
  optimizer   Adam m, v in fp32: 8*Pt, and an fp32 master copy 4*Pt with bf16/fp16 (ZeRO >= 1: /W);
              ZeRO-0 with bf16 also keeps fp32 gradients 4*Pt (DeepSpeed's BF16_Optimizer)
  activations per layer that needs gradients: T*(16h + (4h + 2kv + 4I)*b), with model.lean_activations
              T*((6h + 2kv + 3I)*b + 8) (RMSNorm inputs kept in b, not fp32; SiLU(gate) recomputed),
              plus T*a*s*(b+4) for eager
              attention (its fp32 softmax); with gradient checkpointing: T*h*b per layer plus one layer's
              full set; times 1.15 for the backward's own working set (calibrated)
  logits      n*V*(12+b), n = min(N, C): one chunk of C target positions at a time (ours applies the
              output layer to target positions only, and recomputes each chunk in backward rather than
              keeping its fp32 log-softmax): its logits in b and fp32, the log-softmax and its gradient
Per frozen role (reference, reward models): weights b*P (ZeRO-3: /W), nothing else that persists.
PPO's rollout: KV cache 2*L*kv*b per token of (rollout batch x (prompt + max_new_tokens)).
Loading: a model is read in fp32 (4*P) and cast to the training precision; about 2*P of that stays in
the process (measured: RSS keeps the cast's residue).
Runtime: the interpreter with torch/transformers/deepspeed/this package, the collective backend and
the tokenizer, measured once on this machine by a probe process (host memory only).

On a GPU the device holds the weights, gradients, optimizer state (unless offloaded), activations
and logits; on CPU everything is host memory, and the total is the resident set (RSS) a run reports
as `memory/peak_rss_mib` in metrics.jsonl. Offload moves optimizer state (and with offload_params,
ZeRO-3 weights) to host memory.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignment.core.allocator import fixes_mmap_threshold
from alignment.core.config import RecipeError
from alignment.core.lean_layers import make_lean
from alignment.core.modeling import LOGIT_CHUNK
from alignment.core.models import attention_for, load_tokenizer, resolve_model_path
from alignment.core.recipes import load_recipe, validate_dpo
from alignment.data.preference import load_pairs
from alignment.data.report import DataReport
from alignment.data.sft import build_sft_examples
from alignment.data.sources import read_splits

MIB = 2**20
# Calibrated on this project's CPU runs (SmolLM2-135M LoRA SFT at micro batch 4 and 16, the tiny model), then
# checked on reward-model and DPO runs that took no part in the fit (tests/cluster/test_estimate.py, bench/estimate.py):
BACKWARD_TRANSIENTS = 0.15  # the backward's working set (activation gradients, fp32 upcasts) over what autograd keeps
ENGINE_OVERHEAD_MIB = 80.0  # DeepSpeed engine and optimizer objects, autograd graph, allocator arenas

_PROBE = """
import json, sys
import torch, transformers, deepspeed
import alignment.stages.sft, alignment.stages.dpo, alignment.stages.ppo, reward.train
from alignment.core.config import DeepSpeedConfig
from alignment.core.distributed import Distributed
from alignment.core.models import load_tokenizer
Distributed(DeepSpeedConfig())
load_tokenizer(sys.argv[1])
from alignment.core.tracking import peak_memory
print(json.dumps({"runtime_mib": peak_memory()["memory/peak_rss_mib"]}))
"""


@dataclass
class Term:
    role: str
    what: str
    bytes: float
    formula: str
    where: str = "device"  # device | host


@dataclass
class Estimate:
    stage: str
    world_size: int
    terms: list[Term] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, role: str, what: str, value: float, formula: str, where: str = "device") -> None:
        self.terms.append(Term(role, what, float(value), formula, where))

    def total(self, where: str | None = None) -> float:
        return sum(t.bytes for t in self.terms if where is None or t.where == where)

    def as_dict(self) -> dict:
        return {"stage": self.stage, "world_size": self.world_size, "total_mib": self.total() / MIB,
                "device_mib": self.total("device") / MIB, "host_mib": self.total("host") / MIB,
                "terms": [{"role": t.role, "what": t.what, "mib": t.bytes / MIB, "formula": t.formula,
                           "where": t.where} for t in self.terms], "notes": self.notes}

    def format(self) -> str:
        lines = [f"align estimate: {self.stage}, {self.world_size} rank(s); memory per rank (MiB)",
                 f"{'role':<10} {'what':<30} {'MiB':>9}  {'where':<6}  formula"]
        for t in self.terms:
            lines.append(f"{t.role:<10} {t.what:<30} {t.bytes / MIB:>9.1f}  {t.where:<6}  {t.formula}")
        lines.append(f"{'total':<10} {'':<30} {self.total() / MIB:>9.1f}  (device {self.total('device') / MIB:.1f}, "
                     f"host {self.total('host') / MIB:.1f}; on CPU both are RAM: compare memory/peak_rss_mib)")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass
class Shape:
    params: int
    layers: int
    hidden: int
    kv: int
    intermediate: int
    heads: int
    vocab: int
    leanable: bool = False  # its RMSNorm and MLP are the ones alignment.core.lean_layers patches

    @classmethod
    def of(cls, path: str, trust_remote_code: bool = False, num_labels: int | None = None) -> "Shape":
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            if num_labels:
                config.num_labels = num_labels
                model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)
            else:
                model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        params = sum(p.numel() for p in model.parameters())

        leanable = make_lean(model)["mlp"] == config.num_hidden_layers
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(params, config.num_hidden_layers, config.hidden_size, kv_heads * head_dim,
                   getattr(config, "intermediate_size", 4 * config.hidden_size), heads, config.vocab_size, leanable)

    def params_per_layer(self) -> float:
        return (self.params - self.vocab * self.hidden) / max(self.layers, 1)


def _bytes(precision: str) -> int:
    return 4 if precision in ("fp32", "bf16-mixed") else 2


def lora_params(shape: Shape, r: int, targets: list[str]) -> int:
    """Adapter parameters: r x (in + out) per adapted linear; all-linear = q, k, v, o, gate, up, down."""
    h, kv, i = shape.hidden, shape.kv, shape.intermediate
    linears = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h), "gate_proj": (h, i),
               "up_proj": (h, i), "down_proj": (i, h)}
    chosen = linears if "all-linear" in targets else {k: v for k, v in linears.items() if k in targets}
    return shape.layers * sum(r * (a + b) for a, b in chosen.values())


def trainable_role(est: Estimate, role: str, shape: Shape, trainable: int, recipe, tokens: int, row: int,
                   targets: int, grad_layers: int, attention: str, logits: bool = True) -> None:
    """The terms of one model that trains (see the module docstring)."""
    b, w, z = _bytes(recipe.train.precision), est.world_size, recipe.deepspeed.zero_stage
    P, Pt = shape.params, trainable
    shard_w = w if z == 3 else 1
    est.add(role, "weights", b * P / shard_w + (b * shape.params_per_layer() if z == 3 else 0),
            f"{b}*P/{shard_w}" + (" + one layer gathered" if z == 3 else "") + f", P={P / 1e6:.1f}M")
    gw = w if z >= 2 else 1
    est.add(role, "gradients", b * Pt / gw, f"{b}*Pt/{gw}, Pt={Pt / 1e6:.2f}M")
    ow = w if z >= 1 else 1
    master = 4 * Pt if b == 2 else 0
    where = "host" if recipe.deepspeed.offload_optimizer else "device"
    est.add(role, "optimizer (Adam m, v)", 8 * Pt / ow, f"8*Pt/{ow}", where)
    if master:
        est.add(role, "fp32 master weights", master / ow, f"4*Pt/{ow}", where)
        if z == 0:
            est.add(role, "fp32 gradients", 4 * Pt, "4*Pt (BF16_Optimizer, ZeRO-0)", where)
    h, kv, i, a = shape.hidden, shape.kv, shape.intermediate, shape.heads
    r = lora.r * 7 if (lora := recipe.lora).enabled else 0
    # What autograd keeps per token of one layer (bytes): two RMSNorms in fp32 (input and normalised, 8h each)
    # and their outputs (h*b each); rotated q, k and v (h + 2kv); the attention output (h); the MLP's gate,
    # SiLU(gate), up and their product (4I); LoRA's r-wide intermediates.
    layer = 16 * h + (4 * h + 2 * kv + 4 * i + r) * b
    formula_layer = f"(16h + (4h+2kv+4I{'+7r' if r else ''})*{b})"
    if recipe.model.lean_activations and shape.leanable:
        # lean_layers: each RMSNorm keeps its input in b (2h for two) and one fp32 scale, the MLP gate and up.
        layer = (6 * h + 2 * kv + 3 * i + r) * b + 8
        formula_layer = f"((6h+2kv+3I{'+7r' if r else ''})*{b} + 8) lean"
    if recipe.model.gradient_checkpointing:
        per = tokens * (h * b * grad_layers + layer)
        formula = f"T*h*{b}*{grad_layers} + one layer T*{formula_layer}, T={tokens}"
        attn_layers = 1
    else:
        per = tokens * layer * grad_layers
        formula = f"T*{formula_layer}*{grad_layers} layers, T={tokens}"
        attn_layers = grad_layers
    if attention == "eager":
        per += tokens * a * row * (b + 4) * attn_layers
        formula += f" + T*a*s*({b}+4) eager softmax, s={row}"
    per *= 1 + BACKWARD_TRANSIENTS
    formula = f"(1+{BACKWARD_TRANSIENTS})*[{formula}]"
    est.add(role, "activations", per, formula)
    if logits:
        n = min(targets, LOGIT_CHUNK)
        est.add(role, "logits", n * shape.vocab * (12 + b), f"n*V*(12+{b}), n=min(N={targets}, {LOGIT_CHUNK}), "
                f"V={shape.vocab}")


def frozen_role(est: Estimate, role: str, shape: Shape, recipe) -> None:
    b, w, z = _bytes(recipe.train.precision), est.world_size, recipe.deepspeed.zero_stage
    shard_w = w if z == 3 else 1
    est.add(role, "weights (frozen)", b * shape.params / shard_w, f"{b}*P/{shard_w}, P={shape.params / 1e6:.1f}M")


def _longest(lengths: list[int], micro: int) -> tuple[int, int]:
    """(row length s, tokens T) of the heaviest micro-batch: the `micro` longest rows, right-padded."""
    top = sorted(lengths, reverse=True)[:micro]
    return (top[0], top[0] * len(top)) if top else (0, 0)


def runtime_mib(model_path: str) -> float:
    proc = subprocess.run([sys.executable, "-c", _PROBE, model_path], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"runtime probe failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["runtime_mib"]


def estimate(recipe, stage: str, world_size: int, probe: bool = True) -> Estimate:
    est = Estimate(stage, world_size)
    path = resolve_model_path(recipe.model.name_or_path, recipe.model.revision)
    tokenizer = load_tokenizer(recipe.model.tokenizer or path, recipe.model.trust_remote_code)
    micro, d = recipe.train.micro_batch_size, recipe.data

    shared_prompt = stage == "rm" and d.packing and recipe.rm.share_prompt  # reward/train.py's choice
    attention = attention_for(recipe.model.attn_implementation, "cuda" if _on_gpu() else "cpu",
                              2 * d.max_length if shared_prompt else d.max_length, shared_prompt) or "sdpa"
    lora = recipe.lora
    b = _bytes(recipe.train.precision)

    def trainable_of(shape: Shape, head: int = 0) -> int:
        if lora.enabled:
            return lora_params(shape, lora.r, lora.target_modules) + head
        return shape.params

    if stage == "sft":
        rows, _ = read_splits(d, recipe.seed)
        report = DataReport("train")
        examples = build_sft_examples(rows, tokenizer, d, recipe.sft.assistant_only_loss, report)
        lengths = [len(e.input_ids) for e in examples]
        row, tokens = (d.max_length, micro * d.max_length) if d.packing else _longest(lengths, micro)
        share = report.trainable_tokens / max(report.tokens, 1)
        shape = Shape.of(path)
        trainable_role(est, "policy", shape, trainable_of(shape), recipe, tokens, row, math.ceil(tokens * share),
                       shape.layers, attention)
        est.notes.append(f"data: {len(examples)} examples, longest {max(lengths)} tokens; {100 * share:.0f}% of "
                         "tokens carry a loss target")
    elif stage in ("rm", "dpo"):
        rows, _ = read_splits(d, recipe.seed)
        section = recipe.rm if stage == "rm" else recipe.dpo
        pairs = load_pairs(rows, tokenizer, d, section.max_prompt_length, DataReport("train"), stage == "rm")
        seqs = [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
        row, pair_tokens = _longest(seqs, micro)
        tokens = 2 * pair_tokens  # chosen and rejected sequences of each pair
        responses = sorted((len(p.chosen_ids) + len(p.rejected_ids) for p in pairs), reverse=True)[:micro]
        if stage == "rm":
            shape = Shape.of(path, num_labels=1)
            layers = shape.layers
            if not lora.enabled and recipe.rm.trainable_layers is not None:
                layers = min(recipe.rm.trainable_layers, shape.layers)
                trainable = int(shape.params_per_layer() * layers + shape.hidden)
            else:
                trainable = trainable_of(shape, head=shape.hidden)
            trainable_role(est, "reward", shape, trainable, recipe, tokens, row, 0, layers, attention, logits=False)
        else:
            shape = Shape.of(path)
            trainable_role(est, "policy", shape, trainable_of(shape), recipe, tokens, row, sum(responses),
                           shape.layers, attention)

            mode = validate_dpo(recipe)
            if mode == "model":
                frozen_role(est, "reference", shape, recipe)
            est.notes.append(f"reference: {mode}" + (" (no second copy)" if mode in ("adapter", "precomputed", "none")
                                                     else ""))
        est.notes.append(f"data: {len(pairs)} pairs, heaviest micro-batch {micro} pairs of <= {row} tokens")
    elif stage == "ppo":
        cfg = recipe.ppo
        shape = Shape.of(path)
        prompt = cfg.max_prompt_length or d.max_length
        row = prompt + cfg.max_new_tokens
        tokens = micro * row
        trainable_role(est, "actor", shape, trainable_of(shape), recipe, tokens, row, micro * cfg.max_new_tokens,
                       shape.layers, attention)
        if not lora.enabled:
            frozen_role(est, "reference", shape, recipe)
        if cfg.advantage == "gae":
            trainable_role(est, "critic", shape, shape.params, recipe, tokens, row, 0, shape.layers, attention,
                           logits=False)
        for source in cfg.rewards:
            if source.source not in ("gold",) and ":" not in source.source:
                frozen_role(est, "reward", Shape.of(resolve_model_path(source.source), num_labels=1), recipe)
        batch = cfg.rollout_batch_size
        est.add("rollout", "KV cache", 2 * shape.layers * shape.kv * b * batch * row,
                f"2*L*kv*{b} x {batch} sequences x {row} tokens")
        est.add("rollout", "sampling logits", batch * shape.vocab * 4 * 2, f"{batch} x V x 4 x 2 (logits, probs)")
    else:
        raise ValueError(f"align estimate: no estimate for stage {stage!r}")

    # With the fixed mmap threshold (alignment.core.allocator) the cast's blocks go back to the OS.
    if recipe.train.precision != "fp32" and not fixes_mmap_threshold(stage, recipe):
        est.add("load", "cast residue", 2 * shape.params, "2*P: models load in fp32 (4*P, file pages) and are cast "
                "(2*P); the cast peaks at 6*P and the allocator keeps about 2*P of it", "host")
    est.add("runtime", "engine and allocator", ENGINE_OVERHEAD_MIB * MIB, "constant, calibrated on this machine", "host")
    if probe:
        est.add("runtime", "interpreter, libraries, tokenizer", runtime_mib(path) * MIB,
                "measured: a probe process imports the stack, joins a 1-rank job, loads the tokenizer", "host")
    if world_size > 1 and not _on_gpu():
        est.add("runtime", "DeepSpeed CPU all-reduce buffer", 66 * 1e6, "66 MB per rank (deepspeed shm comm)", "host")
    return est


def _on_gpu() -> bool:
    return torch.cuda.is_available()


def stage_of_recipe(path: str) -> str | None:
    """`sft.yaml` -> sft, `rm-hh.yaml` -> rm, `grpo.yaml` -> ppo (as the configs/ folders name recipes)."""
    stem = Path(path).stem
    for candidate in (stem, stem.split("-", 1)[0]):
        candidate = {"grpo": "ppo"}.get(candidate, candidate)
        if candidate in ("sft", "rm", "dpo", "ppo"):
            return candidate
    return None


def main(args) -> int:
    try:
        recipe = load_recipe(args.recipe, args.stage, list(args.overrides))
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    est = estimate(recipe, args.stage, args.nproc or 1)
    print(est.format())
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(est.as_dict(), handle, indent=1)
    return 0
