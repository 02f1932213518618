"""How much the fp32 LM head on the scored rows (gpt2.py, under bf16/fp16) brings bf16 log-probs
closer to fp32: a random-init GPT-2 whose embedding is scaled so that logits reach the tens (as a
trained GPT-2's do), in bf16, against the same bf16-rounded weights run in fp32.

    python bench/head_precision.py
"""
import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dpo import response_logps  # noqa: E402
from gpt2 import GPT, GPTConfig  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n_layer", type=int, default=4, help="layers of the random model")
    parser.add_argument("--n_embd", type=int, default=128, help="width of the random model")
    parser.add_argument("--embedding_scale", type=float, default=40.0, help="multiplies wte, to reach large logits")
    args = parser.parse_args()
    model = GPT(GPTConfig(n_layer=args.n_layer, n_head=4, n_embd=args.n_embd, n_positions=128)).init_weights(seed=0)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(args.embedding_scale)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    fp32 = copy.deepcopy(bf16).float()  # the same rounded weights: only the compute differs
    ids = torch.randint(0, 50257, (8, 88), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(8, 88, dtype=torch.bool)
    mask[:, 64:] = True  # 64 prompt + 24 response tokens, the lm-human-preferences shape
    with torch.no_grad():
        reference = response_logps(fp32, ids, mask).double()
        fp32_head = response_logps(bf16, ids, mask).double()
        rounded_logits = bf16.lm_head(bf16(ids, return_hidden=True))[:, 63:87].float()  # bf16 logits, as before
        bf16_head = rounded_logits.log_softmax(-1).gather(-1, ids[:, 64:, None]).squeeze(-1).sum(-1).double()
        scale = fp32(ids, logits_at=torch.arange(8 * 88)).abs()
    print(f"|logit| mean {scale.mean():.1f}, max {scale.max():.1f}")
    print(f"mean |bf16 - fp32| summed log-prob of a 24-token response: bf16 head {(bf16_head - reference).abs().mean():.3f} "
          f"nats, fp32 head {(fp32_head - reference).abs().mean():.3f} nats")


if __name__ == "__main__":
    main()
