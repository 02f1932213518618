"""The trainer's DPO step on lm-human-preferences-shaped data: does packing a prompt's pairs pay?

    python bench/group_packing.py            # gpt2 (124M) shape, random init, CPU, fp32

Each query has a 64-token prompt, 4 responses of 24 tokens and 3 pairs (best vs each other). One
micro-batch of 9 pairs is timed three ways with train.step.train_step (policy forward + backward,
reference forward, AdamW), one process, no FSDP:
  - group_order + prefix sharing: 3 prompts x 3 pairs -> 3 packed rows of 64 + 4 x 24 = 160;
  - random order + prefix sharing: 9 pairs of 9 prompts -> 9 rows of 64 + 24 + 24 = 112;
  - no prefix sharing: 18 rows of 64 + 24 = 88.
"""
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.batches import collate, pairs_of  # noqa: E402
from data.formats import PreferenceGroup  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.distributed import build_training_state, end_process_group  # noqa: E402
from train.step import train_step  # noqa: E402


def main():
    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device("cpu")
    cfg = TrainConfig(init_from="scratch", n_layer=12, n_head=12, n_embd=768, n_positions=1024, precision="fp32",
                      sharding="none", device="cpu", micro_batch_size=9, batch_size=9)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    state = build_training_state(cfg, 0, device, mesh=None)

    gen = torch.Generator().manual_seed(0)
    tokens = lambda n: torch.randint(0, 50256, (n,), generator=gen).tolist()  # noqa: E731
    groups = [PreferenceGroup(tokens(64), [tokens(24) for _ in range(4)], [(0, 1), (0, 2), (0, 3)], f"query {i}")
              for i in range(9)]
    pairs = pairs_of(groups)
    grouped = pairs[:9]  # 3 prompts x 3 pairs: what group_order gives
    scattered = pairs[::3]  # 9 pairs of 9 prompts: what a random pair order mostly gives
    no_sharing = TrainConfig(**{**vars(cfg), "prefix_sharing": False})
    for name, batch_pairs, run_cfg in (("group_order + prefix sharing", grouped, cfg),
                                       ("random order + prefix sharing", scattered, cfg),
                                       ("no prefix sharing", scattered, no_sharing)):
        batch = collate(batch_pairs, share_prompt=run_cfg.prefix_sharing).to(device)
        step_s = []
        for _ in range(6):
            start = time.perf_counter()
            train_step(state.policy, state.reference, state.optimizer, [batch], run_cfg, 1e-5, state.scaler)
            step_s.append(time.perf_counter() - start)
        print(f"{name}: rows x positions {tuple(batch.input_ids.shape)}, step median "
              f"{statistics.median(step_s[1:]) * 1000:.0f} ms over 5 steps after 1 warm-up "
              f"(9 pairs = {9 * 2 * 88} tokens as if run separately)", flush=True)
    end_process_group()


if __name__ == "__main__":
    main()
