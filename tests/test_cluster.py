"""cluster/: the KubeRay manifests validate against the CRD schemas of every supported KubeRay version,
entrypoints run jobs that exist with arguments their parsers accept, GPU counts agree with the replicas,
images are pinned and exist, the image has one CUDA (torch's) and writable cache folders for its user,
mounted Secrets are readable by it, RayJobs clean up after themselves and keep idle pods past planning,
the RayService's groups hold its replicas, the launcher's IAM policies cover what Ray's autoscaler calls,
the monitoring files validate against prometheus-operator's CRDs; the model stage lands on the
accelerator it names."""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from jobs import caption_videos

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
# Reference data beside the checkout (../shared), or beside the folder of worktrees (../../shared).
SHARED = next((d / "shared" for d in (REPO.parent, REPO.parent.parent) if (d / "shared").is_dir()), REPO.parent / "shared")
# The KubeRay versions the README supports (its "Supported KubeRay versions" line) and the folder of
# each one's CRDs: every manifest must validate against every one of them.
KUBERAY_CRD_DIRS = {
    "1.6.0": Path(os.environ.get("KUBERAY_CRDS_V1_6", SHARED / "kuberay-crds-v1.6.0")),
    "1.7.0": Path(os.environ.get("KUBERAY_CRDS", SHARED / "kuberay-crds")),
}
KUBERAY_VERSIONS = sorted(KUBERAY_CRD_DIRS)
APP_DIR = "/home/ray/app"  # where cluster/Dockerfile puts the checkout
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayCronJob": "ray.io_raycronjobs.yaml", "RayService": "ray.io_rayservices.yaml"}


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


def validator(kind: str, api_version: str, kuberay: str = KUBERAY_VERSIONS[-1]):
    crd_dir = KUBERAY_CRD_DIRS[kuberay]
    if not crd_dir.is_dir():
        pytest.skip(f"KubeRay {kuberay} CRD schemas not found at {crd_dir} (set KUBERAY_CRDS / KUBERAY_CRDS_V1_6 to the "
                    f"folder holding ray.io_*.yaml to run the manifest validation)")
    return _validator(kind, api_version, crd_dir)


@functools.cache
def _validator(kind: str, api_version: str, crd_dir: Path):
    crd = yaml.safe_load((crd_dir / CRD_FILES[kind]).read_text())
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    assert version in versions and versions[version]["served"], f"{kind} {api_version} is not served"
    schema = strict(versions[version]["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def schema_errors(doc: dict, kuberay: str = KUBERAY_VERSIONS[-1]) -> list[str]:
    v = validator(doc["kind"], doc["apiVersion"], kuberay)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]


RAY_DOCS = [(name, doc) for name, doc in manifest_docs() if doc["kind"] in CRD_FILES]


def test_every_kuberay_kind_has_a_manifest():
    assert {doc["kind"] for _, doc in RAY_DOCS} == set(CRD_FILES)


@pytest.mark.parametrize("kuberay", KUBERAY_VERSIONS)
@pytest.mark.parametrize("name,doc", RAY_DOCS, ids=[f"{n}-{d['kind']}" for n, d in RAY_DOCS])
def test_kuberay_manifest_validates_against_its_crd_in_every_supported_version(name, doc, kuberay):
    """`kubectl apply` refuses a field the installed operator's CRD does not declare: each manifest
    validates strictly against the CRDs of every KubeRay version the README supports."""
    assert schema_errors(doc, kuberay) == []


@pytest.mark.parametrize("kuberay", KUBERAY_VERSIONS)
def test_validation_catches_a_misspelled_field(kuberay):
    _, rayjob = of_kind("RayJob")[0]
    broken = copy.deepcopy(rayjob)
    broken["spec"]["activeDeadlineSecond"] = broken["spec"].pop("activeDeadlineSeconds")
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    errors = schema_errors(broken, kuberay)
    assert any("activeDeadlineSecond'" in e for e in errors)
    assert any("maxReplica'" in e for e in errors)
    wrong_type = copy.deepcopy(rayjob)
    wrong_type["spec"]["backoffLimit"] = "one"
    assert any("backoffLimit" in e for e in schema_errors(wrong_type, kuberay))


def test_validation_sees_what_one_supported_version_lacks():
    """RayCronJob's spec.timeZone arrived in KubeRay 1.7: the 1.6 CRD refuses it, so a manifest using it
    fails the check for 1.6 (as `kubectl apply` on a 1.6 operator would)."""
    (_, cron), = of_kind("RayCronJob")
    zoned = copy.deepcopy(cron)
    zoned["spec"]["timeZone"] = "Etc/UTC"
    assert schema_errors(zoned, "1.7.0") == []
    assert any("timeZone" in e for e in schema_errors(zoned, "1.6.0"))


def test_readme_names_the_supported_kuberay_versions_and_installs_one():
    text = (REPO / "README.md").read_text()
    m = re.search(r"Supported KubeRay versions: ([0-9., and]+)", text)
    assert m, "the README must say which KubeRay versions are supported"
    assert sorted(re.findall(r"\d+\.\d+\.\d+", m.group(1))) == KUBERAY_VERSIONS
    installed = re.findall(r"helm (?:upgrade --install|install) kuberay-operator kuberay/kuberay-operator --version (\S+)", text)
    assert installed and set(installed) <= set(KUBERAY_VERSIONS), installed


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
    pods name their instance type, the model fits its GPUs at the job's --tp (pipeline/planning/sizing.py)."""
    from pipeline.planning.sizing import KNOWN_MODELS, known_config, plan, shape_of

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
    host, mount = re.search(r"-v (/opt/dlami/nvme):(\S+)", opts).groups()  # where the DLAMI mounts instance-store NVMe
    cache = re.search(r"-e PIPELINE_MODEL_CACHE=(\S+)", opts).group(1)
    assert cache.startswith(mount + "/")
    assert any(host in c for c in conf["initialization_commands"])
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
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py311-cpu", base)
    assert m, f"{base}: want a pinned rayproject/ray image with Python 3.11 (CPU base: CUDA comes with torch's wheels)"
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


# --- accelerator type ----------------------------------------------------------------------------

PLACEMENT_SCRIPT = r"""
import json, sys
from pathlib import Path
import ray
from ray.cluster_utils import Cluster
from pipeline.batch.run import run
import caption_videos

samples, model, out = sys.argv[1:4]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
nodes = {"A100": cluster.add_node(num_cpus=2, resources={"accelerator_type:A100": 1}),
         "L40S": cluster.add_node(num_cpus=2, resources={"accelerator_type:L40S": 1})}
ray.init(address=cluster.address)
result = {"nodes": {k: n.node_id for k, n in nodes.items()}}
for wanted in ("L40S", "A100"):
    trace = Path(out) / wanted / "trace"
    trace.mkdir(parents=True)
    cfg = caption_videos.parse_args([
        "--manifest", f"{samples}/manifest.jsonl", "--output", f"{out}/{wanted}/captions", "--model", model,
        "--device", "cpu", "--num-frames", "2", "--max-new-tokens", "2", "--accelerator-type", wanted])
    summary = run(cfg.model_copy(update={"trace_dir": str(trace)}))
    used = {json.loads(line)["node_id"] for f in trace.glob("*.jsonl") for line in f.read_text().splitlines()}
    result[wanted] = {"ok": summary.ok, "used": sorted(used)}
print(json.dumps(result), flush=True)
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.slow
def test_model_stage_runs_only_on_nodes_of_the_accelerator_type(samples, tiny_model, tmp_path):
    """A local Ray cluster of two worker nodes that carry Ray's `accelerator_type:NAME` resources (as
    GPU nodes do): the model actors of a run with --accelerator-type NAME land on that node only,
    for either name."""
    import subprocess

    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'jobs'}", RAY_ADDRESS="")
    proc = subprocess.run([sys.executable, "-c", PLACEMENT_SCRIPT, str(samples), str(tiny_model), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for wanted in ("L40S", "A100"):
        assert result[wanted]["ok"] > 0
        assert result[wanted]["used"] == [result["nodes"][wanted]], wanted


# --- the image's CUDA, the launcher's AMI, images that exist -------------------------------------

def base_image_cuda() -> str:
    """The image's CUDA: the Dockerfile's IMAGE_CUDA, which its build checks torch's build against."""
    return re.search(r"^ARG IMAGE_CUDA=(\d+\.\d+)$", (CLUSTER / "Dockerfile").read_text(), re.M).group(1)


