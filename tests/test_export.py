"""out_dir/final/ against transformers, the independent reader: a pipeline and AutoTokenizer load the
folder with nothing else, generate what sample.py generates and tokenize as tiktoken does; the model
card and generation config say how the run was made; every file is readable by others (0644)."""
import json
import os
import stat

import pytest
from transformers import AutoTokenizer, GenerationConfig, pipeline

from conftest import ROOT
from data.tokenizer import EOT_ID, encode
from gpt2 import GPT, GPTConfig, write_hf_checkpoint
import sample
from train import export
from train.run_dir import write_atomic
from test_fsdp_train import run_python
from train.config import TrainConfig

PROMPT = "Honestly, the hotel was"
TEXT = ("Honestly, the hotel was great! I'd stay again in 2024 \u2014 5\u2605, na\u00efve caf\u00e9\u2026\n\n"
        "  \u65e5\u672c\u8a9e \U0001F600\ttabs")


def current_umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~current_umask()  # what open() gives a new file: 0644 usually


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A two-step DPO run of the tiny model; its final/ is the folder under test."""
    out_dir = tmp_path_factory.mktemp("export_run")
    run_python(out_dir, "--sharding=none", "--max_steps=2", "--eval_fraction=0.03", "--n_samples=0",
               "--kl_samples=0", "--max_new_tokens=6")
    return out_dir


def test_final_holds_a_complete_model_folder_readable_by_everyone(run):
    final = run / "final"
    assert sorted(os.listdir(final)) == ["README.md", "config.json", "export.json", "generation_config.json",
                                         "merges.txt", "model.safetensors", "special_tokens_map.json",
                                         "tokenizer_config.json",
                                         "vocab.json"]
    # the hub's openai-community/gpt2 files, byte for byte
    assert (final / "vocab.json").read_bytes() == (ROOT / "data" / "gpt2_bpe" / "encoder.json").read_bytes()
    assert (final / "merges.txt").read_bytes() == (ROOT / "data" / "gpt2_bpe" / "vocab.bpe").read_bytes()
    written = [*final.iterdir(), run / "config.yaml", run / "metrics.jsonl",
               *(run / "checkpoints").glob("step_*/train_state.json")]
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written}
    assert set(modes.values()) == {oct(FILE_MODE)}, modes


def test_pipeline_greedy_tokens_equal_sample_py(run):
    final = str(run / "final")
    generate = pipeline("text-generation", model=final, device="cpu")
    out = generate(PROMPT, do_sample=False, max_new_tokens=8, return_tensors=True)[0]["generated_token_ids"]
    prompt_ids = encode(PROMPT)
    assert out[:len(prompt_ids)] == prompt_ids
    theirs = out[len(prompt_ids):]
    theirs = theirs[:theirs.index(EOT_ID)] if EOT_ID in theirs else theirs
    ours = sample.continuations(GPT.from_pretrained(final), [PROMPT], max_new_tokens=8, temperature=0.0)[0]
    assert theirs == ours and ours  # a row that ended at once would compare nothing


def test_auto_tokenizer_is_gpt2_with_tiktoken_ids(run):
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert tokenizer(TEXT)["input_ids"] == encode(TEXT)
    assert tokenizer.decode(encode(TEXT)) == TEXT
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == EOT_ID
    assert tokenizer.model_max_length == 64  # the run's n_positions


def test_generation_config_and_model_card_describe_the_run(run):
    config = GenerationConfig.from_pretrained(run / "final")
    assert config.eos_token_id == config.bos_token_id == config.pad_token_id == EOT_ID
    assert (config.do_sample, config.temperature, config.max_new_tokens) == (True, 0.7, 6)
    card = (run / "final" / "README.md").read_text()
    with open(run / "metrics.jsonl") as f:
        final_eval = [json.loads(line) for line in f if "eval/loss" in line][-1]
    for expected in ("loss_type sigmoid, β = 0.1", "format `demo`", "eval_fraction 0.03",
                     "2 optimizer steps of 8 pairs", "precision | fp32", "python fsdp_train.py --init_from=scratch",
                     "--max_new_tokens=6",
                     f"| eval/loss | {final_eval['eval/loss']:.4f} |",
                     f"| eval/rewards/accuracies | {final_eval['eval/rewards/accuracies']:.4f} |"):
        assert expected in card, expected
    assert "base_model" not in card  # a scratch model has none


def test_greedy_runs_export_a_greedy_generation_config():
    config = export.generation_config(TrainConfig(temperature=0.0, max_new_tokens=24))
    assert config["do_sample"] is False and "temperature" not in config
    GenerationConfig(**config).validate(strict=True)  # no warning either
    assert export.base_model("gpt2-xl") == "openai-community/gpt2-xl" and export.base_model("scratch") is None


def test_files_written_over_a_private_leftover_are_not_private(tmp_path):
    """write_atomic and the safetensors writer create their files anew: 0o666 & ~umask, whatever a
    crash left behind (safetensors alone makes its files 0600)."""
    leftover = tmp_path / "config.yaml.tmp"
    leftover.write_text("torn")
    leftover.chmod(0o600)
    write_atomic(str(tmp_path / "config.yaml"), "a: 1\n")
    write_atomic(str(tmp_path / "vocab.json"), b"{}")
    config = GPTConfig(n_layer=1, n_head=1, n_embd=8, vocab_size=16, n_positions=8)
    write_hf_checkpoint(config, GPT(config).state_dict(), str(tmp_path))
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["config.yaml", "vocab.json", "config.json", "model.safetensors"], FILE_MODE)
