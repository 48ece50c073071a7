"""How tokenized items become the rows a forward pass reads: one packer, one shared-prefix row builder.

Every batch of every stage is one of three layouts:
- padded rows: one item a row, right-padded (collate, collate_pairs by default, episode_batch);
- packed rows: items laid end to end, first-fit-decreasing (first_fit_decreasing), attention stopped at
  item boundaries, so no compute goes to padding (data.packing for SFT and the pair stages);
- shared-prefix rows (shared_rows): the tokens every item of a micro-batch starts with (a chat template's
  system prompt) run once a row, each item's stem once, then its 0, 1, 2 or K branches, each branch seeing
  the prefix, its stem and itself only (sft.share_prefix: 0 branches; dpo.share_prefix and the reward
  model's shared-prompt packing: 2, chosen and rejected; ppo.share_prompt: a group's K responses).
  Positions continue as in each branch's own sequence, so every token's hidden state, and every log-prob
  or reward read from it, is the one it has in its own padded row.
Attention over packed and shared rows is branch_mask(owner, branch): owner[r, t] is -1 on the shared
prefix, the item's index on its own tokens, -2 on padding; branch[r, t] is 0 on the stem, b on branch b.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

IGNORE = -100


# ---------------------------------------------------------------------------
# Grouping items into rows
# ---------------------------------------------------------------------------


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into rows of at most `capacity` tokens, longest first, each into the first row with room
    (deterministic; an item longer than `capacity` gets a row of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        for r, room in enumerate(free):
            if room >= n:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(capacity - n)
    return rows


def _fill(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive items into rows of at most `budget` (an item longer than that alone in its row)."""
    rows: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(lengths):
        if rows[-1] and used + n > budget:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def rows_under(lengths: list[int], prefix: int, cap: int) -> list[list[int]]:
    """Consecutive items (their lengths after a shared prefix) grouped into as few rows as fit `cap` tokens
    with the prefix in front of each, and balanced: every row is padded to the widest, so 520 tokens under
    a 512 cap make two rows of about 272, not 512 + 8 padded to 1,024. Attention over a shared row is
    quadratic in its width, hence the cap; an item longer than it gets a row of its own."""
    room = max(1, cap - prefix)
    count = len(_fill(lengths, room))  # filling up to the cap gives the fewest rows
    low, high = max(1, math.ceil(sum(lengths) / count)), room
    while low < high:  # the smallest row budget that still needs only `count` rows
        mid = (low + high) // 2
        if len(_fill(lengths, mid)) <= count:
            high = mid
        else:
            low = mid + 1
    return _fill(lengths, low)


def common_prefix(sequences: list[list[int]], limit: int) -> int:
    """Length of the longest prefix (at most `limit`) that every sequence starts with."""
    first = sequences[0]
    n = 0
    while n < limit and all(s[n] == first[n] for s in sequences):
        n += 1
    return n


# ---------------------------------------------------------------------------
# Masks and the shared-prefix row builder
# ---------------------------------------------------------------------------


def branch_mask(owner: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """Attention allowed [R, 1, W, W] in packed and shared-prefix rows (owner and branch as the module
    docstring says): a token sees, causally, the shared prefix, its own item's stem and its own branch;
    padding sees itself (a softmax over nothing would be NaN)."""
    width = owner.shape[1]
    q_owner, k_owner = owner[:, :, None], owner[:, None, :]
    same = (q_owner == k_owner) & ((branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None]))
    allowed = ((k_owner == -1) | same) & (q_owner != -2) & (k_owner != -2)
    allowed &= torch.ones(width, width, dtype=torch.bool, device=owner.device).tril()[None]
    allowed |= torch.eye(width, dtype=torch.bool, device=owner.device)[None]
    return allowed[:, None]


