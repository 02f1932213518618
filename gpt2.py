"""GPT-2 in one file: the model, Hugging Face weight loading and export, and KV-cache sampling.

The module names mirror transformers' GPT2LMHeadModel (transformer.h.N.attn.c_attn, ...) so that
a checkpoint maps onto it key by key; the only rewrite is the transpose of HF's Conv1D weights.
Parallelism (FSDP, activation checkpointing) is applied to this model from outside, in
train/distributed.py (parallelize); nothing here knows about it. This file imports only torch, safetensors and
huggingface_hub.
"""
import json
import math
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file


class WeightsError(ValueError):
    """Weights or config.json that cannot be loaded (missing, corrupt, another model); the message
    names the file. Its own type, so a trainer can tell bad input from a bug."""


EOT_ID = 50256  # <|endoftext|>, GPT-2's end-of-text token
# The LM head is tied to the token embedding: one parameter under two names. Files store it once, as
# TIED_TO (transformers' files do too); every state dict in memory carries both names.
TIED_HEAD, TIED_TO = "lm_head.weight", "transformer.wte.weight"
SCORE_HEAD = "score.weight"  # the scalar head of GPT(score_head=True), as GPT2ForSequenceClassification names it


# ----------------------------------------------------------------------------- config

@dataclass
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50257
    n_positions: int = 1024
    n_inner: int | None = None           # MLP hidden width; None means 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"  # GPT-2's tanh approximation of GELU
    scale_attn_weights: bool = True      # divide attention scores by sqrt(head_dim)
    scale_attn_by_inverse_layer_idx: bool = False  # also by (layer index + 1), a HF option

    def __post_init__(self):
        sizes = ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions") + (("n_inner",) if self.n_inner else ())
        for name in sizes:
            if type(getattr(self, name)) is not int or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is not a positive integer")
        if type(self.layer_norm_epsilon) not in (int, float) or not self.layer_norm_epsilon > 0:
            raise ValueError(f"layer_norm_epsilon={self.layer_norm_epsilon!r} is not a positive number")
        for name in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx"):
            if type(getattr(self, name)) is not bool:
                raise ValueError(f"{name}={getattr(self, name)!r} is not true or false")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not isinstance(self.activation_function, str) or self.activation_function not in ACTIVATIONS:
            raise ValueError(f"activation_function={self.activation_function!r} is not supported; "
                             f"use one of {sorted(ACTIVATIONS)}")

    @classmethod
    def from_name(cls, name: str) -> "GPTConfig":
        key = name.removeprefix("openai-community/")
        if key not in PRESETS:
            raise ValueError(f"unknown model size {name!r}; presets are {list(PRESETS)}")
        return cls(**PRESETS[key])

    @classmethod
    def from_hf_dict(cls, hf: dict, source: str = "config.json") -> "GPTConfig":
        """Read a transformers GPT2Config dict; refuse what this model does not implement."""
        if not isinstance(hf, dict):
            raise WeightsError(f"{source}: holds a JSON {type(hf).__name__}, not an object of GPT-2 config keys")
        if hf.get("model_type", "gpt2") != "gpt2":
            raise WeightsError(f"{source}: model_type={hf.get('model_type')!r}, expected 'gpt2'")
        if hf.get("add_cross_attention", False):
            raise WeightsError(f"{source}: add_cross_attention=true is not supported (decoder-only GPT-2 only)")
        if not hf.get("tie_word_embeddings", True):
            raise WeightsError(f"{source}: tie_word_embeddings=false is not supported; GPT-2 ties lm_head to wte")
        known = {f.name for f in fields(cls)}
        missing = [k for k in ("n_layer", "n_head", "n_embd") if k not in hf]
        if missing:
            raise WeightsError(f"{source}: missing keys {missing}; is this a GPT-2 config.json?")
        try:
            return cls(**{k: v for k, v in hf.items() if k in known})
        except ValueError as err:  # __post_init__'s checks: n_embd divisible by n_head, the activation
            raise WeightsError(f"{source}: {err}") from err

    def to_hf_dict(self, score_head: bool = False) -> dict:
        """The config.json transformers writes for GPT2LMHeadModel, with our shape; with score_head, for
        GPT2ForSequenceClassification with one label (a reward model), <|endoftext|> as its pad token."""
        kind = ({"architectures": ["GPT2ForSequenceClassification"], "num_labels": 1, "pad_token_id": EOT_ID}
                if score_head else {"architectures": ["GPT2LMHeadModel"]})
        return {
            **kind, "model_type": "gpt2", **asdict(self),
            "n_ctx": self.n_positions,
            "bos_token_id": EOT_ID if EOT_ID < self.vocab_size else None,
            "eos_token_id": EOT_ID if EOT_ID < self.vocab_size else None,
            "tie_word_embeddings": True, "reorder_and_upcast_attn": False, "initializer_range": 0.02,
            # GPT-2's published dropout; this implementation runs without dropout (see GPT below).
            "attn_pdrop": 0.1, "embd_pdrop": 0.1, "resid_pdrop": 0.1, "use_cache": True,
        }


