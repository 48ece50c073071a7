"""`align`: one command, a subcommand per stage.

    align sft RECIPE.yaml [--set key.sub=value ...] [--nproc N] [--resume]
    align rm  RECIPE.yaml ...        align dpo RECIPE.yaml ...        align kto RECIPE.yaml ...
    align ppo RECIPE.yaml ...        align pipeline PIPELINE.yaml ...
    align score --model RM_DIR --data FILE --out FILE
    align pairs --model POLICY_DIR --prompts FILE --judge gold|RM_DIR --out FILE
    align data OUT_DIR                 (write the built-in task's data files)

`--nproc N` starts N local ranks through DeepSpeed's launcher (gloo on CPU, NCCL on
GPU). The same command runs unchanged under `deepspeed`, `torchrun` or `srun`
started by hand: a process that already has RANK/WORLD_SIZE set joins that job.
"""

from __future__ import annotations

import argparse
import base64
import importlib
import json
import os
import re
import subprocess
import sys
import traceback

# Only light modules here: the host allocator settings must be applied before torch loads (alignment.core.allocator),
# so each command's module is imported when that command runs.
from alignment import stages
from alignment.collect.label import add_parser as add_label_parser
from alignment.core import allocator
from alignment.errors import UserError

STAGES = {
    "sft": "supervised fine-tuning on demonstrations (chat, prompt/completion or text)",
    "rm": "reward model training on preference pairs (Bradley-Terry)",
    "dpo": "direct preference optimisation (DPO, IPO, hinge, SimPO, ...) on preference pairs",
    "kto": "KTO on single answers labelled good or bad (thumbs up/down), or on preference pairs split in two",
    "ppo": "online RL: PPO with a critic (GAE), or GRPO / RLOO / REINFORCE++ (ppo.advantage), on rewards from "
           "reward models, the built-in verifier or Python functions",
    "pipeline": "SFT -> reward model -> (on-policy pairs) -> DPO -> online RL (PPO, GRPO, ...: ppo.enabled), chained, "
                "each stage in its own process, with gold scores and an HTML report",
}