def branch_rows(built: list[tuple[list, list, list, list]], pad_id: int):
    """Built rows as tensors: each is (token ids, positions, owner, branch) as branch_mask reads them; returns
    (input_ids, position_ids, owner, branch) [R, W], right-padded (owner -2)."""
    width = max(len(b[0]) for b in built)
    shape = (len(built), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    owner = torch.full(shape, -2, dtype=torch.long)
    branch = torch.zeros(shape, dtype=torch.long)
    for r, (row, pos, own, br) in enumerate(built):
        n = len(row)
        ids[r, :n], positions[r, :n] = torch.tensor(row), torch.tensor(pos)
        owner[r, :n], branch[r, :n] = torch.tensor(own), torch.tensor(br)
    return ids, positions, owner, branch


@dataclass
class Placement:
    """Where one item landed: its row, the columns of its stem's first and last own token, and of each branch's
    first token."""

    row: int
    stem_start: int
    stem_end: int
    branch_starts: list[int] = field(default_factory=list)


@dataclass
class SharedRows:
    """Rows built by shared_rows: tensors [R, W], the items of each row, and where each item landed."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    owner: torch.Tensor
    branch: torch.Tensor
    rows: list[list[int]]
    placements: list[Placement]

    @property
    def attention_mask(self) -> torch.Tensor:
        return (self.owner != -2).long()

    def mask(self) -> torch.Tensor:
        return branch_mask(self.owner, self.branch)

    def predictions(self, branches: list[list[list[int]]]):
        """Every branch token as a target read where it is predicted: (pred_index [(row, column)], target ids,
        which [(item, branch 1.., t)]), in row order. Token t of a branch is predicted by the stem's last token
        for t = 0, else by the branch's token t - 1."""
        preds, targets, which = [], [], []
        for members in self.rows:
            for i in members:
                place = self.placements[i]
                for b, (start, tokens) in enumerate(zip(place.branch_starts, branches[i]), start=1):
                    for t, token in enumerate(tokens):
                        preds.append((place.row, place.stem_end if t == 0 else start + t - 1))
                        targets.append(token)
                        which.append((i, b, t))
        return preds, targets, which


def shared_rows(stems: list[list[int]], branches: list[list[list[int]]], prefix: int, rows: list[list[int]],
                pad_id: int) -> SharedRows:
    """The one row builder of packed and shared-prefix layouts: row r is [prefix | stem i | branches of i |
    stem j | ...] for the items i, j, ... of rows[r] in that order; `prefix` leading stem tokens are the same in
    every item and run once a row (0 for plain packing). Stem tokens take positions 0.. as in the stem; every
    branch continues from the stem's end."""
    built: list[tuple[list, list, list, list]] = []
    placements: list[Placement | None] = [None] * len(stems)
    head = stems[0][:prefix]
    for r, members in enumerate(rows):
        ids, positions, owner, branch = list(head), list(range(prefix)), [-1] * prefix, [0] * prefix
        for i in members:
            stem = stems[i]
            start = len(ids)
            ids += stem[prefix:]
            positions += range(prefix, len(stem))
            owner += [i] * (len(stem) - prefix)
            branch += [0] * (len(stem) - prefix)
            place = Placement(r, start, len(ids) - 1)
            for b, tokens in enumerate(branches[i], start=1):
                place.branch_starts.append(len(ids))
                ids += tokens
                positions += range(len(stem), len(stem) + len(tokens))
                owner += [i] * len(tokens)
                branch += [b] * len(tokens)
            placements[i] = place
        built.append((ids, positions, owner, branch))
    ids_t, positions_t, owner_t, branch_t = branch_rows(built, pad_id)
    return SharedRows(ids_t, positions_t, owner_t, branch_t, rows, placements)


# ---------------------------------------------------------------------------
# SFT: padded, packed and shared-prefix micro-batches
# ---------------------------------------------------------------------------


@dataclass
class PackedRow:
    """Several examples laid end to end; `lengths` marks their boundaries."""

    input_ids: list[int]
    labels: list[int]
    lengths: list[int]


def pack_examples(examples: list, max_length: int) -> list[PackedRow]:
    """Examples packed first-fit-decreasing into rows of at most max_length tokens (order-stable per seed). An
    example's first token is not a target inside a pack: it would be predicted from the previous, unrelated
    example."""
    packed = []
    for members in first_fit_decreasing([len(e.input_ids) for e in examples], max_length):
        row = PackedRow([], [], [])
        for i in members:
            ex = examples[i]
            row.input_ids += ex.input_ids
            row.labels += [IGNORE] + ex.labels[1:]
            row.lengths.append(len(ex.input_ids))
        packed.append(row)
    return packed


def collate(items: list, pad_id: int):
    """Right-pad a micro-batch. Packed rows get position ids and a block-diagonal causal mask.

    Returns a dict with input_ids, labels (IGNORE on padding), attention_mask and,
    for packed rows, position_ids plus `block_mask` (branch_mask) that stops attention at
    example boundaries (works with eager and SDPA attention, on CPU too).
    """
    width = max(len(it.input_ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for b, it in enumerate(items):
        n = len(it.input_ids)
        ids[b, :n] = torch.tensor(it.input_ids)
        labels[b, :n] = torch.tensor(it.labels)
        mask[b, :n] = 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if items and isinstance(items[0], PackedRow):
        positions = torch.zeros((len(items), width), dtype=torch.long)
        owner = torch.full((len(items), width), -2, dtype=torch.long)
        for b, it in enumerate(items):
            start = 0
            for k, n in enumerate(it.lengths):
                positions[b, start : start + n] = torch.arange(n)
                owner[b, start : start + n] = k
                start += n
        batch["position_ids"] = positions
        batch["block_mask"] = branch_mask(owner, torch.zeros_like(owner))
    return batch


def shared_prefix_length(items: list) -> int:
    """Tokens every example of a micro-batch starts with and that may be computed once: the longest common
    prefix, cut so that it holds no target and each example keeps at least its first token after it, and
    that first token is not a target either (in a shared row it would be predicted from another example)."""
    if len(items) < 2:
        return 0
    p = common_prefix([it.input_ids for it in items], min(len(it.input_ids) for it in items) - 1)
    while p > 0 and any(t != IGNORE for it in items for t in it.labels[1 : p + 1]):
        p -= 1
    return p


def collate_shared_prefix(items: list, pad_id: int, min_prefix: int = 8, row_tokens: int = 512):
    """Rows [prefix | rest i | rest i+1 | ...] of at most `row_tokens` tokens when the examples share a prefix
    of at least `min_prefix` tokens (a chat template's system prompt), else `collate`.

    Each rest sees its row's prefix and its own earlier tokens only, and its positions continue from the
    prefix's end, so every target's log-prob is the one it has in its own padded row, while the prefix runs
    once a row instead of once an example (SmolLM2's default system prompt is 24 of the built-in task's 54
    tokens a demonstration). Targets come in the order of the padded batch. `example_tokens` counts the
    tokens of the examples as given.
    """
    p = 0 if isinstance(items[0], PackedRow) else shared_prefix_length(items)
    if p < min_prefix:
        batch = collate(items, pad_id)
        batch["example_tokens"] = batch["attention_mask"].sum()
        return batch
    rows = rows_under([len(it.input_ids) - p for it in items], p, row_tokens)
    laid = shared_rows([it.input_ids for it in items], [[] for _ in items], p, rows, pad_id)
    labels = torch.full(laid.input_ids.shape, IGNORE, dtype=torch.long)
    for r, members in enumerate(rows):
        row_labels = [IGNORE] * p + [t for i in members for t in items[i].labels[p:]]
        labels[r, : len(row_labels)] = torch.tensor(row_labels)
    return {"input_ids": laid.input_ids, "labels": labels, "attention_mask": laid.attention_mask,
            "position_ids": laid.position_ids, "block_mask": laid.mask(),
            "example_tokens": torch.tensor(sum(len(it.input_ids) for it in items))}


# ---------------------------------------------------------------------------
# Preference pairs (DPO, reward models)
# ---------------------------------------------------------------------------


def collate_pairs(pairs: list, pad_id: int, pack_to: int | str | None = None, share_prompt: bool = False):
    """Chosen sequences then rejected ones, as one batch for a single forward pass.

    Default: right-padded rows [2B, T]. pack_to="shared" (dpo.share_prefix): shared_pairs_rows.

    With pack_to (padding-free): the 2B sequences are packed first-fit-decreasing into rows of at most
    pack_to tokens, positions restarting per sequence, attention stopped at sequence boundaries;
    `sequence_index` [R, W] maps every token to its sequence (-1 = padding) and `last_position` [2B, 2] gives
    each sequence's last token (row, column).

    With pack_to and share_prompt (reward models only): each pair is one item [prompt | chosen | rejected],
    its prompt run once, the two responses two branches (shared_rows with no common prefix): each response
    token sees the prompt and its own response, never the other one, so the hidden states at the two last
    tokens, and the rewards read there, are those of the separate sequences. Rows hold up to max(pack_to, the
    longest item) tokens. No labels: a rejected response's first token is not preceded by its prompt in the
    row, so next-token targets (DPO) need the other layouts.

    labels mark response tokens (IGNORE on prompt and padding) for DPO's log-probs; the reward model reads
    its score at each sequence's last real token.
    """
    margins = torch.tensor([p.margin if p.margin is not None else 0.0 for p in pairs], dtype=torch.float32)
    extra = {"margin": margins, "has_margin": any(p.margin is not None for p in pairs),
             "num_sequences": 2 * len(pairs),
             # Tokens of the 2B sequences, the same in every layout (a shared prompt counts twice).
             "sequence_tokens": sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)}
    if pack_to == "shared":
        return {**shared_pairs_rows(pairs, pad_id), **extra}
    if share_prompt:
        if pack_to is None:
            raise ValueError("share_prompt needs packed rows (pack_to)")
        return {**_pack_shared_prompt(pairs, pad_id, pack_to), **extra}
    prompts = [p.prompt_ids for p in pairs] * 2
    responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    if pack_to is None:
        return {**collate_sequences(prompts, responses, pad_id), **extra}
    sequences = [p + r for p, r in zip(prompts, responses)]
    labels = [[IGNORE] * len(p) + r for p, r in zip(prompts, responses)]
    return {**_pack_sequences(sequences, labels, pad_id, pack_to), **extra}


def collate_sequences(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> dict:
    """Right-padded rows [prompt | response], one a sequence, `labels` on the response tokens (IGNORE elsewhere):
    what alignment.core.modeling.sequence_logprobs sums per row."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    labels = torch.full((len(prompts), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        labels[i, len(p) : len(p) + len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(p) + len(r)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _pack_sequences(sequences: list[list[int]], labels: list[list[int]], pad_id: int, capacity: int) -> dict:
    rows = first_fit_decreasing([len(s) for s in sequences], capacity)
    laid = shared_rows(sequences, [[] for _ in sequences], 0, rows, pad_id)
    lab = torch.full(laid.input_ids.shape, IGNORE, dtype=torch.long)
    last = torch.zeros((len(sequences), 2), dtype=torch.long)
    for i, place in enumerate(laid.placements):
        n = len(sequences[i])
        # The first token of a segment is never a target: it would be predicted from the previous sequence.
        lab[place.row, place.stem_start : place.stem_start + n] = torch.tensor([IGNORE] + labels[i][1:])
        last[i] = torch.tensor([place.row, place.stem_end])
    return {"input_ids": laid.input_ids, "labels": lab, "attention_mask": laid.attention_mask,
            "position_ids": laid.position_ids, "block_mask": laid.mask(),
            "sequence_index": laid.owner.masked_fill(laid.owner == -2, -1), "last_position": last}


def _pack_shared_prompt(pairs: list, pad_id: int, capacity: int) -> dict:
    sizes = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
    rows = first_fit_decreasing(sizes, max(capacity, max(sizes)))
    laid = shared_rows([p.prompt_ids for p in pairs], [[p.chosen_ids, p.rejected_ids] for p in pairs], 0, rows,
                       pad_id)
    last = torch.zeros((2 * len(pairs), 2), dtype=torch.long)
    for i, (p, place) in enumerate(zip(pairs, laid.placements)):
        last[i] = torch.tensor([place.row, place.branch_starts[0] + len(p.chosen_ids) - 1])
        last[len(pairs) + i] = torch.tensor([place.row, place.branch_starts[1] + len(p.rejected_ids) - 1])
    return {"input_ids": laid.input_ids, "attention_mask": laid.attention_mask, "position_ids": laid.position_ids,
            "block_mask": laid.mask(), "last_position": last}


def shared_pairs_rows(pairs: list, pad_id: int, row_tokens: int = 512) -> dict:
    """Rows [common prefix | prompt i | chosen i | rejected i | prompt i+1 | ...] of at most `row_tokens`
    tokens (rows_under), for DPO's log-probs: shared_rows with two branches a pair.

    Targets are read where they are predicted (`pred_index` (row, position), as group_batch reads grouped
    rollouts): a response's first token from its prompt's last token. `target_owner` names each target's
    sequence (chosen i -> i, rejected i -> B + i).
    """
    B = len(pairs)
    stems = [x.prompt_ids for x in pairs]
    p = common_prefix(stems, min(len(s) for s in stems) - 1)  # each pair keeps a prompt token of its own
    branches = [[x.chosen_ids, x.rejected_ids] for x in pairs]
    sizes = [len(x.prompt_ids) - p + len(x.chosen_ids) + len(x.rejected_ids) for x in pairs]
    laid = shared_rows(stems, branches, p, rows_under(sizes, p, row_tokens), pad_id)
    preds, targets, which = laid.predictions(branches)
    owners = [i if b == 1 else B + i for i, b, _ in which]
    return {"input_ids": laid.input_ids, "attention_mask": laid.attention_mask, "position_ids": laid.position_ids,
            "block_mask": laid.mask(), "pred_index": torch.tensor(preds, dtype=torch.long).view(-1, 2),
            "targets": torch.tensor(targets, dtype=torch.long), "target_owner": torch.tensor(owners, dtype=torch.long)}


# ---------------------------------------------------------------------------
# Episodes (online RL): one row each, or groups with their prompt once
# ---------------------------------------------------------------------------


def episode_batch(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int,
                  device=None) -> dict[str, torch.Tensor]:
    """Episodes laid out for the training pass: right-padded rows [prompt | response] (positions from 0,
    as in generation), `labels` on response tokens (IGNORE elsewhere), `response_start` [B] (prompt lengths),
    `response_mask` [B, T] (T = longest response)."""
    rows = [p + r for p, r in zip(prompt_ids, response_ids)]
    width = max(len(r) for r in rows)
    T = max(1, max(len(r) for r in response_ids))
    B = len(rows)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    labels = torch.full((B, width), IGNORE, dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)
    response_mask = torch.zeros((B, T), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        labels[i, len(p) : len(p) + len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(p) + len(r)] = 1
        response_mask[i, : len(r)] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels,
             "response_start": torch.tensor([len(p) for p in prompt_ids]), "response_mask": response_mask}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def predicting_positions(response_start: torch.Tensor, T: int) -> torch.Tensor:
    """[B, T] position of the token whose output predicts response token t: start - 1 + t. A value V(s_t) and
    the log-prob of response token t are both read there (the last prompt token for t = 0)."""
    return response_start[:, None] - 1 + torch.arange(T, device=response_start.device)[None]


def group_batch(prompt_ids: list[list[int]], response_ids: list[list[int]], group_size: int, pad_id: int,
                device=None, row_tokens: int = 512) -> dict[str, torch.Tensor]:
    """Episodes laid out with each group's prompt once (a group = group_size adjacent episodes sharing a
    prompt) and the prompts' common prefix once a row: shared_rows with the group's responses as its branches,
    rows of at most `row_tokens` tokens. Each response token's hidden state is the one it has alone in
    `episode_batch`. Targets are read where they are predicted: response token t of episode e at `pred_index`
    (row, position; the prompt's last token for t = 0), written back to [B, T] at `target_slot`. Also
    `response_mask` [B, T], as `episode_batch` gives."""
    B = len(prompt_ids)
    if B % group_size:
        raise ValueError(f"{B} episodes do not split into groups of {group_size}")
    G = B // group_size
    for g in range(G):
        first = g * group_size
        if any(prompt_ids[first + k] != prompt_ids[first] for k in range(group_size)):
            raise ValueError(f"group {g}: its episodes do not share one prompt")
    prompts = [prompt_ids[g * group_size] for g in range(G)]
    n = common_prefix(prompts, min(len(p) for p in prompts) - 1)  # each group keeps a prompt token of its own
    branches = [response_ids[g * group_size : (g + 1) * group_size] for g in range(G)]
    sizes = [len(prompts[g]) - n + sum(len(r) for r in branches[g]) for g in range(G)]
    laid = shared_rows(prompts, branches, n, rows_under(sizes, n, row_tokens), pad_id)
    preds, targets, which = laid.predictions(branches)
    slots = [(g * group_size + b - 1, t) for g, b, t in which]
    T = max(1, max(len(r) for r in response_ids))
    response_mask = torch.zeros((B, T), dtype=torch.float32)
    for e, response in enumerate(response_ids):
        response_mask[e, : len(response)] = 1
    batch = {"input_ids": laid.input_ids, "attention_mask": laid.attention_mask, "position_ids": laid.position_ids,
             "block_mask": laid.mask(), "pred_index": torch.tensor(preds, dtype=torch.long).view(-1, 2),
             "targets": torch.tensor(targets, dtype=torch.long),
             "target_slot": torch.tensor(slots, dtype=torch.long).view(-1, 2), "response_mask": response_mask}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch
