"""Helpers for tests that run the `align` CLI as users do: in a subprocess, from the repo root.

Import in a test module with ``from helpers import ...`` (pytest puts tests/ on sys.path).
`align_cache` is a session fixture: re-export it from the module (``from helpers import
align_cache``) and request it; every CLI run then shares one model/data cache.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY_SFT = REPO / "configs" / "tiny" / "sft.yaml"
SHARED_CACHE = Path("/tmp/aligncache")

# Variables that would change what a child run does if they leaked from the test process.
_SCRUB = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
          "ALIGN_DEBUG_FAIL_AT_STEP", "ALIGN_DEBUG_FAIL_RANK", "CROSS_RANK", "CROSS_SIZE")


@pytest.fixture(scope="session")
def align_cache(tmp_path_factory) -> Path:
    """The model/data cache for this session: $ALIGN_CACHE if set, /tmp/aligncache if it exists, else fresh."""
    before = os.environ.get("ALIGN_CACHE")
    if before:
        path = Path(before)
    elif SHARED_CACHE.is_dir():
        path = SHARED_CACHE
    else:
        path = tmp_path_factory.mktemp("aligncache")
    os.environ["ALIGN_CACHE"] = str(path)
    yield path
    if before is None:
        os.environ.pop("ALIGN_CACHE", None)
    else:
        os.environ["ALIGN_CACHE"] = before


@dataclass
class CliResult:
    returncode: int
    output: str  # stdout and stderr, interleaved
    seconds: float
    timed_out: bool
    pid: int

    def check(self) -> "CliResult":
        assert not self.timed_out, f"run timed out after {self.seconds:.0f}s:\n{self.output[-6000:]}"
        assert self.returncode == 0, f"run exited {self.returncode}:\n{self.output[-6000:]}"
        return self


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.setdefault("WANDB_MODE", "disabled")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_cli(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 240) -> CliResult:
    """`python -m alignment.cli ARGS` from the repo root; on timeout its whole process group is killed."""
    cmd = [sys.executable, "-m", "alignment.cli", *args]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    timed_out = False
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    return CliResult(proc.returncode, output, time.monotonic() - start, timed_out, proc.pid)


def sft_args(output_dir: Path | str, *sets: str, steps: int = 6, nproc: int = 1, resume: bool = False,
             recipe: Path | str = TINY_SFT) -> list[str]:
    """Arguments for a quiet fp32 tiny SFT run into output_dir; `sets` are extra KEY=VALUE overrides."""
    args = ["sft", str(recipe), "--set", f"output_dir={output_dir}", "--set", f"train.max_steps={steps}",
            "--set", "train.precision=fp32", "--set", "logging.progress_bar=false", "--set", "logging.wandb=disabled"]
    for item in sets:
        args += ["--set", item]
    if nproc > 1:
        args += ["--nproc", str(nproc)]
    if resume:
        args.append("--resume")
    return args


def run_sft(output_dir: Path | str, *sets: str, steps: int = 6, nproc: int = 1, resume: bool = False,
            env: dict[str, str] | None = None, timeout: float = 240) -> CliResult:
    return run_cli(sft_args(output_dir, *sets, steps=steps, nproc=nproc, resume=resume), env=env, timeout=timeout)


def read_metrics(output_dir: Path | str) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_metrics(output_dir: Path | str) -> dict[int, dict]:
    """Training-step records keyed by step; fails if a step was logged twice."""
    out: dict[int, dict] = {}
    for record in read_metrics(output_dir):
        if "loss" not in record:
            continue
        assert record["step"] not in out, f"step {record['step']} logged twice in {output_dir}/metrics.jsonl"
        out[record["step"]] = record
    return out


def perturbed_tiny_model(out: Path, seed: int = 0, scale: float = 0.05) -> Path:
    """The tiny built-in model with seeded noise added to every weight, saved with its tokenizer to `out`: a policy
    that answers differently from tiny-llama on the same prompts."""
    import torch

    from alignment.core.models import load_model, load_tokenizer, resolve_model_path

    path = resolve_model_path("tiny-llama")
    model = load_model(path, "causal_lm")
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out)
    load_tokenizer(path).save_pretrained(out)
    return out


def load_safetensors_dir(path: Path | str, pattern: str = "*.safetensors") -> dict:
    """Every tensor in the safetensors files of a directory (shards merged)."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob(pattern))
    assert files, f"no {pattern} in {path}"
    tensors: dict = {}
    for file in files:
        part = load_file(str(file))
        overlap = set(part) & set(tensors)
        assert not overlap, f"tensor names repeated across shards: {sorted(overlap)[:5]}"
        tensors.update(part)
    return tensors


def surviving_processes(*needles: str, session: int | None = None) -> list[str]:
    """Live processes (not zombies) whose command line contains any of `needles`, or that belong to the
    session `session` (run_cli starts each run as a session leader with that id: its `pid`)."""
    import psutil

    found = []
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            pid = proc.info["pid"]
            if pid == me or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.info["cmdline"] or [])
            in_session = session is not None and os.getsid(pid) == session
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError, PermissionError):
            continue
        if in_session or any(n in cmdline for n in needles):
            found.append(f"{pid}: {cmdline}")
    return found


# ---------------------------------------------------------------------------
# Tokenizers with the habits of other model families (for the one-tokenization-path tests)
# ---------------------------------------------------------------------------

END = "<|im_end|>"


def bos_adding_tokenizer(tiny_tok, template: str):
    """tiny-llama's vocabulary, with an encoder that prepends BOS (`<|endoftext|>`) as Llama-2's does."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tiny_tok.backend_tokenizer.to_str())
    bos_id = backend.token_to_id("<|endoftext|>")
    backend.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A $B", special_tokens=[("<|endoftext|>", bos_id)]
    )
    t = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token=END, pad_token="<pad>")
    t.chat_template = template
    assert t("a").input_ids[0] == bos_id == t.bos_token_id
    return t


def sentencepiece_style_tokenizer():
    """A Metaspace BPE tokenizer as Llama-2's: spaces become '▁' glued to the next word, BOS `<s>` is added
    by the encoder, EOS `</s>`; Llama-2's [INST] chat template. A prompt ending in a space then shares a
    token with the completion that follows it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = ["[INST] What is 2 + 2? [/INST] Sure, it is 4.", "[INST] Say hello. [/INST] Sure: hello there!",
              "Sure thing. The answer is four, I think."] * 20
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  show_progress=False)
    backend.train_from_iterator(corpus, trainer=trainer)
    backend.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                special_tokens=[("<s>", backend.token_to_id("<s>"))])
    t = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                pad_token="<pad>")
    t.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
                       "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")
    return t


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
