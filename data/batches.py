"""Preference groups to padded token batches: truncate, split, order, shard across ranks, collate.

Everything here is a pure function of its arguments and seeds: no global RNG state is read or
touched, so every rank and every rerun sees the same split, the same order and the same batches.
"""
import hashlib
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from data.formats import PreferenceGroup, group_by_prompt
from data.tokenizer import EOT_ID
from errors import ConfigError


# ----------------------------------------------------------------------------- the rules on sizes
# Each is checked here, where it matters, and by the trainer's config check (train_config.validate)
# before anything runs: one rule, one message.

def check_lengths(max_prompt_len: int, max_len: int):
    if not 1 <= max_prompt_len < max_len:
        raise ConfigError(f"max_prompt_len ({max_prompt_len}) must be >= 1 and < max_len ({max_len}) so every "
                          "response keeps at least one token")


def check_eval_fraction(eval_fraction: float):
    if not 0 <= eval_fraction < 1:
        raise ConfigError(f"eval_fraction must be in [0, 1), got {eval_fraction}")


def check_batch_sizes(batch_size: int, micro_batch_size: int, world_size: int, name="batch_size"):
    """Each rank takes batch_size / world_size pairs of a global batch, in micro-batches (name: the
    option that holds batch_size; PPO's mini_batch_size)."""
    if batch_size % (micro_batch_size * world_size):
        raise ConfigError(f"{name} ({batch_size}) must be a multiple of micro_batch_size ({micro_batch_size}) "
                          f"x world size ({world_size})")


def truncate_groups(groups: list[PreferenceGroup], max_prompt_len: int, max_len: int):
    """Fit every prompt + response into max_len tokens. Returns (groups, dropped_pairs).

    The prompt keeps its LAST max_prompt_len tokens: in a dialogue the most recent turns matter most
    to the answer, and the prompt's end is where the response attaches. Each response then keeps its
    first max_len - len(prompt) tokens, its end-of-text token counted: a response cut here loses it,
    since it did not end. A pair whose response ends up empty (nothing left to score) is dropped.
    Prompts that truncation makes identical are merged (group_by_prompt), so that a split by group
    stays a split by prompt; pairs that become identical or duplicates are dropped too. All are
    counted in dropped_pairs; groups left with no pairs are removed.
    """
    check_lengths(max_prompt_len, max_len)
    truncated, dropped_empty = [], 0
    for group in groups:
        prompt = group.prompt[-max_prompt_len:]
        responses = [response[:max_len - len(prompt)] for response in group.responses]
        pairs = [(c, r) for c, r in group.pairs if responses[c] and responses[r]]
        dropped_empty += len(group.pairs) - len(pairs)
        if pairs:
            truncated.append(replace(group, prompt=prompt, responses=responses, pairs=pairs))
    merged, duplicates, identical = group_by_prompt(truncated)
    return merged, dropped_empty + len(duplicates) + identical


def data_fingerprint(groups: list[PreferenceGroup]) -> str:
    """sha256 of every group's token ids (prompt, responses, pairs), in order: the data a run trains
    and evaluates on, whatever file, format or loader settings it came from."""
    digest = hashlib.sha256()
    for group in groups:
        digest.update(np.array([len(group.prompt), len(group.responses), len(group.pairs)], np.int64).tobytes())
        digest.update(np.array(group.prompt, np.int64).tobytes())
        for response in group.responses:
            digest.update(np.array([len(response)] + response, np.int64).tobytes())
        digest.update(np.array(group.pairs, np.int64).tobytes())
    return digest.hexdigest()


def split_groups(groups: list[PreferenceGroup], eval_fraction: float, seed: int):
    """Split into (train_groups, eval_groups) by group, so a prompt never lands in both (the loaders
    and truncate_groups give each prompt one group).

    A seeded permutation picks round(eval_fraction * n) eval groups, at least 1 when eval_fraction > 0
    and there are >= 2 groups, and always leaving >= 1 train group. Both keep the input order.
    """
    check_eval_fraction(eval_fraction)
    n_groups = len(groups)
    n_eval = round(eval_fraction * n_groups)
    if eval_fraction > 0 and n_groups >= 2:
        n_eval = min(max(n_eval, 1), n_groups - 1)
    permutation = np.random.default_rng(seed).permutation(n_groups)
    eval_indices = set(permutation[:n_eval].tolist())
    train_groups = [g for i, g in enumerate(groups) if i not in eval_indices]
    eval_groups = [g for i, g in enumerate(groups) if i in eval_indices]
    return train_groups, eval_groups


