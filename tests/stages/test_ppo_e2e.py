"""`align ppo` end to end on the tiny model: PPO with a critic and the critic-free estimators run and export;
the first iteration's guards hold; 2 ranks under ZeRO-3 give 1 rank's numbers; kill -9 and --resume give the
uninterrupted run's weights; reward models score as sources, normalised only with their statistics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import REPO, align_cache, child_env, load_safetensors_dir, read_metrics, run_cli, step_metrics  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

QUIET = ("logging.progress_bar=false", "train.precision=fp32")


def ppo_args(recipe: str, out, *sets: str, nproc: int = 1, resume: bool = False) -> list[str]:
    args = ["ppo", recipe, "--set", f"output_dir={out}"]
    for item in QUIET + sets:
        args += ["--set", item]
    return args + (["--nproc", str(nproc)] if nproc > 1 else []) + (["--resume"] if resume else [])


def test_bf16_mixed_trains_fp32_weights_under_autocast_and_exports_them_exactly(tmp_path):
    """train.precision bf16-mixed (TRL's bf16=True): the forward runs under autocast, so the rollout's fp32
    log-probs and the training pass's differ by bf16 rounding (and the correction is on); the weights stay
    fp32, and final/ reloads to the live model's autocast-free outputs at fp32's tolerance."""
    out = tmp_path / "grpo"
    result = run_cli(["ppo", "configs/tiny/grpo.yaml", "--set", f"output_dir={out}", "--set",
                      "logging.progress_bar=false", "--set", "train.precision=bf16-mixed", "--set",
                      "train.max_steps=2"]).check()
    assert "bf16-mixed" in result.output and "exported and verified" in result.output
    first = step_metrics_ppo(out)[1]
    assert 1e-4 < first["check/rollout_logprob_max_diff"] < 0.5, "autocast on in training, off in the rollout"
    assert "mismatch/is_weight_mean" in first
    weights = load_safetensors_dir(out / "final")
    assert {t.dtype for t in weights.values()} == {torch.float32}


def test_tiny_ppo_with_a_critic_end_to_end(tmp_path):
    out = tmp_path / "ppo"
    result = run_cli(ppo_args("configs/tiny/ppo.yaml", out, "ppo.gold_eval.prompts=builtin:prompts_eval",
                              "ppo.gold_eval.num_prompts=6", "ppo.gold_eval.max_new_tokens=6",
                              "ppo.gold_eval.interval=2")).check()
    steps = step_metrics_ppo(out)
    assert sorted(steps) == [1, 2, 3, 4]
    # gold_eval.interval: the training weights scored at iteration 2; the last iteration is the export's score.
    assert "gold/score" in steps[2] and "gold/score" not in steps[1] and "gold/score" not in steps[4]
    assert "iteration 2: gold score" in result.output
    assert [m["step"] for m in read_metrics(out) if "gold/score" in m] == [0, 2, 4]  # 0: the start, in memory
    first = steps[1]
    # Before any update: the ratio is 1, the approximate KL 0, the rollout's log-probs the training pass's.
    assert first["check/first_ratio_dev"] < 1e-6 and first["check/first_approxkl"] < 1e-10
    assert first["check/rollout_logprob_max_diff"] < 1e-4
    assert first["objective/kl"] == pytest.approx(0.0, abs=1e-6), "the policy is the reference at iteration 1"
    for key in ("objective/scores", "objective/kl", "objective/entropy", "policy/clipfrac", "policy/approxkl",
                "loss/policy", "loss/value", "val/explained_variance", "response/length", "response/no_eos_share",
                "time/rollout", "time/scoring", "time/logprobs", "time/update", "train/episodes_per_s",
                "objective/score/gold", "objective/score/alignment.evaluate.rewards:digits"):
        assert all(key in steps[s] for s in steps), key
    assert steps[4]["objective/kl"] > 0, "the policy moved away from the reference"
    # No dynamic sampling: every sampled response is trained on, so the two scores are one number.
    assert all(steps[s]["rollout/scores_all_sampled"] == pytest.approx(steps[s]["objective/scores"], abs=1e-6)
               for s in steps)
    assert "exported and verified" in result.output
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    AutoModelForCausalLM.from_pretrained(out / "final")
    critic = AutoModelForSequenceClassification.from_pretrained(out / "final" / "critic")
    assert critic.config.num_labels == 1
    assert json.loads((out / "manifest.json").read_text())["complete"]


def step_metrics_ppo(out) -> dict[int, dict]:
    return {m["step"]: m for m in read_metrics(out) if "objective/scores" in m}


@pytest.mark.timeout(600)
def test_two_ranks_under_zero3_match_one_rank(tmp_path):
    """Episodes are seeded one by one, every rank holds the whole rollout for the math, minibatches are global:
    1 rank (ZeRO-2) and 2 ranks (ZeRO-3, actor and critic sharded) make the same rollouts and updates."""
    one, two = tmp_path / "r1", tmp_path / "r2"
    run_cli(ppo_args("configs/tiny/ppo.yaml", one, "train.max_steps=3", "train.save_interval=0")).check()
    run_cli(ppo_args("configs/tiny/ppo.yaml", two, "train.max_steps=3", "train.save_interval=0",
                     "deepspeed.zero_stage=3", nproc=2), timeout=380).check()
    a, b = step_metrics_ppo(one), step_metrics_ppo(two)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for s in a:
        assert b[s]["response/length"] == a[s]["response/length"], f"iteration {s}: other responses"
        for key in ("objective/scores", "objective/kl", "loss/policy", "loss/value", "policy/approxkl"):
            assert b[s][key] == pytest.approx(a[s][key], rel=1e-4, abs=1e-6), f"iteration {s} {key}"
    assert a[3]["objective/kl"] > 0, "updates happened, so equal numbers mean equal updates"


@pytest.mark.timeout(600)
def test_kill_9_then_resume_gives_the_uninterrupted_weights(tmp_path):
    recipe, sets = "configs/tiny/grpo.yaml", ("train.max_steps=4", "train.save_interval=1", "train.keep_checkpoints=4")
    whole = tmp_path / "whole"
    run_cli(ppo_args(recipe, whole, *sets)).check()

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "alignment.cli", *ppo_args(recipe, out, *sets)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "step-00000002" / "checkpoint.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists()

    resumed = run_cli(ppo_args(recipe, out, *sets, resume=True)).check()
    assert "resuming from" in resumed.output
    assert sorted(step_metrics_ppo(out)) == [1, 2, 3, 4]
    a, b = step_metrics_ppo(whole), step_metrics_ppo(out)
    for s in (3, 4):
        assert b[s]["objective/scores"] == a[s]["objective/scores"] and b[s]["loss/policy"] == a[s]["loss/policy"]
    expected, got = load_safetensors_dir(whole / "final"), load_safetensors_dir(out / "final")
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


@pytest.fixture(scope="module")
def reward_model_dirs(tmp_path_factory, align_cache):
    """A tiny reward model directory as `align rm` exports one (with statistics), and one without them."""
    from alignment.core.models import load_model, load_tokenizer, resolve_model_path
    from reward.model import ensure_distinct_pad

    root = tmp_path_factory.mktemp("rms")
    path = resolve_model_path("tiny-llama")
    dirs = {}
    for name, stats in (("with-stats", {"reward_mean": 0.5, "reward_std": 2.0}), ("no-stats", {})):
        tok = load_tokenizer(path)
        torch.manual_seed(3)
        model = load_model(path, "reward")
        ensure_distinct_pad(tok, model)
        for key, value in stats.items():
            setattr(model.config, key, value)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


def test_reward_model_source_and_its_normalisation(tmp_path, reward_model_dirs):
    rm = reward_model_dirs["with-stats"]
    out = tmp_path / "rloo"
    rewards = f'[{{source: {rm}, normalize: true}}, {{source: gold, weight: 0.5}}]'
    run_cli(ppo_args("configs/tiny/grpo.yaml", out, "ppo.advantage=rloo", f"ppo.rewards={rewards}",
                     "train.max_steps=2", "train.save_interval=0")).check()
    first = step_metrics_ppo(out)[1]
    assert f"objective/score/{rm}" in first and "objective/score/gold" in first

    bad = run_cli(ppo_args("configs/tiny/grpo.yaml", tmp_path / "bad", "train.max_steps=1",
                           f"ppo.rewards=[{{source: {reward_model_dirs['no-stats']}, normalize: true}}]"))
    assert bad.returncode == 2 and "stores no reward_mean / reward_std" in bad.output, bad.output[-2000:]


def test_reinforce_pp_kl_in_the_reward_and_tempered_sampling(tmp_path):
    """REINFORCE++ with KL in the reward and the adaptive controller, sampling at temperature 0.7: the training
    pass reads the tempered log-probs, so the first-iteration guards hold exactly as at temperature 1."""
    out = tmp_path / "rpp"
    result = run_cli(ppo_args("configs/tiny/grpo.yaml", out, "ppo.advantage=reinforce_pp", "ppo.kl_in=reward",
                              "ppo.kl_estimator=k2", "ppo.kl_target=0.01", "ppo.temperature=0.7",
                              "train.max_steps=2", "train.save_interval=0")).check()
    steps = step_metrics_ppo(out)
    assert steps[2]["objective/kl_coef"] != steps[1]["objective/kl_coef"], "the adaptive controller moved beta"
    first = steps[1]
    assert first["check/first_ratio_dev"] < 1e-6 and first["check/first_approxkl"] < 1e-10
    assert first["check/rollout_logprob_max_diff"] < 1e-4
    assert first["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert "sampling at temperature 0.7" in result.output and "warning: sampling" not in result.output
    # 2 iterations against the default horizon of 10000 episodes: the target cannot bind, and the run says so
    assert "warning: ppo.kl_target 0.01: over 2 iterations" in result.output, result.output[-3000:]


def test_informative_groups_keeps_groups_with_a_spread_first_in_order():
    from alignment.rlhf.episodes import informative_groups

    # 4 groups of 3: group 0 tied, 1 spread, 2 tied, 3 spread.
    scores = torch.tensor([1., 1., 1., 0., 1., 0., 0., 0., 0., 0.5, 0.5, 1.])
    assert informative_groups(scores, 3, 2) == [3, 4, 5, 9, 10, 11]
    assert informative_groups(scores, 3, 3) == [0, 1, 2, 3, 4, 5, 9, 10, 11]  # then tied ones, first first
    assert informative_groups(scores, 3, 1) == [3, 4, 5]


def test_dynamic_sampling_trains_on_the_kept_groups_and_reports_every_sample(tmp_path):
    """oversample 3: three times the prompts are sampled and scored, the groups with a spread are kept (as
    many as prompts_per_rollout); rollout/scores_all_sampled is the mean over every sample, objective/scores
    over the kept ones."""
    out = tmp_path / "dyn"
    run_cli(ppo_args("configs/tiny/grpo.yaml", out, "ppo.oversample=3", "ppo.rewards=[{source: alignment.evaluate."
                     "rewards:digits}]", "train.max_steps=2", "train.save_interval=0")).check()
    steps = step_metrics_ppo(out)
    for m in steps.values():
        assert 0.0 <= m["rollout/scores_all_sampled"] <= 1.0 and 0.0 <= m["rollout/informative_share"] <= 1.0
    # (Without oversampling the two are equal: test_tiny_ppo_with_a_critic_end_to_end.)


def test_guidance_helpers_find_all_wrong_groups_and_encode_the_reference_answer():
    from alignment.data import text
    from alignment.core.models import load_tokenizer, resolve_model_path
    from alignment.builtin import task
    from alignment.stages.ppo import all_wrong_groups, reference_response

    rows = [{"gold": {"family": "arith", "task": "multiply", "kind": "number", "expected": "42", "format": "plain",
                      "operands": [6, 7], "case_sensitive": False}}] * 4
    texts = ["41", "42", "7", "8"]  # group 0 has the right answer, group 1 has none
    gold = rows[0]["gold"]
    assert task.score(gold, "42") == task.FULL_CREDIT and task.score(gold, "41") < task.FULL_CREDIT
    assert all_wrong_groups(texts, rows, 2) == [1]
    with pytest.raises(Exception, match="needs a 'gold' spec"):
        all_wrong_groups(texts, [{}] * 4, 2)
    tokenizer = load_tokenizer(resolve_model_path("tiny-llama"))
    stops = text.stop_token_ids(tokenizer)
    prompt = [{"role": "user", "content": "What is 6 * 7?"}]
    ids = reference_response(tokenizer, prompt, rows[0], 32, stops)
    assert ids[-1] in stops, "the reference answer ends its turn as a sample that stopped would"
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "42"
    assert ids == text.encode(tokenizer, prompt, "42").response_ids  # the training pass's ids
    assert reference_response(tokenizer, prompt, rows[0], 1, stops) == ids[:1]


def test_grpo_with_reference_guidance(tmp_path):
    """The random tiny policy gets nothing right: every group gets the reference answer as its last member,
    which the verifier scores 1; the policy's own scores and the first-iteration guards ignore it."""
    out = tmp_path / "guided"
    run_cli(ppo_args("configs/tiny/grpo.yaml", out, "ppo.guidance=reference", "ppo.rewards=[{source: gold}]",
                     "ppo.max_new_tokens=6", "train.max_steps=2", "train.save_interval=0")).check()
    steps = step_metrics_ppo(out)
    first = steps[1]
    assert first["rollout/guided_share"] == pytest.approx(1 / 4)  # one of the 4 samples of every prompt
    assert first["objective/scores"] == 0.0 and first["objective/score/gold"] == 0.0
    assert first["check/first_ratio_dev"] < 1e-6 and first["check/rollout_logprob_max_diff"] < 1e-4
    assert first["loss/policy"] == first["loss/policy"]  # finite: the guided rows carry no NaN into the loss
    import alignment.stages.ppo  # noqa: F401  (registers the stage's schema)
    from alignment.core.recipes import load_recipe

    with pytest.raises(Exception, match="use it with advantage grpo or rloo"):
        load_recipe(REPO / "configs" / "tiny" / "ppo.yaml", "ppo", ["ppo.guidance=reference"])


@pytest.mark.timeout(30)
def test_rollout_prompts_are_epochs_without_repeats_and_do_not_depend_on_resume_or_world_size():
    """FAILURES row 17: a resumed RL job replayed prompts (the dataloader position was not restored), and a new
    world size broke the consumed-sample arithmetic. Here iteration k's prompts are a function of (k, seed) alone,
    the epochs are permutations, and the ranks' slices of a rollout (and their episodes' seeds) are the same
    episodes at any world size."""
    from alignment.rlhf.episodes import episode_seed, rollout_prompts

    num_prompts, per_rollout, seed = 10, 4, 3
    uninterrupted = [rollout_prompts(num_prompts, per_rollout, k, seed) for k in range(1, 11)]  # 4 epochs
    flat = [i for ids in uninterrupted for i in ids]
    epochs = [flat[e * num_prompts : (e + 1) * num_prompts] for e in range(4)]
    assert all(sorted(epoch) == list(range(num_prompts)) for epoch in epochs), "no prompt repeats within an epoch"
    assert len({tuple(epoch) for epoch in epochs}) == 4, "each epoch is shuffled anew"
    # A run resumed at iteration 4 (in any order, nothing carried over) draws what the uninterrupted one drew.
    assert [rollout_prompts(num_prompts, per_rollout, k, seed) for k in (6, 4, 5)] == (
        [uninterrupted[5], uninterrupted[3], uninterrupted[4]])
    assert rollout_prompts(num_prompts, per_rollout, 1, seed + 1) != uninterrupted[0]

    def episodes(world_size: int, iteration: int, samples: int = 2) -> list[tuple[int, int]]:
        indices = rollout_prompts(num_prompts, per_rollout, iteration, seed)
        per_rank = per_rollout // world_size
        return sorted((i, episode_seed(seed, iteration, i, k)) for rank in range(world_size)
                      for i in indices[rank * per_rank : (rank + 1) * per_rank] for k in range(samples))

    for iteration in (1, 3, 7):
        assert episodes(1, iteration) == episodes(2, iteration) == episodes(4, iteration)


@pytest.mark.timeout(60)
def test_a_reward_model_with_another_tokenizer_reads_a_truncated_answer_as_produced():
    """RewardScorer.read_policy_ids (what a reward model of ppo.rewards reads) when the RM's tokenizer is not the
    policy's: the answer is decoded and rendered for the RM, with the end of turn and the template's suffix when it ended, without them when a token limit
    cut it: here the same ids as `align pairs`' judge (reward.scorer.sequence_ids) and the RM's training on
    truncated pairs read. (The stage tokenizes a cut answer's text alone, which needs no stop token at the end
    of the RM's rendering; text.unfinished_response_ids does, and refuses a template without one.)"""
    from types import SimpleNamespace

    from alignment.data import text
    from alignment.core.models import load_tokenizer, resolve_model_path
    from reward.scorer import RewardScorer as RewardModelSource
    from reward.scorer import sequence_ids

    policy_tok, rm_tok = (load_tokenizer(resolve_model_path(name)) for name in ("tiny-llama", "smollm2-135m"))
    source = SimpleNamespace(_same_ids={id(policy_tok): False}, tokenizer=rm_tok, max_length=256,
                             max_prompt_length=None)
    prompt = [{"role": "user", "content": "What is 7 + 5?"}]
    answer = policy_tok("12 is the answer", add_special_tokens=False).input_ids
    finished = RewardModelSource.read_policy_ids(source, prompt, [], answer + [policy_tok.eos_token_id], True, policy_tok)
    cut = RewardModelSource.read_policy_ids(source, prompt, [], answer, False, policy_tok)
    response = policy_tok.decode(answer, skip_special_tokens=True)
    assert finished == sequence_ids(rm_tok, prompt, response, 256)
    assert cut == sequence_ids(rm_tok, prompt, response, 256, ended=False)
    end_of_turn = text.stop_token_ids(rm_tok)
    assert finished[: len(cut)] == cut and finished[len(cut)] in end_of_turn
    assert rm_tok.decode(cut).endswith("12 is the answer")
