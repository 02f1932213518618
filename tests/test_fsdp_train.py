"""fsdp_train.py end to end, on CPU/gloo, against independent references: a single process without
FSDP, one batch without accumulation, an uninterrupted run, transformers on the exported model.

Runs of one process go through fsdp_train.run() in this process (a one-process gloo group, made
and destroyed by each run): the same code as `python fsdp_train.py`, without a second torch import.
Runs of two ranks are two processes started warm (tests/warm.py); a run that reads its environment
at import (TORCH_LOGS) is a fresh `python fsdp_train.py`."""
import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel

import warm
from conftest import ROOT, made_once
from warm import ENV
from data.batches import collate_pairs, pairs_of, split_groups, truncate_groups
from data.formats import make_demo_groups
import fsdp_train

pytestmark = pytest.mark.slow

EVAL_FRACTION = 0.05  # 6 of the demo's 128 prompts, 24 pairs: the two evals of a run are most of its compute
TINY = ["--init_from=scratch", "--n_layer=2", "--n_head=2", "--n_embd=32", "--n_positions=64", "--dataset=demo",
        "--max_prompt_len=16", "--max_len=32", f"--eval_fraction={EVAL_FRACTION}", "--batch_size=8",
        "--micro_batch_size=4", "--max_steps=4", "--lr=1e-3", "--precision=fp32", "--device=cpu", "--log_every=1",
        "--eval_every=0", "--n_samples=2", "--kl_samples=2", "--max_new_tokens=4", "--seed=0"]


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


def run_in_process(args) -> Finished:
    """fsdp_train.run(args) here, as `python fsdp_train.py ARGS` would run it: its output captured,
    an exception that escapes it printed as the interpreter would (exit 1)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            returncode = fsdp_train.run([str(a) for a in args])
        except Exception:  # noqa: BLE001 -- what an uncaught exception does to a process: traceback, exit 1
            traceback.print_exc()
            returncode = 1
    return Finished(returncode, stdout.getvalue(), stderr.getvalue())


def run_python(out_dir, *extra, check=True):
    """One training run of TINY (plus extra flags) into out_dir, in this process."""
    result = run_in_process([*TINY, f"--out_dir={out_dir}", *extra])
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def run_subprocess(out_dir, *extra, env=None):
    """The same as its own `python fsdp_train.py` process (for logs read from the environment at import)."""
    result = subprocess.run([sys.executable, "fsdp_train.py", *TINY, f"--out_dir={out_dir}", *extra],
                            cwd=ROOT, env=dict(ENV, **(env or {})), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def run_ranks(out_dir, *extra, nnodes=1, nproc_per_node=2):
    """A multi-process run: its ranks launched as torchrun launches its workers, each started warm
    (tests/warm.py); torchrun itself is tested in tests/test_faults.py."""
    returncodes, output = warm.wait_ranks(warm.ranks(["fsdp_train.py", *TINY, f"--out_dir={out_dir}", *extra],
                                                     nnodes=nnodes, nproc_per_node=nproc_per_node))
    assert returncodes == [0] * (nnodes * nproc_per_node), output[-4000:]
    return output


def train_losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return [line["loss"] for line in lines if "loss" in line]


def final_weights(out_dir):
    return load_file(os.path.join(out_dir, "final", "model.safetensors"))


def assert_same_losses(a, b, rel=1e-5, n_steps=4):
    assert len(a) == len(b) == n_steps
    for x, y in zip(a, b):
        assert abs(x - y) <= rel * abs(y) + 1e-6, (a, b)


def assert_weights_close(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, worst


# Two ranks against one in bf16 differ by up to 7e-5 relative here (fp16: 6e-6): one process
# accumulates its two micro-batches' gradients in the compute dtype, two ranks reduce them in fp32.
MIXED_PRECISION_REL = 3e-4


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one process, no FSDP (sharding=none), micro-batches of 4 (accumulation 2)."""
    out_dir = tmp_path_factory.mktemp("single")
    run_python(out_dir, "--sharding=none", "--ckpt_every=2")
    return out_dir


