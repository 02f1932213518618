"""frontier.py and generate_pairs.py as a user runs them: every option that cannot work is refused in
one line before any stage or sampling, a multi-process launch is refused on every rank instead of
hanging, and SIGTERM ends the frontier with one line and 143. (The frontier end to end is
tests/test_fsdp_train.py::test_frontier_command_on_the_demos_sft_model; the pipeline's counts and
ordering tests/test_reward.py.)"""
import signal
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
    ({"generation": {"k": 4, "bogus": 1}}, "generation: unknown keys ['bogus']"),
    ({"generation": {"k": 1}}, "k must be an integer >= 2"),
    ({"trainer": ["init_from", "gpt2"]}, "trainer must be a mapping of options, got list"),
    ({"trainer": {"reward": "vader"}}, "trainer.init_from must name the starting model"),
    ({"dpo": {"lr": "fast"}}, "lr must be float"),
    ({"prompts": "no/such/prompts.jsonl"}, "no/such/prompts.jsonl: cannot read prompts"),
])
def test_a_bad_frontier_config_is_refused_before_any_stage(tmp_path, capsys, changes, message):
    (tmp_path / "frontier.yaml").write_text(yaml.safe_dump(demo_config(**changes)))
    out_dir = tmp_path / "out"
    assert exit_code_of(frontier.main, [f"--config_file={tmp_path / 'frontier.yaml'}", f"--out_dir={out_dir}"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out_dir.exists()


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
