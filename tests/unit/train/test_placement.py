"""Training workers the cluster cannot place are said before Ray Train waits for them."""

from __future__ import annotations

import logging

import pytest

from ft_ray.config import InputError, config_from_dict
from ft_ray.train import placement
from ft_ray.train.placement import check_placement, placement_problem

GPU_NODE = {"CPU": 16.0, "GPU": 4.0, "memory": 1e11}
CPU_NODE = {"CPU": 8.0, "memory": 1e10}


def test_workers_fit_or_the_reason_names_the_keys_to_change():
    one_gpu = {"CPU": 4, "GPU": 1}
    assert placement_problem([GPU_NODE, GPU_NODE], one_gpu, 8, "PACK") is None
    assert placement_problem([GPU_NODE, CPU_NODE], {"CPU": 2, "GPU": 0.5}, 8, "SPREAD") is None  # GPU shares
    assert placement_problem([GPU_NODE], {"CPU": 32, "GPU": 1}, 1, "PACK") == (
        "no node has 32 CPU, 1 GPU for one worker (the largest has 16 CPU, 4 GPU): lower "
        "distributed.cpus_per_worker or gpus_per_worker, or add larger nodes")
    assert placement_problem([GPU_NODE, CPU_NODE], one_gpu, 5, "PACK") == (
        "the cluster's nodes hold 4 workers of 4 CPU, 1 GPU in all, and the job asks for 5: lower "
        "distributed.num_workers (or make it a range [min, max]), or add nodes")
    assert placement_problem([GPU_NODE, GPU_NODE], one_gpu, 6, "STRICT_PACK") == (
        "placement_strategy STRICT_PACK puts all 6 workers on one node, and a node holds at most 4 of 4 CPU, "
        "1 GPU: use PACK, or fewer workers")
    assert placement_problem([GPU_NODE, GPU_NODE, CPU_NODE], one_gpu, 3, "STRICT_SPREAD") == (
        "placement_strategy STRICT_SPREAD puts each of the 3 workers on a node of its own, and 2 nodes have "
        "4 CPU, 1 GPU: use SPREAD, or fewer workers")
    assert placement_problem([{"CPU": 0.0}, CPU_NODE], {"CPU": 1}, 8, "PACK") is None  # a head without CPUs


def job(**distributed):
    return config_from_dict({"data": {"train": "t.jsonl"}, "distributed": distributed})


def test_a_static_cluster_refuses_and_an_autoscaler_with_a_large_enough_node_type_waits(monkeypatch, caplog):
    import ray

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": CPU_NODE},
                                               {"Alive": False, "Resources": {"CPU": 64.0}}])
    check_placement(job(num_workers=4, cpus_per_worker=2))
    check_placement(job(num_workers=[2, 8], cpus_per_worker=4))  # elastic: starts with what fits
    monkeypatch.setattr(placement, "autoscaler_node_types", lambda: None)  # no autoscaler: these nodes are all
    with pytest.raises(InputError, match=r"^distributed: the training workers cannot be placed on this cluster: "
                                         r"no node has 16 CPU for one worker \(the largest has 8 CPU\)"):
        check_placement(job(num_workers=1, cpus_per_worker=16))
    monkeypatch.setattr(placement, "autoscaler_node_types", lambda: [{"CPU": 8.0}])
    with pytest.raises(InputError, match="nor on the node types its autoscaler may add: no node has 16 CPU"):
        check_placement(job(num_workers=1, cpus_per_worker=16))
    monkeypatch.setattr(placement, "autoscaler_node_types", lambda: [{"CPU": 32.0}])
    with caplog.at_level(logging.WARNING):
        check_placement(job(num_workers=2, cpus_per_worker=16))
    assert "its autoscaler has node types that can: training starts when it has added them" in caplog.text