@dataclass
class Pair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    group_index: int  # index into the groups list this pair came from
    chosen_index: int  # the responses' indices within their group: pairs of one group that name the
    rejected_index: int  # same response share its slot when packed (collate_pairs_shared_prompt)


def pairs_of(groups: list[PreferenceGroup]) -> list[Pair]:
    """Flatten groups into pairs (group order, then pair order), keeping each pair's group index."""
    return [
        Pair(group.prompt, group.responses[chosen], group.responses[rejected], group_index, chosen, rejected)
        for group_index, group in enumerate(groups)
        for chosen, rejected in group.pairs
    ]


def sft_pairs(train_pairs: list[Pair]) -> list[Pair]:
    """Each distinct (prompt, response) of the training pairs once, as a Pair whose "chosen" is the
    response (SFT reads only the chosen rows)."""
    seen, pairs = set(), []
    for pair in train_pairs:
        for index, response in ((pair.chosen_index, pair.chosen), (pair.rejected_index, pair.rejected)):
            if (pair.group_index, index) not in seen:
                seen.add((pair.group_index, index))
                pairs.append(Pair(pair.prompt, response, response, pair.group_index, index, index))
    return pairs


def epoch_order(n_items: int, seed: int, epoch: int) -> list[int]:
    """A permutation of range(n_items) that depends only on (seed, epoch): the same on every rank and run."""
    return np.random.default_rng([seed, epoch]).permutation(n_items).tolist()


def grouped_epoch_order(pairs: list[Pair], seed: int, epoch: int) -> list[int]:
    """Like epoch_order, but the groups are shuffled and each group's pairs stay together, so the
    pairs of one prompt tend to land in one micro-batch and share one packed row."""
    pairs_by_group = {}
    for index, pair in enumerate(pairs):
        pairs_by_group.setdefault(pair.group_index, []).append(index)
    groups = list(pairs_by_group)
    return [index for g in np.random.default_rng([seed, epoch]).permutation(len(groups)).tolist()
            for index in pairs_by_group[groups[g]]]