def image_pins() -> dict[str, str]:
    lines = (CLUSTER / "image-constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if line.strip() and not line.startswith("#"))


def test_image_pins_torch_builds_of_the_base_images_cuda():
    """torch/torchvision are pinned (pip -c) to builds whose CUDA is the base image's: one CUDA
    stack, and the driver the base image states. The build checks torch.version.cuda too."""
    cuda, pins, dockerfile = base_image_cuda(), image_pins(), (CLUSTER / "Dockerfile").read_text()
    assert {"torch", "torchvision", "cuda-toolkit"} <= set(pins)
    assert re.fullmatch(rf"{re.escape(cuda)}\.\d+", pins["cuda-toolkit"]), (pins, cuda)
    assert re.search(r"^COPY .*cluster/image-constraints\.txt", dockerfile, re.M)
    assert re.search(r"pip install [^\n]*-c cluster/image-constraints\.txt -e \.", dockerfile)
    assert re.search(rf"^ARG IMAGE_CUDA={re.escape(cuda)}$", dockerfile, re.M) and "torch.version.cuda" in dockerfile
    assert re.search(r"driver >= \d+", dockerfile)


def test_pinned_torch_wheel_requires_the_base_images_cuda():
    """The wheel's own metadata: the pinned torch (the one this environment runs) requires exactly
    the pinned cuda-toolkit, and is built for the base image's CUDA."""
    from importlib.metadata import requires, version

    import torch

    pins = image_pins()
    if version("torch").split("+")[0] != pins["torch"]:
        pytest.skip(f"this environment runs torch {version('torch')}, not the image's {pins['torch']}: "
                    "its wheel's CUDA requirement cannot be read here (the image build checks it)")
    toolkit = [r for r in requires("torch") if r.startswith("cuda-toolkit")]
    assert toolkit and all(r.split(";")[0].strip().endswith(f"=={pins['cuda-toolkit']}") for r in toolkit), toolkit
    assert torch.version.cuda == base_image_cuda()
    assert version("torchvision").split("+")[0] == pins["torchvision"]


def test_launcher_ami_is_a_current_gpu_ami_that_ray_passes_through():
    """`latest_dlami` is replaced by Ray 2.60 with a CUDA 11 era Ubuntu 18.04 AMI; the config names
    AWS's current Deep Learning Base GPU AMI by its SSM parameter (or a pinned id), which Ray's
    AMI check leaves as it is for EC2 to resolve."""
    from ray.autoscaler._private.aws import config as aws_config

    conf = yaml.safe_load((CLUSTER / "aws-cluster.yaml").read_text())
    for name, node in conf["available_node_types"].items():
        ami = node["node_config"]["ImageId"]
        assert re.fullmatch(r"ami-[0-9a-f]{8,17}|resolve:ssm:/aws/service/deeplearning/ami/x86_64/"
                            r"base-oss-nvidia-driver-gpu-ubuntu-2[2-9]\.04/latest/ami-id", ami), (name, ami)
    checked = copy.deepcopy(conf)
    aws_config._check_ami(checked)
    assert checked["available_node_types"] == conf["available_node_types"]
    old = copy.deepcopy(conf)
    old["available_node_types"]["head"]["node_config"]["ImageId"] = "latest_dlami"
    aws_config._check_ami(old)  # what the old setting became: Ray's hard-coded CUDA 11 AMI
    assert old["available_node_types"]["head"]["node_config"]["ImageId"] == aws_config.DEFAULT_AMI["us-west-2"]
    assert "18.04" in aws_config.DEFAULT_AMI_NAME


# Images whose versioned tags were removed from their registry (bitnami/containers issues 87841, 88999:
# the Bitnami catalog's versioned tags left Docker Hub; only `latest`, which the pin check refuses, stayed).
GONE_IMAGES = [r"^(docker\.io/)?bitnami/"]


def test_no_image_known_to_be_gone():
    found = all_images()
    assert [i for i in found if any(re.search(p, i) for p in GONE_IMAGES)] == []
    kubectl = [i for i in found if "kubectl" in i]
    assert kubectl and all(re.fullmatch(r"rancher/kubectl:v1\.\d+\.\d+", i) for i in kubectl), kubectl


# --- pods: token, volumes, accelerators ----------------------------------------------------------

def pod_groups() -> list[tuple[str, str, dict]]:
    """(where, group name, group spec) of every head and worker group of every Ray cluster spec."""
    return [(name, group.get("groupName", "head"), group) for name, spec in cluster_specs()
            for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]]


