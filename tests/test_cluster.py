"""Deployment files: cluster.yaml, cluster/Dockerfile, cluster/kuberay/*.yaml, cluster/runtime_env.yaml.

Offline and CPU-only: the launcher config goes through the JSON schema and the validator that ship
inside the installed Ray (no AWS call is made), the Serve config through Ray Serve's own schema,
the runtime env through Ray's RuntimeEnv, and every file is cross-checked against the repo (pinned
versions, image tag, entry-point paths, the cache variable the code reads).
"""
from __future__ import annotations

import ast
import copy
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
CLUSTER_DIR = REPO / "cluster"
DOCKERFILE = CLUSTER_DIR / "Dockerfile"
KUBERAY_DIR = CLUSTER_DIR / "kuberay"
RUNTIME_ENV = CLUSTER_DIR / "runtime_env.yaml"
SERVE_CONFIG = REPO / "serve" / "config.yaml"

RAYJOBS = {  # manifest -> the job script its entrypoint must run
    "rayjob-pretrain.yaml": "jobs/pretrain.py",
    "rayjob-finetune.yaml": "jobs/finetune.py",
    "rayjob-caption.yaml": "jobs/caption.py",
    "rayjob-evaluate.yaml": "jobs/evaluate.py",
    "rayjob-curate.yaml": "jobs/curate.py",
}
CACHE_ENV = ("MINIGPT4_CACHE", "/mnt/cache/minigpt4")
A100_INSTANCE_TYPES = {"p4d.24xlarge", "p4de.24xlarge"}
SERVE_DEPLOYMENT = "MiniGPT4Deployment"
SERVE_IMPORT_PATH = "minigpt4.serving:app"


# ----------------------------------------------------------------------------- repo facts

