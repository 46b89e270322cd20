"""Multi-node, simulated on one box: a Ray cluster of a head and three worker nodes
(`ray.cluster_utils.Cluster`, each node its own raylet and object store), a custom resource standing
in for the GPU of a GPU node. The stage-1 job (embedded default, shortened) goes in through the Jobs
API, as `ray job submit` sends it; its two workers must land on two different nodes, and a worker
node removed mid-run must end in a run resumed from its last checkpoint and completed.

The scenario runs in its own interpreter, apart from the suite's session cluster, and the simulated
head's job agent gets a free port: on the default one (52365, the session cluster's) it never came up."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NODE_RESOURCE = "sim_gpu_node"  # one per worker node, as a GPU node has its GPUs


def _wait(cond, timeout: float, what: str, every: float = 0.25):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _start_cluster():
    from ray.cluster_utils import Cluster

    import socket

    with socket.socket() as s:  # the job agent's port: the default (52365) may be another cluster's
        s.bind(("127.0.0.1", 0))
        agent_port = s.getsockname()[1]
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": True,
                                                      "dashboard_host": "127.0.0.1",
                                                      "dashboard_agent_listen_port": agent_port,
                                                      "object_store_memory": 256 * 1024**2})
    workers = [c.add_node(num_cpus=1, resources={NODE_RESOURCE: 1}, object_store_memory=128 * 1024**2)
               for _ in range(3)]
    c.wait_for_nodes()
    return c, workers


def _train_workers(address: str) -> list[dict]:
    from ray.util.state import list_actors

    return list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])


def test_stage1_job_spreads_over_nodes_and_survives_losing_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, __file__, str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:] + "\n" + r.stderr[-6000:])
    assert "scenario passed" in r.stdout


def scenario(tmp_path: Path) -> None:
    c, workers = _start_cluster()
    try:
        _scenario(c, workers, tmp_path)
    finally:
        c.shutdown()
    print("scenario passed")


def _scenario(c, workers, tmp_path: Path) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    dashboard = "http://" + c.head_node.address_info["webui_url"]
    client = JobSubmissionClient(dashboard)
    run_dir = tmp_path / "runs" / "pretrain"
    overrides = ["train.num_workers=2", "train.cpus_per_worker=1", f"train.worker_resources.{NODE_RESOURCE}=1",
                 "train.torch_threads=1", "train.epochs=1", "train.iters_per_epoch=80", "train.batch_size=16",
                 "train.checkpoint_every=20", "train.log_every=10", "train.shuffle_buffer=0",
                 f"train.storage_path={tmp_path / 'runs'}"]
    def submit():  # the head's job agent starts after its dashboard: until then Ray answers 500
        try:
            return client.submit_job(entrypoint=f"cd {REPO} && {sys.executable} jobs/pretrain.py " + " ".join(overrides),
                                     runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
        except RuntimeError as e:
            if "No available agent" in str(e):
                return None
            raise

    job_id = _wait(submit, 120, "the head's job agent to take the job", every=1.0)

    def status():
        s = client.get_job_status(job_id)
        if s in (JobStatus.FAILED, JobStatus.STOPPED):
            raise AssertionError(f"job {s}:\n{client.get_job_logs(job_id)[-3000:]}")
        return s

    # both workers up: on two worker nodes (never the head, which has no NODE_RESOURCE)
    def both_placed():
        status()
        actors = _train_workers(dashboard)
        return actors if len(actors) == 2 else None

    placed = _wait(both_placed, 240, "two training workers")
    nodes = {a["node_id"] for a in placed}
    assert len(nodes) == 2 and c.head_node.node_id not in nodes
    # the run's own bookkeeping actor stays with the driver: a lost worker node must not take it along
    from ray.util.state import list_actors

    boards = [a for a in list_actors(address=dashboard, filters=[("state", "=", "ALIVE")])
              if a["class_name"].endswith("PositionBoard")]
    assert boards and {a["node_id"] for a in boards} == {c.head_node.node_id}
    # a checkpoint committed, then a node holding a worker goes away (a spot reclaim, a dead host)
    def committed():  # registered by Ray Train (its snapshot lists it), not merely written
        try:
            snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        except (OSError, ValueError):
            return None
        return [r["metrics"]["step"] for r in snap.get("checkpoint_results", []) if "step" in r.get("metrics", {})]

    _wait(lambda: status() and committed(), 240, "the first committed checkpoint")
    victim = next(w for w in workers if w.node_id in nodes)
    c.remove_node(victim, allow_graceful=False)
    _wait(lambda: status() == JobStatus.SUCCEEDED, 300, "the job to finish")

    progress = (run_dir / "progress.log").read_text()
    resumed = [line for line in progress.splitlines() if "resumed from step" in line]
    assert resumed, progress
    step = int(resumed[0].split("resumed from step ")[1].split()[0])
    assert 20 <= step < 80 and step % 20 == 0
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 80
    assert (run_dir / "minigpt4_stage1.pth").exists()
    logs = client.get_job_logs(job_id)
    assert "done in" in logs


if __name__ == "__main__":
    scenario(Path(sys.argv[1]))