def _stage_parser(sub, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("recipe", help="YAML recipe (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key by its dotted name, e.g. --set train.max_steps=10 (repeatable)")
    p.add_argument("--nproc", type=int, default=None,
                   help="local ranks to launch through DeepSpeed's launcher (default 1; a pipeline: its recipe's nproc)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in output_dir")
    if name != "pipeline":
        p.add_argument("--overwrite", action="store_true",
                       help="replace a finished run in output_dir that was made from other inputs (refused otherwise)")
    if name == "pipeline":
        p.add_argument("--dry-run", action="store_true", help="check every stage's recipe, print the commands, run nothing")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="align",
        description="Preference alignment on DeepSpeed: SFT, reward models, DPO, KTO and online RL (PPO, GRPO, "
                    "...) from YAML recipes.",
        epilog="Example: align sft configs/tiny/sft.yaml --set train.max_steps=20 --nproc 2",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in STAGES.items():
        _stage_parser(sub, name, help_text)
    score = sub.add_parser("score", help="score responses or pairs in a file with a trained reward model")
    score.add_argument("--model", required=True, help="reward model directory (align rm output final/)")
    score.add_argument("--data", required=True, help="JSONL/JSON/Parquet file of pairs or prompt+response rows")
    score.add_argument("--out", required=True, help="output JSONL")
    score.add_argument("--batch-size", type=int, default=16)
    score.add_argument("--max-length", type=int, default=None,
                       help="tokens the reward model reads (default: its training data.max_length, else 512)")
    score.add_argument("--normalize", action="store_true", help="subtract the stored mean, divide by the std")
    score.add_argument("--trust-remote-code", action="store_true", help="the model ships its own modelling code")
    pairs = sub.add_parser("pairs", help="on-policy preference pairs: sample from a policy, rank with a judge",
                           description="Sample responses from a policy for each prompt, score them with the "
                           "built-in task's verifier (--judge gold) or a reward model directory, and write "
                           "best-vs-worst pairs as prompt/chosen/rejected JSONL for align dpo / align rm.")
    pairs.add_argument("--model", required=True, help="policy: HF directory (e.g. an SFT run's final/ or final/merged)")
    pairs.add_argument("--prompts", required=True, help="prompt rows: a file or builtin:prompts_train")
    pairs.add_argument("--judge", default="gold", help="'gold' (built-in verifier) or a reward model directory")
    pairs.add_argument("--out", required=True, help="output JSONL of pairs")
    pairs.add_argument("--num-prompts", type=int, default=0, help="random subset of this many prompts (0: all)")
    pairs.add_argument("--samples", type=int, default=4, help="responses sampled per prompt")
    pairs.add_argument("--temperature", type=float, default=1.0)
    pairs.add_argument("--max-new-tokens", type=int, default=32)
    pairs.add_argument("--min-gap", type=float, default=1e-6, help="smallest best-worst score gap kept as a pair")
    pairs.add_argument("--missing-eos-penalty", type=float, default=None,
                       help="subtract this from the judge's score of a sample max_new_tokens cut "
                       "(as ppo.missing_eos_penalty)")
    pairs.add_argument("--batch-size", type=int, default=32, help="prompts per generate call")
    pairs.add_argument("--max-length", type=int, default=None,
                       help="tokens a reward-model judge reads (default: its training data.max_length, else 512)")
    pairs.add_argument("--offset", type=int, default=0, help="with --num-prompts: start this far into the seeded "
                       "shuffle of the prompts (rounds of online DPO take consecutive slices)")
    pairs.add_argument("--chosen", choices=["best", "reference"], default="best",
                       help="best: the best sample; reference: the verifier's reference answer against the worst "
                            "sample when that one is wrong (SPIN-style; prompts need gold specs)")
    pairs.add_argument("--seed", type=int, default=0)
    pairs.add_argument("--trust-remote-code", action="store_true", help="the models ship their own modelling code")
    ev = sub.add_parser("eval", help="evaluate a policy (gold, RM score, win rate, KL, forgetting) or a reward model",
                        description="On a policy: gold score, reward-model score, win rate against a reference, "
                        "KL to it, response length and EOS share, the change in NLL on general text against the "
                        "base model, and samples. On a reward model (--reward-model with --pairs, no --policy): "
                        "accuracy, ECE, length bias, accuracy per category. Writes OUT/eval.json and OUT/report.html.")
    ev.add_argument("--policy", default=None, help="policy directory (a run's final/ or final/merged) or model name")
    ev.add_argument("--reference", default=None, help="reference policy for the win rate and the KL")
    ev.add_argument("--base", default=None, help="base model for the forgetting check (default: --reference)")
    ev.add_argument("--prompts", default="builtin:prompts_eval", help="prompt rows (gold specs give the gold score)")
    ev.add_argument("--num-prompts", type=int, default=128, help="first N rows of --prompts / --pairs (0: all)")
    ev.add_argument("--reward-model", default=None, help="reward model directory (align rm output final/)")
    ev.add_argument("--normalize", action="store_true", help="RM scores with the stored mean and std")
    ev.add_argument("--pairs", default=None, help="preference pairs for a reward-model evaluation")
    ev.add_argument("--forgetting-text", default=None, help="plain text, paragraphs split by blank lines "
                    "(default: the general text shipped in alignment/evaluate/data/)")
    ev.add_argument("--skip-prompts", type=int, default=0, help="leave out the first N rows of --prompts")
    ev.add_argument("--samples", type=int, default=0,
                    help="also score K sampled responses per prompt (their mean: the score sampling optimises), "
                         "beside the greedy one; with --reference, paired against its samples")
    ev.add_argument("--temperature", type=float, default=1.0, help="the sampling temperature of --samples")
    ev.add_argument("--max-new-tokens", type=int, default=24)
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--out", required=True, help="output directory")
    ev.add_argument("--trust-remote-code", action="store_true", help="the models ship their own modelling code")
    doctor = sub.add_parser("doctor", help="preflight a job: versions across ranks, accelerators, all-reduce "
                            "bandwidth, shared filesystem", description="Run under the same launcher as a stage "
                            "(--nproc, deepspeed, torchrun, srun). Exit 1 on any mismatch, 2 on an unreadable hostfile.")
    doctor.add_argument("--nproc", type=int, default=None, help="local ranks (default 1)")
    doctor.add_argument("--hostfile", default=None, help="DeepSpeed hostfile the job was started from, to check slots")
    doctor.add_argument("--output-dir", default="runs/doctor", help="directory whose filesystem every rank must share")
    doctor.add_argument("--size-mb", type=int, default=64, help="all-reduce size for the bandwidth test")
    est = sub.add_parser("estimate", help="memory per rank for each role of a stage, with the formulas",
                         description="Reads the recipe (and its data, for the longest rows); runs nothing heavy.")
    est.add_argument("recipe")
    est.add_argument("--stage", default=None, help="the recipe's stage (default: from its file name, as sft.yaml, "
                     "rm-hh.yaml, grpo.yaml)")
    est.add_argument("--nproc", type=int, default=None, help="ranks of the job (default 1)")
    est.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    est.add_argument("--json", default=None, help="also write the estimate as JSON here")
    add_label_parser(sub)
    data = sub.add_parser("data", help="write the built-in task's data files, or check a data file",
                          description="align data OUT_DIR writes the built-in task's data files (SFT, preferences, "
                          "prompts); align data check FILE [--eval FILE] reports shapes, malformed rows, "
                          "duplicates, train/eval leakage, identical pairs and length bias.")
    data.add_argument("target", nargs="+", metavar="OUT_DIR | check FILE")
    data.add_argument("--eval", default=None, help="check: an evaluation file to look for shared prompts in")
    data.add_argument("--out", default=None, help="check: where the JSON report goes")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--n-train", type=int, default=2000)
    data.add_argument("--n-eval", type=int, default=200)
    return parser


def launch_local(nproc: int, argv: list[str]) -> int:
    """Re-run this command on `nproc` local ranks with DeepSpeed's per-node launcher.

    The launcher watches its children: when one exits non-zero it terminates the
    others and exits with that code, so a failing rank never leaves the job hanging.
    """
    import signal

    import psutil

    from alignment.core.distributed import free_port

    world_info = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(nproc))}).encode()).decode()
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info}", "--node_rank=0",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "--no_local_rank", "--module",
           "alignment.cli", *argv]
    launcher = subprocess.Popen(cmd)

    def forward_stop(signum, frame):
        # Preemption: the ranks checkpoint at their next step boundary and exit 75 (alignment.core.loop). The
        # signal goes to the ranks, not to DeepSpeed's launcher, which would kill them mid-step.
        for child in psutil.Process(launcher.pid).children():  # the ranks; not their own helper processes
            try:
                child.send_signal(signal.SIGUSR1)
            except psutil.NoSuchProcess:
                pass

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, forward_stop)
    return launcher.wait()


