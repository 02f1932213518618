"""gpt2.py against transformers' GPT2LMHeadModel: logits, padding, loading, export, generation."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import ROOT
from gpt2 import GPT, GPTConfig, PRESETS, WeightsError, padding_inputs, sample_next_token

TOL = 1e-5  # max |ours - transformers| / max |transformers|, fp32


def make_hf_model(seed=0, **shape):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**shape)).eval()


def saved_hf_dir(tmp_path, hf_model, name="hf"):
    path = tmp_path / name
    hf_model.save_pretrained(path)
    return path


def rewrite_in_hub_original_layout(path, n_layer, n_positions):
    """The hub's original gpt2 files: keys without "transformer.", plus the attn.bias/masked_bias buffers."""
    with safe_open(path / "model.safetensors", "pt") as f:
        tensors = {k.removeprefix("transformer."): f.get_tensor(k) for k in f.keys()}
    for i in range(n_layer):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_positions, n_positions)).view(1, 1, n_positions, n_positions)
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def relative_error(ours, ref, mask=None):
    diff = (ours - ref).abs()
    if mask is not None:
        diff = diff * mask[..., None]
    return (diff.max() / ref.abs().max()).item()


SHAPES = {f"{name}-2layers": dict(v, n_layer=2, vocab_size=1000, n_positions=128) for name, v in PRESETS.items()}
SHAPES["odd"] = dict(n_layer=3, n_head=5, n_embd=40, vocab_size=333, n_positions=50, n_inner=72,
                     layer_norm_epsilon=1e-3, scale_attn_by_inverse_layer_idx=True)
SHAPES["exact-gelu"] = dict(n_layer=1, n_head=1, n_embd=16, vocab_size=77, n_positions=20, activation_function="gelu")


