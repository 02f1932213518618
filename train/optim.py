"""The optimizer side of a step: AdamW (or the DPO paper's RMSprop) with its decay groups, the
learning-rate schedule, and the dynamic loss scale that fp16 needs."""
import math

import torch


def make_optimizer(model, cfg):
    """AdamW, or RMSprop as the DPO paper trains (App. B: RMSprop, lr 1e-6; the authors' code builds
    torch.optim.RMSprop with its defaults: alpha 0.99, eps 1e-8, no momentum). Weight decay only on
    >= 2-D weights (matrices and embeddings), not biases or norms; RMSprop's is added to the gradient
    (L2), AdamW's decoupled."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.lr, alpha=0.99, eps=1e-8, foreach=True)
    # fused: one kernel over all tensors, without the foreach path's per-step temporaries (CPU and CUDA)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=True)


def lr_at(step, total_steps, cfg):
    """The learning rate of optimizer step `step` (0-based): linear warmup over warmup_steps, then
    constant, or a cosine that reaches 0 at total_steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr


class LossScaler:
    """Dynamic loss scaling for fp16: the loss is multiplied by `scale` before backward so small
    gradients survive fp16, and the gradients divided by it before the step. A step with a
    non-finite gradient halves the scale (not below min_scale); growth_interval finite steps in a
    row double it. The overflow check is the global gradient norm, which clip_grad_norm_
    all-reduces over every shard, so all ranks skip or step together. Disabled, the scale is 1."""

    def __init__(self, enabled, scale=2.0 ** 16, growth_interval=2000, min_scale=1.0):
        self.enabled, self.growth_interval, self.min_scale = enabled, growth_interval, min_scale
        self.scale = scale if enabled else 1.0
        self.good_steps = 0

    def update(self, finite):
        if not self.enabled:
            return
        if finite:
            self.good_steps += 1
            if self.good_steps % self.growth_interval == 0:
                self.scale *= 2
        else:
            self.scale, self.good_steps = max(self.scale / 2, self.min_scale), 0
