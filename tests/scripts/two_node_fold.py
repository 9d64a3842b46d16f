"""Run one fold with 2 Ray Train workers on a simulated 2-node cluster (ray.cluster_utils.Cluster).

Each node offers one `worker_slot` and each worker asks for one, so the fold can only run with a worker on each node.
Prints one JSON line with the cluster's nodes and the fold's result. Usage: two_node_fold.py PREPARED_DIR WORK_DIR
"""

import json
import os
import sys

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from idengine.config_io import load_config  # noqa: E402
from idengine.data.prepared import read_prepared  # noqa: E402
from idengine.features.tokens import tokenized_table  # noqa: E402
from idengine.evaluate.metrics import score_logits  # noqa: E402
from idengine.train import ray_train  # noqa: E402

prepared, work = sys.argv[1], sys.argv[2]
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 2, "resources": {"worker_slot": 1}, "object_store_memory": 200 * 1024**2,
    "_system_config": {"health_check_timeout_ms": 30000}})
cluster.add_node(num_cpus=1, resources={"worker_slot": 1}, object_store_memory=200 * 1024**2)
ray.init(address=cluster.address)
cluster.wait_for_nodes()

config = load_config("jobs/configs/tiny-cpu.yaml", [
    f"train.storage_path={work}/ray", "train.epochs=1", "train.num_workers=2", "train.cpus_per_worker=0.5",
    "train.train_eval_size=32"])
original = ray_train.scaling_config


def one_worker_per_node(cfg):
    scaling = original(cfg)
    scaling.resources_per_worker = {**scaling.resources_per_worker, "worker_slot": 1}
    return scaling


ray_train.scaling_config = one_worker_per_node
records, labels = read_prepared(prepared)
tokens = tokenized_table(prepared, config)
run = ray_train.fit_fold(config, tokens, "0", dict(enumerate(labels.species)), score_logits, "two-node")
nodes = [n for n in ray.nodes() if n["Alive"]]
print(json.dumps({"alive_nodes": len(nodes), "slots": sum(n["Resources"].get("worker_slot", 0) for n in nodes),
                  "epochs": [h["epoch"] for h in run.history], "val_rows": int(run.eval_logits.shape[0]),
                  "val_ids": len(run.eval_ids)}))
ray.shutdown()
cluster.shutdown()