@pytest.mark.parametrize("layout", ["save_pretrained", "hub_original"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_logits_match_transformers(tmp_path, shape, layout):
    spec = SHAPES[shape]
    hf = make_hf_model(**spec)
    path = saved_hf_dir(tmp_path, hf)
    if layout == "hub_original":
        rewrite_in_hub_original_layout(path, spec["n_layer"], spec["n_positions"])
    ours = GPT.from_pretrained(str(path))
    input_ids = torch.randint(0, spec["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert relative_error(ours(input_ids), hf(input_ids).logits) <= TOL


def test_full_size_gpt2_124m_matches_transformers(tmp_path):
    hf = make_hf_model()  # GPT2Config() defaults are gpt2 (124M)
    ours = GPT.from_pretrained(str(saved_hf_dir(tmp_path, hf)))
    assert ours.config == GPTConfig.from_name("gpt2")
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    input_ids = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert relative_error(ours(input_ids), hf(input_ids).logits) <= TOL


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    hf = make_hf_model(n_layer=2, n_head=4, n_embd=64, vocab_size=50257, n_positions=64)
    path = tmp_path_factory.mktemp("small") / "hf"
    hf.save_pretrained(path)
    return hf, GPT.from_pretrained(str(path)), path


def padded_batch(side):
    lengths = [9, 5, 12, 1]
    T = max(lengths)
    gen = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 50257, (len(lengths), T), generator=gen)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, T - n:] = 1
    return input_ids, mask


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batches_match_transformers_on_real_tokens(small_pair, side):
    hf, ours, _ = small_pair
    input_ids, mask = padded_batch(side)
    # transformers' forward counts positions 0..T-1 whatever the mask; its generate() derives them
    # from the mask, as ours does by default. Give both the same positions.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(input_ids, attention_mask=mask, position_ids=position_ids).logits
        assert relative_error(ours(input_ids, *padding_inputs(mask)), ref, mask) <= TOL
        if side == "right":  # right padding needs no mask at all: causal rows never see later pads
            assert relative_error(ours(input_ids), ref, mask) <= TOL
        assert torch.isfinite(ours(input_ids, *padding_inputs(mask))).all()


def test_logits_at_gives_logits_only_at_chosen_positions(small_pair):
    hf, ours, _ = small_pair
    input_ids, mask = padded_batch("right")
    chosen = mask.bool() & (torch.arange(input_ids.size(1)) % 3 == 0)
    with torch.no_grad():
        packed = ours(input_ids, logits_at=chosen)
        ref = hf(input_ids).logits[chosen]
        flat_index = torch.tensor([5, 0, 5, 13])  # (row 0, pos 5), (0, 0), again, (row 1, pos 1)
        indexed = ours(input_ids, logits_at=flat_index)
    assert packed.shape == (int(chosen.sum()), 50257)
    assert relative_error(packed, ref) <= TOL
    ref_indexed = hf(input_ids).logits[[0, 0, 0, 1], [5, 0, 5, 1]]
    assert relative_error(indexed, ref_indexed) <= TOL


def test_round_trip_ours_to_transformers(tmp_path, small_pair):
    _, ours, _ = small_pair
    ours.save_pretrained(tmp_path / "export")
    assert sorted(os.listdir(tmp_path / "export")) == ["config.json", "model.safetensors"]
    reloaded, info = GPT2LMHeadModel.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    input_ids = torch.randint(0, 50257, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert relative_error(ours(input_ids), reloaded.eval()(input_ids).logits) <= TOL


def test_sharded_checkpoint_loads(tmp_path):
    hf = make_hf_model(n_layer=2, n_head=4, n_embd=64, vocab_size=50257, n_positions=64)
    path = tmp_path / "sharded"
    hf.save_pretrained(path, max_shard_size="2MB")
    assert (path / "model.safetensors.index.json").exists() and not (path / "model.safetensors").exists()
    ours = GPT.from_pretrained(str(path))
    input_ids = torch.randint(0, 50257, (1, 10))
    with torch.no_grad():
        assert relative_error(ours(input_ids), hf(input_ids).logits) <= TOL


def test_loads_in_requested_dtype_without_meta_leftovers(small_pair):
    _, _, path = small_pair
    ours = GPT.from_pretrained(str(path), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in ours.parameters())
    assert ours.lm_head.weight is ours.transformer.wte.weight


def test_hub_id_goes_through_huggingface_hub_cache_offline(tmp_path):
    """A hub id resolves through huggingface_hub's cache (HF_HUB_OFFLINE=1), as after a real download."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-gpt2"
    make_hf_model(n_layer=1, n_head=2, n_embd=32, vocab_size=50257, n_positions=32).save_pretrained(
        repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    code = ("from gpt2 import GPT\n"
            "print(GPT.from_pretrained('someone/tiny-gpt2').config.n_embd)\n"
            "GPT.from_pretrained('someone/not-cached')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.stdout.strip() == "32"
    assert "could not fetch 'someone/not-cached'" in result.stderr and "HF_HUB_OFFLINE" in result.stderr


# ----------------------------------------------------------------------------- bad files

def test_truncated_safetensors_is_a_clear_error(tmp_path, small_pair):
    _, ours, _ = small_pair
    ours.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file.*truncated"):
        GPT.from_pretrained(str(tmp_path / "m"))


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path, small_pair):
    _, ours, _ = small_pair
    ours.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    with safe_open(weights, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    tensors["transformer.h.0.ln_1.weight"] = torch.ones(3)
    tensors["transformer.h.7.extra.weight"] = torch.ones(1)
    save_file(tensors, weights)
    with pytest.raises(ValueError) as err:
        GPT.from_pretrained(str(tmp_path / "m"))
    message = str(err.value)
    assert "1 missing: transformer.h.1.mlp.c_fc.bias" in message
    assert "1 unexpected: transformer.h.7.extra.weight" in message
    assert "transformer.h.0.ln_1.weight: file (3,) vs model (64,)" in message


def test_weights_holding_nan_or_inf_are_named_not_sampled(tmp_path, small_pair):
    """A diverged or damaged model: its NaN logits made every sample <|endoftext|>, silently (the
    inverse-CDF sampler finds no token under a NaN total); its tensors are named when it is read,
    and sample.py says so in one line (exit 2)."""
    from errors import exit_code_of
    import sample
    _, ours, _ = small_pair
    ours.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    with safe_open(weights, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["transformer.h.1.attn.c_proj.weight"][3, 5] = float("nan")
    tensors["transformer.ln_f.bias"][0] = float("inf")
    save_file(tensors, weights)
    with pytest.raises(WeightsError, match=r"2 tensor\(s\) hold NaN or inf values as torch\.float32: "
                                           r"transformer\.h\.1\.attn\.c_proj\.weight, transformer\.ln_f\.bias"):
        GPT.from_pretrained(str(tmp_path / "m"))
    assert exit_code_of(sample.main, ["--model", str(tmp_path / "m"), "--device", "cpu"]) == 2


def test_missing_config_json_is_a_clear_error(tmp_path, small_pair):
    _, ours, _ = small_pair
    ours.save_pretrained(tmp_path / "m")
    os.remove(tmp_path / "m" / "config.json")
    with pytest.raises(WeightsError, match=r"config\.json: missing"):
        GPT.from_pretrained(str(tmp_path / "m"))


def test_pickle_only_checkpoint_is_refused(tmp_path, small_pair):
    _, ours, _ = small_pair
    ours.save_pretrained(tmp_path / "m")
    os.rename(tmp_path / "m" / "model.safetensors", tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="only safetensors"):
        GPT.from_pretrained(str(tmp_path / "m"))


def test_unsupported_config_is_refused(tmp_path, small_pair):
    _, ours, _ = small_pair
    ours.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=False)))
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        GPT.from_pretrained(str(tmp_path / "m"))
    with pytest.raises(WeightsError, match="no such directory"):
        GPT.from_pretrained(str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------- sharded and malformed files

@pytest.fixture
def tiny_tensors(tmp_path):
    """A tiny model saved as one model.safetensors (the reference) and its tensors in the file's layout."""
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, n_positions=16, vocab_size=64)).init_weights(seed=0).save_pretrained(
        tmp_path / "single")
    with safe_open(tmp_path / "single" / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def write_shards(directory, source, shards: dict, weight_map: dict):
    """config.json from source, each {file name: tensors} as a shard, and a hand-written index."""
    directory.mkdir()
    (directory / "config.json").write_bytes((source / "config.json").read_bytes())
    for name, tensors in shards.items():
        save_file(tensors, directory / name, metadata={"format": "pt"})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return str(directory)


def split_in_two(tensors):
    keys = sorted(tensors)
    first, second = keys[: len(keys) // 2], keys[len(keys) // 2:]
    shards = {"model-00001-of-00002.safetensors": {k: tensors[k] for k in first},
              "model-00002-of-00002.safetensors": {k: tensors[k] for k in second}}
    return shards, {k: name for name, part in shards.items() for k in part}


def test_each_tensor_is_read_from_the_shard_the_index_assigns_it_to(tmp_path, tiny_tensors):
    shards, weight_map = split_in_two(tiny_tensors)
    reference = GPT.from_pretrained(str(tmp_path / "single")).state_dict()
    loaded = GPT.from_pretrained(write_shards(tmp_path / "sharded", tmp_path / "single", shards, weight_map))
    assert all(torch.equal(value, reference[key]) for key, value in loaded.state_dict().items())
    # a copy of a tensor in the shard it is not assigned to, with other values, would override the right one
    (assigned_file, _), (other_file, _) = shards.items()
    key = next(iter(shards[assigned_file]))
    shards[other_file][key] = torch.zeros_like(tiny_tensors[key])
    directory = write_shards(tmp_path / "overridden", tmp_path / "single", shards, weight_map)
    with pytest.raises(WeightsError) as err:
        GPT.from_pretrained(directory)
    right, wrong = f"{directory}/{assigned_file}", f"{directory}/{other_file}"
    assert str(err.value) == (f"{key} is in two shards, {right} and {wrong}; "
                              f"model.safetensors.index.json assigns it to {right}: refusing to guess")


def test_a_shard_must_hold_exactly_the_tensors_the_index_assigns_it(tmp_path, tiny_tensors):
    shards, weight_map = split_in_two(tiny_tensors)
    (name, part), _ = shards.items()
    key = sorted(part)[0]
    del part[key]
    directory = write_shards(tmp_path / "lacking", tmp_path / "single", shards, weight_map)
    with pytest.raises(WeightsError, match=f"^{directory}/{name}: lacks {key}, which model.safetensors.index.json"):
        GPT.from_pretrained(directory)
    part[key] = tiny_tensors[key]
    del weight_map[key]  # in the shard, but the index does not say so
    directory = write_shards(tmp_path / "unlisted", tmp_path / "single", shards, weight_map)
    with pytest.raises(WeightsError, match=f"^{directory}/{name}: holds {key}, which model.safetensors.index.json does "
                                           "not list"):
        GPT.from_pretrained(directory)


@pytest.mark.parametrize("where", ["../outside.safetensors", "absolute"])
def test_shard_names_outside_the_model_directory_are_refused(tmp_path, tiny_tensors, where):
    """The file outside holds exactly the right tensors: it would load without a word if it were read."""
    outside = tmp_path / "outside.safetensors"
    save_file(tiny_tensors, outside, metadata={"format": "pt"})
    shard_name = str(outside) if where == "absolute" else where
    directory = write_shards(tmp_path / "sharded", tmp_path / "single", {}, {k: shard_name for k in tiny_tensors})
    assert os.path.isfile(os.path.join(directory, shard_name))  # joined, the name does reach the file
    with pytest.raises(WeightsError) as err:
        GPT.from_pretrained(directory)
    assert str(err.value).startswith(f"{directory}/model.safetensors.index.json: weight_map[")
    assert f"is {shard_name!r}, not a file name in {directory} (a shard outside the model directory is refused)" \
        in str(err.value)


@pytest.mark.parametrize("file, contents, message", [
    ("config.json", {"n_head": 0}, "n_head=0 is not a positive integer"),
    ("config.json", {"n_embd": "32"}, "n_embd='32' is not a positive integer"),
    ("config.json", [{"n_layer": 1}], "holds a JSON list, not an object of GPT-2 config keys"),
    ("config.json", "{not json", "not valid JSON (JSONDecodeError"),
    ("model.safetensors.index.json", {"metadata": {}},
     'not a safetensors index: expected a JSON object whose "weight_map"'),
    ("model.safetensors.index.json", {"weight_map": {"transformer.wte.weight": 1}},
     "weight_map['transformer.wte.weight'] is 1, not a shard file name"),
    ("model.safetensors.index.json", {"weight_map": {"transformer.wte.weight": ["a.safetensors"]}},
     "weight_map['transformer.wte.weight'] is ['a.safetensors'], not a shard file name"),
    ("model.safetensors.index.json", '{"weight_map": {', "not valid JSON (JSONDecodeError"),
])
def test_bad_config_or_index_is_one_line_naming_the_file(tmp_path, tiny_tensors, file, contents, message):
    shards, weight_map = split_in_two(tiny_tensors)
    directory = tmp_path / "sharded"
    write_shards(directory, tmp_path / "single", shards, weight_map)
    if file == "config.json" and isinstance(contents, dict):  # one key changed in a real config
        contents = dict(json.loads((directory / file).read_text()), **contents)
    (directory / file).write_text(contents if isinstance(contents, str) else json.dumps(contents))
    with pytest.raises(WeightsError) as err:
        GPT.from_pretrained(str(directory))
    assert str(err.value).startswith(f"{directory / file}: {message}") and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- generation

def test_greedy_with_cache_equals_without_and_equals_transformers(small_pair):
    hf, ours, _ = small_pair
    input_ids, mask = padded_batch("left")
    ours_cached = ours.generate(input_ids, attention_mask=mask, max_new_tokens=12, temperature=0, eos_id=None)
    ours_uncached = ours.generate(input_ids, attention_mask=mask, max_new_tokens=12, temperature=0, eos_id=None,
                                  use_cache=False)
    ref = hf.generate(input_ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=50256,
                      eos_token_id=None)
    assert torch.equal(ours_cached, ours_uncached)
    assert torch.equal(ours_cached, ref)
    assert len(set(ours_cached[:, -12:].flatten().tolist())) > 4  # not a degenerate constant output


def test_generation_stops_rows_at_end_of_text(small_pair):
    _, ours, _ = small_pair
    input_ids, mask = padded_batch("left")
    free = ours.generate(input_ids, attention_mask=mask, max_new_tokens=6, temperature=0, eos_id=None)
    first_token = free[:, input_ids.size(1)]
    eos = int(first_token[0])  # treat row 0's first greedy token as "end of text"
    stopped = ours.generate(input_ids, attention_mask=mask, max_new_tokens=6, temperature=0, eos_id=eos)
    new = stopped[:, input_ids.size(1):]
    assert (new[0] == eos).all()  # row 0 finished at once and is padded with eos
    for row in range(1, len(new)):  # other rows continue as without the stop, until they emit eos
        free_row = free[row, input_ids.size(1):].tolist()
        n = free_row.index(eos) + 1 if eos in free_row else len(free_row)
        assert new[row, :n].tolist() == free_row[:n]


def test_top_k_and_top_p_restrict_the_sampled_set():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log().expand(4000, 4)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next_token(logits, temperature=0), torch.zeros(4000, dtype=torch.long))
    assert set(sample_next_token(logits, top_k=1, generator=gen).tolist()) == {0}
    top_p = sample_next_token(logits, top_p=0.7, generator=gen)  # 0.5 < 0.7 <= 0.8: tokens 0 and 1
    assert set(top_p.tolist()) == {0, 1}
    assert abs((top_p == 0).float().mean().item() - 0.5 / 0.8) < 0.03
    top_k = sample_next_token(logits, top_k=3, generator=gen)
    assert set(top_k.tolist()) == {0, 1, 2}
    assert abs((top_k == 2).float().mean().item() - 0.15 / 0.95) < 0.03
    cold = sample_next_token(logits, temperature=0.5, generator=gen)  # p^2 renormalised
    assert abs((cold == 0).float().mean().item() - 0.25 / (0.25 + 0.09 + 0.0225 + 0.0025)) < 0.03


def final_hidden_states(model, ids):
    """(B, T, C) after ln_f, every position, written out here: the model returns only logits."""
    x = model.transformer.wte(ids) + model.transformer.wpe(torch.arange(ids.size(1)))
    for block in model.transformer.h:
        x = block(x)
    return model.transformer.ln_f(x)


def test_scored_logits_of_a_bf16_model_are_computed_in_fp32():
    """Under bf16/fp16 the LM head runs in fp32 on the rows asked for (logits_at): the logits equal
    the fp64 product of the same bf16 hidden states and head weights, not their bf16 rounding."""
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, n_positions=16)).init_weights(seed=0)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(300)  # logits in the tens: bf16 would round them by up to 0.25
    model = model.to(torch.bfloat16)
    ids = torch.randint(0, 50257, (2, 8), generator=torch.Generator().manual_seed(0))
    rows = torch.tensor([3, 9, 15])
    with torch.no_grad():
        logits = model(ids, logits_at=rows)
        hidden = final_hidden_states(model, ids).flatten(0, 1)[rows]
    expected = hidden.double() @ model.lm_head.weight.double().t()
    assert logits.dtype == torch.float32 and expected.abs().max() > 16
    assert (logits.double() - expected).abs().max() < 1e-3 * expected.abs().max()
    assert (expected.to(torch.bfloat16).double() - expected).abs().max() > 0.05  # what rounding would have cost