PRESETS = {
    "gpt2":        dict(n_layer=12, n_head=12, n_embd=768),    # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),   # 350M
    "gpt2-large":  dict(n_layer=36, n_head=20, n_embd=1280),   # 774M
    "gpt2-xl":     dict(n_layer=48, n_head=25, n_embd=1600),   # 1558M
}

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


# ----------------------------------------------------------------------------- model

class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated to max_len.

    Each layer's buffers are allocated at its first update, in the dtype its keys come in: under
    mixed precision that is the compute dtype (bf16), not the fp32 of the stored weights.
    """

    def __init__(self, n_layer: int, max_len: int):
        self.max_len = max_len
        self.keys, self.values = [None] * n_layer, [None] * n_layer
        self.length = 0  # positions filled so far; advanced by GPT.forward after all layers ran

    def update(self, layer_idx: int, k, v):
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked for {end}")
        if self.keys[layer_idx] is None:
            B, H, _, D = k.shape
            self.keys[layer_idx] = k.new_zeros(B, H, self.max_len, D)
            self.values[layer_idx] = v.new_zeros(B, H, self.max_len, D)
        self.keys[layer_idx][:, :, self.length:end] = k
        self.values[layer_idx][:, :, self.length:end] = v
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]


def avoid_cudnn_attention():
    """Switch off SDPA's cuDNN backend (a process-wide flag; flash, memory-efficient and math stay).
    On H100/H200 (sm90) with torch >= 2.5, SDPA ranks cuDNN attention first, and its backward gives
    NaN query gradients when a mask is passed, the key length is 64 mod 128 and some row's logsumexp
    is below about -88.7 (pytorch/pytorch issue 196678, open; it caused NaN DPO runs in
    huggingface/trl issue 7181): exactly the packed prefix-sharing call. Without it, SDPA picks
    flash for the causal call and the memory-efficient kernel for masked ones."""
    torch.backends.cuda.enable_cudnn_sdp(False)


# ----------------------------------------------------------------------------- the scored rows' LM head

HEAD_PRECISIONS = ("bf16_in_fp32_out", "fp32")


def scored_logits(x, weight, precision: str = "fp32"):
    """(N, C) hidden states and the (V, C) head in bf16 (or fp16) -> (N, V) fp32 logits.

    Under mixed precision x and weight hold bf16 values, so both choices multiply the same numbers
    exactly and accumulate in fp32; they differ in speed and summation order, not in what is
    rounded (bench/head_precision.py measures the error, bench/gpu_probe.py the speed):
      bf16_in_fp32_out  a bf16 tensor-core GEMM that writes fp32 (torch.mm's out_dtype, CUDA);
                        on CPU an fp32 GEMM, which gives the same products
      fp32              an fp32 GEMM: on an H100/H200 ~67 TFLOP/s against ~990 for bf16
    (TF32 would also be exact on bf16 values, at half bf16's rate; it is a process-wide flag, so
    the trainer does not offer it.) In backward, bf16_in_fp32_out rounds the logits' fp32 gradient
    to the inputs' dtype before its two GEMMs, as every bf16 layer's backward does; fp32 runs them in
    fp32. Either way the gradients of x and weight come out in their own dtype.
    """
    if precision not in HEAD_PRECISIONS:
        raise ValueError(f"head precision {precision!r} is not one of {HEAD_PRECISIONS}")
    if precision == "bf16_in_fp32_out" and x.dtype == weight.dtype:  # (a bf16 x over fp32 weights: fp32's GEMM)
        return Bf16InFp32Out.apply(x, weight)
    return F.linear(x.float(), weight.float())


class Bf16InFp32Out(torch.autograd.Function):
    """x @ weight.T with low-precision inputs and an fp32 output, and its gradients."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        if x.is_cuda:
            return torch.mm(x, weight.t(), out_dtype=torch.float32)  # (N, V) fp32
        return x.float() @ weight.float().t()  # no CPU kernel for out_dtype: the same products in fp32

    @staticmethod
    def backward(ctx, grad_logits):  # (N, V) fp32
        x, weight = ctx.saved_tensors
        grad = grad_logits.to(x.dtype)
        return grad @ weight, grad.t() @ x  # (N, C), (V, C)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.n_head = config.n_head
        self.layer_idx = layer_idx
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # fused q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        head_dim = config.n_embd // config.n_head
        self.scale = head_dim ** -0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1

    def forward(self, x, attn_mask=None, kv_cache=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, H, S, D), S = cached + T
        # No mask: plain causal attention, SDPA's flash kernel on CUDA; a mask (prefix sharing, padding):
        # the memory-efficient kernel, cuDNN's being switched off (avoid_cudnn_attention).
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                           scale=self.scale)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        n_inner = config.n_inner or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, n_inner)
        self.c_proj = nn.Linear(n_inner, config.n_embd)
        self.act = ACTIVATIONS[config.activation_function]

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, kv_cache=None, keep=None):
        """x: (B, T, C) -> (B, T, C); with keep, long (N,) indices into the B*T flattened positions,
        -> (N, C) of just those positions: attention still reads every position's keys and values,
        but the MLP (two thirds of the block's FLOPs) runs only on the rows kept."""
        x = x + self.attn(self.ln_1(x), attn_mask, kv_cache)
        if keep is not None:
            x = x.flatten(0, 1)[keep]  # (N, C)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2 with a tied LM head and no dropout; with score_head, also a scalar head `score` (n_embd -> 1,
    no bias), named and shaped as transformers' GPT2ForSequenceClassification's: a reward model's
    score, or PPO's value head on the policy (forward's `head`).

    No dropout: DPO compares log-probs of the policy and the reference on the same tokens, and
    the DPO authors train with dropout off; with it on, the ratio would be noise at step 0.
    """

    head_precision = "fp32"  # how the scored rows' fp32 logits are computed under bf16 (scored_logits); the
    #                          trainer sets its lm_head_precision here

    def __init__(self, config: GPTConfig, score_head: bool = False):
        super().__init__()
        avoid_cudnn_attention()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.n_positions, config.n_embd),
            h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.score = nn.Linear(config.n_embd, 1, bias=False) if score_head else None
        self.tie_weights()

    def tie_weights(self):
        """lm_head.weight is wte.weight (TIED_HEAD): again after anything that replaces either tensor."""
        self.lm_head.weight = self.transformer.wte.weight
        return self

    def to_empty(self, *, device, recurse=True):
        """nn.Module.to_empty gives each name its own new tensor, which unties the head: tied again. (Under
        FSDP2 the parameters are swapped in place and stay one.)"""
        super().to_empty(device=device, recurse=recurse)
        if self.lm_head.weight is not self.transformer.wte.weight:
            self.tie_weights()
        return self

    def init_weights(self, seed: int | None = None):
        """GPT-2's initialisation (normal 0.02; residual projections scaled by 1/sqrt(2 * n_layer))."""
        generator = torch.Generator(device=self.transformer.wte.weight.device)
        if seed is not None:
            generator.manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith(".bias") or ".ln_" in name or name.startswith("transformer.ln_f"):
                nn.init.ones_(p) if name.endswith(".weight") else nn.init.zeros_(p)
            else:
                std = 0.02 / math.sqrt(2 * self.config.n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std, generator=generator)
        return self

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())  # the tied head is counted once
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, input_ids, position_ids=None, mask=None, kv_cache=None, logits_at=None, head="lm"):
        """Logits for a batch of token ids, in the spirit of gpt-fast's forward(idx, input_pos): the
        caller builds the positions and the mask; the model only applies them.

        input_ids: (B, T) long.
        position_ids: (B, T) long; default 0..T-1 after what kv_cache holds. Left-padded rows count
            from their first real token: padding_inputs builds both for them.
        mask: None for causal attention over unpadded or right-padded rows (positions after a row's
            end are garbage but never read back by the causal rows before them); else a bool
            (B, 1, T, S), True where a query may attend to a key, S = cached + T: padding_inputs'
            for left padding, data.batches' for packed rows. With a KV cache holding anything a
            mask is needed (causal attention of T new queries over S keys is not top-left aligned).
        logits_at: optional bool mask (B, T), or long (N,) indices into the B*T flattened positions
            (repeats allowed). The LM head (n_embd x 50257) is the largest matmul at DPO's lengths,
            and most positions are prompt tokens whose logits are never used: with this, logits are
            computed only at those positions and returned packed, (N, vocab), in mask (row-major) or
            index order. Nothing reads the other positions after the last block's attention, so its
            MLP and ln_f run only at these positions too.
        head: "lm" returns the logits; "score" the score head's fp32 scalars instead, (B, T) or (N,)
            (no LM head is run); "both" returns (logits, scores) from the one pass (PPO's policy and
            value).
        """
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if head not in ("lm", "score", "both") or (head != "lm" and self.score is None):
            raise ValueError(f"head={head!r}: expected lm, or score/both on a model built with score_head=True")
        if mask is None and past > 0:
            raise ValueError("a forward after a filled KV cache needs its mask (padding_inputs)")
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)

        keep = None  # (N,) flat positions whose logits are wanted; the last block keeps only them
        if logits_at is not None:
            keep = logits_at.flatten().nonzero().squeeze(1) if logits_at.dtype == torch.bool else logits_at

        x = self.transformer.wte(input_ids) + self.transformer.wpe(position_ids)  # (B, T, C)
        last = len(self.transformer.h) - 1
        for i, block in enumerate(self.transformer.h):
            x = block(x, mask, kv_cache, keep if i == last else None)  # (B, T, C); (N, C) after the last
        x = self.transformer.ln_f(x)
        if kv_cache is not None:
            kv_cache.length += T
        # The scalar head in fp32 (under bf16 a score or value would keep ~3 significant digits): (B, T) or (N,)
        scores = F.linear(x.float(), self.score.weight.float()).sum(-1) if head != "lm" else None  # not a view
        if head == "score":
            return scores
        logits = self.lm_logits(x, keep is not None)
        return (logits, scores) if head == "both" else logits

    def lm_logits(self, x, packed):
        if packed and x.dtype in (torch.bfloat16, torch.float16):
            # The scored rows' logits in fp32: in bf16 a logit of 32-64 is rounded to a multiple of 0.25
            # before the log-softmax. How the fp32 logits are computed: self.head_precision.
            return scored_logits(x, self.lm_head.weight, self.head_precision)  # (N, V) fp32
        return self.lm_head(x)  # logits (B, T, V) or (N, V)

    # ------------------------------------------------------------------------- sampling

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=24, temperature=1.0, top_k=None,
                 top_p=None, eos_id=EOT_ID, use_cache=True, generator=None, stop_early=True, uniforms=None):
        """Continue a batch of prompts; returns (B, T + n) ids, n <= max_new_tokens.

        Prompts of different lengths are left-padded, with attention_mask (B, T) marking real tokens.
        temperature=0 is greedy decoding; otherwise sample from softmax(logits / temperature),
        restricted to the top_k tokens and/or the smallest set whose probability reaches top_p.
        A row that emits eos_id is finished and padded with eos_id; decoding stops when all are
        (eos_id=None: never). use_cache=False recomputes the whole prefix every step (for tests).
        stop_early=False always runs max_new_tokens steps: under FSDP every rank must run the same
        number of forward passes, whatever its own rows did. uniforms: optional (B, max_new_tokens)
        draws in [0, 1) for the sampler, row by row and step by step, instead of the generator's
        (PPO's rollouts: then each row's sample does not depend on which other rows share its batch).
        """
        B, T = input_ids.shape
        if T + max_new_tokens > self.config.n_positions:
            raise ValueError(f"prompt length {T} + max_new_tokens {max_new_tokens} exceeds the model's "
                             f"{self.config.n_positions} positions")
        device = input_ids.device
        token_mask = (torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None
                      else attention_mask.bool())
        kv_cache = KVCache(self.config.n_layer, T + max_new_tokens) if use_cache else None
        tokens, step_input = input_ids, input_ids
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            model_input = step_input if use_cache else tokens
            last_positions = torch.arange(1, B + 1, device=device) * model_input.size(1) - 1  # flat (B,)
            # logits only at each row's last position: the prompt's other positions need none
            position_ids, mask = padding_inputs(token_mask, model_input.size(1))
            logits = self(model_input, position_ids, mask, kv_cache=kv_cache if use_cache else None,
                          logits_at=last_positions)  # (B, V)
            next_token = sample_next_token(logits.float(), temperature, top_k, top_p, generator,
                                           None if uniforms is None else uniforms[:, step:step + 1])
            if eos_id is not None:
                next_token = torch.where(finished, torch.full_like(next_token, eos_id), next_token)
                finished |= next_token == eos_id
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            token_mask = torch.cat([token_mask, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
            step_input = next_token[:, None]
            if stop_early and eos_id is not None and bool(finished.all()):
                break
        return tokens

    # ------------------------------------------------------------------------- weights

    @classmethod
    def from_pretrained(cls, name_or_dir: str, dtype=torch.float32, device="cpu", revision=None,
                        cache_dir=None, score_head=False) -> "GPT":
        """GPT-2 weights from a local directory or a Hugging Face hub id.

        A directory must hold config.json and model.safetensors (or sharded model-0000N-of-0000M
        files with model.safetensors.index.json). Anything else is taken as a hub repo id
        ("gpt2", "openai-community/gpt2-xl", "user/my-gpt2") and fetched with huggingface_hub,
        which honours its cache, HF_HUB_OFFLINE and `revision`. Only safetensors are read:
        pytorch_model.bin is never unpickled. score_head=True reads a GPT2ForSequenceClassification
        folder with one label (a reward model; its score.weight is then required).
        """
        path = resolve_checkpoint_dir(name_or_dir, revision=revision, cache_dir=cache_dir)
        config = read_hf_config(path)
        with torch.device("meta"):  # no memory for weights until they are read
            model = cls(config, score_head=score_head)
        state_dict = read_hf_state_dict(path, config, dtype=dtype, device=device, score_head=score_head)
        model.load_state_dict(state_dict, strict=False, assign=True)  # lm_head is tied, not in the dict
        return model.tie_weights().eval()  # assign=True replaced wte

    def save_pretrained(self, out_dir: str):
        """Write config.json + model.safetensors that transformers.GPT2LMHeadModel (with a score head:
        GPT2ForSequenceClassification) loads."""
        write_hf_checkpoint(self.config, self.state_dict(), out_dir)


def padding_inputs(token_mask, T=None):
    """(B, S) real-token mask of left- (or right-) padded rows -> the forward's (position_ids (B, T),
    mask (B, 1, T, S)) for their last T positions (default all S): positions counted from each row's
    first real token, as transformers' generate counts them; the mask causal, never attending to pads."""
    token_mask = token_mask.bool()
    T = token_mask.size(1) if T is None else T
    position_ids = (token_mask.long().cumsum(-1) - 1).clamp(min=0)[:, token_mask.size(1) - T:]
    return position_ids, padding_attention_mask(token_mask, T)


def padding_attention_mask(token_mask, T):
    """(B, S) real-token mask -> (B, 1, T, S) bool mask: causal, and no attending to pads.

    The T queries are the last T of the S positions. A pad query (left padding) would have no key
    to attend to and SDPA would return NaN for it; letting it see itself keeps the numbers finite,
    and its output is never used.
    """
    B, S = token_mask.shape
    query_pos = torch.arange(S - T, S, device=token_mask.device)[:, None]   # (T, 1)
    key_pos = torch.arange(S, device=token_mask.device)[None, :]            # (1, S)
    allowed = (key_pos <= query_pos) & (token_mask[:, None, :] | (key_pos == query_pos))  # (B, T, S)
    return allowed[:, None]


def last_token_index(input_ids, pad_id=EOT_ID):
    """(B, T) -> (B,) the column of each row's last token that is not pad_id: where a reward model reads
    its score, by transformers' GPT2ForSequenceClassification's rule (its pad token is <|endoftext|>,
    so a response's closing <|endoftext|> is not read either; a row of pad_id alone reads column 0)."""
    return last_true_column(input_ids != pad_id)


def last_true_column(mask):
    """(B, T) bool or 0/1 -> (B,) the column of each row's last True (0 for a row without one)."""
    columns = torch.arange(mask.size(1), device=mask.device)
    return (columns * (mask > 0)).argmax(-1)


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None, u=None):
    """(B, V) fp32 logits -> (B,) token ids. u: optional (B, 1) uniform draws (else the generator's)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    # Inverse-CDF sampling: the first token whose cumulative probability exceeds u ~ U[0, 1) times the
    # total. One uniform per row and a cumsum: on CPU ~30x faster than torch.multinomial over 50257
    # tokens (16 ms -> 0.5 ms for 16 rows), the difference between a slow and a fast PPO rollout. The
    # fp32 cumsum's rounding (~1e-7 of the total) only touches tokens rarer than that.
    cumulative = logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
    if u is None:
        u = torch.rand(logits.size(0), 1, device=logits.device, generator=generator, dtype=cumulative.dtype)
    chosen = torch.searchsorted(cumulative, u * cumulative[:, -1:], right=True)  # (B, 1)
    return chosen.clamp_(max=logits.size(-1) - 1).squeeze(-1)


# ----------------------------------------------------------------------------- HF checkpoints

# HF's GPT-2 uses Conv1D, whose weight is (in, out): the transpose of nn.Linear's (out, in).
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
WEIGHT_PATTERNS = ["config.json", "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json"]


def resolve_checkpoint_dir(name_or_dir: str, revision=None, cache_dir=None) -> str:
    """A local model directory as it is; a hub id ("gpt2" is openai-community/gpt2) fetched (hub_snapshot)."""
    if os.path.isdir(name_or_dir):
        return name_or_dir
    if looks_like_a_path(name_or_dir):
        raise WeightsError(f"{name_or_dir}: no such directory (and not a hub id like 'gpt2' or 'org/name')")
    repo_id = name_or_dir if "/" in name_or_dir else f"openai-community/{name_or_dir}"
    return hub_snapshot(repo_id, WEIGHT_PATTERNS, revision=revision, cache_dir=cache_dir,
                        holding="config.json and model.safetensors")


def looks_like_a_path(name: str) -> bool:
    """A filesystem path rather than a hub id ("gpt2", "org/name")."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def hub_snapshot(repo_id, allow_patterns, revision=None, cache_dir=None, repo_type=None, error=WeightsError,
                 holding="its files", what=""):
    """The one way this project fetches from the Hugging Face hub (weights here; a reward classifier,
    train/reward.py; a dataset, data/formats.py): the files of repo_id that match allow_patterns,
    through huggingface_hub's cache, which honours HF_HUB_OFFLINE, HF_HUB_CACHE and `revision`; the
    local snapshot directory. Any failure (offline without a cache, an unknown or gated repo) raises
    `error` naming the repo and saying how to work offline."""
    from huggingface_hub import snapshot_download  # imported here: local loading needs no hub client
    try:
        return snapshot_download(repo_id, repo_type=repo_type, revision=revision, cache_dir=cache_dir,
                                 allow_patterns=allow_patterns)
    except Exception as err:  # offline, unknown repo, gated repo...: say which and how to fix it
        kind = f" --repo-type {repo_type}" if repo_type else ""
        raise error(f"could not fetch {what}{repo_id!r} (revision {revision or 'main'}) from the Hugging Face hub: "
                    f"{type(err).__name__}: {err}\nOffline? Download it once on a connected machine (hf download "
                    f"{repo_id}{kind}) and set HF_HUB_OFFLINE=1, or pass a local directory holding {holding}.") from err


