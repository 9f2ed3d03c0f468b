"""The cluster-facing files: ray_cluster.yaml, the KubeRay RayJob and every config in configs/.

Checks what `ray up` and `kubectl apply` would reject, and that the real-model recipes fit the
node types those files declare (GPUs per replica, trainer workers, reward actors, shared mounts).
"""

import copy
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from masters.config import MastersConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
RAY_CLUSTER = ROOT / "ray_cluster.yaml"
RAYJOB = ROOT / "deploy" / "kuberay-rayjob.yaml"
# Run configs; configs/zoo/ holds zoo configs (masters.zoo.ZooConfig), tested in test_zoo.py.
# Run configs: everything under configs/ but the zoo configs and the ablation ladders (files with `rungs`).
LADDERS = sorted(path for path in (ROOT / "configs" / "ablations").glob("*.yaml") if "rungs" in yaml.safe_load(path.read_text()))
CONFIGS = sorted(
    path
    for path in (ROOT / "configs").rglob("*.yaml")
    if "zoo" not in path.relative_to(ROOT / "configs").parts[:-1] and path not in LADDERS
)
# Real-model recipes: the top-level configs that serve with vLLM (ablations run on the embedded default).
RECIPES = [path for path in sorted((ROOT / "configs").glob("*.yaml")) if load_config(path).serve.engine == "vllm"]
PART_RESOURCES = {"teacher_node", "trainer_node", "reward_node"}


@dataclass(frozen=True)
class NodeType:
    """What one node of a type offers Ray, and how many such nodes the cluster may hold."""

    cpus: float
    gpus: int
    custom: dict[str, float]
    max_count: int


@dataclass(frozen=True)
class Cluster:
    node_types: dict[str, NodeType]  # keyed by the part's custom resource
    mounts: list[str]  # paths visible inside every Ray container
    writable_mounts: list[str]  # of those, the ones every container may write


def _load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _ray_cluster() -> Cluster:
    config = _load_yaml(RAY_CLUSTER)
    types = {}
    for spec in config["available_node_types"].values():
        resources = dict(spec["resources"])
        (part,) = PART_RESOURCES & resources.keys() or {None}
        if part is not None:
            types[part] = NodeType(
                cpus=resources.pop("CPU"), gpus=resources.pop("GPU", 0), custom=resources, max_count=spec["max_workers"]
            )
    volumes = [option.split()[1].split(":") for option in config["docker"]["run_options"] if option.startswith("-v ")]
    return Cluster(types, [volume[1] for volume in volumes], [volume[1] for volume in volumes if volume[2:] != ["ro"]])


def _group_resources(group: dict) -> dict[str, float]:
    # KubeRay's format: a JSON string literal holding a JSON object, e.g. '"{\"teacher_node\": 8}"'.
    return json.loads(json.loads(group["rayStartParams"]["resources"]))


