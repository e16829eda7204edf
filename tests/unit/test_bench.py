"""The benchmark's own logic (bench/): the 8B shape it builds, and the longest-sequence search
stopping at the first length that runs out of memory."""

from __future__ import annotations

import json

import pytest
import torch

from bench.longest import doubling, lengths


def test_the_longest_sequence_search_doubles_until_memory_runs_out():
    assert lengths(8192, 131072) == [8192, 16384, 32768, 65536, 131072]
    assert lengths(8192, 100000) == [8192, 16384, 32768, 65536]
    tried = []

    def step(n: int) -> None:
        tried.append(n)
        if n > 16384:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    peaks = doubling(lengths(8192, 131072), "cpu", step)
    assert tried == [8192, 16384, 32768]  # nothing longer is tried once a length does not fit
    assert list(peaks) == [8192, 16384, 32768] and peaks[32768] == "out of memory"
    assert all(isinstance(peaks[n], float) for n in (8192, 16384))

    def broken(n: int) -> None:
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError):  # any other failure is the bench's bug, not a length that does not fit
        doubling([8192], "cpu", broken)


def test_the_8b_shape_is_llama_3_1_8b_with_only_the_settings_changed(tmp_path):
    from bench.train import make_model

    path = make_model("cpu", tmp_path / "m", "8b", ["num_hidden_layers=1", "hidden_size=64", "intermediate_size=128",
                                                     "num_attention_heads=2", "num_key_value_heads=1", "head_dim=32"])
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert path == str(tmp_path / "m")
    assert (config["vocab_size"], config["tie_word_embeddings"], config["max_position_embeddings"]) == (128256, False, 131072)
    assert config["rope_parameters"]["rope_type"] == "llama3" and config["rope_parameters"]["factor"] == 8.0
    assert (config["num_hidden_layers"], config["hidden_size"], config["dtype"]) == (1, 64, "bfloat16")
    assert make_model("cpu", tmp_path / "m", "8b") == path  # reused, not written again
    assert make_model("cpu", tmp_path / "other", "tiny") == "builtin:tiny-llama"


def test_the_preference_bench_packs_whole_pairs():
    from bench.preference import packed_pairs
    from bench.train import job_config
    from ft_ray.data.formats import CHOSEN, REJECTED
    from ft_ray.models import load_tokenizer

    config = job_config("lora", "cpu", "builtin:tiny-llama", 512, 2)
    rows = packed_pairs(config, load_tokenizer(config.model), 4)
    assert len(rows) == 4
    for row in rows:
        starts = row["position_ids"] == 0
        spans = [int(role) for role in row["roles"][starts]]
        answers = [role for role in spans if role]  # role 0: the padding at the end
        # chosen and rejected answers in turn (each pair whole in its row), most of the row used
        assert answers == [CHOSEN, REJECTED] * (len(answers) // 2) and len(answers) >= 2
        assert spans[:len(answers)] == answers
        assert (row["labels"] != -100).sum() > 0 and (row["position_ids"] > 0).sum() > 256