def test_building_a_model_switches_off_cudnn_attention():
    """The flag SDPA reads on CUDA (readable on CPU builds too): cuDNN attention's backward gives
    NaN gradients on the packed prefix-sharing call on H100/H200 (pytorch issue 196678)."""
    torch.backends.cuda.enable_cudnn_sdp(True)
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, n_positions=16))
    assert not torch.backends.cuda.cudnn_sdp_enabled()


# ----------------------------------------------------------------------------- the scored rows' LM head

def test_every_head_precision_gives_the_fp64_head_log_probs_and_bf16_logits_do_not():
    """bench/head_precision.py's measurement, on logits in the tens: each of the trainer's choices (and
    TF32, emulated) is within 1e-3 nats of an fp64 head on the same bf16 hidden states for a
    24-token response; rounding the logits to bf16 is not (README, 'the LM head on the GPU')."""
    from bench.head_precision import measure
    results = measure()
    assert results["logit_abs_max"] > 50  # the case the fp32 head exists for
    errors = {name: r["head_error_nats"] for name, r in results["heads"].items()}
    assert all(errors[name] < 1e-3 for name in ("fp32", "tf32", "bf16_in_fp32_out")), errors
    assert errors["bf16 logits"] > 0.1, errors


def test_bf16_in_fp32_out_gradients_equal_the_fp32_heads_to_bf16_rounding():
    """Its hand-written backward against autograd through the fp32 head: the same gradients but for
    rounding the logits' gradient to bf16 first."""
    from gpt2 import scored_logits
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 32, generator=gen).bfloat16()
    weight = (torch.randn(50257, 32, generator=gen) * 0.5).bfloat16()
    upstream = torch.randn(12, 50257, generator=gen)
    grads = {}
    for precision in ("fp32", "bf16_in_fp32_out"):
        xg, wg = x.clone().requires_grad_(), weight.clone().requires_grad_()
        logits = scored_logits(xg, wg, precision)
        assert logits.dtype == torch.float32
        (logits * upstream).sum().backward()
        grads[precision] = (logits.detach(), xg.grad, wg.grad)
    for ours, reference in zip(grads["bf16_in_fp32_out"], grads["fp32"]):
        assert ours.dtype == reference.dtype
        scale = reference.float().abs().max()
        assert (ours.float() - reference.float()).abs().max() <= 2e-2 * scale
    assert torch.equal(grads["bf16_in_fp32_out"][0], grads["fp32"][0])  # on CPU: the same fp32 GEMM forward