def _kuberay_cluster() -> Cluster:
    spec = _load_yaml(RAYJOB)["spec"]["rayClusterSpec"]
    types = {}
    for group in spec["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        custom = _group_resources(group)
        (part,) = PART_RESOURCES & custom.keys()
        types[part] = NodeType(
            cpus=float(limits["cpu"]),
            gpus=int(limits.get("nvidia.com/gpu", 0)),
            custom=custom,
            max_count=group["maxReplicas"],
        )
    (head,) = spec["headGroupSpec"]["template"]["spec"]["containers"]
    containers = [head] + [group["template"]["spec"]["containers"][0] for group in spec["workerGroupSpecs"]]
    writable = [{m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")} for c in containers]
    return Cluster(types, [mount["mountPath"] for mount in head["volumeMounts"]], sorted(set.intersection(*writable)))


CLUSTERS = {"ray_cluster.yaml": _ray_cluster, "kuberay-rayjob.yaml": _kuberay_cluster}


# --------------------------------------------------------------------------- ray up


def test_ray_cluster_is_valid_for_ray_up():
    config = _load_yaml(RAY_CLUSTER)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    # What `ray up` does before it touches the cloud: merge the provider defaults, then Ray's own checks
    # (schema again, head type, global max_workers against the per-type minimums).
    validate_config(prepare_config(copy.deepcopy(config)))


def test_ray_cluster_runs_the_submitting_ray_and_python():
    # Ray refuses a client whose Ray or Python version differs from the cluster's.
    image = _load_yaml(RAY_CLUSTER)["docker"]["image"]
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert image.split(":")[1].startswith(f"{ray.__version__}-{python}-gpu"), image


def test_ray_cluster_node_types_each_advertise_their_part():
    config = _load_yaml(RAY_CLUSTER)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head must take no work (it runs the driver and the GCS)"
    cluster = _ray_cluster()
    assert set(cluster.node_types) == PART_RESOURCES
    for part, node in cluster.node_types.items():
        # One unit per GPU on GPU nodes, per CPU on CPU nodes, so a part asks for units like for devices.
        assert node.custom == {part: node.gpus or node.cpus}
    assert cluster.node_types["teacher_node"].gpus > 0 and cluster.node_types["trainer_node"].gpus > 0
    assert cluster.node_types["reward_node"].gpus == 0
    assert config["max_workers"] >= sum(node.max_count for node in cluster.node_types.values())


# --------------------------------------------------------------------------- KubeRay


def test_rayjob_runs_the_driver_on_an_existing_config():
    job = _load_yaml(RAYJOB)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    python, script, flag, config_path = shlex.split(spec["entrypoint"])
    assert (python, script, flag) == ("python", "jobs/distill.py", "--config")
    assert (ROOT / script).is_file()
    assert load_config(ROOT / config_path).serve.engine == "vllm"
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__


def test_rayjob_cluster_places_each_part_and_exposes_serve():
    spec = _load_yaml(RAYJOB)["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = cluster["workerGroupSpecs"]
    assert [set(_group_resources(group)) for group in groups] == [{"teacher_node"}, {"trainer_node"}, {"reward_node"}]
    for group in groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in head["ports"]}
    config = load_config(ROOT / shlex.split(spec["entrypoint"])[3])
    assert ports["serve"] == config.serve.port
    assert ports["dashboard"] == 8265  # the submitter pod reaches the job API there


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_loads(path):
    assert isinstance(load_config(path), MastersConfig)


@pytest.mark.parametrize("path", LADDERS, ids=lambda p: p.name)
def test_every_ladder_resolves_every_rung(path):
    from masters.ablation import load_ladder, rung_config

    ladder = load_ladder(path)
    for rung, file in ladder.rungs.items():
        if file is not None:
            assert isinstance(rung_config(ladder, rung, ladder.seeds[0]), MastersConfig)


def test_config_names_are_unique():
    # Runs resume by name: two configs with one name would share (and resume) one run directory.
    names = [load_config(path).name for path in CONFIGS]
    assert len(set(names)) == len(names), names


def test_there_are_recipes_for_the_paper_families():
    assert {path.stem for path in RECIPES} >= {
        "internvl3_5-14b-38b-to-8b", "internvl3-14b-38b-78b-to-8b", "qwen2_5-vl-32b-72b-to-7b", "qwen3-vl-32b-to-8b"
    }


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_keeps_the_paper_values(path):
    config = load_config(path)
    assert config.mask.ratios == [0.2, 0.15, 0.1, 0.05, 0.0]
    # The paper's chain: a mid-size teacher, then the large one (14B -> 38B, or 14B -> 38B -> 78B);
    # a family with no mid size (Qwen3-VL dense) runs its one teacher.
    assert 1 <= len(config.models.teachers) <= 3
    assert (config.generation.group_teacher, config.generation.group_student) == (4, 4)
    assert config.generation.teacher_topk == 64
    assert config.rewards.judge.kind == "llm"
    assert (config.train.strategy, config.train.zero_stage, config.train.use_gpu) == ("deepspeed", 3, True)
    assert config.train.lr == 1e-6
    assert config.loss.objective == "full"


@pytest.mark.parametrize("cluster_name", CLUSTERS)
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_fits_the_cluster(path, cluster_name):
    config = load_config(path)
    cluster = CLUSTERS[cluster_name]()
    serve, train, rewards = config.serve, config.train, config.rewards

    # Teachers and the student: one vLLM replica owns its whole tensor-parallel group, inside one node.
    teacher = cluster.node_types["teacher_node"]
    assert serve.tensor_parallel_size == serve.num_gpus
    assert teacher.gpus % serve.num_gpus == 0, "replicas should pack a teacher node without stranding GPUs"
    replicas_per_node = teacher.gpus // int(serve.num_gpus)
    assert replicas_per_node * serve.num_cpus <= teacher.cpus
    models = len(config.models.teachers) + 1
    replicas = models * (serve.max_replicas or serve.replicas)
    assert replicas <= replicas_per_node * teacher.max_count, f"{replicas} replicas need more teacher nodes"

    # Trainer: one GPU per Ray Train worker.
    trainer = cluster.node_types["trainer_node"]
    assert train.num_workers <= trainer.gpus * trainer.max_count
    assert min(train.num_workers, trainer.gpus) * train.cpus_per_worker <= trainer.cpus

    reward = cluster.node_types["reward_node"]
    assert rewards.actors * rewards.actor_num_cpus <= reward.cpus * reward.max_count

    # The service must accept what the pipeline asks for.
    assert serve.max_tokens_limit >= config.generation.sampling.max_new_tokens
    assert serve.max_n >= max(config.generation.group_teacher, config.generation.group_student)

    # Nothing is downloaded at run time: models and data are paths on storage every node mounts.
    for path_on_node in [t.model for t in config.models.teachers] + [config.models.student, config.data.dataset]:
        assert any(Path(path_on_node).is_relative_to(mount) for mount in cluster.mounts), path_on_node
    # Every node writes the run directory (stage records, trainer outputs, checkpoints).
    assert any(Path(config.storage_path).is_relative_to(mount) for mount in cluster.writable_mounts), config.storage_path