def read_hf_config(path: str) -> GPTConfig:
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise WeightsError(f"{config_path}: missing; a GPT-2 checkpoint directory needs config.json "
                                "next to model.safetensors")
    try:
        with open(config_path) as f:
            hf = json.load(f)
    except ValueError as err:  # JSONDecodeError, or UnicodeDecodeError for a file that is not text
        raise WeightsError(f"{config_path}: not valid JSON ({type(err).__name__}: {err})") from err
    return GPTConfig.from_hf_dict(hf, source=config_path)


def weight_files(path: str) -> dict[str, list[str] | None]:
    """The safetensors files of a checkpoint directory, each with the tensor names to read from it:
    None (all of them) for a single model.safetensors; for shards, those the index assigns to each."""
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        return {single: None}
    if os.path.isfile(index):
        return read_shard_index(index, path)
    found = sorted(os.listdir(path))
    raise WeightsError(f"{path}: no model.safetensors or model.safetensors.index.json (found {found}); "
                            "only safetensors weights are loaded (pytorch_model.bin would need unpickling)")


def read_shard_index(index: str, path: str) -> dict[str, list[str]]:
    """model.safetensors.index.json -> {shard file: the tensor names its weight_map assigns to it}.

    A shard must be a plain file name in path: "../x" or "/x" would read a file the index has no
    business naming. (Checked as written, not resolved: the hub's cache links each file in a snapshot
    to a blob outside it.)
    """
    try:
        with open(index) as f:
            contents = json.load(f)
    except ValueError as err:  # JSONDecodeError, or UnicodeDecodeError for a file that is not text
        raise WeightsError(f"{index}: not valid JSON ({type(err).__name__}: {err})") from err
    weight_map = contents.get("weight_map") if isinstance(contents, dict) else None
    if not isinstance(weight_map, dict):
        raise WeightsError(f'{index}: not a safetensors index: expected a JSON object whose "weight_map" maps each '
                           "tensor name to the shard file holding it")
    shards = {}
    for tensor_name, shard_name in weight_map.items():
        if not isinstance(shard_name, str):
            raise WeightsError(f"{index}: weight_map[{tensor_name!r}] is {shard_name!r}, not a shard file name")
        if os.path.basename(shard_name) != shard_name or shard_name in ("", ".", ".."):
            raise WeightsError(f"{index}: weight_map[{tensor_name!r}] is {shard_name!r}, not a file name in {path} "
                               "(a shard outside the model directory is refused)")
        shards.setdefault(os.path.join(path, shard_name), []).append(tensor_name)
    return shards


def open_safetensors(file: str):
    try:
        return safe_open(file, framework="pt", device="cpu")
    except Exception as err:  # safetensors raises its own error type for truncated/corrupt files
        raise WeightsError(f"{file}: not a readable safetensors file ({type(err).__name__}: {err}); "
                           "it may be truncated or corrupt: download it again") from err


def keys_to_read(file: str, present: list[str], assigned: list[str] | None, assigned_file: dict) -> list[str]:
    """Every key of a single file; of a shard, the keys the index assigns to it. A shard must hold
    exactly those: a tensor it also holds that the index assigns elsewhere could override the right one."""
    if assigned is None:
        return present
    lacking = sorted(set(assigned) - set(present))
    if lacking:
        more = f" (and {len(lacking) - 1} more)" if len(lacking) > 1 else ""
        raise WeightsError(f"{file}: lacks {lacking[0]}{more}, which model.safetensors.index.json assigns to it")
    for key in sorted(set(present) - set(assigned)):
        if key in assigned_file:
            raise WeightsError(f"{key} is in two shards, {assigned_file[key]} and {file}; "
                               f"model.safetensors.index.json assigns it to {assigned_file[key]}: refusing to guess")
        raise WeightsError(f"{file}: holds {key}, which model.safetensors.index.json does not list")
    return assigned


