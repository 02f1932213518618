"""frontier.py and generate_pairs.py as a user runs them: every option that cannot work is refused in
one line before any stage or sampling, a multi-process launch is refused on every rank instead of
hanging, and SIGTERM ends the frontier with one line and 143. (The frontier end to end is
tests/test_fsdp_train.py::test_frontier_command_on_the_demos_sft_model; the pipeline's counts and
ordering tests/test_reward.py.)"""
import json
import math
import signal
import statistics
import time

import pytest
import yaml

import frontier
import generate_pairs
import warm
from conftest import ROOT
from errors import exit_code_of
from gpt2 import GPT, GPTConfig

pytestmark = pytest.mark.slow


def demo_config(**changes):
    config = yaml.safe_load((ROOT / "config" / "frontier_demo.yaml").read_text())
    for key, value in changes.items():
        config[key] = value
    return config


@pytest.mark.parametrize("changes, message", [
    ({"betas": ["abc"]}, "betas must be a list of numbers > 0"),
    ({"betas": 0.1}, "betas must be a list of numbers > 0"),
    ({"alphas": [0]}, "alphas must be a list of numbers > 0"),
    ({"seeds": [0, 0]}, "seeds must be a list of distinct integers >= 0"),
    ({"unlikelihood": ["lr"]}, "unlikelihood must be a mapping of options, got list"),
    ({"generation": {"k": 4, "bogus": 1}}, "generation: unknown keys ['bogus']"),
    ({"generation": {"k": 1}}, "k must be an integer >= 2"),
    ({"trainer": ["init_from", "gpt2"]}, "trainer must be a mapping of options, got list"),
    ({"trainer": {"reward": "vader"}}, "trainer.init_from must name the starting model"),
    ({"dpo": {"lr": "fast"}}, "lr must be float"),
    ({"prompts": "no/such/prompts.jsonl"}, "no/such/prompts.jsonl: cannot read prompts"),
    ({"ppo": {"lr": 1e-4, "target_kl": 3.0}}, "ppo: target_kl is set per run by frontier.py"),
    ({"dpo": {"beta": 0.5}}, "dpo: beta is set per run by frontier.py"),
    ({"reward_model": {"eval_fraction": 0}}, "the reward model needs held-out pairs for its accuracy"),
    ({"reward_model": None}, "ppo and reward_model go together"),
    ({"sft": {"objective": "dpo"}}, "sft: objective is set per run by frontier.py"),
    ({"sft": {"lr_schedule": "linear"}}, "lr_schedule='linear'"),
    ({"sft": {"dataset": "text", "data_path": "no/such/reviews.jsonl"}}, "data_path 'no/such/reviews.jsonl': no such file"),
])
def test_a_bad_frontier_config_is_refused_before_any_stage(tmp_path, capsys, changes, message):
    (tmp_path / "frontier.yaml").write_text(yaml.safe_dump(demo_config(**changes)))
    out_dir = tmp_path / "out"
    assert exit_code_of(frontier.main, [f"--config_file={tmp_path / 'frontier.yaml'}", f"--out_dir={out_dir}"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out_dir.exists()


def test_the_paper_scale_config_passes_every_check_and_plans_the_papers_runs(tmp_path, monkeypatch):
    """config/frontier_gpt2_imdb.yaml, with its three IMDb files in the working directory (stand-ins) and
    the classifier's download skipped: every stage's options pass the trainer's checks, SFT reads the
    reviews as plain text, and the runs are the paper's 22 per seed (preferred-FT once) with a reward model."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(frontier, "fetch_reward", lambda spec: None)
    (tmp_path / "imdb_train_texts.jsonl").write_text('{"text": "A film."}\n')
    for name in ("prompts.jsonl", "test_prompts.jsonl"):
        (tmp_path / name).write_text('{"prompt": "This movie"}\n')
    cfg = frontier.read_config(str(ROOT / "config" / "frontier_gpt2_imdb.yaml"))
    assert cfg.trainer["init_from"] == "gpt2-large" and cfg.sft["dataset"] == "text"
    runs = frontier.planned_runs(cfg, "pairs.jsonl", "best.jsonl")
    per_seed = {method: sum(run["method"] == method for run in runs) / len(cfg.seeds) for method in
                ("dpo", "unlikelihood", "ppo", "ppo_gt", "preferred_ft", "reward_model")}
    assert per_seed == {"dpo": 4, "unlikelihood": 4, "ppo": 4, "ppo_gt": 4, "preferred_ft": 1, "reward_model": 1}


def test_a_multi_process_launch_of_the_frontier_is_refused_on_every_rank(tmp_path):
    """torchrun --nproc_per_node 2 frontier.py hung for good (both ranks made the same pairs, then the
    next stage's process group never formed): now each rank says how to run it, and all exit. The two
    ranks are started as torchrun starts its workers (tests/warm.py)."""
    start = time.monotonic()
    returncodes, output = warm.wait_ranks(warm.ranks(["frontier.py", "--config_file=config/frontier_demo.yaml",
                                                      f"--out_dir={tmp_path}"]), timeout=180)
    assert returncodes == [2, 2] and time.monotonic() - start < 120, output[-3000:]
    assert output.count("launch it with python, not torchrun") == 2  # each rank refuses before any work
    assert not (tmp_path / "sft").exists() and not (tmp_path / "pairs.jsonl").exists()


def test_sigterm_ends_the_frontier_with_one_line_and_143(tmp_path):
    config = demo_config(sft={"dataset": "demo", "lr": 3e-3, "max_steps": 400, "epochs": 100})
    config["trainer"] |= {"device": "cpu", "log_every": 1, "n_samples": 0, "kl_samples": 0}
    (tmp_path / "frontier.yaml").write_text(yaml.safe_dump(config))
    process = warm.popen(["frontier.py", f"--config_file={tmp_path / 'frontier.yaml'}", f"--out_dir={tmp_path / 'out'}"],
                         merge_stderr=False)
    for line in process.stdout:
        if line.startswith("step 3/"):
            process.send_signal(signal.SIGTERM)
            break
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith("the sft run was stopped by SIGTERM")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, n_positions=32)).init_weights(seed=0).save_pretrained(path)
    return path


@pytest.mark.parametrize("prompt, extra, message", [
    (" word" * 40, [], "prompt 2 (40 tokens) + max_new_tokens 8 is longer than the model's 32 positions"),
    ("Hello", ["--max_new_tokens=40"], "prompt 1 (1 tokens) + max_new_tokens 40 is longer"),
    ("Hello", ["--k=1"], "k must be an integer >= 2"),
    ("Hello", ["--out=DIR"], "is a directory; name a file"),
    ("Hello", ["--out=DIR/missing/pairs.jsonl"], "does not exist"),
    ("Hello", ["--device=cuda"], "torch.cuda.is_available() is False"),
], ids=["long_prompt", "max_new_tokens", "k", "out_is_a_directory", "out_folder_missing", "cuda"])
def test_generate_pairs_refuses_what_cannot_work_before_sampling(tmp_path, capsys, tiny_model, prompt, extra,
                                                                 message):
    if "cuda" in message and __import__("torch").cuda.is_available():
        pytest.skip("checks the refusal on a machine without CUDA")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"Hello\n{prompt}\n")
    extra = [e.replace("DIR", str(tmp_path)) for e in extra]
    argv = ["--model", str(tiny_model), "--prompts", str(prompts), "--out", str(tmp_path / "pairs.jsonl"),
            "--max_new_tokens=8", *extra]
    assert exit_code_of(generate_pairs.main, argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "pairs.jsonl").exists() and not (tmp_path / "pairs.jsonl.tmp").exists()


def test_generate_pairs_never_writes_an_empty_pairs_file(tmp_path, tiny_model, capsys, monkeypatch):
    """Samples that all tie (here: a reward that scores everything 0) give no pairs: refused, no file."""
    class Flat:
        def score(self, prompts, texts):
            return [0.0] * len(texts)
    monkeypatch.setattr(generate_pairs, "load_reward", lambda spec, device: Flat())
    (tmp_path / "prompts.txt").write_text("Hello\nThe movie was\n")
    argv = ["--model", str(tiny_model), "--prompts", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "p.jsonl"),
            "--max_new_tokens=4"]
    assert exit_code_of(generate_pairs.main, argv) == 2
    assert "no pairs" in capsys.readouterr().err and not (tmp_path / "p.jsonl").exists()


# ----------------------------------------------------------------------------- the frontier's numbers

def write_run(directory, points):
    """A run directory whose metrics.jsonl holds these (step, kl, reward) eval lines."""
    directory.mkdir()
    (directory / "metrics.jsonl").write_text("".join(
        json.dumps({"step": step, "eval/kl": kl, "eval/reward": reward, "eval/kl_one_sample": kl}) + "\n"
        for step, kl, reward in points))
    return directory


def test_series_are_means_over_seeds_with_their_standard_errors_and_dominance_is_counted(tmp_path):
    """Two seeds of DPO and of unlikelihood, written by hand: each series' point is the mean of its
    seeds' points at that step, its error the sample standard deviation over sqrt(seeds)
    (statistics.stdev); a non-DPO point counts as dominated when a DPO point has at least its reward
    at no more KL; the reference is each seed's step-0 reward."""
    runs = []
    for seed, shift in ((0, 0.0), (1, 0.2)):
        runs.append({"method": "dpo", "beta": 0.1, "alpha": None, "target_kl": None, "seed": seed, "dir": write_run(
            tmp_path / f"dpo_{seed}", [(0, 0.0, 0.1 + shift), (10, 1.0 + shift, 0.5 + shift), (20, 2.0, 0.9)])})
        runs.append({"method": "unlikelihood", "beta": None, "alpha": 0.5, "target_kl": None, "seed": seed,
                     "dir": write_run(tmp_path / f"ul_{seed}", [(0, 0.0, 0.1 + shift), (10, 1.5, 0.6), (20, 0.5, 0.95)])})
        (tmp_path / f"rm_{seed}").mkdir()  # a reward model: its held-out accuracy, no point of the figure
        (tmp_path / f"rm_{seed}" / "metrics.jsonl").write_text(json.dumps(
            {"step": 20, "eval/rewards/accuracies": 0.8 + shift / 2}) + "\n")
        runs.append({"method": "reward_model", "beta": None, "alpha": None, "target_kl": None, "seed": seed,
                     "dir": tmp_path / f"rm_{seed}"})
    result = frontier.frontier(runs)
    assert result["reward_model"] == {"per_seed": {"0": 0.8, "1": 0.9}, "accuracy": pytest.approx(0.85)}
    assert result["reference"] == {"per_seed": {"0": 0.1, "1": pytest.approx(0.3)}, "reward": pytest.approx(0.2)}
    dpo, unlikelihood = result["series"]
    assert (dpo["method"], dpo["beta"], dpo["seeds"]) == ("dpo", 0.1, [0, 1])
    assert [p["step"] for p in dpo["points"]] == [0, 10, 20]
    middle = dpo["points"][1]
    assert middle["kl"] == pytest.approx(1.1) and middle["reward"] == pytest.approx(0.6)
    assert middle["kl_stderr"] == pytest.approx(statistics.stdev([1.0, 1.2]) / math.sqrt(2))
    assert middle["reward_stderr"] == pytest.approx(statistics.stdev([0.5, 0.7]) / math.sqrt(2))
    assert dpo["points"][2]["kl_stderr"] == 0.0
    # unlikelihood's step 10 (kl 1.5, reward 0.6) is dominated by DPO's (1.1, 0.6); step 20 (0.5, 0.95) is not
    assert result["dominance"] == {"dominated": 1, "of": 2, "not_dominated": [
        {"series": "Unlikelihood α=0.5", "step": 20, "kl": 0.5, "reward": 0.95}]}
    summary = frontier.summary(result)
    assert "| DPO β=0.1 | 2 | 20 | 2.00 ± 0.00 | 0.900 ± 0.000 |" in summary
    assert "dominance: 1 of 2 points" in summary
    assert "reward model: held-out accuracy against the ground-truth ordering 0.850" in summary


def test_a_second_frontier_on_a_directory_in_use_is_refused(tmp_path, capsys):
    from train.run_dir import lock_run_dir, unlock_run_dirs
    (tmp_path / "frontier.yaml").write_text(yaml.safe_dump(demo_config()))
    lock_run_dir(str(tmp_path / "out"))
    try:
        assert exit_code_of(frontier.main, [f"--config_file={tmp_path / 'frontier.yaml'}",
                                            f"--out_dir={tmp_path / 'out'}"]) == 2
    finally:
        unlock_run_dirs()
    assert "is in use by another run" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".lock"]