def project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def requirement_pins(path: Path = REPO / "requirements.txt") -> dict[str, str]:
    """`name==version` lines of a requirements file, names lower-cased without extras."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if m := re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*==\s*(\S+)", line):
            pins[m.group(1).lower().replace("_", "-")] = m.group(3)
    return pins


def load_cluster_yaml() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def project_image() -> str:
    return load_cluster_yaml()["docker"]["image"]


def kuberay_docs() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(KUBERAY_DIR.glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def ray_cluster_specs() -> list[tuple[str, dict]]:
    out = []
    for name, doc in kuberay_docs():
        if doc["kind"] == "RayJob":
            out.append((name, doc["spec"]["rayClusterSpec"]))
        elif doc["kind"] == "RayService":
            out.append((name, doc["spec"]["rayClusterConfig"]))
    return out


def pod_groups(spec: dict) -> list[tuple[str, dict]]:
    """(group name, group spec) for the head and every worker group of a RayCluster spec."""
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def quantity_bytes(q: str | int) -> int:
    """Kubernetes memory quantity ('16Gi', '500M', '1024') in bytes."""
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(q))
    assert m, f"not a memory quantity: {q!r}"
    mult = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
            "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[m.group(2)]
    return int(m.group(1)) * mult


def serve_app(serve_config: dict) -> dict:
    (app,) = [a for a in serve_config["applications"] if a["import_path"] == SERVE_IMPORT_PATH]
    return app


def rayservice_serve_config() -> dict:
    (doc,) = [d for _, d in kuberay_docs() if d["kind"] == "RayService"]
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


# ----------------------------------------------------------------------------- cluster.yaml

@pytest.fixture
def no_aws(monkeypatch):
    """Any attempt to build a boto3 client/resource fails the test: validation must stay offline."""
    import boto3.session

    def refuse(*args, **kwargs):
        raise AssertionError("cluster.yaml validation tried to reach AWS")

    monkeypatch.setattr(boto3.session.Session, "client", refuse)
    monkeypatch.setattr(boto3.session.Session, "resource", refuse)


def test_cluster_yaml_matches_the_schema_shipped_with_ray():
    import jsonschema
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(load_cluster_yaml(), json.loads(schema_path.read_text()))


def test_cluster_yaml_passes_rays_own_validator(no_aws):
    # What `ray up` does before the provider's AWS bootstrap: merge the AWS defaults, fold
    # setup_commands into head/worker setup, check the docker block, default per-type
    # min/max workers, then validate (schema + cross-field rules).
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load_cluster_yaml()
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    # The defaults file carries example node types; ours must have replaced them, not merged.
    assert set(config["available_node_types"]) == set(raw["available_node_types"])
    assert config["available_node_types"][config["head_node_type"]]["max_workers"] == 0
    assert config["provider"]["cache_stopped_nodes"] is True


def test_node_types_head_gpu_spot_and_cpu():
    cfg = load_cluster_yaml()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "no Train/Data/Serve work may be scheduled on the head"

    expect = {"gpu_a100_40g": ("p4d.24xlarge", "A100-40G"),
              "gpu_a100_40g_spot": ("p4d.24xlarge", "A100-40G"),
              "gpu_a100_80g": ("p4de.24xlarge", "A100-80G")}
    for name, (instance, size) in expect.items():
        t = types[name]
        assert t["node_config"]["InstanceType"] == instance
        r = t["resources"]
        assert r["GPU"] == 8 and r["CPU"] == 96, name
        assert r["accelerator_type:A100"] == 1 and r[f"accelerator_type:{size}"] == 1, name

    spot = types["gpu_a100_40g_spot"]
    assert spot["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert spot["resources"].get("spot") == 1
    for name, t in types.items():
        if name != "gpu_a100_40g_spot":
            assert "InstanceMarketOptions" not in t["node_config"], f"{name} must be on-demand"
    # The spot twin offers what its on-demand twin offers, apart from the market marker.
    strip = lambda r: {k: v for k, v in r.items() if k not in ("spot", "on_demand")}  # noqa: E731
    assert strip(spot["resources"]) == strip(types["gpu_a100_40g"]["resources"])

    cpu_only = [n for n, t in types.items() if n != cfg["head_node_type"] and "GPU" not in t["resources"]]
    assert cpu_only, "a CPU-only worker type for Ray Data preprocessing"

    for name, t in types.items():
        if name == cfg["head_node_type"]:
            continue
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"], name
    assert cfg["upscaling_speed"] > 0 and 1 <= cfg["idle_timeout_minutes"] <= 60


def test_nodes_use_instance_profiles_and_one_ami():
    cfg = load_cluster_yaml()
    amis = set()
    for name, t in cfg["available_node_types"].items():
        nc = t["node_config"]
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+",
                            nc["IamInstanceProfile"]["Arn"]), name
        amis.add(nc["ImageId"])
    assert len(amis) == 1, f"one AMI for all node types, got {amis}"
    assert "aws_credentials" not in cfg["provider"]


def test_docker_image_run_options_and_cache():
    cfg = load_cluster_yaml()
    docker = cfg["docker"]
    assert docker["image"] == docker["worker_image"]
    assert docker["image"].rsplit(":", 1)[1] == project_version(), "image tag = project version"
    assert docker["container_name"]
    opts = " ".join(docker["run_options"])
    assert "--ulimit nofile=" in opts and "--ulimit memlock=-1" in opts
    assert "--volume /mnt/cache:/mnt/cache" in opts
    assert f"--env {CACHE_ENV[0]}={CACHE_ENV[1]}" in opts
    # /dev/shm (the object store's home) is sized on the head and on every worker type.
    assert any(o.startswith("--shm-size=") for o in docker["head_run_options"])
    for name, t in cfg["available_node_types"].items():
        if name != cfg["head_node_type"]:
            assert any(o.startswith("--shm-size=") for o in t["docker"]["worker_run_options"]), name
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("--object-store-memory=" in c for c in cfg[key]), key
    # The cache mount is prepared on the host before the container starts.
    assert any("/mnt/cache" in c and "mount" in c for c in cfg["initialization_commands"])


def test_region_is_consistent():
    cfg = load_cluster_yaml()
    region = cfg["provider"]["region"]
    assert all(az.startswith(region) for az in cfg["provider"]["availability_zone"].split(","))
    text = CLUSTER_YAML.read_text()
    assert set(re.findall(r"\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com", text)) == {region}
    assert set(re.findall(r"--region ([a-z0-9-]+)", text)) == {region}


def test_setup_commands_pin_project_and_ray_versions():
    cfg = load_cluster_yaml()
    (cmd,) = [c for c in cfg["setup_commands"] if "minigpt4-ray" in c]
    argv = shlex.split(cmd)
    assert argv[:2] == ["python", "-c"]
    compile(argv[2], "setup_commands", "exec")
    want = ast.literal_eval(re.search(r"want = (\{[^}]*\})", argv[2]).group(1))
    assert want == {"minigpt4-ray": project_version(), "ray": requirement_pins()["ray"]}


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash to syntax-check commands")
def test_every_cluster_command_is_valid_bash():
    cfg = load_cluster_yaml()
    keys = ["initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands"]
    for key in keys:
        for cmd in cfg.get(key, []):
            r = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
            assert r.returncode == 0, f"{key}: {r.stderr}\n{cmd}"


# ----------------------------------------------------------------------------- Dockerfile

def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped and continuation lines joined."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, "dangling line continuation"
    return out


def dockerfile_args(instrs) -> dict[str, str]:
    args = {}
    for ins, rest in instrs:
        if ins == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k] = v.strip('"')
    return args


def test_dockerfile_base_user_workdir_and_version():
    instrs = dockerfile_instructions()
    non_arg = [i for i in instrs if i[0] != "ARG"]
    assert non_arg[0][0] == "FROM"
    base = non_arg[0][1]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?devel-ubuntu22\.04", base), base
    users = [rest for ins, rest in instrs if ins == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    workdirs = [rest for ins, rest in instrs if ins == "WORKDIR"]
    assert workdirs[-1] == "/opt/minigpt4"
    labels = " ".join(rest for ins, rest in instrs if ins == "LABEL")
    assert f'org.opencontainers.image.version="{project_version()}"' in labels
    env = " ".join(rest for ins, rest in instrs if ins == "ENV")
    assert f"{CACHE_ENV[0]}={CACHE_ENV[1]}" in env


def test_dockerfile_copies_only_existing_paths_and_ignores_local_state():
    for ins, rest in dockerfile_instructions():
        if ins not in ("COPY", "ADD"):
            continue
        parts = [p for p in shlex.split(rest) if not p.startswith("--")]
        assert "--from" not in rest, "multi-stage COPY is not expected here"
        *sources, _dest = parts
        for src in sources:
            found = (REPO / src).exists() or (any(c in src for c in "*?[") and any(REPO.glob(src)))
            assert found, f"{ins} {src}: not in the repo"
    ignore = (CLUSTER_DIR / "Dockerfile.dockerignore").read_text().split()
    for must in (".git", ".venv", "outputs"):
        assert must in ignore, f"{must} must stay out of the build context"


def test_dockerfile_installs_pinned_deps_gpu_torch_deepspeed_ops_and_the_project():
    instrs = dockerfile_instructions()
    runs = [rest for ins, rest in instrs if ins == "RUN"]
    pip_calls = [c for r in runs for c in re.split(r"&&|;", r) if re.search(r"\bpip install\b", c)]
    assert pip_calls
    for call in pip_calls:  # the project's rule, as in the Makefile
        assert "-c constraints.txt" in call, f"pip call without the constraints file: {call}"
    assert any("-r requirements.txt" in c for c in pip_calls)
    assert any("." in c.split() for c in pip_calls), "the project itself must be pip-installed"

    # GPU torch: same release as the CPU pin, a CUDA local label, index and base image agreeing.
    gpu_pins = requirement_pins(CLUSTER_DIR / "requirements-gpu.txt")
    cpu_torch = requirement_pins()["torch"]
    release, _, label = gpu_pins["torch"].partition("+")
    assert release == cpu_torch.split("+")[0] and re.fullmatch(r"cu\d{3,}", label), gpu_pins["torch"]
    args = dockerfile_args(instrs)
    assert args["TORCH_EXTRA_INDEX_URL"] == f"https://download.pytorch.org/whl/{label}"
    base = [rest for ins, rest in instrs if ins == "FROM"][0]
    cuda_major = re.search(r"nvidia/cuda:(\d+)\.", base).group(1)
    assert label[2:].startswith(cuda_major), f"torch {label} vs CUDA {cuda_major} base: nvcc must match"

    # DeepSpeed: the pinned version, its A100 ops compiled at build time against that torch.
    ds = " ".join(r for r in runs if "DS_BUILD" in r)
    assert "DS_BUILD_FUSED_ADAM=1" in ds and "DS_BUILD_CPU_ADAM=1" in ds
    assert "DS_ACCELERATOR=cuda" in ds and "--no-build-isolation" in ds
    assert "^deepspeed==" in ds and "deepspeed" in requirement_pins()
    assert "8.0" in args["TORCH_CUDA_ARCH_LIST"]


# ----------------------------------------------------------------------------- KubeRay manifests

RAYJOB_SPEC_KEYS = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate",
                    "metadata", "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy",
                    "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
                    "entrypointNumCpus", "entrypointNumGpus", "entrypointMemory",
                    "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule"}
RAYSERVICE_SPEC_KEYS = {"serveConfigV2", "rayClusterConfig", "serveService", "upgradeStrategy",
                        "excludeHeadPodFromServeSvc", "rayClusterDeletionDelaySeconds",
                        "serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold"}
RAYCLUSTER_SPEC_KEYS = {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
                        "autoscalerOptions", "headServiceAnnotations", "suspend", "managedBy",
                        "gcsFaultToleranceOptions", "upgradeStrategy", "authOptions"}
GROUP_KEYS = {"serviceType", "headService", "enableIngress", "groupName", "replicas", "minReplicas",
              "maxReplicas", "numOfHosts", "rayStartParams", "template", "scaleStrategy", "suspend",
              "idleTimeoutSeconds", "resources", "labels"}
AUTOSCALER_KEYS = {"resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts",
                   "securityContext", "idleTimeoutSeconds", "upscalingMode", "version"}


def test_kuberay_manifests_parse_with_known_kinds_and_fields():
    docs = kuberay_docs()
    kinds = {}
    for name, doc in docs:
        kinds.setdefault(doc["kind"], []).append(name)
        if doc["kind"] == "ServiceAccount":
            assert doc["apiVersion"] == "v1"
            continue
        assert doc["apiVersion"] == "ray.io/v1", name
        assert doc["kind"] in ("RayJob", "RayService"), name
        spec = doc["spec"]
        allowed = RAYJOB_SPEC_KEYS if doc["kind"] == "RayJob" else RAYSERVICE_SPEC_KEYS
        assert set(spec) <= allowed, f"{name}: unknown spec fields {set(spec) - allowed}"
    assert sorted(kinds["RayJob"]) == sorted(RAYJOBS)
    assert kinds["RayService"] == ["rayservice.yaml"]
    for name, spec in ray_cluster_specs():
        assert set(spec) <= RAYCLUSTER_SPEC_KEYS, f"{name}: unknown cluster fields {set(spec) - RAYCLUSTER_SPEC_KEYS}"
        assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_KEYS, name
        assert spec["workerGroupSpecs"], name
        for group, g in pod_groups(spec):
            assert set(g) <= GROUP_KEYS, f"{name}/{group}: unknown fields {set(g) - GROUP_KEYS}"


def test_kuberay_clusters_image_version_identity_cache_and_shm():
    image, ray_pin = project_image(), requirement_pins()["ray"]
    (sa,) = [d for _, d in kuberay_docs() if d["kind"] == "ServiceAccount"]
    assert "eks.amazonaws.com/role-arn" in sa["metadata"]["annotations"], "S3 access through IRSA"
    for name, spec in ray_cluster_specs():
        assert spec["rayVersion"] == ray_pin, name
        head_params = spec["headGroupSpec"]["rayStartParams"]
        assert head_params.get("num-cpus") == "0", f"{name}: keep work off the head"
        for group, g in pod_groups(spec):
            where = f"{name}/{group}"
            params = g["rayStartParams"]
            assert all(isinstance(v, str) for v in params.values()), f"{where}: rayStartParams are strings"
            if group != "head":
                assert g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], where
            pod = g["template"]["spec"]
            assert pod["serviceAccountName"] == sa["metadata"]["name"], where
            volumes = {v["name"]: v for v in pod["volumes"]}
            (container,) = pod["containers"]
            assert container["image"] == image, f"{where}: image must be {image}"
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get(CACHE_ENV[0]) == CACHE_ENV[1], where
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert "/mnt/cache" in mounts and CACHE_ENV[1].startswith("/mnt/cache/"), where
            shm = volumes[mounts["/dev/shm"]]["emptyDir"]
            assert shm["medium"] == "Memory", f"{where}: /dev/shm must be memory-backed"
            store = int(params.get("object-store-memory", 0))
            assert 0 < store < quantity_bytes(shm["sizeLimit"]), f"{where}: object store must fit in /dev/shm"
            limits = container["resources"]["limits"]
            assert quantity_bytes(shm["sizeLimit"]) < quantity_bytes(limits["memory"]), where
            for secret_env in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
                assert secret_env not in env, f"{where}: use the IRSA service account, not keys"


def test_kuberay_gpu_groups_request_a100s():
    for name, spec in ray_cluster_specs():
        gpu_groups = 0
        for group, g in pod_groups(spec):
            pod = g["template"]["spec"]
            (container,) = pod["containers"]
            res = container["resources"]
            gpus = res.get("limits", {}).get("nvidia.com/gpu")
            if group == "head":
                assert gpus is None, f"{name}: the head needs no GPU"
                continue
            if gpus is None:
                continue
            gpu_groups += 1
            where = f"{name}/{group}"
            # Extended resources: Kubernetes requires requests == limits.
            assert str(res["requests"]["nvidia.com/gpu"]) == str(gpus) and int(gpus) >= 1, where
            assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), where
            selected = set()
            if "node.kubernetes.io/instance-type" in pod.get("nodeSelector", {}):
                selected.add(pod["nodeSelector"]["node.kubernetes.io/instance-type"])
            terms = (pod.get("affinity", {}).get("nodeAffinity", {})
                     .get("requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms", []))
            for term in terms:
                for expr in term.get("matchExpressions", []):
                    if expr["key"] == "node.kubernetes.io/instance-type" and expr["operator"] == "In":
                        selected |= set(expr["values"])
            assert selected and selected <= A100_INSTANCE_TYPES, f"{where}: must land on A100 nodes, got {selected}"
        assert gpu_groups >= 1, f"{name}: no GPU worker group"


def rayjob(manifest: str) -> dict:
    (doc,) = [d for n, d in kuberay_docs() if n == manifest and d["kind"] == "RayJob"]
    return doc


@pytest.mark.parametrize("manifest", sorted(RAYJOBS))
def test_rayjob_lifecycle(manifest):
    spec = rayjob(manifest)["spec"]
    assert spec["entrypoint"].split()[0] == "python"
    assert spec["shutdownAfterJobFinishes"] is True
    assert 0 < spec["ttlSecondsAfterFinished"] <= 3600
    assert 0 <= spec["backoffLimit"] <= 3
    assert spec["activeDeadlineSeconds"] > 0
    assert "headGroupSpec" in spec["rayClusterSpec"] and spec["rayClusterSpec"]["workerGroupSpecs"]


@pytest.mark.parametrize("manifest", sorted(RAYJOBS))
def test_rayjob_entrypoint_files_exist(manifest):
    """Entry points run from the image's copy of the repo (/opt/minigpt4, the Dockerfile's WORKDIR)."""
    argv = shlex.split(rayjob(manifest)["spec"]["entrypoint"])
    image_root = [r for i, r in dockerfile_instructions() if i == "WORKDIR"][-1].rstrip("/") + "/"
    script = argv[1]
    assert script.startswith(image_root), script
    assert script[len(image_root):] == RAYJOBS[manifest], f"{manifest} must run {RAYJOBS[manifest]}"
    assert "--config" in argv
    config = argv[argv.index("--config") + 1]
    assert config.startswith(image_root + "jobs/configs/") and config.endswith(".yaml"), config
    overrides = argv[argv.index("--config") + 2:]
    assert all(re.fullmatch(r"[a-z_][\w.]*=\S+", o) for o in overrides), overrides

    local_script = REPO / RAYJOBS[manifest]
    if not local_script.exists():
        pytest.skip(f"{RAYJOBS[manifest]} is not in the repo yet; this check asserts once it lands")
    local_config = REPO / config[len(image_root):]
    have = sorted(p.name for p in (REPO / "jobs" / "configs").glob("*.yaml"))
    assert local_config.exists(), f"{manifest}: {local_config.relative_to(REPO)} missing; configs: {have}"


def test_rayservice_serve_config_is_a_valid_serve_app():
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    cfg = rayservice_serve_config()
    ServeDeploySchema.model_validate(cfg)
    app = serve_app(cfg)
    assert app["route_prefix"] == "/"
    (dep,) = [d for d in app["deployments"] if d["name"] == SERVE_DEPLOYMENT]
    assert dep["ray_actor_options"]["num_gpus"] == 1
    auto = dep["autoscaling_config"]
    unknown = set(auto) - set(AutoscalingConfig.model_fields)
    assert not unknown, f"autoscaling_config fields Serve does not know: {unknown}"
    AutoscalingConfig(**auto)
    assert 1 <= auto["min_replicas"] <= auto["max_replicas"]
    assert 0 < auto["target_ongoing_requests"] <= dep["max_ongoing_requests"]
    # The cluster can host max_replicas: GPU pods x GPUs per pod.
    (_, spec), = [(n, s) for n, s in ray_cluster_specs() if n == "rayservice.yaml"]
    gpu_slots = sum(int(g["maxReplicas"]) * int(g["template"]["spec"]["containers"][0]["resources"]
                                                 ["limits"].get("nvidia.com/gpu", 0))
                    for g in spec["workerGroupSpecs"])
    assert gpu_slots >= auto["max_replicas"] * dep["ray_actor_options"]["num_gpus"]


def test_rayservice_matches_serve_config_yaml():
    if not SERVE_CONFIG.exists():
        pytest.skip("serve/config.yaml is not in the repo yet; this check asserts once it lands")
    ours, theirs = serve_app(rayservice_serve_config()), serve_app(yaml.safe_load(SERVE_CONFIG.read_text()))
    assert ours["import_path"] == theirs["import_path"]
    assert ours.get("route_prefix", "/") == theirs.get("route_prefix", "/")
    ours_deps = {d["name"]: d for d in ours["deployments"]}
    theirs_deps = {d["name"]: d for d in theirs["deployments"]}
    assert set(ours_deps) == set(theirs_deps), "deployment names differ"
    for name, dep in ours_deps.items():
        for key in ("autoscaling_config", "max_ongoing_requests", "max_queued_requests", "num_replicas"):
            assert dep.get(key) == theirs_deps[name].get(key), f"{name}.{key}: rayservice.yaml vs serve/config.yaml"
        # serve/config.yaml is the embedded default (tiny, CPU); the RayService gives each replica a GPU
        assert theirs_deps[name]["ray_actor_options"]["num_gpus"] == 0
        assert dep["ray_actor_options"]["num_gpus"] == 1


# ----------------------------------------------------------------------------- runtime env

def test_runtime_env_is_valid_for_ray(monkeypatch):
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(RUNTIME_ENV.read_text())
    monkeypatch.chdir(REPO)  # paths are relative to where `ray job submit` runs: the repo root
    RuntimeEnv(**env)  # validates field names, types and that local paths exist
    assert env["env_vars"][CACHE_ENV[0]] == CACHE_ENV[1]
    for must in (".venv", "outputs", ".git"):
        assert must in env["excludes"], must
    assert not {"pip", "conda", "uv"} & set(env), "dependencies come from the image"
    assert not (REPO / "platform" / "__init__.py").exists()


def test_cache_variable_is_the_one_the_code_reads():
    code = "\n".join(p.read_text() for p in (REPO / "platform" / "minigpt4").rglob("*.py"))
    assert f'"{CACHE_ENV[0]}"' in code


# ----------------------------------------------------------------------------- secrets

SECRET_PATTERNS = [
    re.compile(r"aws_access_key_id", re.I),
    re.compile(r"aws_secret_access_key", re.I),
    re.compile(r"aws_session_token", re.I),
    re.compile(r"secret[_-]?access[_-]?key", re.I),
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"),  # secret-key-shaped blob
]


def deployment_files() -> list[Path]:
    return [CLUSTER_YAML] + sorted(p for p in CLUSTER_DIR.rglob("*") if p.is_file())


def test_no_credentials_in_deployment_files():
    files = deployment_files()
    assert DOCKERFILE in files and RUNTIME_ENV in files
    for path in files:
        text = path.read_text()
        for pattern in SECRET_PATTERNS:
            m = pattern.search(text)
            assert m is None, f"{path.relative_to(REPO)}: looks like a credential: {m.group(0)!r}"
    assert "--password-stdin" in CLUSTER_YAML.read_text(), "ECR login reads a token from the instance profile"


def test_serve_app_args_are_valid_settings():
    """Both Serve configs' `args:` build a ServeSettings (a typo there would fail every replica)."""
    from minigpt4.config import from_dict
    from minigpt4.serving import ServeSettings

    for cfg in (rayservice_serve_config(), yaml.safe_load(SERVE_CONFIG.read_text())):
        settings = from_dict(ServeSettings, serve_app(cfg).get("args", {}))
        settings.model_config()
    local = yaml.safe_load(SERVE_CONFIG.read_text())
    assert local["http_options"]["host"] == "127.0.0.1"
