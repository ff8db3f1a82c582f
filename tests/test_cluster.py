"""cluster/: the KubeRay manifests validate against KubeRay's CRD schemas, entrypoints run jobs that
exist with arguments their parsers accept, GPU counts agree with the replicas, images are pinned."""

from __future__ import annotations

import copy
import functools
import os
import re
import shlex
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
CRD_DIR = Path(os.environ.get("KUBERAY_CRDS", REPO.parent / "shared" / "kuberay-crds"))
APP_DIR = "/home/ray/app"  # where cluster/Dockerfile puts the checkout
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayCronJob": "ray.io_raycronjobs.yaml", "RayService": "ray.io_rayservices.yaml"}

sys.path.insert(0, str(REPO / "jobs"))
import caption_videos  # noqa: E402


def manifest_docs() -> list[tuple[str, dict]]:
    """(file name, document) for every YAML document in cluster/kuberay/, plus the RayJob the
    fallback CronJob keeps in its ConfigMap."""
    docs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs.append((path.name, doc))
            if doc["kind"] == "ConfigMap":
                docs += [(f"{path.name}:{key}", yaml.safe_load(text)) for key, text in doc["data"].items()]
    return docs


def of_kind(kind: str) -> list[tuple[str, dict]]:
    return [(name, doc) for name, doc in manifest_docs() if doc["kind"] == kind]


def strict(schema):
    """The CRD schema, refusing fields it does not declare: what `kubectl apply` (strict field
    validation) reports as unknown fields. CRD schemas leave additionalProperties open."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


def validator(kind: str, api_version: str):
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {CRD_DIR} (set KUBERAY_CRDS to the folder holding "
                    f"ray.io_*.yaml to run the manifest validation)")
    return _validator(kind, api_version)


@functools.cache
def _validator(kind: str, api_version: str):
    crd = yaml.safe_load((CRD_DIR / CRD_FILES[kind]).read_text())
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    assert version in versions and versions[version]["served"], f"{kind} {api_version} is not served"
    schema = strict(versions[version]["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def schema_errors(doc: dict) -> list[str]:
    v = validator(doc["kind"], doc["apiVersion"])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]


RAY_DOCS = [(name, doc) for name, doc in manifest_docs() if doc["kind"] in CRD_FILES]


def test_every_kuberay_kind_has_a_manifest():
    assert {doc["kind"] for _, doc in RAY_DOCS} == set(CRD_FILES)


@pytest.mark.parametrize("name,doc", RAY_DOCS, ids=[f"{n}-{d['kind']}" for n, d in RAY_DOCS])
def test_kuberay_manifest_validates_against_its_crd(name, doc):
    assert schema_errors(doc) == []


def test_validation_catches_a_misspelled_field():
    _, rayjob = of_kind("RayJob")[0]
    broken = copy.deepcopy(rayjob)
    broken["spec"]["shutdownAfterJobFinish"] = broken["spec"].pop("shutdownAfterJobFinishes")
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    errors = schema_errors(broken)
    assert any("shutdownAfterJobFinish'" in e for e in errors)
    assert any("maxReplica'" in e for e in errors)
    wrong_type = copy.deepcopy(rayjob)
    wrong_type["spec"]["backoffLimit"] = "one"
    assert any("backoffLimit" in e for e in schema_errors(wrong_type))


def test_scheduled_runs_use_the_rayjob_spec():
    """RayCronJob and the fallback CronJob's RayJob run exactly rayjob.yaml's spec."""
    (_, rayjob), = [(n, d) for n, d in of_kind("RayJob") if n == "rayjob.yaml"]
    (_, cron), = of_kind("RayCronJob")
    assert cron["spec"]["jobTemplate"] == rayjob["spec"]
    (_, kept), = [(n, d) for n, d in of_kind("RayJob") if n.startswith("cronjob-fallback.yaml:")]
    assert kept == rayjob


def test_fallback_cronjob_creates_the_rayjob_with_rbac_and_no_overlap():
    docs = {doc["kind"]: doc for name, doc in manifest_docs() if name == "cronjob-fallback.yaml"}
    cron = docs["CronJob"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    account = pod["serviceAccountName"]
    binding = docs["RoleBinding"]
    assert docs["ServiceAccount"]["metadata"]["name"] == account
    assert {"kind": "ServiceAccount", "name": account} in binding["subjects"]
    assert binding["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
    rules = docs["Role"]["rules"]
    assert any("ray.io" in r["apiGroups"] and "rayjobs" in r["resources"] and {"create", "get", "delete"} <= set(r["verbs"])
               for r in rules)
    steps = [c["command"] + c["args"] for c in pod["initContainers"] + pod["containers"]]
    assert [s[:2] for s in steps] == [["kubectl", "delete"], ["kubectl", "create"], ["kubectl", "wait"]]
    rayjob_name = yaml.safe_load(docs["ConfigMap"]["data"]["rayjob.yaml"])["metadata"]["name"]
    assert rayjob_name in steps[0] and f"rayjob/{rayjob_name}" in steps[2]
    mount = pod["initContainers"][1]["volumeMounts"][0]["mountPath"]
    assert steps[1][-1] == f"{mount}/rayjob.yaml"


def test_raycronjob_schedule_is_nightly():
    (_, cron), = of_kind("RayCronJob")
    minute, hour, dom, month, dow = cron["spec"]["schedule"].split()
    assert minute.isdigit() and hour.isdigit() and (dom, month, dow) == ("*", "*", "*")


# --- entrypoints ---------------------------------------------------------------------------------

def entrypoints() -> list[tuple[str, str]]:
    found = []
    for name, doc in RAY_DOCS:
        spec = doc["spec"].get("jobTemplate", doc["spec"])
        if "entrypoint" in spec:
            found.append((name, spec["entrypoint"]))
    return found


def readme_job_commands() -> list[str]:
    """The `python jobs/caption_videos.py ...` commands of the README's code blocks (continuations joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    return [m.group(0) for m in re.finditer(r"python jobs/caption_videos\.py[^\n]*", text)]


def job_argv(command: str) -> tuple[Path, list[str]]:
    argv = shlex.split(command)
    assert argv[0] == "python", command
    script = argv[1]
    path = REPO / script.removeprefix(APP_DIR + "/") if script.startswith(APP_DIR) else REPO / script
    return path, argv[2:]


ENTRYPOINTS = entrypoints()


def test_there_are_entrypoints_and_readme_commands():
    assert len(ENTRYPOINTS) >= 3  # RayJob, RayCronJob, the fallback's RayJob
    assert len(readme_job_commands()) >= 2


@pytest.mark.parametrize("name,command", ENTRYPOINTS + [("README.md", c) for c in readme_job_commands()])
def test_entrypoint_runs_an_existing_job_with_arguments_its_parser_accepts(name, command):
    path, args = job_argv(command)
    assert path.is_file(), f"{name}: {path} does not exist"
    assert path == REPO / "jobs" / "caption_videos.py"
    cfg = caption_videos.parse_args(args)  # argparse exits on an unknown or invalid argument
    assert cfg.manifest and cfg.output and cfg.model


def test_parser_rejects_what_the_entrypoint_check_relies_on():
    with pytest.raises(SystemExit):
        caption_videos.parse_args(["--manifest", "m", "--output", "o", "--model", "x", "--replicaz", "2"])


def test_dockerfile_puts_the_jobs_where_entrypoints_call_them():
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^WORKDIR {re.escape(APP_DIR)}$", text, re.M)
    assert re.search(r"^COPY .*\bjobs \./jobs$", text, re.M) and re.search(r"^COPY .*\bpipeline \./pipeline$", text, re.M)
    assert re.search(r"^COPY .*\bschemas \./schemas$", text, re.M)


# --- GPUs and replicas ---------------------------------------------------------------------------

def cluster_specs() -> list[tuple[str, dict]]:
    specs = []
    for name, doc in RAY_DOCS:
        spec = doc["spec"]
        spec = spec.get("jobTemplate", spec)
        for key in ("rayClusterSpec", "rayClusterConfig"):
            if key in spec:
                specs.append((f"{name}:{doc['kind']}", spec[key]))
        if doc["kind"] == "RayCluster":
            specs.append((name, spec))
    return specs


def group_gpus(group: dict) -> int:
    (container,) = [c for c in group["template"]["spec"]["containers"] if c["name"].startswith("ray-")]
    limits = container["resources"]["limits"]
    requests = container["resources"].get("requests", {})
    assert requests.get("nvidia.com/gpu", limits.get("nvidia.com/gpu")) == limits.get("nvidia.com/gpu")
    return int(limits.get("nvidia.com/gpu", 0))


@pytest.mark.parametrize("name,spec", cluster_specs(), ids=[n for n, _ in cluster_specs()])
def test_gpus_per_worker_group_agree_with_one_replica(name, spec):
    """7B: one replica = one GPU (tp 1). 72B: one replica spans 4 or 8 GPUs of one node (--tp 4 or
    8), so its pods hold 8. CPU groups hold no GPU."""
    for group in spec["workerGroupSpecs"]:
        gpus = group_gpus(group)
        if group["groupName"] == "gpu-7b":
            assert gpus == 1
        elif group["groupName"] == "gpu-72b":
            assert gpus in (4, 8)
        else:
            assert gpus == 0, group["groupName"]
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
    assert group_gpus({"template": spec["headGroupSpec"]["template"]}) == 0


# GPU memory of the instance types the manifests select, for the sizing check
INSTANCE_GPU_GB = {"p5.48xlarge": 80, "p4d.24xlarge": 40, "g6e.2xlarge": 48}


def test_rayjob_replicas_fit_its_gpu_workers():
    """A replica's tp GPUs are in one pod; the initial pods hold every replica at once; where the
    pods name their instance type, the model fits its GPUs at the job's --tp (pipeline/sizing.py)."""
    from pipeline.sizing import KNOWN_MODELS, known_config, plan, shape_of

    for name, doc in of_kind("RayJob") + [(n, {"spec": d["spec"]["jobTemplate"]}) for n, d in of_kind("RayCronJob")]:
        cfg = caption_videos.parse_args(job_argv(doc["spec"]["entrypoint"])[1])
        gpu_groups = [g for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"] if group_gpus(g)]
        assert cfg.device == "cuda" and cfg.replicas >= 1 and gpu_groups, name
        assert all(group_gpus(g) % cfg.tp == 0 for g in gpu_groups), name  # no GPUs stranded, tp within a pod
        assert sum(g["replicas"] * (group_gpus(g) // cfg.tp) for g in gpu_groups) >= cfg.replicas, name
        for g in gpu_groups:
            instance = g["template"]["spec"].get("nodeSelector", {}).get("node.kubernetes.io/instance-type")
            if instance:
                shape = shape_of(known_config(KNOWN_MODELS[cfg.model]))
                assert plan(shape, INSTANCE_GPU_GB[instance], tp=cfg.tp).fits, name


def test_launcher_yaml_node_types():
    conf = yaml.safe_load((CLUSTER / "aws-cluster.yaml").read_text())
    assert conf["provider"]["type"] == "aws"
    types = conf["available_node_types"]
    assert conf["head_node_type"] in types
    assert types[conf["head_node_type"]]["resources"].get("GPU", 0) == 0
    workers = {k: v for k, v in types.items() if k != conf["head_node_type"]}
    assert {"cpu-decode", "gpu-7b", "gpu-72b"} <= set(workers)
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= conf["max_workers"], name
        assert "InstanceType" in t["node_config"] and "IamInstanceProfile" in t["node_config"], name
    assert workers["cpu-decode"]["resources"].get("GPU", 0) == 0
    assert workers["gpu-7b"]["resources"]["GPU"] == 1
    assert workers["gpu-72b"]["resources"]["GPU"] in (4, 8)
    # model weights on node-local disk: the cache variable points into the mounted NVMe
    opts = " ".join(conf["docker"]["run_options"])
    mount = re.search(r"-v /mnt/nvme:(\S+)", opts).group(1)
    cache = re.search(r"-e PIPELINE_MODEL_CACHE=(\S+)", opts).group(1)
    assert cache.startswith(mount + "/")
    assert any("/mnt/nvme" in c for c in conf["initialization_commands"])
    assert any("--metrics-export-port" in c for c in conf["head_start_ray_commands"])


# --- images --------------------------------------------------------------------------------------

def images(obj) -> list[str]:
    if isinstance(obj, dict):
        return [v for k, v in obj.items() if k == "image" and isinstance(v, str)] + [
            i for k, v in obj.items() for i in images(v)]
    if isinstance(obj, list):
        return [i for v in obj for i in images(v)]
    return []


def all_images() -> list[str]:
    found = [i for _, doc in manifest_docs() for i in images(doc)]
    found += images(yaml.safe_load((CLUSTER / "aws-cluster.yaml").read_text()))
    found += re.findall(r"^FROM\s+(\S+)", (CLUSTER / "Dockerfile").read_text(), re.M)
    return found


def is_pinned(image: str) -> bool:
    name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
    return "@sha256:" in image or (bool(tag) and tag != "latest" and not tag.startswith("latest-"))


def test_pinning_check_refuses_floating_tags():
    assert not is_pinned("rayproject/ray") and not is_pinned("rayproject/ray:latest")
    assert not is_pinned("localhost:5000/pipeline") and is_pinned("localhost:5000/pipeline:0.1.0")


def test_every_image_is_pinned():
    found = all_images()
    assert len(found) >= 10
    assert [i for i in found if not is_pinned(i)] == []


def test_project_image_tag_is_the_project_version_and_ray_versions_agree():
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    project = [i for i in all_images() if "/pipeline:" in i]
    assert project and {i.rsplit(":", 1)[1] for i in project} == {version}
    (base,) = re.findall(r"^FROM\s+(\S+)", (CLUSTER / "Dockerfile").read_text(), re.M)
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py311-cu\d+", base)
    assert m, f"{base}: want a pinned rayproject/ray CUDA image with Python 3.11"
    ray_versions = {spec["rayVersion"] for _, spec in cluster_specs()}
    assert ray_versions == {m.group(1)}


# --- serve ---------------------------------------------------------------------------------------

def test_rayservice_serves_the_pipeline_app():
    (_, service), = of_kind("RayService")
    apps = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert [a["import_path"] for a in apps] == ["pipeline.serve:build_app"]
    assert apps[0]["args"]["model"]
    serve_yaml = CLUSTER / "serve.yaml"
    if serve_yaml.exists():  # the `serve deploy` config (written with the Serve application)
        deployed = {a["name"]: a["import_path"] for a in yaml.safe_load(serve_yaml.read_text())["applications"]}
        assert deployed == {a["name"]: a["import_path"] for a in apps}


def test_no_credentials_in_cluster_files():
    text = "\n".join(p.read_text() for p in CLUSTER.rglob("*") if p.is_file() and p.suffix in (".yaml", ".json", ""))
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    assert not re.search(r"(?i)aws_secret_access_key|aws_access_key_id", text)
    for _, doc in manifest_docs():
        for env in _envs(doc):
            assert "value" not in env or not re.search(r"(?i)token|secret|password|key", env["name"]), env


def _envs(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "env" and isinstance(v, list):
                yield from v
            else:
                yield from _envs(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _envs(v)


def test_rayservice_runs_the_serve_yaml_arguments_with_the_gpu_and_a_token_secret():
    """KubeRay serves what `serve deploy cluster/serve.yaml` serves: the same application arguments
    (GPU reserved, token from a mounted Secret), and the pods that run replicas mount that Secret."""
    from pipeline.serve import deployment_options, parse_args

    (_, service), = of_kind("RayService")
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    (deployed,) = yaml.safe_load((CLUSTER / "serve.yaml").read_text())["applications"]
    assert app["args"] == deployed["args"]
    cfg = parse_args(app["args"])
    model_options, _ = deployment_options(cfg)
    assert cfg.device == "cuda" and model_options["ray_actor_options"]["num_gpus"] >= 1
    assert cfg.api_token_file and not cfg.allow_unauthenticated
    assert "autoscaling_config" in model_options and not any(u.startswith("data") for u in cfg.allowed_prefixes)
    token_dir = str(Path(cfg.api_token_file).parent)
    spec = service["spec"]["rayClusterConfig"]
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
        mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert mounts.get(token_dir) in secrets, f"{group['groupName']} does not mount the token Secret at {token_dir}"
