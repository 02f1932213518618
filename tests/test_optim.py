"""optim.py against hand-computed values: the learning-rate schedule, the fp16 loss scale, and
exactly which of GPT-2's tensors get weight decay."""
import math

import pytest

from gpt2 import GPT, GPTConfig
from train.config import TrainConfig
from train.optim import LossScaler, lr_at, make_optimizer


def test_warmup_is_linear_from_lr_over_warmup_steps():
    cfg = TrainConfig(lr=1e-3, warmup_steps=4)
    assert [lr_at(step, 100, cfg) for step in range(5)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])


def test_constant_schedule_keeps_lr_to_the_last_step():
    cfg = TrainConfig(lr=3e-4, warmup_steps=0, lr_schedule="constant")
    assert lr_at(0, 10, cfg) == lr_at(9, 10, cfg) == lr_at(50, 10, cfg) == 3e-4


def test_cosine_decays_from_lr_after_warmup_to_zero_at_the_end():
    cfg = TrainConfig(lr=1e-3, warmup_steps=2, lr_schedule="cosine")
    total = 12  # 10 steps of decay after 2 of warmup
    assert lr_at(1, total, cfg) == pytest.approx(1e-3)  # the last warmup step reaches lr
    assert lr_at(2, total, cfg) == pytest.approx(1e-3)  # progress 0
    assert lr_at(7, total, cfg) == pytest.approx(0.5e-3)  # half way: cos(pi/2) = 0
    assert lr_at(4, total, cfg) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert lr_at(11, total, cfg) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.9)))  # the last step
    assert lr_at(12, total, cfg) == pytest.approx(0.0, abs=1e-18)
    assert lr_at(30, total, cfg) == pytest.approx(0.0, abs=1e-18)  # past the end (max_steps beyond): stays 0


def test_loss_scale_grows_after_growth_interval_finite_steps():
    scaler = LossScaler(enabled=True, scale=2.0 ** 10, growth_interval=3)
    for _ in range(2):
        scaler.update(finite=True)
    assert scaler.scale == 2.0 ** 10
    scaler.update(finite=True)
    assert scaler.scale == 2.0 ** 11
    for _ in range(3):
        scaler.update(finite=True)
    assert scaler.scale == 2.0 ** 12


def test_loss_scale_halves_on_overflow_and_restarts_the_count():
    scaler = LossScaler(enabled=True, scale=2.0 ** 10, growth_interval=3)
    scaler.update(finite=True)
    scaler.update(finite=True)
    scaler.update(finite=False)
    assert scaler.scale == 2.0 ** 9 and scaler.good_steps == 0
    scaler.update(finite=True)
    scaler.update(finite=True)
    assert scaler.scale == 2.0 ** 9  # two good steps since the overflow: no growth yet


def test_loss_scale_never_goes_below_its_floor():
    scaler = LossScaler(enabled=True, scale=4.0, growth_interval=100)
    for _ in range(5):
        scaler.update(finite=False)
    assert scaler.scale == scaler.min_scale == 1.0


def test_disabled_scaler_is_one_and_never_changes():
    scaler = LossScaler(enabled=False, scale=2.0 ** 16, growth_interval=1)
    for finite in (True, False, True):
        scaler.update(finite)
    assert scaler.scale == 1.0


def test_weight_decay_applies_to_matrices_and_embeddings_only():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, n_positions=32, vocab_size=100))
    optimizer = make_optimizer(model, TrainConfig(weight_decay=0.1))
    names = {id(p): name for name, p in model.named_parameters()}  # the tied lm_head is wte: listed once
    decayed, not_decayed = ({names[id(p)] for p in group["params"]} for group in optimizer.param_groups)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.1, 0.0]
    matrices = {f"transformer.h.{i}.{m}.weight" for i in range(2)
                for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert decayed == {"transformer.wte.weight", "transformer.wpe.weight"} | matrices
    norms_and_biases = {f"transformer.h.{i}.{m}" for i in range(2)
                        for m in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.c_attn.bias",
                                  "attn.c_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias")}
    assert not_decayed == norms_and_biases | {"transformer.ln_f.weight", "transformer.ln_f.bias"}


def test_rmsprop_steps_as_its_formula_with_decay_only_on_matrices():
    """The DPO paper's optimizer (App. B), three steps against RMSprop written out here (Hinton's
    lecture 6e, as torch documents it): v = a v + (1 - a) g^2, p -= lr g / (sqrt(v) + eps), with the
    L2 decay added to the gradient of the >= 2-D weights only."""
    import torch
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, vocab_size=32, n_positions=8)).init_weights(seed=0)
    cfg = TrainConfig(optimizer="rmsprop", lr=1e-2, weight_decay=0.1)
    optimizer = make_optimizer(model, cfg)
    assert isinstance(optimizer, torch.optim.RMSprop)
    expected = {name: p.detach().clone() for name, p in model.named_parameters()}
    square_avg = {name: torch.zeros_like(p) for name, p in expected.items()}
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        grads = {name: torch.randn(p.shape, generator=gen) for name, p in model.named_parameters()}
        for name, p in model.named_parameters():
            p.grad = grads[name].clone()
        optimizer.step()
        for name, p in expected.items():
            g = grads[name] + (0.1 * p if p.dim() >= 2 else 0.0)
            square_avg[name] = 0.99 * square_avg[name] + 0.01 * g * g
            p -= 1e-2 * g / (square_avg[name].sqrt() + 1e-8)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-7)