def project_containers(group: dict) -> list[dict]:
    return [c for c in group["template"]["spec"]["containers"] if "/pipeline:" in c["image"]]


def test_every_pod_of_the_project_image_gets_the_hub_token():
    """The driver (head) reads the model's config and processor, the decode group loads the processor,
    the model groups the weights: a gated or private hub model needs HF_TOKEN on each of them."""
    want = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token", "optional": True}}}
    checked = 0
    for where, group_name, group in pod_groups():
        for container in project_containers(group):
            assert want in container.get("env", []), (where, group_name)
            checked += 1
    assert checked >= 15


def test_no_hostpath_and_the_weight_cache_is_node_ephemeral_storage():
    """Pod Security "baseline" refuses hostPath volumes: the cache is an emptyDir with a size limit,
    and its pods request ephemeral storage so they land on nodes with room for the weights."""
    caches = 0
    for where, group_name, group in pod_groups():
        pod = group["template"]["spec"]
        assert all("hostPath" not in v for v in pod.get("volumes", [])), (where, group_name)
        for volume in pod.get("volumes", []):
            if volume["name"] == "model-cache":
                caches += 1
                assert volume["emptyDir"].get("sizeLimit") and "medium" not in volume["emptyDir"], (where, group_name)
                if "RayService" not in where:  # the Serve app's pods: cluster/kuberay/rayservice.yaml's own sizing
                    requests = project_containers(group)[0]["resources"]["requests"]
                    assert "ephemeral-storage" in requests, (where, group_name)
    assert caches >= 7


def rayjob_specs() -> list[tuple[str, dict]]:
    return ([(n, d["spec"]) for n, d in of_kind("RayJob")]
            + [(f"{n}:jobTemplate", d["spec"]["jobTemplate"]) for n, d in of_kind("RayCronJob")])


DELETION_ORDER = ["DeleteWorkers", "DeleteCluster", "DeleteSelf"]


@pytest.mark.parametrize("name,spec", rayjob_specs(), ids=[n for n, _ in rayjob_specs()])
def test_rayjob_deletes_its_cluster_at_once_and_itself_after_days(name, spec):
    """KubeRay's deletion rules (its webhook's checks, which the CRD schema leaves out): the
    cluster's GPUs are freed when the job ends, the RayJob object goes after days, so nightly
    RayCronJob runs do not pile up."""
    assert not spec.get("shutdownAfterJobFinishes") and "ttlSecondsAfterFinished" not in spec  # exclusive with rules
    rules = spec["deletionStrategy"]["deletionRules"]
    by_condition: dict[tuple, dict] = {}
    for rule in rules:
        condition = rule["condition"]
        assert ("jobStatus" in condition) != ("jobDeploymentStatus" in condition), rule
        if spec["rayClusterSpec"].get("enableInTreeAutoscaling"):
            assert rule["policy"] != "DeleteWorkers", "refused with autoscaling"
        key = (condition.get("jobStatus"), condition.get("jobDeploymentStatus"))
        assert rule["policy"] not in by_condition.setdefault(key, {}), f"duplicate rule {rule}"
        by_condition[key][rule["policy"]] = condition.get("ttlSeconds", 0)
    for key, ttls in by_condition.items():
        ordered = [ttls[p] for p in DELETION_ORDER if p in ttls]
        assert ordered == sorted(ordered), (key, ttls)  # workers <= cluster <= self
    for key in [("SUCCEEDED", None), ("FAILED", None), (None, "Failed")]:
        assert {"DeleteCluster", "DeleteSelf"} <= set(by_condition[key]), key
        assert by_condition[key]["DeleteCluster"] <= 3600 and by_condition[key]["DeleteSelf"] >= 86400, key
    assert by_condition[("SUCCEEDED", None)]["DeleteCluster"] == 0


# The GPU Ray detects on each instance type the manifests select (ray's accelerator_type names)
INSTANCE_ACCELERATOR = {"g6e.2xlarge": "L40S", "p4d.24xlarge": "A100", "p5.48xlarge": "H100"}


def autoscaler_resources(group: dict) -> dict:
    """What Ray's KubeRay autoscaler reads from a worker group (its own parser)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _get_ray_resources_from_group_spec

    return _get_ray_resources_from_group_spec(group, is_head=False)


def group_accelerators(resources: dict) -> list[str]:
    return [k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")]


def test_gpu_groups_declare_the_accelerator_of_the_nodes_they_are_pinned_to():
    """The autoscaler grows a group for --accelerator-type X only if the group declares X; the
    group's pods are pinned to an instance type whose GPU Ray detects as X."""
    checked = 0
    for where, group_name, group in pod_groups():
        if "RayService" in where or group_name == "head" or not group_gpus(group):
            continue
        resources = autoscaler_resources(group)
        instance = group["template"]["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"]
        assert group_accelerators(resources) == [INSTANCE_ACCELERATOR[instance]], (where, group_name)
        assert resources["GPU"] == group_gpus(group)
        checked += 1
    assert checked >= 6
    conf = yaml.safe_load((CLUSTER / "aws-cluster.yaml").read_text())
    for name, node in conf["available_node_types"].items():
        expected = INSTANCE_ACCELERATOR.get(node["node_config"]["InstanceType"])
        assert group_accelerators(node["resources"]) == ([expected] if expected else []), name