def _strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        out.append(arg)
    return out


def stage_module(name: str):
    """The module that runs `align NAME` (a training stage, or the pipeline); None for another command."""
    if name == "pipeline":
        return importlib.import_module("alignment.pipeline")
    return stages.load(name) if name in stages.MODULES else None


_PEER_LOST = re.compile(r"(Connection reset by peer|Connection closed by peer|Broken pipe|remote process exited"
                        r"|Connection refused)", re.IGNORECASE)
_PEER_ADDR = re.compile(r"\[([0-9a-fA-F.:]+)\]:(\d+)")


def lost_peer(message: str) -> str | None:
    """'the peer at ADDR:PORT (reason)' when a collective failed because another rank went away, else None."""
    reason = _PEER_LOST.search(message)
    if not reason:
        return None
    addr = _PEER_ADDR.search(message)
    where = f"the peer at {addr.group(1)}:{addr.group(2)}" if addr else "a peer"
    return f"{where} ({reason.group(1)})"


def run_data(args) -> int:
    if args.target[0] == "check":
        if len(args.target) != 2:
            raise UserError("align data check FILE [--eval FILE]")
        from alignment.collect.datacheck import main as check_main

        args.file = args.target[1]
        return check_main(args)
    if len(args.target) != 1:
        raise UserError("align data OUT_DIR (or: align data check FILE)")
    from alignment.builtin import task

    paths = task.write_task_data(args.target[0], seed=args.seed, n_train=args.n_train, n_eval=args.n_eval)
    for name, path in paths.items():
        print(f"{name:14s} {path}")
    return 0


