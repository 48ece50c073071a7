"""What an RL iteration reports: its metrics (objective/*, policy/*, loss/*, val/*, response/*, rollout/*,
time/*) and the warnings a user needs before the curves go bad."""

from __future__ import annotations

from alignment.rlhf import advantages as adv


def iteration_metrics(buffer, mask, seq_kl, beta, stats, values, returns, clock, episodes: int) -> dict:
    sampled = ~buffer["guided"]  # the policy's own responses (ppo.guidance adds reference answers)
    scores = buffer["scores"][sampled]
    seq_kl = seq_kl[sampled]
    lengths = mask[sampled].sum(dim=1)
    out = {"objective/scores": float(scores.mean()), "objective/scores_std": float(scores.std()) if len(scores) > 1 else 0.0,
           "objective/kl": float(seq_kl.mean()), "objective/kl_coef": beta,
           "objective/rlhf_reward": float((scores - beta * seq_kl).mean()),
           "response/length": float(lengths.mean()), "response/length_max": float(lengths.max()),
           "response/no_eos_share": float((~buffer["ended"][sampled]).float().mean()),
           "rollout/guided_share": float(buffer["guided"].float().mean()),
           **stats,
           **{f"time/{k}": v for k, v in clock.times.items()},
           "train/episodes_per_s": episodes / max(sum(clock.times.values()), 1e-9)}
    for key, value in buffer.items():
        if key.startswith("score:"):
            out[f"objective/score/{key[6:]}"] = float(value[sampled].mean())
    if returns is not None:
        out["val/explained_variance"] = adv.explained_variance(values, returns, mask)
        out["val/mean"] = float(adv.masked_mean(values, mask))
    return out


class Health:
    """Warnings a PPO user needs before the curves go bad: KL negative or far past its target, entropy
    collapse, groups whose samples are all the same, responses that stop stopping."""

    def __init__(self, cfg, group_size: int):
        self.cfg, self.group_size = cfg, group_size
        self.no_eos: list[float] = []

    def check(self, m: dict, groups: list[list[str]], target: float | None) -> list[str]:
        out = []
        if m["objective/kl"] < -0.05:
            out.append(f"mean KL {m['objective/kl']:.3f} < 0: the rollout is not sampled from the policy the KL is "
                       "measured against (sampling settings, or a reference that is not the start model)")
        if target is not None and m["objective/kl"] > 3 * target:
            out.append(f"mean KL {m['objective/kl']:.3f} is past 3x its target {target}")
        if m["objective/entropy"] < 0.05:
            out.append(f"entropy {m['objective/entropy']:.3f} nats per token: the policy is collapsing")
        if self.group_size > 1 and self.cfg.advantage in ("grpo", "rloo"):  # GAE and REINFORCE++ need no groups
            same = sum(len(set(g)) == 1 for g in groups) / max(len(groups), 1)
            if same > 0.5:
                out.append(f"{same:.0%} of prompts got {self.group_size} identical responses: no signal for "
                           "group baselines (raise the temperature or the group size)")
        self.no_eos.append(m["response/no_eos_share"])
        if len(self.no_eos) >= 3 and self.no_eos[-1] > 0.3 and self.no_eos[-1] > self.no_eos[0] + 0.2:
            out.append(f"{self.no_eos[-1]:.0%} of responses hit max_new_tokens without stopping (from "
                       f"{self.no_eos[0]:.0%}); consider ppo.missing_eos_penalty")
        return out


