"""Small collectives over the training workers (every rank must call each, in the same
order): sums, rank 0's value, merged dicts, the node of every rank. Outside a process group
(one worker, a benchmark) each is the identity."""

from __future__ import annotations

from typing import Any

import torch


def worker_nodes() -> list[str]:
    """The Ray node id of every rank, in rank order (a collective)."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return [node]
    nodes: list = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return nodes


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum small numbers over workers (a sync point: every rank must call it)."""
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        tensor = tensor.to(device)
        dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def broadcast_tensor_(tensor: torch.Tensor) -> None:
    """Rank 0's values written into `tensor` on every rank (a collective; over NCCL through
    the GPU)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else tensor.device
    sent = tensor.data.to(device)  # the tensor itself where it is on that device
    dist.broadcast(sent, src=0)
    if sent.data_ptr() != tensor.data_ptr():
        tensor.data.copy_(sent)


def broadcast(value: Any) -> Any:
    """Rank 0's value on every rank (a collective)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_dicts(part: dict) -> dict:
    """Every rank's dict merged (a collective); the same on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return dict(part)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return {key: value for p in parts for key, value in p.items()}