def run_doctor(args, argv: list[str]) -> int:
    from alignment.cluster import doctor as doctor_module

    if args.hostfile and "RANK" not in os.environ:  # the launching process; ranks leave it to rank 0
        try:
            doctor_module.read_hostfile(args.hostfile)
        except doctor_module.HostfileError as exc:
            raise UserError(str(exc)) from None
    if (args.nproc or 1) > 1 and not ("RANK" in os.environ and "WORLD_SIZE" in os.environ):
        return launch_local(args.nproc, _strip_nproc(argv))
    code = doctor_module.main(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # as for stages: skip teardown, gloo threads can abort it
    return code


def run_estimate(args) -> int:
    from alignment.cluster.estimate import main as estimate_main
    from alignment.cluster.estimate import stage_of_recipe

    args.stage = args.stage or stage_of_recipe(args.recipe)
    if args.stage is None:
        raise UserError(f"cannot tell the stage of {args.recipe} from its name; pass --stage")
    return estimate_main(args)


def run_pairs(args) -> int:
    from alignment.collect.pairs import main as pairs_main

    if args.samples < 2:
        raise UserError("--samples must be at least 2 to form a pair")
    return pairs_main(args)


# Commands other than the stages: each module's main(args) is imported when its command runs (see the imports).
TOOLS = {"score": "reward.score", "label": "alignment.collect.label", "eval": "alignment.evaluate.evaluation"}


def run_stage(args, argv: list[str], debug: bool) -> int:
    """A training stage or the pipeline: the recipe loaded and checked, then run on this rank (or launched on
    --nproc local ranks). A user's mistake ends every rank with one line and exit 2; anything else with this
    rank's traceback and exit 1, so the launcher stops the other ranks."""
    from alignment.core.recipes import load_recipe

    module = stage_module(args.command)
    if args.nproc is not None and args.nproc < 1:
        raise UserError("--nproc must be >= 1")
    overrides = list(args.overrides)
    if args.command == "pipeline" and args.nproc is not None:
        overrides.append(f"nproc={args.nproc}")
    recipe = load_recipe(args.recipe, args.command, overrides)
    allocator.tune_host_allocator(args.command, recipe)  # before the models load
    in_job = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if (args.nproc or 1) > 1 and not in_job and args.command != "pipeline":
        return launch_local(args.nproc, _strip_nproc(argv))
    rank = os.environ.get("RANK", "0")
    extra = {"dry_run": args.dry_run} if args.command == "pipeline" else {"overwrite": args.overwrite}
    try:
        module.run(recipe, resume=args.resume, **extra)
    except UserError as exc:  # bad data or recipe, a missing model, a reward function or model that misbehaves
        if debug:
            sys.stderr.write(traceback.format_exc())
        sys.stderr.write(f"[rank {rank}] error: {exc}\n")
        sys.stderr.flush()
        os._exit(2)
    except Exception as exc:
        # Print this rank's traceback and exit non-zero; the launcher then stops the other ranks.
        sys.stderr.write(f"[rank {rank}] align {args.command} failed:\n{traceback.format_exc()}")
        lost = lost_peer(str(exc))
        if lost:
            sys.stderr.write(f"[rank {rank}] error: lost contact with another rank: {lost}. Its node stopped or "
                             "its network failed (see that node's log); this rank stops too.\n")
        sys.stderr.flush()
        os._exit(1)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Everything is written and the process group is destroyed. Skip interpreter teardown:
        # gloo's background threads can abort it ("terminate called without an active
        # exception"), which would turn a finished run into a failed job.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`align COMMAND ...`. A mistake in what the user gave (data, recipe, paths, models, reward functions) ends
    with one line on stderr and exit 2; `--debug` anywhere on the command line (or ALIGN_DEBUG=1) adds the
    traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("ALIGN_DEBUG") == "1"
    if debug:
        argv = [a for a in argv if a != "--debug"]
        os.environ["ALIGN_DEBUG"] = "1"  # the ranks a launcher starts inherit it
    args = build_parser().parse_args(argv)
    allocator.cap_onednn_cache()  # before torch loads (see the module)
    if args.command not in (*stages.MODULES, "pipeline"):
        allocator.tune_host_allocator(args.command)  # stages choose theirs once the recipe is read
    try:
        if args.command in (*stages.MODULES, "pipeline"):
            return run_stage(args, argv, debug)
        if args.command == "data":
            return run_data(args)
        if args.command == "doctor":
            return run_doctor(args, argv)
        if args.command == "estimate":
            return run_estimate(args)
        if args.command == "pairs":
            return run_pairs(args)
        return importlib.import_module(TOOLS[args.command]).main(args)
    except UserError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