def step_batch(step: int, n_items: int, batch_size: int, order_of_epoch) -> tuple[int, list[int]]:
    """(epoch, the global batch of optimizer step `step`): epoch order_of_epoch(epoch) (indices into
    n_items) cut into batches of batch_size, the remainder dropped; a pure function of the step."""
    epoch, position = divmod(step, n_items // batch_size)
    return epoch, order_of_epoch(epoch)[position * batch_size:(position + 1) * batch_size]


def rank_slice(items: list, rank: int, world_size: int) -> list:
    """The contiguous part of one global batch that `rank` takes; the ranks' parts partition it."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank_slice: rank {rank} is outside 0..{world_size - 1} (world_size={world_size})")
    if len(items) % world_size != 0:  # the trainer's check_batch_sizes has refused such a config already
        raise ValueError(f"rank_slice: a global batch of {len(items)} cannot be split evenly over {world_size} "
                         f"ranks; make the global batch size a multiple of the world size")
    per_rank = len(items) // world_size
    return items[rank * per_rank:(rank + 1) * per_rank]


# ----------------------------------------------------------------------------- batches: two layouts

class _Tensors:
    def to(self, device):
        """The same batch with every tensor on `device` (other fields as they are). To a GPU from pinned
        memory without waiting: a copy from pageable memory would make the host wait for it, each step."""
        device = torch.device(device)

        def moved(t):
            if not isinstance(t, torch.Tensor):
                return t
            return (t.pin_memory() if device.type == "cuda" and not t.is_cuda else t).to(device, non_blocking=True)
        return type(self)(**{f.name: moved(getattr(self, f.name)) for f in fields(self)})


@dataclass
class PairBatch(_Tensors):
    """B pairs as 2B right-padded rows: 0..B-1 prompt + chosen, B..2B-1 prompt + rejected.
    The scored tokens are given as index tensors built here, on the host, so that the step itself
    has no data-dependent shapes (boolean-mask indexing would make the GPU wait for the host)."""
    input_ids: torch.Tensor  # (2B, T) long
    attention_mask: torch.Tensor  # (2B, T) bool, True on real tokens
    response_mask: torch.Tensor  # (2B, T) bool, True on the response tokens that are scored
    predictor_index: torch.Tensor  # (N,) flat index into 2B*T of the position whose logits predict each target
    target_ids: torch.Tensor  # (N,) every response token, row after row (the chosen rows' first)
    target_row: torch.Tensor  # (N,) in 0..2B-1
    n_chosen_tokens: int  # the first n_chosen_tokens targets are the chosen rows' (SFT scores only those)


@dataclass
class PackedBatch(_Tensors):
    """B pairs packed by prompt: one row per prompt, [prompt | response | response | ...], each
    distinct response ("slot") once; see collate_pairs_shared_prompt."""
    input_ids: torch.Tensor  # (G, L) long, right-padded
    position_ids: torch.Tensor  # (G, L) long: each response sits at the positions it would have alone
    attention_mask: torch.Tensor  # (G, L, L) bool: the prompt and its own response, causally
    target_ids: torch.Tensor  # (N,) every slot's tokens, slot after slot
    predictor_index: torch.Tensor  # (N,) flat index into G*L of the position whose logits predict each target
    target_slot: torch.Tensor  # (N,) in 0..S-1
    slot_lengths: torch.Tensor  # (S,)
    chosen_slot: torch.Tensor  # (B,)
    rejected_slot: torch.Tensor  # (B,)


def collate(pairs: list[Pair], share_prompt: bool) -> PairBatch | PackedBatch:
    """The tensors of one forward over pairs: packed rows that run each prompt once (DPO's default),
    or separate chosen and rejected rows (prefix_sharing off, and SFT, which reads only the chosen)."""
    return collate_pairs_shared_prompt(pairs) if share_prompt else collate_pairs(pairs)


def collate_pairs(pairs: list[Pair], pad_id: int = EOT_ID) -> PairBatch:
    """Pairs to the tensors of ONE forward pass over chosen and rejected together.

    Rows 0..B-1 are prompt+chosen and rows B..2B-1 prompt+rejected, right-padded with pad_id to the
    longest row T. attention_mask is True on real tokens. response_mask is True at positions that
    hold a response token: the tokens whose log-probs DPO sums (position t is predicted from t-1,
    which is why a prompt must be non-empty).
    """
    if not pairs:
        raise ValueError("collate_pairs: got no pairs; a batch needs at least one")
    if not all(p.prompt for p in pairs):
        raise ValueError("collate_pairs: a pair has an empty prompt; the first response token needs a prompt "
                         "token to be predicted from")
    rows = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    T = max(len(prompt) + len(response) for prompt, response in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (2B, T)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.bool)  # (2B, T)
    response_mask = torch.zeros((len(rows), T), dtype=torch.bool)  # (2B, T)
    predictors, targets, target_rows = [], [], []
    for row, (prompt, response) in enumerate(rows):
        n_prompt, n_total = len(prompt), len(prompt) + len(response)
        input_ids[row, :n_total] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[row, :n_total] = True
        response_mask[row, n_prompt:n_total] = True
        predictors += range(row * T + n_prompt - 1, row * T + n_total - 1)  # position t - 1 predicts token t
        targets += response
        target_rows += [row] * len(response)
    return PairBatch(input_ids, attention_mask, response_mask, torch.tensor(predictors, dtype=torch.long),
                     torch.tensor(targets, dtype=torch.long), torch.tensor(target_rows, dtype=torch.long),
                     n_chosen_tokens=sum(len(p.chosen) for p in pairs))


def collate_pairs_shared_prompt(pairs: list[Pair], pad_id: int = EOT_ID) -> PackedBatch:
    """Pairs to packed rows that run each prompt once: one row per group (prompt) in the batch,
    [prompt | response | response | ...], holding each response that the batch's pairs of that
    group name, once.

    A lone pair is [prompt | chosen | rejected]: 64 + 24 + 24 = 112 positions instead of the 176 of
    two separate rows; the three pairs of an lm-human-preferences query (4 responses) are 64 + 4 x 24
    = 160 instead of 528. The attention mask lets every token see what it would see alone after the
    prompt: the prompt and its own response, causally, never a sibling response; positions restart
    after the prompt for each response, so each response sits at the positions it would have alone.

    A response's slot is keyed by (group_index, response index): two pairs that give one key
    different tokens (hand-built pairs with wrong indices) would share a slot and get wrong
    log-probs, so that is refused; so is a group whose pairs disagree on the prompt.
    Each response's first token is predicted by the prompt's last position.
    """
    if not pairs:
        raise ValueError("collate_pairs_shared_prompt: got no pairs; a batch needs at least one")
    rows, slot_of, slot_tokens = {}, {}, {}  # group -> (prompt, [(slot, tokens)]); response key -> slot, tokens
    for pair in pairs:
        if not pair.prompt:
            raise ValueError("collate_pairs_shared_prompt: a pair has an empty prompt; the first response token "
                             "needs a prompt token to be predicted from")
        prompt, responses = rows.setdefault(pair.group_index, (pair.prompt, []))
        if pair.prompt != prompt:
            raise ValueError(f"collate_pairs_shared_prompt: two pairs of group {pair.group_index} have different "
                             "prompts; pairs of one group must share their prompt")
        for index, tokens in ((pair.chosen_index, pair.chosen), (pair.rejected_index, pair.rejected)):
            key = (pair.group_index, index)
            if key not in slot_of:
                slot_of[key] = len(slot_of)  # slots are numbered in pair order, laid out row by row
                slot_tokens[key] = tokens
                responses.append((slot_of[key], tokens))
            elif slot_tokens[key] != tokens:
                raise ValueError(f"collate_pairs_shared_prompt: two pairs of group {pair.group_index} name response "
                                 f"{index} but hold different tokens; give each distinct response its own index")
    G = len(rows)
    L = max(len(prompt) + sum(len(r) for _, r in responses) for prompt, responses in rows.values())
    input_ids = torch.full((G, L), pad_id, dtype=torch.long)
    position_ids = torch.zeros((G, L), dtype=torch.long)
    segment = torch.full((G, L), -1, dtype=torch.long)  # -1 pad, 0 prompt, s + 1 for slot s
    targets, predictors, target_slots, slot_lengths = [], [], [], [0] * len(slot_of)
    for g, (prompt, responses) in enumerate(rows.values()):
        P, start = len(prompt), len(prompt)
        input_ids[g, :P], position_ids[g, :P], segment[g, :P] = torch.tensor(prompt), torch.arange(P), 0
        for slot, tokens in responses:
            R, end = len(tokens), start + len(tokens)
            input_ids[g, start:end] = torch.tensor(tokens)
            position_ids[g, start:end] = torch.arange(P, P + R)
            segment[g, start:end] = slot + 1
            targets += tokens
            predictors += [g * L + P - 1] + [g * L + start + i for i in range(R - 1)]
            target_slots += [slot] * R
            slot_lengths[slot] = R
            start = end
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    query, key = segment[:, :, None], segment[:, None, :]
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=causal & ((key == 0) | (key == query)),  # (G, L, L): the prompt, and oneself
        target_ids=torch.tensor(targets, dtype=torch.long),
        predictor_index=torch.tensor(predictors, dtype=torch.long),
        target_slot=torch.tensor(target_slots, dtype=torch.long),
        slot_lengths=torch.tensor(slot_lengths),
        chosen_slot=torch.tensor([slot_of[(p.group_index, p.chosen_index)] for p in pairs]),
        rejected_slot=torch.tensor([slot_of[(p.group_index, p.rejected_index)] for p in pairs]),
    )


def right_pad(rows: list[list[int]], pad_id: int = EOT_ID):
    """Token rows of different lengths as one (B, T) long tensor, padded on the right with pad_id."""
    T = max(len(r) for r in rows)
    return torch.tensor([r + [pad_id] * (T - len(r)) for r in rows], dtype=torch.long)


def left_pad(prompts: list[list[int]], pad_id: int = EOT_ID):
    """Prompts of different lengths for generation: (input_ids, attention_mask), both (B, T), padded on
    the left so that every prompt ends in the last column, where generation continues."""
    T = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (T - len(p)) + p for p in prompts], dtype=torch.long)
    attention_mask = torch.tensor([[False] * (T - len(p)) + [True] * len(p) for p in prompts])
    return input_ids, attention_mask