def hf_key_to_ours(key: str) -> str | None:
    """Map a checkpoint key to our parameter name; None for keys to skip (buffers, tied head)."""
    if key.endswith((".attn.bias", ".attn.masked_bias")) or key == TIED_HEAD:
        return None  # causal-mask buffers of old files, and the head that is tied to wte
    if key == SCORE_HEAD:
        return key
    return key if key.startswith("transformer.") else "transformer." + key  # hub's original files: no prefix


def read_hf_state_dict(path: str, config: GPTConfig, dtype=torch.float32, device="cpu", score_head=False) -> dict:
    """Read a checkpoint's tensors into our layout, one tensor at a time, cast to dtype on device.

    Peak memory is one copy of the model in `dtype` plus one tensor: safetensors maps the file and
    each tensor is converted as it is read. Each tensor comes from the shard the index assigns it to
    (keys_to_read). Missing, unexpected and mis-shaped keys are reported together in one error; so
    are tensors holding NaN or inf (a diverged or damaged model: its logits would be NaN, and its
    samples, without this, silently all <|endoftext|>).
    """
    with torch.device("meta"):
        expected = {k: v.shape for k, v in GPT(config, score_head).state_dict().items() if k != TIED_HEAD}
    state_dict, read_from, unexpected, wrong_shape, non_finite, files = {}, {}, [], [], [], weight_files(path)
    assigned_file = {key: file for file, keys in files.items() for key in keys or ()}
    for file, assigned in files.items():
        with open_safetensors(file) as handle:
            for key in keys_to_read(file, list(handle.keys()), assigned, assigned_file):
                name = hf_key_to_ours(key)
                if name is None:
                    continue
                if name not in expected:
                    unexpected.append(key)
                    continue
                if name in read_from:  # e.g. "h.0.ln_1.weight" and "transformer.h.0.ln_1.weight"
                    raise WeightsError(f"{file}: {key} and {read_from[name]} are both {name}: refusing to guess "
                                       "which to load")
                read_from[name] = f"{key} in {file}"
                tensor = handle.get_tensor(key)
                if name.endswith(CONV1D_SUFFIXES):
                    tensor = tensor.t()
                if tensor.shape != expected[name]:
                    wrong_shape.append(f"{key}: file {tuple(tensor.shape)} vs model {tuple(expected[name])}")
                    continue
                state_dict[name] = tensor.to(device=device, dtype=dtype).contiguous()
                if not bool(torch.isfinite(state_dict[name]).all()):
                    non_finite.append(key)
    missing = sorted(set(expected) - set(state_dict) - {w.split(":")[0] for w in wrong_shape})
    if missing or unexpected or wrong_shape:
        problems = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                problems.append(f"{len(keys)} {label}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}")
        raise WeightsError(f"{path}: weights do not match config.json (n_layer={config.n_layer}, "
                         f"n_embd={config.n_embd}, vocab_size={config.vocab_size}): " + "; ".join(problems))
    if non_finite:
        raise WeightsError(f"{path}: {len(non_finite)} tensor(s) hold NaN or inf values as {dtype}: "
                           f"{', '.join(non_finite[:8])}{' ...' if len(non_finite) > 8 else ''}; such a model's "
                           "logits, samples and losses would be meaningless")
    return state_dict


