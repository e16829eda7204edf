"""Whether a job's training workers can be placed on the cluster, said before Ray Train waits.

Ray Train asks for one placement group of all workers and, when it cannot be placed, gives
up after 60 s and asks again, forever (Ray 2.60: a startup timeout is a retryable
controller error, `controller_failure_limit` -1). Its own check compares only the sum
of each resource with the autoscaler's maximum, and only where there is an autoscaler, so
a worker larger than every node, or STRICT_PACK/STRICT_SPREAD asking for what no set of
nodes holds, waited without a word. The nodes' totals are compared here (not what is free:
a sweep's other trials hold some of it for a while), with the node types an autoscaler may
start where the cluster has one.
"""

from __future__ import annotations

import math
from ft_ray.config import InputError, JobConfig
from ft_ray.console import LOG

EPSILON = 1e-6  # Ray keeps resources in units of 1/10000


def worker_resources(config: JobConfig) -> dict[str, float]:
    """What one training worker asks Ray for (the trainer's ScalingConfig)."""
    dist = config.distributed
    return {"CPU": dist.cpus_per_worker, **({"GPU": dist.gpu_share} if dist.use_gpu else {})}


def placement_problem(nodes: list[dict[str, float]], per_worker: dict[str, float], workers: int,
                      strategy: str) -> str | None:
    """Why `workers` workers of `per_worker` resources cannot be placed on `nodes` (each
    node's total resources) with the placement `strategy`, or None when they can."""
    asked = {k: v for k, v in per_worker.items() if v > 0}

    def room(node: dict[str, float]) -> int:  # workers the node holds
        return min((math.floor(node.get(k, 0) / v + EPSILON) for k, v in asked.items()), default=workers)

    shown = _resources(asked)
    rooms = sorted((room(node) for node in nodes), reverse=True)
    if not rooms or rooms[0] == 0:
        largest = max(nodes, key=lambda n: tuple(n.get(k, 0) for k in asked), default={})
        return (f"no node has {shown} for one worker (the largest has {_resources({k: largest.get(k, 0) for k in asked})}): "
                "lower distributed.cpus_per_worker" + (" or gpus_per_worker" if "GPU" in asked else "")
                + ", or add larger nodes")
    if strategy == "STRICT_PACK" and rooms[0] < workers:
        return (f"placement_strategy STRICT_PACK puts all {workers} workers on one node, and a node holds at most "
                f"{rooms[0]} of {shown}: use PACK, or fewer workers")
    if strategy == "STRICT_SPREAD" and sum(r > 0 for r in rooms) < workers:
        return (f"placement_strategy STRICT_SPREAD puts each of the {workers} workers on a node of its own, and "
                f"{sum(r > 0 for r in rooms)} nodes have {shown}: use SPREAD, or fewer workers")
    if sum(rooms) < workers:
        return (f"the cluster's nodes hold {sum(rooms)} workers of {shown} in all, and the job asks for {workers}: "
                "lower distributed.num_workers (or make it a range [min, max]), or add nodes")
    return None


def _resources(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in resources.items()) or "nothing"


def least_workers(config: JobConfig) -> int:
    """The workers a run needs to start (an elastic run: the low end of its range)."""
    workers = config.distributed.num_workers
    return workers if isinstance(workers, int) else workers[0]


def check_placement(config: JobConfig) -> None:
    """Refuses a job whose workers this cluster cannot place; where an autoscaler may add
    nodes of a type that holds them, says that the job waits for it.

    Raises:
        InputError: the workers cannot be placed, now or on any node type the autoscaler has.
    """
    import ray

    dist = config.distributed
    workers = least_workers(config)
    per_worker = worker_resources(config)
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    problem = placement_problem(nodes, per_worker, workers, dist.placement_strategy)
    if problem is None:
        return
    types = autoscaler_node_types()
    if types is None:
        raise InputError(f"distributed: the training workers cannot be placed on this cluster: {problem}")
    if types and placement_problem(nodes + types * workers, per_worker, workers, dist.placement_strategy) is None:
        LOG.warning(f"distributed: the cluster's nodes cannot hold the training workers now ({problem}); "
                    "its autoscaler has node types that can: training starts when it has added them")
        return
    if types:
        raise InputError(f"distributed: the training workers cannot be placed on this cluster, nor on the node "
                         f"types its autoscaler may add: {problem}")
    LOG.warning(f"distributed: the cluster's nodes cannot hold the training workers now ({problem}); Ray Train "
                "waits for nodes to join")


def autoscaler_node_types() -> list[dict[str, float]] | None:
    """The resources of each node type the cluster's autoscaler may start; None where the
    cluster has no autoscaler (its nodes are all there will be); [] where that cannot be told
    (Ray's private state API changed)."""
    try:
        from ray._private.state import state

        cluster = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - a private API: unknown, not "no autoscaler"
        return []
    if cluster is None:
        return None
    return [dict(group.resources) for group in cluster.node_group_configs if group.max_count != 0]
