"""CUDA checks, for the lent GPU machine (bench/gpu_check.py runs them in its stages; skipped without CUDA).

- bf16 logits and log-probs of our model against transformers on CUDA, the tolerance measured
  (both against fp32 on the same weights) rather than assumed;
- SDPA's q/k/v gradients on the packed prefix-sharing call at key lengths 64 and 192, for the
  backend the model uses (cuDNN switched off: pytorch issue 196678) against the math kernel in fp32;
- short FSDP bf16 training runs of the trainer on CUDA: the demo, and random-init gpt2 at 64 + 24
  tokens with compile off and on.
Measured values go to $GPU_CHECK_OUT/<test>.json when that is set (bench/gpu_check.py sets it).
"""
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def record(name, values):
    out_dir = os.environ.get("GPU_CHECK_OUT")
    if out_dir:
        values = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, **values}
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump(values, f, indent=2)


def test_bf16_parity_of_logits_and_logps_with_transformers_on_cuda(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from dpo import response_logps
    from gpt2 import GPT
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=12, n_head=12, n_embd=768)).eval()  # gpt2's shape, random init
    hf.save_pretrained(tmp_path / "gpt2-random")
    ids = torch.randint(0, 50257, (8, 88), device="cuda")
    mask = torch.zeros(8, 88, dtype=torch.bool, device="cuda")
    mask[:, 64:] = True
    results = {}
    with torch.no_grad():
        reference = hf.cuda().float()(ids).logits.double()  # fp32 transformers: the reference
        hf_bf16 = hf.to(torch.bfloat16)(ids).logits.double()
        ours = GPT.from_pretrained(str(tmp_path / "gpt2-random"), dtype=torch.bfloat16).cuda().eval()
        ours_bf16 = ours(ids).double()
        results["logits_max_abs_error_vs_fp32"] = {"ours_bf16": (ours_bf16 - reference).abs().max().item(),
                                                   "transformers_bf16": (hf_bf16 - reference).abs().max().item()}
        hf_logps = reference[:, 63:87].log_softmax(-1).gather(-1, ids[:, 64:, None]).squeeze(-1).sum(-1)
        ours_logps = response_logps(ours, ids, mask).double()  # scored rows in fp32 (gpt2.py)
        results["response_logp_mean_abs_error_vs_fp32_nats"] = (ours_logps - hf_logps).abs().mean().item()
    record("bf16_parity", results)
    errors = results["logits_max_abs_error_vs_fp32"]
    assert errors["ours_bf16"] <= 2 * errors["transformers_bf16"] + 1e-3, results  # no worse than bf16 itself
    assert results["response_logp_mean_abs_error_vs_fp32_nats"] < 0.5, results


@pytest.mark.parametrize("precision", ["bf16_in_fp32_out", "fp32"])
def test_large_logits_head_precision_on_cuda(precision):
    """bench/head_precision.py on CUDA, logits in the tens: the real bf16-in fp32-out kernel and the
    fp32 GEMM against an fp64 head on the same hidden states, and bf16-rounded logits for scale."""
    from bench.head_precision import measure
    results = measure(device="cuda")
    record(f"large_logits_head_{precision}", results)
    errors = {name: r["head_error_nats"] for name, r in results["heads"].items()}
    assert errors[precision] < 1e-3, errors


def test_bf16_in_fp32_out_head_parity_and_gradients_on_cuda():
    """The trainer's default head on CUDA (torch.mm's out_dtype) and its hand-written backward against
    autograd through the fp32 GEMM on the same bf16 values, at gpt2-xl's width."""
    from gpt2 import scored_logits
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(3072, 1600, generator=gen, device="cuda").bfloat16()
    weight = (torch.randn(50257, 1600, generator=gen, device="cuda") * 0.02).bfloat16()
    upstream = torch.randn(3072, 50257, generator=gen, device="cuda") / 3072
    out = {}
    for precision in ("fp32", "bf16_in_fp32_out"):
        xg, wg = x.clone().requires_grad_(), weight.clone().requires_grad_()
        logits = scored_logits(xg, wg, precision)
        (logits * upstream).sum().backward()
        out[precision] = (logits.detach(), xg.grad.float(), wg.grad.float())
    errors = {name: ((a - b).abs().max() / b.abs().max()).item()
              for name, a, b in zip(("logits", "grad_x", "grad_weight"), out["bf16_in_fp32_out"], out["fp32"])}
    record("head_bf16_in_fp32_out_vs_fp32", errors)
    assert out["bf16_in_fp32_out"][0].dtype == torch.float32
    assert errors["logits"] < 1e-4 and errors["grad_x"] < 2e-2 and errors["grad_weight"] < 2e-2, errors


def test_trainer_bf16_path_against_its_fp32_path_on_the_same_weights():
    """The trainer's own models (distributed.build_training_state: FSDP over one NCCL rank, bf16 mixed
    precision) against its fp32 models from the same scratch weights: the summed response log-probs
    of one packed batch at gpt2's shape (random weights: logits near 0; the large-logits case is
    test_large_logits_head_precision_on_cuda's)."""
    import torch.distributed as dist

    from train import distributed
    from data.batches import Pair, collate
    from dpo import concatenated_logps
    from train.config import TrainConfig
    gen = torch.Generator().manual_seed(0)
    pairs = [Pair(torch.randint(0, 50256, (64,), generator=gen).tolist(),
                  torch.randint(0, 50256, (24,), generator=gen).tolist(),
                  torch.randint(0, 50256, (24,), generator=gen).tolist(), i, 0, 1) for i in range(8)]
    batch = collate(pairs, share_prompt=True).to("cuda")
    cfg = TrainConfig(init_from="scratch", n_layer=12, n_head=12, n_embd=768, n_positions=1024, device="cuda",
                      max_prompt_len=64, max_len=88)
    _, _, device, mesh = distributed.setup_distributed(cfg)
    try:
        logps = {}
        for precision in ("fp32", "bf16"):
            state = distributed.build_training_state(dataclasses.replace(cfg, precision=precision), 0, device, mesh)
            with torch.no_grad():
                result = concatenated_logps(state.policy, batch)
            logps[precision] = torch.stack([result.chosen, result.rejected]).double()
            del state
    finally:
        dist.destroy_process_group()
    error = (logps["bf16"] - logps["fp32"]).abs()
    record("trainer_bf16_path_vs_fp32_path", {"mean_abs_error_nats": error.mean().item(),
                                              "max_abs_error_nats": error.max().item(),
                                              "fp32_logps_mean": logps["fp32"].mean().item()})
    assert error.mean() < 0.5, error


