"""A user's mistakes end with one clear line on stderr and exit 2 (the traceback only with --debug), a finished
run is not overwritten by a run of other inputs, and a stage trained on the user's own file evaluates on that
file: the commands of the issue "your own model and data", run as a new user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import datasets

from helpers import REPO, align_cache, child_env, free_port, run_cli  # noqa: F401

TINY = REPO / "configs" / "tiny"


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "error:" in line]


def assert_one_line(result, *needles: str) -> str:
    assert result.returncode == 2, result.output[-3000:]
    assert "Traceback" not in result.output, result.output[-3000:]
    lines = error_lines(result.output)
    assert len(lines) == 1, result.output[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def pairs_file(path, n: int = 40, identical: int = 0):
    rows = [{"prompt": f"What is 2+{i}?", "chosen": f"It is {2 + i}.", "rejected": f"It is {3 + i}."} for i in range(n)]
    rows += [{"prompt": "Same?", "chosen": "yes", "rejected": "yes"}] * identical
    datasets.Dataset.from_list(rows).to_json(str(path))  # JSON lines, as datasets writes them
    return path


def test_bad_data_is_one_line_and_debug_shows_the_traceback(tmp_path, align_cache):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Hi"}) + "\n")
    args = ["sft", str(TINY / "sft.yaml"), "--set", f"output_dir={tmp_path / 'out'}", "--set", f"data.train={bad}"]
    assert_one_line(run_cli(args), f"{bad}:1: field 'completion' is missing")
    debug = run_cli(args + ["--debug"])
    assert debug.returncode == 2 and "Traceback" in debug.output


def test_a_model_path_that_does_not_exist_is_named_before_any_hub_lookup(tmp_path, align_cache):
    result = run_cli(["sft", str(TINY / "sft.yaml"), "--set", f"output_dir={tmp_path}",
                      "--set", "model.name_or_path=runs/no-such-run/final"])
    assert_one_line(result, "model path does not exist: runs/no-such-run/final (relative to")


def test_an_unreachable_hub_fails_at_once_and_says_how_to_work_offline(tmp_path, align_cache):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = run_cli(["sft", str(TINY / "sft.yaml"), "--set", f"output_dir={tmp_path}",
                      "--set", "model.name_or_path=some-org/some-model"],
                     env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint})
    assert_one_line(result, "some-org/some-model: cannot reach the Hugging Face hub at " + endpoint, "HF_HUB_OFFLINE=1")


def test_a_reward_module_that_does_not_exist_is_found_before_any_model_loads(tmp_path, align_cache):
    result = run_cli(["ppo", str(TINY / "grpo.yaml"), "--set", f"output_dir={tmp_path}",
                      "--set", "ppo.rewards=[{source: no_such_module:score}]"])
    assert_one_line(result, "ppo.rewards[0].source: 'no_such_module:score': module 'no_such_module' does not import")
    assert "attention:" not in result.output  # no model was loaded


def test_a_reward_function_with_the_wrong_count_stops_before_any_update(tmp_path, align_cache):
    (tmp_path / "my_rewards.py").write_text("def one(prompts, responses, rows):\n    return [1.0]\n")
    out = tmp_path / "run"
    result = run_cli(["ppo", str(TINY / "grpo.yaml"), "--set", f"output_dir={out}",
                      "--set", "ppo.rewards=[{source: my_rewards:one}]"],
                     env={"PYTHONPATH": f"{tmp_path}:{REPO}"})
    assert_one_line(result, "ppo.rewards: my_rewards:one returned 1 values for 16 responses")
    metrics = out / "metrics.jsonl"
    steps = [json.loads(line).get("step") for line in metrics.read_text().splitlines()] if metrics.exists() else []
    assert not any(step and step >= 1 for step in steps) and not (out / "checkpoints").exists()


def test_a_pipeline_runs_from_another_directory(tmp_path, align_cache):
    result = subprocess.run([sys.executable, "-m", "alignment.cli", "pipeline", str(TINY / "pipeline.yaml"),
                             "--dry-run", "--set", f"output_dir={tmp_path / 'pipe'}"], cwd=tmp_path,
                            env=child_env({"PYTHONPATH": str(REPO)}), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    commands = result.stdout.strip().splitlines()
    assert [c.split()[1:3] for c in commands] == [["sft", str(TINY / "sft.yaml")], ["rm", str(TINY / "rm.yaml")],
                                                  ["dpo", str(TINY / "dpo.yaml")]]


def test_own_pairs_evaluate_on_their_own_held_out_rows_and_a_finished_run_is_not_overwritten(tmp_path, align_cache):
    mine = pairs_file(tmp_path / "my_pairs.json", identical=2)
    out = tmp_path / "dpo"
    base = ["dpo", str(TINY / "dpo.yaml"), "--set", f"output_dir={out}", "--set", "train.max_steps=2",
            "--set", "train.save_interval=0"]
    first = run_cli(base + ["--set", f"data.train={mine}"]).check()
    assert f"data report [eval] from 10% of {mine}, seed 0: 4 rows" in first.output, first.output[-3000:]
    assert "builtin:prefs_eval" not in first.output
    assert "held-out implicit-reward accuracy" in first.output and "on 4 pairs" in first.output
    dropped = [json.loads(line) for line in (out / "dropped.jsonl").read_text().splitlines()]
    assert [d["reason"] for d in dropped] == ["chosen identical to rejected"] * 2
    assert all(d["origin"].startswith(f"{mine}:") for d in dropped)

    other = run_cli(base)  # the recipe's built-in pairs into the same output_dir
    assert_one_line(other, f"{out} holds a finished dpo run made from other inputs",
                    "my_pairs.json -> builtin:prefs_train", "data.eval: None -> builtin:prefs_eval", "--overwrite")
    assert json.loads((out / "manifest.json").read_text())["complete"]  # untouched
    run_cli(base + ["--overwrite"]).check()