def test_fsdp_two_ranks_equal_one_process_without_fsdp(single, tmp_path):
    run_ranks(tmp_path)
    assert_same_losses(train_losses(tmp_path), train_losses(single))
    assert_weights_close(final_weights(tmp_path), final_weights(single))


def test_two_nodes_hybrid_sharding_equal_one_node(single, tmp_path):
    """Two "nodes" of one rank each on 127.0.0.1, HSDP over a (2 nodes x 1) mesh."""
    run_ranks(tmp_path, "--sharding=hybrid", nnodes=2, nproc_per_node=1)
    assert_same_losses(train_losses(tmp_path), train_losses(single))
    assert_weights_close(final_weights(tmp_path), final_weights(single))


def test_gradient_accumulation_equals_one_large_batch(single, tmp_path):
    run_python(tmp_path, "--sharding=none", "--micro_batch_size=8")  # 1 x 8 against 2 x 4
    assert_same_losses(train_losses(tmp_path), train_losses(single))
    assert_weights_close(final_weights(tmp_path), final_weights(single))


def test_rmsprop_stops_and_resumes_bitwise_like_adamw(tmp_path):
    """The paper's optimizer (optimizer: rmsprop) keeps its state across a checkpoint: stopped at step
    2 and resumed, the losses and weights of an uninterrupted run (its step: tests/test_optim.py)."""
    rmsprop = ["--sharding=none", "--ckpt_every=2", "--optimizer=rmsprop", "--lr=1e-4"]
    run_python(tmp_path / "whole", *rmsprop)
    run_python(tmp_path / "cut", *rmsprop, "--max_steps=2")
    assert "at step 2" in run_python(tmp_path / "cut", *rmsprop).stdout
    assert train_losses(tmp_path / "cut") == train_losses(tmp_path / "whole")
    a, b = final_weights(tmp_path / "cut"), final_weights(tmp_path / "whole")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stop_and_resume_is_bitwise_equal_to_uninterrupted(single, tmp_path):
    run_python(tmp_path, "--sharding=none", "--ckpt_every=2", "--max_steps=2")
    assert os.path.isdir(tmp_path / "checkpoints" / "step_000002")
    resumed = run_python(tmp_path, "--sharding=none", "--ckpt_every=2")  # same command, more steps
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout
    assert train_losses(tmp_path) == train_losses(single)
    a, b = final_weights(tmp_path), final_weights(single)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra", [
    ["--sharding=none", "--activation_checkpointing"],   # recomputation changes nothing
    ["--sharding=full", "--activation_checkpointing"],   # ... under FSDP either
    ["--sharding=none", "--prefix_sharing=false"],       # separate chosen/rejected rows
])
def test_memory_options_keep_the_losses(single, tmp_path, extra):
    run_python(tmp_path, *extra)
    assert_same_losses(train_losses(tmp_path), train_losses(single))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_two_ranks_equal_one_process_in_the_same_precision(single, tmp_path, precision):
    """bf16/fp16 compute (fp32 master weights and reduction; fp16 with loss scaling): FSDP over two
    ranks against one process in the same precision, 100x tighter than bf16 against fp32 could be
    held; and visibly not the fp32 run (a mixed precision policy that silently did nothing would
    pass the first check, not this one)."""
    run_python(tmp_path / "one", "--sharding=full", f"--precision={precision}")
    run_ranks(tmp_path / "two", "--sharding=full", f"--precision={precision}")
    one, two, fp32 = train_losses(tmp_path / "one"), train_losses(tmp_path / "two"), train_losses(single)
    assert_same_losses(two, one, rel=MIXED_PRECISION_REL)
    # measured against fp32 (the LM head runs in fp32 on the scored rows): bf16 1.2e-4, fp16 1.4e-5;
    # a policy that did nothing would be within float noise (< 1e-7)
    assert max(abs(a - b) / b for a, b in zip(one, fp32)) > {"bf16": 3e-5, "fp16": 3e-6}[precision], (one, fp32)
    assert_same_losses(one, fp32, rel=3e-3)


