"""How precisely the LM head on the scored rows computes bf16 log-probs, for each way of computing it:
a random-init GPT-2 whose embedding is scaled so that logits reach the tens (as a trained GPT-2's
do), run in bf16; the scored rows' summed log-prob of a 24-token response from

    bf16 logits        the head in bf16, logits rounded to bf16 before the log-softmax (before the
                       scored rows' head ran in fp32)
    fp32               the trainer's lm_head_precision=fp32: an fp32 GEMM of the bf16 values
    tf32               an fp32 GEMM with TF32 inputs (10-bit mantissa; on CPU emulated by rounding)
    bf16_in_fp32_out   the trainer's lm_head_precision=bf16_in_fp32_out (on CUDA torch.mm's
                       out_dtype; elsewhere the fp32 GEMM, the same products)

each against the same hidden states through an fp64 head ("head error"), and end to end against
the fp32 model on the same bf16-rounded weights ("vs fp32 model": the bf16 body's own error, which
no head choice can remove).

    python bench/head_precision.py                 # CPU: tf32 emulated, bf16_in_fp32_out = fp32's kernel
    python bench/head_precision.py --device cuda   # the real kernels
"""
import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gpt2 import GPT, GPTConfig, scored_logits  # noqa: E402


def round_to_tf32(t):
    """fp32 values with their mantissa rounded to TF32's 10 bits (round to nearest even)."""
    bits = t.float().contiguous().view(torch.int32)
    rounded = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return rounded.view(torch.float32)


def summed_logps(logits, targets, n_pairs, response_len):
    """(N, V) logits of the scored rows -> (n_pairs,) summed log-probs, in fp64."""
    token_logps = logits.double().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    return token_logps.view(n_pairs, response_len).sum(-1)


def measure(n_layer=4, n_embd=128, embedding_scale=40.0, device="cpu", n_rows=8, prompt_len=64, response_len=24):
    """{head: {"head_error_nats": ..., "vs_fp32_model_nats": ...}} and the logits' scale."""
    device = torch.device(device)
    model = GPT(GPTConfig(n_layer=n_layer, n_head=4, n_embd=n_embd, n_positions=128)).init_weights(seed=0)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(embedding_scale)
    bf16 = copy.deepcopy(model).to(device=device, dtype=torch.bfloat16)
    fp32 = copy.deepcopy(bf16).float()  # the same rounded weights: only the compute differs
    length = prompt_len + response_len
    ids = torch.randint(0, 50257, (n_rows, length), generator=torch.Generator().manual_seed(0)).to(device)
    rows = torch.arange(n_rows, device=device)[:, None] * length
    predictors = (rows + torch.arange(prompt_len - 1, length - 1, device=device)).flatten()  # (N,)
    targets = ids[:, prompt_len:].flatten()  # (N,)
    with torch.no_grad():
        hidden = bf16.transformer.ln_f(last_hidden(bf16, ids, predictors))  # (N, C) bf16
        weight = bf16.lm_head.weight  # (V, C) bf16
        exact = summed_logps(hidden.double() @ weight.double().t(), targets, n_rows, response_len)
        fp32_model = summed_logps(fp32(ids, logits_at=predictors), targets, n_rows, response_len)
        heads = {"bf16 logits": (hidden @ weight.t()).float(),
                 "fp32": scored_logits(hidden, weight, "fp32"),
                 "tf32": round_to_tf32(hidden) @ round_to_tf32(weight).t(),
                 "bf16_in_fp32_out": scored_logits(hidden, weight, "bf16_in_fp32_out")}
        results = {}
        for name, logits in heads.items():
            logps = summed_logps(logits, targets, n_rows, response_len)
            results[name] = {"head_error_nats": (logps - exact).abs().mean().item(),
                             "vs_fp32_model_nats": (logps - fp32_model).abs().mean().item()}
        logit_scale = fp32(ids, logits_at=predictors).abs()
    return {"device": device.type, "logit_abs_mean": logit_scale.mean().item(), "logit_abs_max": logit_scale.max().item(),
            "response_tokens": response_len, "heads": results}


def last_hidden(model, ids, keep):
    """The last block's output at the `keep` positions (N, C), before ln_f: the body as the trainer runs it."""
    B, T = ids.shape
    x = model.transformer.wte(ids) + model.transformer.wpe(torch.arange(T, device=ids.device))
    last = len(model.transformer.h) - 1
    for i, block in enumerate(model.transformer.h):
        x = block(x, keep=keep if i == last else None)
    return x


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--n_layer", type=int, default=4, help="layers of the random model")
    parser.add_argument("--n_embd", type=int, default=128, help="width of the random model")
    parser.add_argument("--embedding_scale", type=float, default=40.0, help="multiplies wte, to reach large logits")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the heads run")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    results = measure(args.n_layer, args.n_embd, args.embedding_scale, args.device)
    print(f"|logit| mean {results['logit_abs_mean']:.1f}, max {results['logit_abs_max']:.1f}; mean |error| of a "
          f"{results['response_tokens']}-token response's summed log-prob, nats:")
    for name, errors in results["heads"].items():
        print(f"  {name:<18} head vs fp64 {errors['head_error_nats']:.2e}   vs the fp32 model {errors['vs_fp32_model_nats']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