def write_hf_checkpoint(config: GPTConfig, state_dict: dict, out_dir: str):
    """config.json + model.safetensors in transformers' layout ("transformer." prefix, Conv1D
    weights, no buffers, tied head omitted). Written to temporary names and renamed, so a crash
    leaves the old files or the new ones, never half of one."""
    os.makedirs(out_dir, exist_ok=True)
    score_head = SCORE_HEAD in state_dict
    tensors = {}
    for name, tensor in state_dict.items():
        if name == TIED_HEAD:
            continue
        tensor = tensor.detach().cpu()
        tensors[name] = (tensor.t() if name.endswith(CONV1D_SUFFIXES) else tensor).contiguous()
    def write_config(tmp_path):
        with open(tmp_path, "w") as f:
            json.dump(config.to_hf_dict(score_head), f, indent=2)

    for filename, write in (
        ("model.safetensors", lambda tmp_path: save_file(tensors, tmp_path, metadata={"format": "pt"})),
        ("config.json", write_config),
    ):
        tmp_path = os.path.join(out_dir, f".{filename}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        try:
            with open(tmp_path, "xb"):  # created as any file is: 0o666 & ~umask, so 0644 usually
                pass
            mode = os.stat(tmp_path).st_mode & 0o777
            write(tmp_path)
            os.chmod(tmp_path, mode)  # safetensors (0.8) makes its file 0600, which would make it private
            os.replace(tmp_path, os.path.join(out_dir, filename))
        finally:
            if os.path.exists(tmp_path):
                os.remove(tmp_path)