@pytest.mark.parametrize("sharding", ["none", "full"])
def test_bf16_reference_under_fp32_training_stays_close(single, tmp_path, sharding):
    """reference_precision=bf16: at step 0 the policy equals the reference, so with an fp32
    reference the loss is exactly log 2; a bf16 reference's log-probs carry rounding, so the loss
    moves off log 2 a little, and the run stays close to the fp32 one."""
    result = run_python(tmp_path, f"--sharding={sharding}", "--reference_precision=bf16")
    assert "reference in bf16" in result.stdout
    losses, fp32_losses = train_losses(tmp_path), train_losses(single)
    assert fp32_losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert 1e-5 < abs(losses[0] - math.log(2)) < 1e-2, losses[0]  # about 1e-4 at this shape
    assert_same_losses(losses, fp32_losses, rel=3e-2)


def test_resume_accepts_the_resolved_reference_precision(tmp_path):
    """reference_precision "same" under fp32 is the same run as "fp32"; a bf16 reference is a
    different run, refused by name."""
    run_python(tmp_path, "--sharding=none", "--ckpt_every=2", "--max_steps=2")
    state_path = tmp_path / "checkpoints" / "step_000002" / "train_state.json"
    state = json.loads(state_path.read_text())
    assert state["identity"]["reference_precision"] == "fp32"
    refused = run_python(tmp_path, "--sharding=none", "--reference_precision=bf16", check=False)
    assert refused.returncode != 0 and "reference_precision" in refused.stdout + refused.stderr
    resumed = run_python(tmp_path, "--sharding=none", "--ckpt_every=2", "--reference_precision=fp32")
    assert "at step 2" in resumed.stdout


def test_compile_keeps_the_losses_and_every_block_compiled(single, tmp_path):
    """compile=true (inductor per block) after the step-0 samples and eval: the same losses as eager,
    and no block variant falls back to eager because dynamo ran out of recompiles."""
    result = run_subprocess(tmp_path, "--sharding=none", "--compile=true", env={"TORCH_LOGS": "recompiles"})
    output = result.stdout + result.stderr
    assert "Recompiling function forward" in output  # the log is on: a limit hit would show here
    assert "recompile_limit" not in output, output[output.index("recompile_limit") - 2000:][:3000]
    assert_same_losses(train_losses(tmp_path), train_losses(single), rel=1e-4)


def test_group_order_packs_a_prompts_pairs_without_changing_their_losses(tmp_path):
    """The demo's prompts have 4 pairs each; with group_order a prompt's pairs arrive together and
    share one packed row. The same order without any packing must give the same losses."""
    run_python(tmp_path / "packed", "--sharding=none", "--group_order")
    run_python(tmp_path / "separate", "--sharding=none", "--group_order", "--prefix_sharing=false")
    assert_same_losses(train_losses(tmp_path / "packed"), train_losses(tmp_path / "separate"))


def test_precomputed_reference_gives_the_same_losses(single, tmp_path):
    run_python(tmp_path, "--sharding=none", "--precompute_reference=true")
    assert (tmp_path / "reference_logps.safetensors").exists()
    assert_same_losses(train_losses(tmp_path), train_losses(single))


def test_changed_data_is_refused_on_resume_and_moved_data_is_not(tmp_path):
    """The data's content is part of the run: the same file rewritten (chosen and rejected swapped)
    is refused by name; the same pairs from another path resume."""
    from data.demo import write_demo_jsonl
    data = tmp_path / "prefs.jsonl"
    write_demo_jsonl(data, n_groups=40)
    out_dir = tmp_path / "run"
    run_python(out_dir, "--sharding=none", "--dataset=jsonl", f"--data_path={data}", "--max_steps=2")
    moved = tmp_path / "moved.jsonl"
    moved.write_text(data.read_text())
    swapped = [json.loads(line) for line in data.read_text().splitlines()]
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n"
                            for r in swapped))
    before = sorted(p.name for p in (out_dir / "checkpoints").iterdir())
    refused = run_python(out_dir, "--sharding=none", "--dataset=jsonl", f"--data_path={data}", check=False)
    assert refused.returncode == 2
    assert "data_sha256" in refused.stderr and f"data_path='{data}'" in refused.stderr
    assert sorted(p.name for p in (out_dir / "checkpoints").iterdir()) == before
    resumed = run_python(out_dir, "--sharding=none", "--dataset=jsonl", f"--data_path={moved}")
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout


