"""The DeepSpeed JSON is generated from the job, so the two cannot disagree."""

import pytest
import torch

from ft_ray.config import ConfigError, config_from_dict
from ft_ray.train.deepspeed_engine import deepspeed_config


def job(**sections):
    raw = {"data": {"train": "x.jsonl"}, "method": "full", "distributed": {"strategy": "deepspeed"}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return config_from_dict(raw)


def test_batch_sizes_precision_optimizer_follow_the_job():
    config = job(train={"micro_batch_size": 3, "gradient_accumulation": 5, "learning_rate": 1e-4,
                        "precision": "bf16", "max_grad_norm": 0.5},
                 distributed={"strategy": "deepspeed", "num_workers": 4, "deepspeed": {"stage": 3}})
    ds = deepspeed_config(config, total_steps=100)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 5
    assert ds["train_batch_size"] == 3 * 5 * 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["optimizer"]["params"]["lr"] == 1e-4
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_cpu_offload_and_torch_adam_on_cpu():
    offloaded = deepspeed_config(job(distributed={"strategy": "deepspeed", "deepspeed": {
        "stage": 3, "offload_optimizer": "cpu", "offload_params": "cpu"}}), 10)
    assert offloaded["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert offloaded["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert "torch_adam" not in offloaded["optimizer"]["params"]  # DeepSpeedCPUAdam does the offloaded step
    plain_cpu = deepspeed_config(job(), 10)
    assert plain_cpu["optimizer"]["params"]["torch_adam"] is True  # FusedAdam needs CUDA


def test_config_override_is_merged_key_by_key():
    config = job(distributed={"strategy": "deepspeed", "deepspeed": {"config_override": {
        "zero_optimization": {"reduce_bucket_size": 1000}, "steps_per_print": 5}}})
    ds = deepspeed_config(config, 10)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000
    assert ds["zero_optimization"]["stage"] == 2  # generated keys beside the override survive
    assert ds["steps_per_print"] == 5


@pytest.mark.parametrize("sections, message", [
    ({"method": "qlora", "distributed": {"strategy": "deepspeed", "deepspeed": {"stage": 3}}},
     "quantization.quant_storage: qlora with ZeRO-3 needs a float storage dtype"),
    ({"distributed": {"strategy": "ddp", "deepspeed": {"offload_optimizer": "cpu"}}},
     "CPU offload needs distributed.strategy: deepspeed"),
    ({"distributed": {"strategy": "deepspeed", "deepspeed": {"stage": 2, "offload_params": "cpu"}}},
     "offload_params: needs stage 3 \\(stage is 2\\)"),
    ({"train": {"precision": "fp16"}}, "fp16 needs a GPU"),
])
def test_impossible_combinations_fail_at_validation(sections, message):
    with pytest.raises(ConfigError, match=message):
        job(**sections)


def test_qlora_zero3_with_float_storage_is_allowed():
    config = job(method="qlora", quantization={"quant_storage": "bfloat16"},
                 distributed={"strategy": "deepspeed", "deepspeed": {"stage": 3}})
    assert config.quantization.quant_storage == "bfloat16"


def test_elastic_worker_range_for_ddp_and_fsdp_not_for_sharded_zero():
    """FSDP's DCP checkpoints re-shard to another worker count; ZeRO's shards are tied to theirs."""
    elastic = job(method="lora", distributed={"strategy": "ddp", "num_workers": [2, 8]})
    assert elastic.distributed.elastic and elastic.distributed.max_workers == 8
    assert job(method="full", distributed={"strategy": "fsdp", "num_workers": [2, 8]}).distributed.elastic
    with pytest.raises(ConfigError, match="elastic range needs strategy ddp, fsdp or ZeRO stage 0"):
        job(distributed={"strategy": "deepspeed", "num_workers": [2, 8], "deepspeed": {"stage": 2}})
    stage0 = job(distributed={"strategy": "deepspeed", "num_workers": [2, 8], "deepspeed": {"stage": 0}})
    assert "train_batch_size" not in deepspeed_config(stage0, 10)
    with pytest.raises(ConfigError, match=r"range \[min, max\] with 1 <= min <= max, got \(8, 2\)"):
        job(distributed={"num_workers": [8, 2]})


class _Payload:
    """What a tampered checkpoint could hold: unpickling it would run a command."""

    def __reduce__(self):
        import os

        return (os.system, ("touch ft-ray-pwned",))


def test_deepspeed_states_are_unpickled_weights_only(tmp_path, monkeypatch):
    import pickle

    from ft_ray.train.deepspeed_engine import weights_only_checkpoint_engine

    monkeypatch.chdir(tmp_path)
    torch.save({"optimizer_state_dict": {"state": {}}, "ds_version": "0.19"}, tmp_path / "fine.pt")
    assert weights_only_checkpoint_engine().load(str(tmp_path / "fine.pt"))["ds_version"] == "0.19"
    torch.save({"optimizer_state_dict": _Payload()}, tmp_path / "tampered.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        weights_only_checkpoint_engine().load(str(tmp_path / "tampered.pt"))
    assert not (tmp_path / "ft-ray-pwned").exists()
