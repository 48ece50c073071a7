"""Hub models at a pinned revision, with their own modelling code: `model.revision` and
`model.trust_remote_code` reach every load of a run (training, the export check, merged/, the gold
score, reward scoring), and the precomputed DPO reference is cached under the commit, never a branch.

No network: the "hub" is a Hugging Face cache made by the test (HF_HUB_OFFLINE=1), holding one repo
whose only ref is the branch `v2`, so any load that drops the revision fails; its config names
modelling code of its own (auto_map), so any load without trust_remote_code fails too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import align_cache, run_cli  # noqa: F401
from alignment.core.models import resolve_model_path

REPO_ID = "local-org/tiny-custom"
CONFIG_CODE = '''from transformers import LlamaConfig


class TinyCustomConfig(LlamaConfig):
    model_type = "tiny-custom"
'''
MODELING_CODE = '''import torch
from transformers import LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel, LlamaPreTrainedModel

from .configuration_tiny_custom import TinyCustomConfig


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig


class TinyCustomForSequenceClassification(LlamaForSequenceClassification):
    config_class = TinyCustomConfig

    def __init__(self, config):  # its own backbone (transformers' builds one through AutoModel)
        LlamaPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = LlamaModel(config)
        self.score = torch.nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()
'''


def fake_hub(root: Path, commits: dict[str, str]) -> Path:
    """An HF cache with REPO_ID: tiny-llama turned into a custom-code model, one snapshot per commit
    (the weights differ by a seeded perturbation), refs/<branch> -> commit for each item of `commits`."""
    import torch
    from safetensors.torch import load_file, save_file

    repo = root / ("models--" + REPO_ID.replace("/", "--"))
    source = Path(resolve_model_path("tiny-llama"))
    for seed, (branch, sha) in enumerate(sorted(commits.items())):
        snap = repo / "snapshots" / sha
        shutil.copytree(source, snap, ignore=shutil.ignore_patterns(".complete", "model.safetensors"))
        weights = load_file(str(source / "model.safetensors"))
        gen = torch.Generator().manual_seed(seed)
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in weights.items()},
                  str(snap / "model.safetensors"))
        config = json.loads((snap / "config.json").read_text())
        config.update(model_type="tiny-custom", architectures=["TinyCustomForCausalLM"], auto_map={
            "AutoConfig": "configuration_tiny_custom.TinyCustomConfig",
            "AutoModelForCausalLM": "modeling_tiny_custom.TinyCustomForCausalLM",
            "AutoModelForSequenceClassification": "modeling_tiny_custom.TinyCustomForSequenceClassification"})
        (snap / "config.json").write_text(json.dumps(config))
        (snap / "configuration_tiny_custom.py").write_text(CONFIG_CODE)
        (snap / "modeling_tiny_custom.py").write_text(MODELING_CODE)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / branch).write_text(sha)
    return root


SHA_A, SHA_B = "a" * 40, "b" * 40


@pytest.fixture(scope="module")
def hub(tmp_path_factory, align_cache):
    return fake_hub(tmp_path_factory.mktemp("hub"), {"v2": SHA_A})


def hub_env(hub: Path) -> dict[str, str]:
    return {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(hub.parent / "modules")}


def use_hub(monkeypatch, hub: Path) -> None:
    """Point this process's huggingface_hub at the fake cache (it reads the environment at import)."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_fixture_really_needs_the_revision_and_remote_code(hub, monkeypatch):
    from transformers import AutoModelForCausalLM

    use_hub(monkeypatch, hub)
    where = dict(cache_dir=str(hub), local_files_only=True)
    with pytest.raises(Exception):
        AutoModelForCausalLM.from_pretrained(REPO_ID, trust_remote_code=True, **where)  # no `main` ref
    with pytest.raises(Exception):
        AutoModelForCausalLM.from_pretrained(REPO_ID, revision="v2", trust_remote_code=False, **where)  # refused
    AutoModelForCausalLM.from_pretrained(REPO_ID, revision="v2", trust_remote_code=True, **where)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sft_lora_run_carries_revision_and_remote_code_everywhere(tmp_path, hub):
    """Training, export verification, merged/ (verified too), and the gold score before and after."""
    out = tmp_path / "sft"
    result = run_cli(["sft", "configs/tiny/sft.yaml", "--set", f"output_dir={out}", "--set", f"model.name_or_path={REPO_ID}",
                      "--set", "model.revision=v2", "--set", "model.trust_remote_code=true", "--set", "lora.enabled=true",
                      "--set", "train.max_steps=2", "--set", "train.precision=fp32", "--set", "logging.progress_bar=false",
                      "--set", "train.eval_interval=0", "--set", "train.save_interval=0",
                      "--set", "sft.gold_eval.prompts=builtin:prompts_eval", "--set", "sft.gold_eval.num_prompts=4",
                      "--set", "sft.gold_eval.max_new_tokens=4"], env=hub_env(hub)).check()
    assert "exported and verified" in result.output and "gold score of" in result.output
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == REPO_ID and adapter["revision"] == "v2"
    assert (out / "final" / "merged" / "modeling_tiny_custom.py").is_file(), "merged/ ships the modelling code"


def test_reference_cache_key_pins_the_commit(tmp_path, monkeypatch):
    """A hub id at a branch is fingerprinted by the commit the branch points to in the local cache:
    moving the branch changes the key; an id that cannot be pinned is not cached at all."""
    from alignment.core.fingerprint import model_fingerprint

    hub = fake_hub(tmp_path / "hub", {"v2": SHA_A, "main": SHA_B})
    use_hub(monkeypatch, hub)
    on_a = model_fingerprint(REPO_ID, "v2")
    assert on_a == model_fingerprint(REPO_ID, SHA_A), "the branch and its commit are the same weights"
    assert model_fingerprint(REPO_ID, None) == model_fingerprint(REPO_ID, "main") != on_a
    (hub / ("models--" + REPO_ID.replace("/", "--")) / "refs" / "v2").write_text(SHA_B)  # the branch moved
    assert model_fingerprint(REPO_ID, "v2") != on_a
    assert model_fingerprint("local-org/not-in-cache", "main") is None


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_lora_reward_model_from_the_hub_scores_with_align_score(tmp_path, hub):
    out = tmp_path / "rm"
    run_cli(["rm", "configs/tiny/rm.yaml", "--set", f"output_dir={out}", "--set", f"model.name_or_path={REPO_ID}",
             "--set", "model.revision=v2", "--set", "model.trust_remote_code=true", "--set", "lora.enabled=true",
             "--set", "train.max_steps=2", "--set", "train.precision=fp32", "--set", "logging.progress_bar=false",
             "--set", "train.eval_interval=0", "--set", "train.save_interval=0", "--set", "data.max_eval_rows=8"],
            env=hub_env(hub)).check()
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Q: 2 + 2 =", "chosen": " 4", "rejected": " 5"}) + "\n")
    scores = tmp_path / "scores.jsonl"
    run_cli(["score", "--model", str(out / "final"), "--data", str(data), "--out", str(scores), "--trust-remote-code",
             "--normalize"], env=hub_env(hub)).check()
    record = json.loads(scores.read_text())
    assert {"reward_chosen", "reward_rejected", "margin"} <= set(record)