def test_entrypoints_ask_for_the_accelerator_of_their_gpu_group():
    """Each RayJob's --accelerator-type names the accelerator its GPU groups declare, and those
    groups hold all its replicas: the model actors can be placed, and only there."""
    for name, spec in rayjob_specs():
        cfg = caption_videos.parse_args(job_argv(spec["entrypoint"])[1])
        gpu_groups = [g for g in spec["rayClusterSpec"]["workerGroupSpecs"] if group_gpus(g)]
        matching = [g for g in gpu_groups if cfg.accelerator_type in group_accelerators(autoscaler_resources(g))]
        assert cfg.accelerator_type and matching == gpu_groups, name
        assert sum(g["replicas"] * (group_gpus(g) // cfg.tp) for g in matching) >= cfg.replicas, name
    for command in readme_job_commands():
        if "--device cuda" in command:
            assert "--accelerator-type" in command, command


# --- monitoring ----------------------------------------------------------------------------------

PROM_CRD_DIR = Path(os.environ.get("PROMETHEUS_OPERATOR_CRDS", SHARED / "prometheus-operator-crds"))
PROM_CRD_FILES = {"PodMonitor": "monitoring.coreos.com_podmonitors.yaml",
                  "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml"}


def prometheus_validator(kind: str):
    if not PROM_CRD_DIR.is_dir():
        pytest.skip(f"prometheus-operator CRD schemas not found at {PROM_CRD_DIR} (set PROMETHEUS_OPERATOR_CRDS "
                    "to the folder holding monitoring.coreos.com_*.yaml to run the monitoring validation)")
    crd = yaml.safe_load((PROM_CRD_DIR / PROM_CRD_FILES[kind]).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1" and v["served"]]
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


def monitoring_doc(kind: str) -> dict:
    (doc,) = [d for _, d in of_kind(kind)]
    return doc


@pytest.mark.parametrize("kind", sorted(PROM_CRD_FILES))
def test_monitoring_manifest_validates_against_its_crd(kind):
    doc = monitoring_doc(kind)
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    v = prometheus_validator(kind)
    assert [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)] == []
    broken = copy.deepcopy(doc)
    broken["spec"]["selectr"] = broken["spec"].pop("selector", {})
    assert list(v.iter_errors(broken))  # the check sees a misspelled field


def test_podmonitor_scrapes_heads_and_workers_keeping_the_cluster_label():
    spec = monitoring_doc("PodMonitor")["spec"]
    (expr,) = spec["selector"]["matchExpressions"]
    assert expr["key"] == "ray.io/node-type" and set(expr["values"]) == {"head", "worker"}
    (endpoint,) = spec["podMetricsEndpoints"]
    assert {"sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"], "targetLabel": "ray_io_cluster"} \
        in endpoint["relabelings"]
    for where, group_name, group in pod_groups():  # every Ray pod exposes the port it scrapes
        ports = {p["name"]: p["containerPort"] for c in group["template"]["spec"]["containers"] for p in c.get("ports", [])}
        assert str(ports[endpoint["port"]]) == group["rayStartParams"]["metrics-export-port"], (where, group_name)


def pipeline_metric_names() -> set[str]:
    """The names Prometheus sees for pipeline/metrics.py's metrics (Ray adds `ray_`)."""
    text = (REPO / "pipeline" / "metrics.py").read_text()
    names = set()
    for kind, name in re.findall(r'_metric\("(counter|gauge|histogram)", "(pipeline_\w+)"', text):
        base = f"ray_{name}"
        names |= {base + "_total"} if kind == "counter" else {base} if kind == "gauge" else {
            base + s for s in ("_bucket", "_count", "_sum")}
    return names


def selectors(expr: str) -> list:
    import promql_parser

    found = []
    promql_parser.walk(promql_parser.parse(expr), lambda node: found.append(node)
                       if type(node).__name__ == "VectorSelector" else None)
    return found


RAY_METRICS = {"ray_node_gram_used", "ray_node_gram_available", "ray_node_gpus_utilization", "ray_node_network_receive_speed",
               "ray_serve_num_http_error_requests_total"}  # Ray's own (node and Serve proxy metrics)


def test_alert_rules_parse_and_cover_errors_stalls_restarts_and_out_of_memory():
    rules = [r for g in monitoring_doc("PrometheusRule")["spec"]["groups"] for r in g["rules"]]
    known = pipeline_metric_names() | RAY_METRICS
    used = set()
    for rule in rules:
        found = {s.name for s in selectors(rule["expr"])}  # promql_parser raises on a syntax error
        assert found <= known, (rule["alert"], found - known)
        used |= found
        assert rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"]
        assert "ray_io_cluster" in rule["expr"] or not re.search(r"\b(sum|count|avg|max|min) by", rule["expr"])
    assert {"ray_pipeline_rows_total", "ray_pipeline_generate_inflight_rows", "ray_pipeline_replica_failures_total"} <= used
    assert any('error_type="out_of_memory"' in r["expr"] for r in rules)
    errors = next(r["expr"] for r in rules if "status=\"error\"" in r["expr"])
    assert "/" in errors  # a ratio of error rows to all rows


def test_dashboard_filters_every_panel_by_the_cluster_variable():
    import promql_parser

    dashboard = json.loads((CLUSTER / "grafana-dashboard.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    cluster = variables["Cluster"]
    assert cluster["type"] == "query" and cluster["query"].endswith(", ray_io_cluster)") and cluster["includeAll"]
    targets = [t for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(targets) >= len(dashboard["panels"]) >= 8
    known = pipeline_metric_names() | RAY_METRICS
    for target in targets:
        for s in selectors(target["expr"]):
            assert s.name in known, s.name
            assert any((m.name, m.value) == ("ray_io_cluster", "$Cluster") and m.op == promql_parser.MatchOp.Re
                       for m in s.matchers.matchers), target["expr"]


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


# --- day one: the image's user and paths, Secrets, idle pods, Serve's groups ------------------------

IMAGE_UID, IMAGE_GID = 1000, 100  # Ray's image: user ray (uid 1000), primary group users (gid 100)


def dockerfile_lines(text: str | None = None) -> list[str]:
    text = (text if text is not None else (CLUSTER / "Dockerfile").read_text()).replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def image_env() -> dict[str, str]:
    env = {}
    for line in dockerfile_lines():
        if line.startswith("ENV "):
            env.update(dict(pair.split("=", 1) for pair in shlex.split(line[4:])))
    return env


def image_dirs(lines: list[str] | None = None) -> dict[str, tuple[int, int]]:
    """The folders the Dockerfile's RUN steps make, with their owner (uid) after its chown steps: the
    image's file system as far as the pods' writable paths go. WORKDIR makes its folder the user's."""
    owners: dict[str, tuple[int, int]] = {}
    user = IMAGE_UID  # the base image's USER
    for line in lines if lines is not None else dockerfile_lines():
        if line.startswith("USER "):
            user = 0 if line.split()[1] in ("root", "0") else IMAGE_UID
        elif line.startswith("WORKDIR "):
            owners.setdefault(line.split()[1], (user, IMAGE_GID))
        elif line.startswith("RUN "):
            for step in re.split(r"&&|;", line[4:]):
                if step.split()[:1] not in (["mkdir"], ["chown"]):
                    continue  # only the steps that make or hand over folders
                argv = shlex.split(step)
                if argv[:2] == ["mkdir", "-p"]:
                    for d in argv[2:]:
                        parts = Path(d).parts
                        for i in range(2, len(parts) + 1):
                            owners.setdefault(str(Path(*parts[:i])), (user, IMAGE_GID))
                elif argv and argv[0] == "chown" and user == 0:
                    recursive = "-R" in argv
                    spec, *paths = [a for a in argv[1:] if not a.startswith("-")]
                    uid, _, gid = spec.partition(":")
                    uid = IMAGE_UID if uid in ("ray", str(IMAGE_UID)) else int(uid) if uid.isdigit() else -1
                    gid = IMAGE_GID if gid in ("users", str(IMAGE_GID), "") else int(gid) if gid.isdigit() else -1
                    for path in paths:
                        for d in list(owners):
                            if d == path or (recursive and d.startswith(path.rstrip("/") + "/")):
                                owners[d] = (uid, gid)
    return owners


def image_user() -> int:
    users = [line.split()[1] for line in dockerfile_lines() if line.startswith("USER ")]
    return IMAGE_UID if not users or users[-1] in ("ray", str(IMAGE_UID)) else -1


def test_image_model_cache_folders_are_the_image_users():
    """PIPELINE_MODEL_CACHE and HF_HOME exist in the image and belong to uid 1000, which the image
    runs as: pods without a volume there (the KubeRay head and cpu-decode groups) can write them."""
    env, dirs = image_env(), image_dirs()
    assert image_user() == IMAGE_UID
    for var in ("PIPELINE_MODEL_CACHE", "HF_HOME"):
        path = env[var]
        assert path in dirs and dirs[path][0] == IMAGE_UID, (var, path, dirs.get(path))
        parent = str(Path(path).parent)
        assert dirs.get(parent, (0,))[0] == IMAGE_UID, (parent, "the cache root must be the user's too: the copy's lock file")


def test_image_dirs_model_reads_user_mkdir_and_chown():
    """The check itself: a folder made as root is root's until a chown; none made is none at all."""
    made = image_dirs(dockerfile_lines("USER root\nRUN mkdir -p /mnt/models/a /mnt/models/b\nUSER ray\n"))
    assert made["/mnt/models"] == (0, IMAGE_GID) and made["/mnt/models/a"][0] == 0
    owned = image_dirs(dockerfile_lines("USER root\nRUN mkdir -p /mnt/models/a && chown -R ray:users /mnt/models\n"))
    assert owned["/mnt/models"][0] == owned["/mnt/models/a"][0] == IMAGE_UID
    assert "/mnt/models" not in image_dirs(dockerfile_lines("FROM x\nWORKDIR /home/ray/app\n"))


@pytest.mark.parametrize("where,group_name,group", pod_groups(), ids=[f"{w}-{g}" for w, g, _ in pod_groups()])
def test_every_pod_can_write_its_model_cache(where, group_name, group):
    """Each pod of the project's image writes PIPELINE_MODEL_CACHE and HF_HOME: on a mounted volume
    (emptyDir: world-writable) or in the image's own folder, owned by the user the pod runs as."""
    env, dirs = image_env(), image_dirs()
    pod = group["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for container in project_containers(group):
        uid = container.get("securityContext", {}).get("runAsUser", pod.get("securityContext", {}).get("runAsUser", IMAGE_UID))
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}
        for var in ("PIPELINE_MODEL_CACHE", "HF_HOME"):
            path = next((e["value"] for e in container.get("env", []) if e["name"] == var and "value" in e), env[var])
            mount = next((m for m in mounts if path == m or path.startswith(m.rstrip("/") + "/")), None)
            if mount is not None:
                assert "emptyDir" in mounts[mount], (where, group_name, mount)
            else:
                assert dirs.get(path, (None,))[0] == uid, f"{where} {group_name}: {path} is not writable by uid {uid}"


def secret_readable(mode: int, fs_group: int | None, uid: int = IMAGE_UID, groups=(IMAGE_GID,)) -> bool:
    """A Secret volume's files are root's (uid 0); with a pod fsGroup their group is fsGroup, which the
    container's processes also get. Can uid read them at this mode?"""
    if uid == 0:
        return True
    if fs_group is not None and mode & 0o040:
        return True
    return bool(mode & 0o004) or (0 in groups and bool(mode & 0o040))


def test_secret_readability_model():
    assert not secret_readable(0o400, None) and not secret_readable(0o440, None) and not secret_readable(0o400, 100)
    assert secret_readable(0o440, 100) and secret_readable(0o444, None)


def test_every_mounted_secret_is_readable_by_the_image_user():
    """The RayService's API token (and any mounted Secret): the kubelet writes its files root-owned
    with defaultMode (Kubernetes' default 0644); uid 1000 reads them only through fsGroup or the
    other-read bit. Before: 0400 and no fsGroup, ChatIngress could not read its token."""
    checked = 0
    for where, group_name, group in pod_groups():
        pod = group["template"]["spec"]
        fs_group = pod.get("securityContext", {}).get("fsGroup")
        secrets = {v["name"]: v["secret"] for v in pod.get("volumes", []) if "secret" in v}
        for container in project_containers(group):
            for mount in container.get("volumeMounts", []):
                if mount["name"] in secrets:
                    mode = secrets[mount["name"]].get("defaultMode", 0o644)
                    assert secret_readable(mode, fs_group), (where, group_name, oct(mode), fs_group)
                    checked += 1
    assert checked >= 2


@pytest.mark.parametrize("name,spec", cluster_specs(), ids=[n for n, _ in cluster_specs()])
def test_autoscaled_clusters_keep_idle_pods_past_planning(name, spec):
    """KubeRay's default idle timeout is 60 s: GPU pods that wait while the driver plans would be
    removed and made again (image pulled, weights copied again; a released p5 may not come back)."""
    if spec.get("enableInTreeAutoscaling"):
        assert spec.get("autoscalerOptions", {}).get("idleTimeoutSeconds", 60) >= 600, name


def pack(bundles: list[dict], nodes: list[dict]) -> bool:
    """First fit, largest first: do the actor bundles fit on these nodes' Ray resources?"""
    free = [dict(n) for n in nodes]
    for bundle in sorted(bundles, key=lambda b: (-b.get("GPU", 0), -b.get("CPU", 0))):
        for node in free:
            if all(node.get(k, 0) >= v for k, v in bundle.items()):
                for k, v in bundle.items():
                    node[k] -= v
                break
        else:
            return False
    return True


def test_rayservice_groups_hold_the_frontends_and_the_model_replicas():
    """Serve's replicas against what the RayService's worker groups give Ray (KubeRay's autoscaler's own
    reading of each group): the frontends and the first model replica fit the initial pods, and at
    max_replicas every replica fits the groups at their max size, each model replica with its GPU."""
    from pipeline.serve import deployment_options, parse_args

    (_, service), = of_kind("RayService")
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    cfg = parse_args(app["args"])
    model, ingress = deployment_options(cfg)

    def bundle(options):
        actor = options["ray_actor_options"]
        return {k: v for k, v in {"CPU": actor.get("num_cpus", 1), "GPU": actor.get("num_gpus", 0)}.items() if v}

    spec = service["spec"]["rayClusterConfig"]
    head = {"CPU": float(spec["headGroupSpec"]["rayStartParams"].get("num-cpus", 0))}
    groups = [(autoscaler_resources(g), g) for g in spec["workerGroupSpecs"]]
    frontends = [bundle(ingress)] * ingress["num_replicas"]
    scaling = model.get("autoscaling_config", {})
    first = scaling.get("initial_replicas", model.get("num_replicas", 1))
    most = scaling.get("max_replicas", first)
    initial = [head] + [r for r, g in groups for _ in range(g["replicas"])]
    largest = [head] + [r for r, g in groups for _ in range(g["maxReplicas"])]
    assert pack(frontends + [bundle(model)] * first, initial), (frontends, bundle(model), initial)
    assert pack(frontends + [bundle(model)] * most, largest), (most, largest)
    gpu_groups = [g for r, g in groups if r.get("GPU")]
    assert gpu_groups and all(g["template"]["spec"].get("nodeSelector", {}).get("node.kubernetes.io/instance-type")
                              for g in gpu_groups), "GPU pods pinned to an instance type whose CPUs and GPU they request"


def test_pack_sees_a_group_too_small():
    assert not pack([{"CPU": 4}, {"CPU": 4}, {"CPU": 1, "GPU": 1}], [{"CPU": 0}, {"CPU": 8, "GPU": 1}])
    assert pack([{"CPU": 4}, {"CPU": 4}, {"CPU": 1, "GPU": 1}], [{"CPU": 8}, {"CPU": 7, "GPU": 1}])


def test_launcher_leaves_shm_sizing_to_ray():
    """With no --shm-size, Ray's docker runner sizes /dev/shm to the object store of each node (30 % of its
    memory, to Ray's cap); a fixed --shm-size turns that off and caps every node's object store."""
    from ray.autoscaler._private.command_runner import DockerCommandRunner

    conf = yaml.safe_load((CLUSTER / "aws-cluster.yaml").read_text())
    options = list(conf["docker"]["run_options"])
    assert not any("--shm-size" in o for o in options)

    class Host:  # a p4d's /proc/meminfo, as the runner reads it over ssh
        def run(self, cmd, with_output=False):
            return b"MemTotal: 1207959552 kB\nMemAvailable: 1200000000 kB\n"

    runner = DockerCommandRunner.__new__(DockerCommandRunner)
    runner.docker_config, runner.ssh_command_runner = conf["docker"], Host()
    sized = runner._auto_configure_shm(options)
    shm = float(re.fullmatch(r"--shm-size='([0-9.e+]+)b'", sized[-1]).group(1))
    assert shm > 100e9  # well past the old 16 GB
    assert runner._auto_configure_shm(options + ["--shm-size=16g"])[-1] == "--shm-size=16g"  # what it did before


def test_image_has_one_cuda_stack_from_torchs_wheels():
    """The base is Ray's CPU image (no CUDA): CUDA comes once, with torch's pinned wheels; the driver's
    libraries come from the host (NVIDIA_DRIVER_CAPABILITIES), the GPUs from the runtime."""
    (base,) = re.findall(r"^FROM\s+(\S+)", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert re.fullmatch(r"rayproject/ray:\d+\.\d+\.\d+-py311-cpu", base), base
    env = image_env()
    assert set(env.get("NVIDIA_DRIVER_CAPABILITIES", "").split(",")) >= {"compute", "utility"}
    assert "NVIDIA_VISIBLE_DEVICES" not in env  # 'all' in the image would show every GPU to CPU pods
    conf = yaml.safe_load((CLUSTER / "aws-cluster.yaml").read_text())
    assert "-e NVIDIA_VISIBLE_DEVICES=all" in conf["docker"]["run_options"]  # launcher: Ray adds --runtime=nvidia on GPU hosts


def dockerignore_excludes(path: str) -> bool:
    """Docker's .dockerignore rules, last match wins (patterns relative to the context; enough for ours)."""
    import fnmatch

    excluded = False
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        pattern = pattern.removeprefix("**/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes) or any(fnmatch.fnmatch(part, pattern) for part in parts
                                                                      if line.lstrip("!").startswith("**/")):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_the_context_to_what_the_image_copies():
    sources = [s for line in dockerfile_lines() if line.startswith("COPY ")
               for s in [a for a in shlex.split(line)[1:] if not a.startswith("--")][:-1]]
    assert {"pipeline", "schemas", "jobs", "pyproject.toml"} <= set(sources)
    for source in sources:
        assert not dockerignore_excludes(source), source
        assert (REPO / source).exists(), source
    for path in (".git/config", ".venv/bin/python", "tests/test_cluster.py", "benchmarks/results", ".quickstart/x",
                 "pipeline/__pycache__/config.cpython-311.pyc"):
        assert dockerignore_excludes(path), path
    assert not dockerignore_excludes("pipeline/batch/run.py")


# --- launcher IAM -----------------------------------------------------------------------------------

IAM = CLUSTER / "iam"


def policy_allows(policy: dict, action: str, resource: str = "*") -> bool:
    import fnmatch

    for statement in policy["Statement"]:
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        if statement["Effect"] == "Allow" and "Condition" not in statement \
                and any(fnmatch.fnmatch(action.lower(), a.lower()) for a in actions) \
                and any(fnmatch.fnmatch(resource, r) for r in resources):
            return True
    return False


def ray_aws_ec2_actions() -> set[str]:
    """The EC2 API calls Ray's AWS node provider (the autoscaler on the head) makes, read from its source."""
    import ray.autoscaler._private.aws.node_provider as provider

    text = Path(provider.__file__).read_text()
    calls = set(re.findall(r"\.(create_instances|terminate_instances|stop_instances|start_instances|create_tags|"
                           r"describe_\w+)\(", text))
    calls |= {"terminate_instances"} if re.search(r"\.terminate\(\)", text) else set()
    calls |= {"stop_instances"} if re.search(r"\.stop\(\)", text) else set()
    calls |= {"describe_instances"} if "instances.filter(" in text else set()
    names = {"create_instances": "RunInstances"}
    return {"ec2:" + names.get(c, "".join(w.title() for w in c.split("_"))) for c in calls}


def test_iam_policies_are_valid_policy_documents():
    for path in sorted(IAM.glob("*.json")):
        doc = json.loads(path.read_text())
        assert doc["Version"] == "2012-10-17" and doc["Statement"], path.name
        for s in doc["Statement"]:
            assert s["Effect"] in ("Allow", "Deny") and s["Action"] and ("Resource" in s or "Principal" in s), (path.name, s)
    trust = json.loads((IAM / "ec2-trust-policy.json").read_text())
    assert trust["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}


def test_launcher_head_profile_may_launch_terminate_and_pass_the_worker_role():
    """Ray uses a configured head profile as it is (no policies added): the head's role must allow what
    its autoscaler calls (read from Ray's AWS node provider), iam:PassRole on the workers' role, and
    ssm:GetParameters for the `resolve:ssm:` AMI that RunInstances resolves."""
    from ray.autoscaler._private.aws import config as aws_config

    conf = yaml.safe_load((CLUSTER / "aws-cluster.yaml").read_text())
    assert "if \"IamInstanceProfile\" in head_node_config" in Path(aws_config.__file__).read_text()  # used as is
    types = conf["available_node_types"]
    head_profile = types[conf["head_node_type"]]["node_config"]["IamInstanceProfile"]["Name"]
    worker_profiles = {t["node_config"]["IamInstanceProfile"]["Name"] for k, t in types.items() if k != conf["head_node_type"]}
    assert head_profile not in worker_profiles and len(worker_profiles) == 1
    head, node = json.loads((IAM / "head-policy.json").read_text()), json.loads((IAM / "node-policy.json").read_text())
    needed = ray_aws_ec2_actions()
    if not conf["provider"].get("cache_stopped_nodes", True):
        needed -= {"ec2:StopInstances", "ec2:StartInstances"}
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:CreateTags", "ec2:DescribeInstances"} <= needed
    assert [a for a in sorted(needed) if not policy_allows(head, a)] == []
    (worker_role,) = worker_profiles  # the README creates each profile with a role of the same name
    assert policy_allows(head, "iam:PassRole", f"arn:aws:iam::ACCOUNT_ID:role/{worker_role}")
    assert not policy_allows(head, "iam:PassRole", "arn:aws:iam::ACCOUNT_ID:role/admin")
    for t in types.values():
        ami = t["node_config"]["ImageId"]
        if ami.startswith("resolve:ssm:"):
            region = conf["provider"]["region"]
            assert policy_allows(head, "ssm:GetParameters", f"arn:aws:ssm:{region}::parameter{ami.removeprefix('resolve:ssm:')}")
    # every node (the head too) pulls the private image and reads and writes S3
    assert policy_allows(node, "ecr:GetAuthorizationToken") and policy_allows(node, "s3:PutObject", "arn:aws:s3:::media-captions/captions/x")


def test_launcher_logs_in_to_the_image_registry_before_the_pull():
    conf = yaml.safe_load((CLUSTER / "aws-cluster.yaml").read_text())
    registry = conf["docker"]["image"].split("/", 1)[0]
    logins = [c for c in conf["initialization_commands"] if "docker login" in c]
    assert logins and all(c.rstrip().endswith(registry) and "--password-stdin" in c for c in logins)
    assert not re.search(r"(?i)--password[ =](?!-stdin)", " ".join(conf["initialization_commands"]))


# --- monitoring: variables for Serve-only clusters, GPU memory ---------------------------------------

RAY_NODE_METRICS = {"ray_node_network_receive_speed", "ray_node_gram_used", "ray_node_gram_available", "ray_node_gpus_utilization"}


def serve_metric_names() -> set[str]:
    return {n for n in pipeline_metric_names() if n.startswith("ray_pipeline_serve_")} | RAY_NODE_METRICS


def batch_metric_names() -> set[str]:
    return {n for n in pipeline_metric_names() if not n.startswith("ray_pipeline_serve_")} | RAY_NODE_METRICS


def test_dashboard_variables_come_from_a_metric_batch_and_serve_clusters_both_export():
    """A Serve-only cluster emits no ray_pipeline_rows_total: the Cluster and session lists come from a
    node metric every Ray node exports (as Ray's own dashboards do)."""
    dashboard = json.loads((CLUSTER / "grafana-dashboard.json").read_text())
    variables = [v for v in dashboard["templating"]["list"] if v["type"] == "query"]
    assert {v["name"] for v in variables} >= {"Cluster", "session"}
    for v in variables:
        (metric,) = re.findall(r"label_values\((\w+)", v["query"])
        assert metric in serve_metric_names() & batch_metric_names(), (v["name"], metric)


def test_no_alert_fires_on_the_gpu_memory_a_healthy_run_holds():
    """Sizing plans 90 % of each GPU and PyTorch's caching allocator keeps what it freed: an alert on
    NVML's used memory fires on every healthy run. The alert is on rows that ran out of memory."""
    from pipeline.planning.sizing import USABLE_FRACTION

    rules = [r for g in monitoring_doc("PrometheusRule")["spec"]["groups"] for r in g["rules"]]
    for rule in rules:
        if "ray_node_gram_used" in rule["expr"]:
            threshold = float(re.search(r">\s*([0-9.]+)\s*$", rule["expr"].strip()).group(1))
            assert threshold >= 0.99 and threshold > USABLE_FRACTION, rule["alert"]
    oom = [r for r in rules if 'error_type="out_of_memory"' in r["expr"]]
    assert oom and all("ray_pipeline_rows_total" in r["expr"] for r in oom)


def test_readme_cluster_section_is_a_day_one_checklist():
    """In the order an operator needs them: IAM (the policies in cluster/iam), registry login, the
    operator with its CRDs (helm repo add, CRDs applied before the upgrade), the secrets."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Running on a cluster"):]
    section = section[:section.index("\n## ", 3)]
    launcher = section[section.index("### Day one: the Ray cluster launcher"):section.index("### Day one: Kubernetes")]
    steps = ["**IAM.**", "**Build and push the image**", "**Registry login.**", "**Start**"]
    assert [launcher.index(s) for s in steps] == sorted(launcher.index(s) for s in steps)
    for path in sorted(IAM.glob("*.json")):
        assert f"cluster/iam/{path.name}" in launcher, path.name
    kube = section[section.index("### Day one: Kubernetes"):]
    order = ["helm repo add kuberay", "helm show crds kuberay/kuberay-operator", "helm upgrade --install kuberay-operator",
             "kubectl apply -f cluster/kuberay/serviceaccount.yaml", "kubectl create secret generic llava-serve-api-token",
             "kubectl apply -f cluster/kuberay/rayservice.yaml"]
    assert [kube.index(s) for s in order] == sorted(kube.index(s) for s in order)
    assert "--server-side" in kube and "RayCronJob" in kube
    (_, service), = of_kind("RayService")
    secrets = {v["secret"]["secretName"] for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
               for v in g["template"]["spec"].get("volumes", []) if "secret" in v}
    assert all(f"kubectl create secret generic {s}" in kube for s in secrets)