def test_reference_cache_is_keyed_on_the_starting_weights(tmp_path):
    """A cache of reference log-probs from other weights at the same init_from path is not reused:
    at step 1 the policy equals the reference, so the DPO loss is exactly log 2."""
    from gpt2 import GPT, GPTConfig
    weights = tmp_path / "weights"
    for seed in (0, 1):
        GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, n_positions=64)).init_weights(seed=seed).save_pretrained(weights)
        out_dir = tmp_path / "run"
        result = run_python(out_dir, "--sharding=none", f"--init_from={weights}", "--precompute_reference=true",
                            "--max_steps=1")
        assert train_losses(out_dir)[-1] == pytest.approx(math.log(2), abs=1e-6)
        train_pairs = json.loads(result.stdout.split("data: ", 1)[1].split("\n", 1)[0])["train_pairs"]
        [step_line] = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()
                       if '"loss"' in line and "eval/" not in line]
        assert step_line["epoch"] == 1 / (train_pairs // 8)  # fractional epochs, as TRL logs them; batch_size 8
        for kept in ("checkpoints", "final"):  # as after a crash before the first checkpoint: only the cache stays
            shutil.rmtree(out_dir / kept)
        (out_dir / "metrics.jsonl").unlink()


def test_export_loads_in_transformers_and_reproduces_the_trainers_eval(single):
    """The trainer's final eval logged the mean chosen log-prob of the held-out pairs; recompute it
    with transformers on the exported weights and the same split."""
    model, info = GPT2LMHeadModel.from_pretrained(single / "final", output_loading_info=True)
    assert not any(info.values()), info
    groups = make_demo_groups()
    for group in groups:  # the demo's responses end with <|endoftext|>, which is scored
        group.responses = [response + [50256] for response in group.responses]
    groups, _ = truncate_groups(groups, max_prompt_len=16, max_len=32)
    _, eval_groups = split_groups(groups, EVAL_FRACTION, seed=0)
    batch = collate_pairs(pairs_of(eval_groups))
    with torch.no_grad():
        logits = model.eval()(batch.input_ids).logits.double()
    logprobs = logits[:, :-1].log_softmax(-1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    sequence_logps = (logprobs * batch.response_mask[:, 1:]).sum(-1)
    expected = sequence_logps[: len(sequence_logps) // 2].mean().item()
    with open(single / "metrics.jsonl") as f:
        final_eval = [json.loads(line) for line in f if "eval/logps/chosen" in line][-1]
    assert abs(final_eval["eval/logps/chosen"] - expected) <= 1e-5 * abs(expected)
    assert (single / "samples.md").read_text().startswith("| Prompt | Before training")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The README's demo, its first third (16 of its 48 DPO steps at a constant learning rate), after
    its full SFT warm start: one run for every test that reads it (made_once: one for both workers).
    Returns (out_dir, its output)."""
    def demo(out_dir):
        result = run_in_process([f"--config_file={ROOT / 'config' / 'demo.yaml'}", f"--out_dir={out_dir}",
                                 "--device=cpu", "--ckpt_every=0", "--max_steps=16"])
        assert result.returncode == 0, result.stderr[-3000:]
        (out_dir / "stdout.txt").write_text(result.stdout)

    out_dir = made_once(tmp_path_factory, "demo", demo)
    return out_dir, (out_dir / "stdout.txt").read_text()


def test_demo_config_learns(demo_run):
    """The README's demo: held-out reward accuracy starts at 0 (all rewards are 0 at step 0, so no
    pair is ranked right) and must end well above chance; the ground-truth reward of samples rises."""
    tmp_path, stdout = demo_run
    with open(tmp_path / "metrics.jsonl") as f:
        evals = [json.loads(line) for line in f if "eval/rewards/accuracies" in line]
    assert evals[0]["step"] == 0 and evals[0]["eval/rewards/accuracies"] == 0.0
    assert evals[-1]["eval/rewards/accuracies"] >= 0.9
    assert evals[-1]["eval/rewards/margins"] > 1.0
    # the SFT warm start is the reference: KL 0 at step 0; VADER's reward of held-out samples rises
    assert evals[0]["eval/kl"] == 0.0 and evals[-1]["eval/kl"] > 0.1
    assert evals[-1]["eval/reward"] > evals[0]["eval/reward"] + 0.2, (evals[0], evals[-1])
    assert "final eval" in stdout and "| Prompt |" in stdout and "**mean reward**" in stdout
    assert (tmp_path / "final" / "model.safetensors").exists()


def test_frontier_command_on_the_demos_sft_model(demo_run, tmp_path):
    """frontier.py end to end, small: pairs sampled from the demo's SFT model and ranked by VADER, one
    DPO run, one unlikelihood run, the preferred-FT baseline, a reward model and PPO on it and PPO-GT
    at one target KL, evaluated on the same held-out prompts; the JSON has the documented shape, and
    DPO's reward rises above the SFT model's (the reference's). A relaunch with other generation
    options is refused before anything is redone."""
    import frontier
    import yaml
    from errors import exit_code_of
    config = yaml.safe_load((ROOT / "config" / "frontier_demo.yaml").read_text())
    config["trainer"] |= {"init_from": str(demo_run[0] / "sft"), "device": "cpu", "kl_samples": 32, "eval_every": 3,
                          "n_samples": 0, "log_every": 3}
    config |= {"sft": None, "betas": [0.5], "dpo": {"lr": 3e-4, "max_steps": 6}, "alphas": [0.5],
               "unlikelihood": {"lr": 3e-4, "max_steps": 3}, "preferred_ft": {"lr": 3e-4, "max_steps": 3},
               "reward_model": {"lr": 2e-3, "max_steps": 3}, "target_kls": [1.0],
               "ppo": config["ppo"] | {"max_steps": 1, "batch_size": 16, "ppo_epochs": 1},
               "seeds": [0], "generation": config["generation"] | {"k": 3}}
    (tmp_path / "frontier.yaml").write_text(yaml.safe_dump(config))
    argv = [f"--config_file={tmp_path / 'frontier.yaml'}", f"--out_dir={tmp_path / 'out'}"]
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        frontier.main(argv)
    result = json.loads((tmp_path / "out" / "frontier.json").read_text())
    assert set(result) == {"reference", "runs", "series", "dominance", "reward_model"}
    assert 0 <= result["reward_model"]["accuracy"] <= 1 and list(result["reward_model"]["per_seed"]) == ["0"]
    reference = result["reference"]["reward"]
    assert result["reference"] == {"per_seed": {"0": reference}, "reward": reference}
    assert [(r["method"], r["beta"], r["alpha"], r["target_kl"], r["seed"]) for r in result["runs"]] == [
        ("dpo", 0.5, None, None, 0), ("unlikelihood", None, 0.5, None, 0), ("preferred_ft", None, None, None, 0),
        ("ppo", None, None, 1.0, 0), ("ppo_gt", None, None, 1.0, 0)]
    for run, series in zip(result["runs"], result["series"]):
        last = {"dpo": 6, "ppo": 1, "ppo_gt": 1}.get(run["method"], 3)
        assert [p["step"] for p in run["points"]] == ([0, 3, 6] if last == 6 else [0, last]), run
        assert all(set(p) == {"step", "kl", "reward"} for p in run["points"])
        assert run["points"][0]["kl"] == 0.0 and run["points"][0]["reward"] == reference
        assert series["seeds"] == [0] and all(p["kl_stderr"] is None for p in series["points"])  # one seed
        assert [(p["kl"], p["reward"]) for p in series["points"]] == [(p["kl"], p["reward"]) for p in run["points"]]
    assert result["dominance"]["of"] == 4  # the unlikelihood and preferred-FT points at step 3, PPO's at 1
    dpo = result["runs"][0]["points"]
    assert dpo[-1]["reward"] > reference and dpo[-1]["kl"] > 0, (dpo, stdout.getvalue()[-2000:])
    pairs = [json.loads(line) for line in (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()]
    assert all(p["chosen_reward"] > p["rejected_reward"] for p in pairs) and len(pairs) <= 128 * 3
    config["generation"]["k"] = 4  # every run above was trained on the k=3 pairs
    (tmp_path / "frontier.yaml").write_text(yaml.safe_dump(config))
    with contextlib.redirect_stderr(io.StringIO()) as stderr:
        assert exit_code_of(frontier.main, argv) == 2
    assert "pairs.jsonl was made from other inputs (generation.k: 3 -> 4)" in stderr.getvalue(), stderr.getvalue()


@pytest.mark.parametrize("args, message", [
    (["--bogus_key=1"], "unknown key 'bogus_key'"),
    (["--beta=abc"], "--beta: beta must be float, got 'abc'"),
    (["--loss_type=foo"], "loss_type='foo' is not one of"),
    (["--beta=0"], "beta must be a finite number > 0, got 0.0"),
    (["--loss_type=ipo", "--label_smoothing=0.1"], "label_smoothing=0.1 is not defined for loss_type 'ipo'"),
    (["--dataset=jsonl", "--data_path=does/not/exist.jsonl"], "does/not/exist.jsonl"),
    (["--batch_size=6", "--micro_batch_size=4"], "batch_size (6) must be a multiple of micro_batch_size (4)"),
    (["--lr=inf"], "lr must be a finite number, got inf"),
    (["--dataset=text", "--data_path=README.md"], "dataset=text is plain text, without prompts or preferences"),
    (["--grad_clip=nan"], "grad_clip must be a finite number, got nan"),
    (["--temperature=nan"], "temperature must be a finite number, got nan"),
    (["--adam_beta1=1"], "adam_beta1 must be in [0, 1), got 1.0"),
    (["--adam_beta2=-0.1"], "adam_beta2 must be in [0, 1), got -0.1"),
    (["--seed=-1"], "seed must be in 0..4294967295, got -1"),
    (["--seed=4294967296"], "seed must be in 0..4294967295, got 4294967296"),
    (["--max_len=80"], "max_len=80 is longer than the model's 64 positions (n_positions)"),
    (["--max_prompt_len=60", "--max_len=64", "--max_new_tokens=5"],
     "max_prompt_len + max_new_tokens = 65 is longer than the model's 64 positions"),
])
def test_bad_config_fails_before_writing_anything(tmp_path, args, message):
    out_dir = tmp_path / "run"
    result = run_python(out_dir, *args, check=False)
    assert result.returncode == 2
    assert message in result.stderr
    assert not out_dir.exists()


def test_sft_on_plain_text_is_transformers_nll_of_each_text_after_endoftext(tmp_path):
    """dataset: text (the paper's SFT on IMDb reviews): each text is scored as transformers' language
    model loss scores <|endoftext|> + the text + <|endoftext|>, cut to max_len. From the same starting
    weights, the first step's loss (all four training texts, before the update) is their pooled NLL per
    token, the first eval's loss the held-out text's; duplicates and empty texts are dropped; the
    training loss falls; and the before/after table holds n_samples texts of their own."""
    from transformers import GPT2Config
    from data.tokenizer import encode
    start = tmp_path / "start"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, resid_pdrop=0, embd_pdrop=0,
                               attn_pdrop=0)).save_pretrained(start)
    texts = ["A wonderful film, I loved it.", "Dull and far too long.", "Fine.", "Fine.", " ",
             "The best performance of the year, " * 8, "I want my two hours back!"]
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    result = run_python(tmp_path / "run", f"--init_from={start}", "--dataset=text", f"--data_path={tmp_path / 'texts.jsonl'}",
                        "--objective=sft", "--eval_fraction=0.2", "--batch_size=4", "--micro_batch_size=4",
                        "--max_steps=6", "--epochs=6", "--kl_samples=0", "--n_samples=3")
    assert '"texts": 5, "dropped_empty": 1, "dropped_duplicate": 1, "cut": 1' in result.stdout
    model = GPT2LMHeadModel.from_pretrained(start).eval()
    nll = {}  # text -> (summed NLL, tokens)
    for text in dict.fromkeys(texts[:4] + texts[5:]):
        ids = torch.tensor([[50256] + (encode(text) + [50256])[:31]])
        with torch.no_grad():
            n_tokens = ids.size(1) - 1
            nll[text] = (model(ids, labels=ids).loss.item() * n_tokens, n_tokens)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first_eval, steps = lines[0], [line for line in lines if "loss" in line and "step" in line]
    held_out = [text for text in nll if abs(first_eval["eval/loss"] - nll[text][0] / nll[text][1]) < 1e-5]
    assert len(held_out) == 1, (first_eval, nll)
    train = [nll[text] for text in nll if text != held_out[0]]
    assert steps[0]["loss"] == pytest.approx(sum(s for s, _ in train) / sum(n for _, n in train), rel=1e-5)
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.1
    rows = (tmp_path / "run" / "samples.md").read_text().splitlines()[2:]
    assert len(rows) == 3 and len({row.split(" | ")[1] for row in rows}) == 3  # three samples before, not one thrice


def test_init_from_model_too_short_for_max_len_is_refused_before_loading(tmp_path):
    """n_positions comes from the model's config.json: refused naming it, before any weight is read
    (the weight file here is garbage, so reading it would be a different error)."""
    from gpt2 import GPT, GPTConfig
    weights = tmp_path / "weights"
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, n_positions=24)).save_pretrained(weights)
    (weights / "model.safetensors").write_bytes(b"not read")
    result = run_python(tmp_path / "run", f"--init_from={weights}", check=False)
    assert result.returncode == 2
    assert f"max_len=32 is longer than the model's 24 positions ({weights / 'config.json'})" in result.stderr
    assert not (tmp_path / "run").exists()


def test_bad_yaml_key_names_the_file(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("betta: 0.1\n")
    result = run_python(tmp_path / "run", f"--config_file={config}", check=False)
    assert result.returncode != 0
    assert f"{config}: unknown key 'betta'; did you mean 'beta'?" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_bug_keeps_its_traceback_and_is_not_called_bad_input(tmp_path, monkeypatch):
    """run() is the one error boundary: a ValueError from inside the step (a shape bug, say) is not
    bad input; it leaves run() as itself (the interpreter prints its traceback, exit 1), not as exit 2."""
    def broken_step(*args, **kwargs):
        raise ValueError("shapes (4, 7) and (8, 7) do not broadcast")
    monkeypatch.setattr(fsdp_train, "train_step", broken_step)
    with pytest.raises(ValueError, match="do not broadcast"):
        fsdp_train.run([*TINY, f"--out_dir={tmp_path}"])
    assert not torch.distributed.is_initialized()  # the group is destroyed on this path too


# ----------------------------------------------------------------------------- hostile and bad input

def test_a_yaml_alias_bomb_and_deep_nesting_are_refused_at_once_in_one_short_line(tmp_path):
    """439 bytes of nested aliases expand to gigabytes ('billion laughs'): refused before expanding,
    and no message prints a value whole."""
    import time

    from errors import ConfigError
    from train.config import parse_args
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text('a: &a ["x","x","x","x","x","x","x","x","x"]\n' + "".join(
        f"{c}: &{c} [{','.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")) + "lr: *i\n")
    deep = tmp_path / "deep.yaml"
    deep.write_text("lr: " + "[" * 20000 + "]" * 20000 + "\n")
    huge_value = tmp_path / "huge.yaml"
    huge_value.write_text("lr: " + "9" * 100000 + "x\n")
    for path, expected in ((bomb, "aliases"), (deep, "nested too deeply"), (huge_value, "lr must be float")):
        start = time.perf_counter()
        with pytest.raises(ConfigError, match=expected) as refused:
            parse_args(["--config_file", str(path)])
        assert time.perf_counter() - start < 2 and len(str(refused.value)) < 500
    for path, expected in ((tmp_path, "not a regular file"), (tmp_path / "none.yaml", "no such file")):
        with pytest.raises(ConfigError, match=expected):
            parse_args(["--config_file", str(path)])


def test_a_directory_or_fifo_as_data_path_is_named_as_such(tmp_path):
    from errors import ConfigError
    from train.config import parse_args
    fifo = tmp_path / "prefs.fifo"
    os.mkfifo(fifo)
    for path in (tmp_path, fifo):
        with pytest.raises(ConfigError, match="not a regular file"):
            parse_args(["--dataset=jsonl", f"--data_path={path}"])


@pytest.mark.parametrize("option, message", [
    ("--temperature=-1", "--temperature must be a finite number >= 0"),
    ("--temperature=nan", "--temperature must be a finite number >= 0"),
    ("--top_p=2", "--top_p must be in (0, 1]"),
    ("--top_k=0", "--top_k must be >= 1"),
    ("--num_samples=0", "--num_samples must be >= 1"),
    ("--prompt=", "--prompt is empty"),
])
def test_sample_refuses_values_it_cannot_use_in_one_line(tmp_path, capsys, option, message):
    import sample
    from errors import exit_code_of
    assert exit_code_of(sample.main, ["--model", str(tmp_path / "not_loaded"), option]) == 2
    err = capsys.readouterr().err  # refused before the model (which does not exist) is looked for
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_unlikelihood_trains_end_to_end_with_the_kl_against_its_start(tmp_path):
    """objective: unlikelihood through the whole job: its terms logged, no preference "loss" in the
    eval lines (it does not train that), eval/kl against the starting weights, a model card saying so."""
    run_python(tmp_path, "--sharding=none", "--objective=unlikelihood", "--unlikelihood_alpha=0.5", "--max_steps=2",
               "--eval_every=0")
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "loss" in line]
    assert len(steps) == 2 and all({"nll/chosen", "unlikelihood/rejected"} <= set(line) for line in steps)
    final = lines[-1]
    assert "eval/loss" not in final and final["eval/kl"] >= -1 and "eval/rewards/accuracies" in final
    assert "unlikelihood: maximum likelihood of the chosen responses" in (tmp_path / "final" / "README.md").read_text()


def test_eval_prompts_replace_the_held_out_prompts_of_the_sampled_metrics(tmp_path):
    """eval_prompts (the paper evaluates on IMDb's test split): with no held-out pairs at all, every eval
    still samples those prompts for eval/kl and eval/reward, and samples.md shows them."""
    prompts = ["The first test prompt", "Another one from the test split", "A third"]
    (tmp_path / "test_prompts.txt").write_text("\n".join(prompts) + "\n")
    run_python(tmp_path / "run", "--eval_fraction=0", f"--eval_prompts={tmp_path / 'test_prompts.txt'}",
               "--kl_samples=3", "--n_samples=3", "--reward=vader")
    evals = [line for line in json.loads("[" + ",".join(open(tmp_path / "run" / "metrics.jsonl")) + "]")
             if "eval/kl" in line]
    assert [line["step"] for line in evals] == [0, 4] and evals[0]["eval/kl"] == 0.0 and evals[-1]["eval/kl"] > 0
    assert all("eval/reward" in line and "eval/rewards/accuracies" not in line for line in evals)
    table = (tmp_path / "run" / "samples.md").read_text()
    assert all(f"| {prompt} |" in table for prompt in prompts), table
    result = run_in_process([*TINY, f"--out_dir={tmp_path / 'bad'}", f"--eval_prompts={tmp_path / 'none.txt'}"])
    assert result.returncode == 2 and "eval_prompts" in result.stderr and "no such file" in result.stderr