def packed_attention_inputs(key_length, dtype):
    """q, k, v and the prefix-sharing mask of one packed row: a prompt, then two responses that see
    the prompt and themselves only. Large scores make some rows' logsumexp very negative, the
    condition of the cuDNN regression."""
    gen = torch.Generator(device="cuda").manual_seed(key_length)
    q, k, v = (torch.randn(2, 12, key_length, 64, generator=gen, device="cuda") * 4 for _ in range(3))
    prompt, response = key_length // 2, key_length // 4
    segment = torch.cat([torch.zeros(prompt), torch.ones(response), torch.full((key_length - prompt - response,), 2)])
    segment = segment.cuda()
    causal = torch.ones(key_length, key_length, dtype=torch.bool, device="cuda").tril()
    mask = causal & ((segment[None, :] == 0) | (segment[None, :] == segment[:, None]))
    return [t.to(dtype).requires_grad_() for t in (q, k, v)], mask


def attention_grads(q, k, v, mask, backend):
    from torch.nn.attention import sdpa_kernel
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    with sdpa_kernel([backend]):
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask).float().square().sum().backward()
    return [t.grad.float() for t in (q, k, v)]


@pytest.mark.parametrize("key_length", [64, 192])
def test_packed_attention_gradients_across_backends(key_length):
    from torch.nn.attention import SDPBackend

    import gpt2
    gpt2.avoid_cudnn_attention()
    (q, k, v), mask = packed_attention_inputs(key_length, torch.bfloat16)
    expected = attention_grads(*(t.float() for t in (q, k, v)), mask, SDPBackend.MATH)  # fp32 math kernel
    results = {}
    for backend in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            grads = attention_grads(q, k, v, mask, backend)
        except RuntimeError as err:  # a backend that does not take this call on this GPU
            results[backend.name] = f"unavailable: {str(err)[:200]}"
            continue
        results[backend.name] = {name: {"finite": bool(torch.isfinite(g).all()),
                                        "max_abs_error": (g - e).abs().max().item(), "max_abs": e.abs().max().item()}
                                 for name, g, e in zip("qkv", grads, expected)}
    record(f"attention_backends_key_length_{key_length}", results)
    used = results["EFFICIENT_ATTENTION"]  # what SDPA picks for a masked call once cuDNN is off
    assert all(g["finite"] and g["max_abs_error"] <= 0.05 * g["max_abs"] for g in used.values()), results


# --reward=: the GPU image has no vaderSentiment; --log_every=1: the first logged loss is step 1's, at the
# starting weights (the SFT model, which is also the reference).
TINY_DEMO = ["--config_file=config/demo.yaml", "--device=cuda", "--precision=bf16", "--max_steps=12",
             "--ckpt_every=0", "--eval_every=0", "--reward=", "--log_every=1"]
GPT2_RANDOM = ["--init_from=scratch", "--n_layer=12", "--n_head=12", "--n_embd=768", "--n_positions=1024",
               "--dataset=jsonl", "--max_prompt_len=64", "--max_len=88", "--device=cuda", "--precision=bf16",
               "--batch_size=32", "--micro_batch_size=8", "--max_steps=6", "--log_every=1", "--eval_every=0",
               "--n_samples=2", "--kl_samples=4", "--lr=1e-4"]


def pairs_at_64_plus_24(path):
    """256 pairs of a 64-token prompt (each its own) and 23-token responses (+ <|endoftext|>: 24)."""
    with open(path, "w") as f:
        for i in range(256):
            f.write(json.dumps({"prompt": " the" * 64 + f" and record {i} says", "chosen": " good" * 23,
                                "rejected": " bad" * 23}) + "\n")
    return path


@pytest.mark.parametrize("name, args", [("demo", TINY_DEMO), ("gpt2_random", GPT2_RANDOM),
                                        ("gpt2_random_compiled", [*GPT2_RANDOM, "--compile=true"])])
def test_fsdp_bf16_training_runs_on_cuda(tmp_path, name, args):
    if "--dataset=jsonl" in args:
        args = [*args, f"--data_path={pairs_at_64_plus_24(tmp_path / 'pairs.jsonl')}"]
    result = subprocess.run([sys.executable, "fsdp_train.py", *args, f"--out_dir={tmp_path / 'run'}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if "loss" in line]
    record(f"train_{name}", {"command": " ".join(["python fsdp_train.py", *args]), "losses": losses,
                             "tokens_per_s": [line["tokens_per_s"] for line in lines if "tokens_per_s" in line],
                             "log_tail": result.stdout[-2000:]})
    assert all(math.isfinite(x) for x in losses), losses
    first = next(line for line in lines if "loss" in line)
    assert first["step"] == 1, first  # the loss of the first step, computed before any update
    assert abs(first["loss"] - 0.6931) < 0.01  # policy == reference at step 1 (bf16 reference: near log 2)
    assert losses[-1] < losses[0]
