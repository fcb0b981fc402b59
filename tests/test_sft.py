"""World-model SFT: memorising transitions, resuming, LoRA, batching, refusing bad data."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import build_tiny_model, collect_data

from spa_rl.cli import main
from spa_rl.errors import SpaError
from spa_rl.samples import encode_sample, load_dataset, pack_trajectories
from spa_rl.sft import SFTConfig, epoch_batches, train_sft
from spa_rl.training import micro_batches


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("ds")
    collect_data("frozenlake-det", str(path), policy="solver", puzzles=2, samples=1, val_fraction=0.0)
    return path


@pytest.fixture(scope="module")
def tiny64(tokenizer, tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    path = tmp_path_factory.mktemp("tiny64")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
def test_tiny_model_fine_tuned_on_transitions_reproduces_them(tokenizer, tmp_path):
    """Three solver transitions on 3x3 lakes; after SFT, greedy decoding writes each completion exactly
    (the true observation, the transition in <prediction>, the answer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from spa_rl.collect import DatasetWriter
    from spa_rl.models import load_model
    from spa_rl.rollout import RolloutConfig, RolloutEngine

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    engine = RolloutEngine(RolloutConfig(env="frozenlake-det", render="grid", env_overrides={"size": 3}),
                           policy="solver")
    writer = DatasetWriter(tmp_path / "data", val_fraction=0.0, manifest={"env": "frozenlake-det"})
    writer.add("u", engine.run([0, 1, 2]), "world-model", "grid", {})
    writer.finalize()
    rows, _, _ = load_dataset(str(tmp_path / "data"))
    assert len(rows) == 3
    train_sft(SFTConfig.make(data=str(tmp_path / "data"), out=str(tmp_path / "sft"), model=str(tmp_path / "base"),
                        epochs=200, lr=6e-3, warmup_ratio=0.05, batch_size=3, micro_batch_size=3,
                        save_epochs=False, tensorboard=False, dtype="fp32"), quiet=True)
    lm = load_model(str(tmp_path / "sft" / "model"), dtype="fp32")
    for row in rows:
        prompt = lm.tokenizer.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True,
                                                  return_dict=False)
        out = lm.model.generate(torch.tensor([prompt]), max_new_tokens=100, do_sample=False)
        assert lm.tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True) == row["completion"][0]["content"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_interrupted_sft_resumes_to_the_same_model(small_dataset, tiny64, tmp_path, monkeypatch, dtype):
    def config(out):
        return SFTConfig.make(data=str(small_dataset), out=str(out), model=str(tiny64), epochs=4, batch_size=1,
                         micro_batch_size=1, tensorboard=False, dtype=dtype, lr=1e-3, pack=False)

    straight = train_sft(config(tmp_path / "a"), quiet=True)
    original = torch.optim.AdamW.step
    calls = {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # in the second epoch, after the first epoch checkpoint
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", flaky)
    with pytest.raises(KeyboardInterrupt):
        train_sft(config(tmp_path / "b"), quiet=True)
    monkeypatch.setattr(torch.optim.AdamW, "step", original)
    assert (tmp_path / "b" / "checkpoint" / "trainer_state.pt").is_file()
    resumed = train_sft(config(tmp_path / "b"), quiet=True)
    assert resumed["steps"] == straight["steps"] == 12
    assert not (tmp_path / "b" / "checkpoint").exists(), "a finished run keeps its model, not its optimizer states"
    assert resumed["val_loss"] == straight["val_loss"]
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert all(v.dtype == torch.float32 for v in b.values()), "a bf16 run saves its fp32 master weights"
    assert json.loads((tmp_path / "b" / "model" / "config.json").read_text())["dtype"] == "float32"
    from spa_rl.io import read_jsonl as read_metrics

    steps = [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if "loss/train" in r]
    assert steps == list(range(1, 13)), "the resumed run's log is one history, without the lost steps twice"
    train_sft(config(tmp_path / "a"), quiet=True)  # rerun of a finished run
    steps = [r["step"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if "loss/train" in r]
    assert steps == list(range(1, 13)), "a rerun never duplicates the history"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_lora_sft_gives_an_adapter_that_eval_loads(small_dataset, tiny64, tmp_path, dtype):
    from safetensors.torch import load_file

    from spa_rl.models import load_model

    train_sft(SFTConfig.make(data=str(small_dataset), out=str(tmp_path), model=str(tiny64), epochs=1, lora=True,
                        batch_size=2, micro_batch_size=1, tensorboard=False, dtype=dtype), quiet=True)
    assert (tmp_path / "model" / "adapter_config.json").is_file()
    adapter = load_file(tmp_path / "model" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k and v.dtype == torch.float32 for k, v in adapter.items())
    assert load_model(str(tmp_path / "model"), dtype="fp32").model is not None
    assert (tmp_path / "loss.png").is_file()
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/train" in m for m in metrics)


def test_batches_count_turns():
    """Global batches hold `batch_size` turns: exactly, one sequence per turn; at least, packed."""
    per_turn = epoch_batches([1] * 10, 4, seed=0)
    assert [len(b) for b in per_turn] == [4, 4, 2] and sorted(i for b in per_turn for i in b) == list(range(10))
    turns = [3, 1, 4, 2, 2, 5, 1]
    packed = epoch_batches(turns, 4, seed=1)
    assert sorted(i for b in packed for i in b) == list(range(7))
    assert all(4 <= sum(turns[i] for i in b) < 4 + 5 for b in packed[:-1])


def test_micro_batches_respect_the_token_budget():
    seqs = [([0] * n, [1] * n) for n in (100, 200, 300, 900, 2000)]
    micro = micro_batches([len(x) for x, _ in seqs], [0, 1, 2, 3, 4], size=4, max_tokens=1000)
    assert micro == [[0, 1, 2], [3], [4]], "3 x 300 fits 1000; 900 alone; 2000 alone even over the budget"
    assert micro_batches([len(x) for x, _ in seqs], [0, 1, 2, 3, 4], size=2) == [[0, 1], [2, 3], [4]]
    similar = [([0] * n, [1] * n) for n in (500, 505, 520, 700, 710)]
    assert micro_batches([len(x) for x, _ in similar], [0, 1, 2, 3, 4], size=4, max_padding=0.1) == \
        [[0, 1, 2], [3, 4]], "700 would make a fifth of [500, 505, 520, 700] padding"


def test_overlong_packed_trajectory_falls_back_to_its_turns(tokenizer, tmp_path):
    """Packing keeps exactly the turns one sequence per turn would keep when some exceed max_length."""
    collect_data("sokoban", str(tmp_path / "d"), policy="random", puzzles=3, samples=2, val_fraction=0.0)
    rows = load_dataset(str(tmp_path / "d"))[0]
    lengths = [len(encode_sample(tokenizer, r, "full")[0]) for r in rows]
    limit = max(lengths) - 1  # the longest trajectory's last turn no longer fits, its earlier turns do
    model_dir = tmp_path / "m"
    build_tiny_model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    result = train_sft(SFTConfig.make(data=str(tmp_path / "d"), out=str(tmp_path / "o"), model=str(model_dir),
                                      epochs=1, max_length=limit, tensorboard=False, dtype="fp32"), quiet=True)
    too_long = sum(n > limit for n in lengths)
    assert too_long >= 1 and result["dropped_too_long"] == too_long
    assert result["train_samples"] == len(rows) - too_long, "the same rows as one sequence per turn would keep"
    assert result["train_sequences"] > len(pack_trajectories(rows))


def test_max_samples_trains_on_a_fixed_subset(small_dataset, tiny64, tmp_path):
    """--max-samples caps the training rows (same subset for the same seed) so datasets compare at equal size."""
    n_train = len(load_dataset(str(small_dataset))[0])
    assert n_train > 2
    runs = []
    for name in ("a", "b"):
        config = SFTConfig.make(data=str(small_dataset), out=str(tmp_path / name), model=str(tiny64), epochs=1,
                                batch_size=2, micro_batch_size=1, tensorboard=False, dtype="fp32", max_train_samples=2)
        runs.append(train_sft(config, quiet=True))
    assert runs[0]["train_samples"] == 2 and runs[0]["steps"] == 1
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "the same seed must pick the same subset"


def test_dataset_of_another_env_is_refused(small_dataset, tmp_path, capsys):
    with pytest.raises(SpaError, match="collected on 'frozenlake-det', not 'sokoban'"):
        load_dataset(str(small_dataset), expected_env="sokoban")
    assert main(["sft", "--data", str(small_dataset), "--out", str(tmp_path / "o"), "--env", "sokoban"]) == 2
    assert "not 'sokoban'" in capsys.readouterr().err


def test_empty_or_malformed_dataset(small_dataset, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(small_dataset, bad)
    (bad / "train.jsonl").write_text((bad / "train.jsonl").read_text() + "{oops\n")
    assert main(["sft", "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "train.jsonl line" in capsys.readouterr().err
    (bad / "train.jsonl").write_text("")
    assert main(["sft", "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "has no rows" in capsys.readouterr().err
    assert main(["sft", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "not a dataset" in capsys.readouterr().err
