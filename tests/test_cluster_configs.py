"""Every file in cluster/ loads, names job entry points that exist with options they accept,
pins the versions pyproject.toml pins, and has the fields Ray and KubeRay require."""

from __future__ import annotations

import json
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
# Where cluster/Dockerfile puts the repository inside the image.
IMAGE_CODE_DIR = "/home/ray/breakhis"
# KubeRay's limits (ray-operator/controllers/ray/utils: MaxRayClusterNameLength...).
MAX_CLUSTER_NAME = 63
MAX_JOB_NAME = 47
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
# rayStartParams that set resources; KubeRay refuses them beside a group's `resources`.
RESOURCE_PARAMS = ("num-cpus", "num-gpus", "memory", "resources")
CREDENTIAL_PATTERNS = (
    re.compile(r"AWS_ACCESS_KEY_ID|AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN", re.I),
    re.compile(r"aws_access_key|aws_secret", re.I),
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
)


def _pins() -> dict[str, str]:
    """``name -> version`` of every ``==`` dependency in pyproject.toml."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for dep in deps:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^;\s]+)", dep.strip())
        if match:
            pins[match.group(1).lower()] = match.group(3)
    return pins


PINS = _pins()
RAY_VERSION = PINS["ray"]
PROJECT_VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
PYTHON_TAG = f"py{sys.version_info.major}{sys.version_info.minor}"


def _cluster_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def _kuberay(kind: str) -> list[tuple[Path, dict]]:
    found = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == kind:
                found.append((path, doc))
    return found


def _dockerfile_from_and_workdir() -> tuple[str, str]:
    text = (CLUSTER / "Dockerfile").read_text()
    images = re.findall(r"^FROM\s+(\S+)", text, re.M)
    workdirs = re.findall(r"^WORKDIR\s+(\S+)", text, re.M)
    assert len(images) == 1, f"cluster/Dockerfile: expected one FROM, found {images}"
    assert workdirs, "cluster/Dockerfile: no WORKDIR"
    return images[0], workdirs[-1]


def _pip_installs(text: str) -> list[str]:
    """Each ``pip install ...`` command in a shell text (continuation lines joined)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [m.group(0) for m in re.finditer(r"pip install[^&;\n]*", joined)]


def _check_pinned_stack(where: str, command: str) -> None:
    for name in ("ray", "torch", "torchvision"):
        wanted = f"{name}==" if name != "ray" else "ray["
        assert wanted in command, f"{where}: `{command}` does not install {name}"
        version = re.search(rf"\b{name}(\[[^\]]*\])?==([0-9][^\s\"']*)", command)
        assert version, f"{where}: {name} is not pinned with == in `{command}`"
        assert version.group(2) == PINS[name], (
            f"{where}: {name}=={version.group(2)} but pyproject.toml pins {PINS[name]}"
        )


def _ray_image_tag(where: str, image: str) -> None:
    match = re.fullmatch(r"rayproject/ray:([0-9.]+)-(py[0-9]+)(-[a-z0-9]+)?", image)
    assert match, f"{where}: {image!r} is not an official rayproject/ray:VERSION-pyXY image"
    assert match.group(1) == RAY_VERSION, f"{where}: {image} but ray=={RAY_VERSION} is pinned"
    assert match.group(2) == PYTHON_TAG, f"{where}: {image} but the project runs on {PYTHON_TAG}"


# --- every file ------------------------------------------------------------------------


def test_every_file_in_cluster_loads_and_holds_no_credentials() -> None:
    files = _cluster_files()
    names = {p.relative_to(CLUSTER).as_posix() for p in files}
    for required in (
        "aws.yaml",
        "runtime_env.yaml",
        "Dockerfile",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob-train.yaml",
        "kuberay/rayjob-tune.yaml",
        "kuberay/rayjob-score.yaml",
    ):
        assert required in names, f"cluster/{required} is missing"
    for path in files:
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
            assert docs and all(isinstance(d, dict) for d in docs), f"{path}: not YAML mappings"
        elif path.name == "Dockerfile":
            _dockerfile_from_and_workdir()
        elif path.suffix == ".json":
            assert isinstance(json.loads(text), dict), f"{path}: not a JSON object"
        else:
            pytest.fail(f"{path}: no check knows this kind of file; add one to this test")
        for pattern in CREDENTIAL_PATTERNS:
            assert not pattern.search(text), f"{path}: looks like a credential: {pattern.pattern}"


def test_every_job_script_mentioned_exists() -> None:
    mentioned = set()
    for path in _cluster_files():
        for script in re.findall(r"\bjobs/[A-Za-z0-9_]+\.py\b", path.read_text()):
            mentioned.add(script)
            assert (REPO / script).is_file(), f"{path} mentions {script}, which does not exist"
    assert {"jobs/train.py", "jobs/tune.py", "jobs/score.py"} <= mentioned


# --- images and pinned versions ----------------------------------------------------------


def test_dockerfile_builds_on_the_pinned_ray_image_and_installs_the_pinned_stack() -> None:
    image, workdir = _dockerfile_from_and_workdir()
    _ray_image_tag("cluster/Dockerfile", image)
    assert workdir == IMAGE_CODE_DIR
    text = (CLUSTER / "Dockerfile").read_text()
    installs = _pip_installs(text)
    assert any("ray[" in c for c in installs), "cluster/Dockerfile installs no pinned stack"
    for command in installs:
        if "ray[" in command:
            _check_pinned_stack("cluster/Dockerfile", command)
    for folder in ("breakhis", "jobs", "cluster"):
        assert re.search(rf"^COPY\b.*\b{folder}\b", text, re.M), f"Dockerfile copies no {folder}/"


def test_aws_launcher_config_is_valid_for_ray_and_pins_the_stack() -> None:
    import jsonschema
    import ray.autoscaler

    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)

    assert config["provider"]["type"] == "aws"
    _ray_image_tag("aws.yaml docker.image", config["docker"]["image"])
    _ray_image_tag("aws.yaml docker.head_image", config["docker"]["head_image"])
    assert config["docker"]["image"].endswith("-gpu"), "workers need the GPU image"

    installs = [c for cmd in config["setup_commands"] for c in _pip_installs(cmd)]
    assert installs, "aws.yaml: setup_commands install nothing"
    for command in installs:
        _check_pinned_stack("aws.yaml setup_commands", command)

    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head should run job drivers only"
    assert "GPU" not in head["resources"]
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpu_types = [n for n, t in workers.items() if t["node_config"]["InstanceType"][0] in "gpq"]
    assert gpu_types, "aws.yaml: no GPU worker type (g*/p* instances)"
    for name in gpu_types:
        assert workers[name]["max_workers"] > workers[name]["min_workers"], (
            f"aws.yaml: worker type {name} does not autoscale"
        )
    # S3 access through instance roles, on every node that reads or writes data.
    for name, node_type in types.items():
        profile = node_type["node_config"].get("IamInstanceProfile")
        assert profile and (profile.get("Name") or profile.get("Arn")), (
            f"aws.yaml: node type {name} has no IamInstanceProfile"
        )


# --- KubeRay -----------------------------------------------------------------------------


def _check_pod_template(where: str, template: dict) -> None:
    containers = template["spec"]["containers"]
    assert containers, f"{where}: template.spec.containers is empty"
    ray_container = containers[0]  # KubeRay treats the first container as Ray's
    assert ray_container.get("name"), f"{where}: the Ray container has no name"
    assert ray_container.get("image") == f"breakhis-ray:{PROJECT_VERSION}", (
        f"{where}: image {ray_container.get('image')!r}; expected the image cluster/Dockerfile "
        f"builds, breakhis-ray:{PROJECT_VERSION}"
    )
    assert template["spec"].get("serviceAccountName"), (
        f"{where}: no serviceAccountName (S3 access goes through IRSA)"
    )


def _check_group(where: str, group: dict) -> None:
    params = group["rayStartParams"]  # required by the CRD, may be empty
    assert isinstance(params, dict), f"{where}: rayStartParams must be a mapping"
    for key, value in params.items():
        assert isinstance(value, str), f"{where}: rayStartParams.{key} must be a string"
    if any(k in params for k in RESOURCE_PARAMS):
        assert not group.get("resources"), f"{where}: resources set twice"
    _check_pod_template(where, group["template"])


def _check_cluster_spec(where: str, spec: dict) -> None:
    assert spec["rayVersion"] == RAY_VERSION, f"{where}: rayVersion {spec['rayVersion']!r}"
    _check_group(f"{where} headGroupSpec", spec["headGroupSpec"])
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", (
        f"{where}: the head should run job drivers only (num-cpus: '0')"
    )
    groups = spec["workerGroupSpecs"]
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names), f"{where}: duplicate worker group names {names}"
    gpus = []
    for group in groups:
        label = f"{where} worker group {group['groupName']}"
        _check_group(label, group)
        low, high = group["minReplicas"], group["maxReplicas"]
        replicas = group.get("replicas", low)
        assert 0 <= low <= replicas <= high, f"{label}: needs min <= replicas <= max"
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus.append(int(limits.get("nvidia.com/gpu", 0)))
    assert any(gpus), f"{where}: no worker group has GPUs"


@pytest.mark.parametrize("path_and_doc", _kuberay("RayCluster"), ids=lambda p: p[0].name)
def test_kuberay_raycluster_has_the_required_fields(path_and_doc) -> None:
    path, doc = path_and_doc
    assert doc["apiVersion"] == "ray.io/v1"
    name = doc["metadata"]["name"]
    assert DNS_1035.fullmatch(name) and len(name) <= MAX_CLUSTER_NAME
    _check_cluster_spec(path.name, doc["spec"])
    assert doc["spec"].get("enableInTreeAutoscaling") is True, "the GPU group should autoscale"


JOBS = _kuberay("RayJob")


def test_there_is_a_rayjob_for_train_tune_and_score() -> None:
    scripts = {shlex.split(doc["spec"]["entrypoint"])[1].rsplit("/", 1)[-1] for _, doc in JOBS}
    assert {"train.py", "tune.py", "score.py"} <= scripts


@pytest.mark.parametrize("path_and_doc", JOBS, ids=lambda p: p[0].name)
def test_kuberay_rayjob_has_the_required_fields(path_and_doc) -> None:
    path, doc = path_and_doc
    assert doc["apiVersion"] == "ray.io/v1"
    name = doc["metadata"]["name"]
    assert DNS_1035.fullmatch(name) and len(name) <= MAX_JOB_NAME, f"{path}: bad name {name!r}"
    spec = doc["spec"]
    assert spec["entrypoint"].strip(), f"{path}: empty entrypoint"
    assert spec.get("rayClusterSpec") or spec.get("clusterSelector"), (
        f"{path}: needs rayClusterSpec or clusterSelector"
    )
    assert spec.get("submissionMode", "K8sJobMode") in SUBMISSION_MODES
    if spec.get("clusterSelector"):
        assert not spec.get("shutdownAfterJobFinishes"), f"{path}: can't shut down a selected one"
    assert spec.get("ttlSecondsAfterFinished", 0) >= 0
    assert spec.get("backoffLimit", 0) >= 0
    if spec.get("rayClusterSpec"):
        _check_cluster_spec(path.name, spec["rayClusterSpec"])
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}
    assert isinstance(runtime_env, dict), f"{path}: runtimeEnvYAML is not a YAML mapping"
    # The same job settings as `ray job submit --runtime-env cluster/runtime_env.yaml`.
    shared = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert runtime_env.get("env_vars") == shared.get("env_vars"), (
        f"{path}: runtimeEnvYAML env_vars differ from cluster/runtime_env.yaml"
    )
    for key in ("pip", "conda", "uv"):
        assert key not in runtime_env, f"{path}: the image has the stack; nothing to install"


@pytest.mark.parametrize("path_and_doc", JOBS, ids=lambda p: p[0].name)
def test_rayjob_entrypoint_runs_a_job_script_with_options_it_accepts(path_and_doc) -> None:
    """The entrypoint is ``python <code dir>/jobs/<job>.py ARGS`` and ARGS parse with the
    options of the subcommand that script runs."""
    from breakhis.cli import build_parser

    path, doc = path_and_doc
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "python", f"{path}: entrypoint should start with `python`"
    script = argv[1]
    assert script.startswith(f"{IMAGE_CODE_DIR}/jobs/"), (
        f"{path}: {script} is not under the image's code dir {IMAGE_CODE_DIR}/jobs/"
    )
    local = REPO / script[len(IMAGE_CODE_DIR) + 1 :]
    assert local.is_file(), f"{path}: {script} has no {local.relative_to(REPO)} in the repo"
    subcommand = re.search(r"main\(\[\s*\"([a-z_-]+)\"", local.read_text())
    assert subcommand, f"{local}: does not call breakhis.cli.main([SUBCOMMAND, ...])"
    args = argv[2:]
    for arg in args:
        if arg.startswith(IMAGE_CODE_DIR + "/"):
            inside = REPO / arg[len(IMAGE_CODE_DIR) + 1 :]
            assert inside.exists(), f"{path}: {arg} is not in the image (no {inside})"
    try:
        parsed = build_parser(subcommand.group(1)).parse_args([subcommand.group(1), *args])
    except SystemExit as exit_:
        pytest.fail(f"{path}: `{script}` refuses its arguments {args} (exit {exit_.code})")
    assert parsed.command == subcommand.group(1)


# --- runtime_env -------------------------------------------------------------------------


def test_runtime_env_is_valid_for_ray_and_ships_only_the_code() -> None:
    from ray.runtime_env import RuntimeEnv

    from breakhis.dev.localcluster import load_runtime_env

    raw = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert raw["working_dir"] == ".", "the working_dir is the repository root"
    for key in ("pip", "conda", "uv", "container", "image_uri"):
        assert key not in raw, f"runtime_env.yaml: {key}: the nodes already have the stack"
    assert not any(k.startswith("AWS_") for k in raw.get("env_vars", {}))
    assert ".venv/" in raw["excludes"], "the virtualenv must not be uploaded with every job"
    resolved = load_runtime_env()
    assert Path(resolved["working_dir"]) == REPO
    RuntimeEnv(**resolved)  # raises on an unknown or malformed field


# --- keeping others out ------------------------------------------------------------------

AUTH_SECRET = "breakhis-ray-auth"
HEAD_PORTS = (6379, 8265, 10001)
# KubeRay 1.6's RayClusterSpec.authOptions (ray-operator/apis/ray/v1/raycluster_types.go
# AuthOptions; config/crd/bases/ray.io_rayclusters.yaml): its fields and its mode's enum.
# KubeRay 1.5 had `mode` only; secretName came in 1.6.
AUTH_OPTION_FIELDS = {"mode", "secretName", "enableK8sTokenAuth"}
AUTH_MODES = {"disabled", "token"}
# The operator refuses authOptions.mode token below this Ray (utils/validation.go).
MIN_RAY_FOR_TOKEN = (2, 52, 0)


def _check_auth_options(where: str, spec: dict) -> None:
    """Ray's token auth through KubeRay's authOptions (KubeRay >= 1.6), the token from the
    project's Secret: only then does the operator put the token into every Ray container,
    the autoscaler sidecar and the submitter, and send it with its own status polls."""
    options = spec.get("authOptions")
    assert isinstance(options, dict), (
        f"{where}: no authOptions; KubeRay sends no token (its status polls get 401, the "
        "autoscaler cannot reach the GCS): set authOptions: {mode: token, secretName: ...}"
    )
    assert set(options) <= AUTH_OPTION_FIELDS, (
        f"{where}: authOptions has {sorted(set(options) - AUTH_OPTION_FIELDS)}; KubeRay knows "
        f"{sorted(AUTH_OPTION_FIELDS)}"
    )
    assert options.get("mode") in AUTH_MODES, f"{where}: authOptions.mode {options.get('mode')!r}"
    assert options == {"mode": "token", "secretName": AUTH_SECRET}, (
        f"{where}: authOptions {options}; expected mode token with secretName {AUTH_SECRET} "
        "(a Secret KubeRay did not generate: the client needs the same token)"
    )
    version = tuple(int(part) for part in spec["rayVersion"].split("."))
    assert version >= MIN_RAY_FOR_TOKEN, f"{where}: token auth needs Ray >= 2.52.0"


def _check_no_hand_written_token(where: str, container: dict) -> None:
    """The token reaches a container only through authOptions: hand-written env would hide
    a missing authOptions (the pods work, the operator and autoscaler do not)."""
    names = {e["name"] for e in container.get("env", [])}
    assert not names & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, (
        f"{where}: RAY_AUTH_MODE/RAY_AUTH_TOKEN written by hand; KubeRay >= 1.6 sets them "
        "from authOptions"
    )


def _cluster_specs() -> list[tuple[str, dict, str]]:
    specs = [(p.name, d["spec"], "RayCluster") for p, d in _kuberay("RayCluster")]
    specs += [(p.name, d["spec"]["rayClusterSpec"], "RayJob") for p, d in JOBS]
    return specs


@pytest.mark.parametrize("where, spec, kind", _cluster_specs(), ids=lambda v: str(v)[:40])
def test_every_ray_pod_requires_the_token_and_is_selected_by_the_network_policy(
    where, spec, kind
) -> None:
    _check_auth_options(where, spec)
    groups = [("head", spec["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    for name, group in groups:
        template = group["template"]
        for container in template["spec"]["containers"] + template["spec"].get(
            "initContainers", []
        ):
            _check_no_hand_written_token(f"{where} {name} {container['name']}", container)
        labels = template.get("metadata", {}).get("labels", {})
        assert labels.get("app.kubernetes.io/name") == "breakhis", (
            f"{where} {name}: pods need app.kubernetes.io/name=breakhis for the NetworkPolicy"
        )
    host = spec["headGroupSpec"]["rayStartParams"].get("dashboard-host", "127.0.0.1")
    if kind == "RayCluster":
        # Reached with kubectl port-forward, which connects inside the pod.
        assert host == "127.0.0.1", f"{where}: dashboard-host {host}; nothing needs it wider"


@pytest.mark.parametrize("path_and_doc", JOBS, ids=lambda p: p[0].name)
def test_rayjob_submitter_gets_the_token_from_auth_options(path_and_doc) -> None:
    """KubeRay gives the submitter the token of its RayCluster's authOptions; the template
    only gives it the label the NetworkPolicy admits."""
    path, doc = path_and_doc
    spec = doc["spec"]
    assert spec.get("rayClusterSpec"), f"{path}: a selected cluster's authOptions are unchecked"
    _check_auth_options(f"{path.name} rayClusterSpec", spec["rayClusterSpec"])
    if spec.get("submissionMode", "K8sJobMode") != "K8sJobMode":
        return
    template = spec.get("submitterPodTemplate")
    assert template, f"{path}: the submitter pod needs the label the NetworkPolicy admits"
    _check_no_hand_written_token(f"{path} submitter", template["spec"]["containers"][0])
    assert template["metadata"]["labels"].get("app.kubernetes.io/name") == "breakhis"


def test_kuberay_manifests_say_they_need_kuberay_1_6() -> None:
    for path in sorted(KUBERAY.glob("ray*.yaml")):
        assert "KubeRay >= 1.6" in path.read_text(), f"{path.name}: say it needs KubeRay >= 1.6"


def test_network_policy_lets_only_the_projects_pods_reach_the_head() -> None:
    policies = _kuberay("NetworkPolicy")
    heads = [
        d
        for _, d in policies
        if d["spec"]["podSelector"]["matchLabels"].get("ray.io/node-type") == "head"
    ]
    assert len(heads) == 1, "cluster/kuberay needs one NetworkPolicy for the head pods"
    spec = heads[0]["spec"]
    assert heads[0]["apiVersion"] == "networking.k8s.io/v1"
    assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "breakhis"
    assert "Ingress" in spec["policyTypes"]
    for rule in spec["ingress"]:
        assert rule.get("from"), f"a rule without `from` opens the head to everyone: {rule}"
        for peer in rule["from"]:
            assert "ipBlock" not in peer, f"no address ranges: {peer}"
            if "namespaceSelector" in peer:
                # Another namespace (the KubeRay operator): the dashboard port only.
                assert peer.get("podSelector"), f"a whole namespace may not connect: {peer}"
                assert {p["port"] for p in rule.get("ports", [])} == {8265}, rule
            else:
                assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "breakhis"}
    workers = [
        d
        for _, d in policies
        if d["spec"]["podSelector"]["matchLabels"].get("ray.io/node-type") == "worker"
    ]
    assert workers, "cluster/kuberay needs a NetworkPolicy for the worker pods"


def test_aws_launcher_turns_on_token_auth_on_every_node() -> None:
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    for command in (c for c in starts if "ray start" in c):
        before = command.split("ray start", 1)[0]
        assert re.search(r"\bexport RAY_AUTH_MODE=token\b|\bRAY_AUTH_MODE=token\s*$", before), (
            f"aws.yaml: `{command}` starts Ray without RAY_AUTH_MODE=token"
        )
    head = next(c for c in config["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head, "the dashboard is reached through ray dashboard"
    assert config["file_mounts"].get("/home/ray/.ray/auth_token") == "~/.ray/auth_token", (
        "aws.yaml: every node needs the token Ray reads (file_mounts ~/.ray/auth_token)"
    )


def test_cluster_docs_commands_bring_the_token() -> None:
    page = (REPO / "docs" / "cluster-and-security.md").read_text()
    cluster = page.split("## Cluster", 1)[1].split("\n## ", 1)[0]
    assert "ray get-auth-token --generate" in cluster
    assert "chmod 600 ~/.ray/auth_token" in cluster
    assert f"kubectl create secret generic {AUTH_SECRET}" in cluster
    assert "cluster/kuberay/networkpolicy.yaml" in cluster
    # Every `ray job submit` of the section runs where RAY_AUTH_MODE=token is exported.
    before_submit = cluster.split("ray job submit", 1)[0]
    assert re.search(r"^export [^\n]*\bRAY_AUTH_MODE=token\b", before_submit, re.M)
    assert "KubeRay" in cluster and "1.6" in cluster and "authOptions" in cluster


# --- AWS: the IAM policies aws.yaml names, the bucket's lifecycle rule ---------------------

IAM_ACTION = re.compile(r"^[a-z0-9-]+:[A-Za-z*]+$")


def _policy(name: str) -> dict:
    document = json.loads((CLUSTER / "iam" / name).read_text())
    assert document["Version"] == "2012-10-17", f"cluster/iam/{name}: IAM's policy language"
    statements = document["Statement"]
    assert isinstance(statements, list) and statements, f"cluster/iam/{name}: no Statement"
    for statement in statements:
        assert statement["Effect"] in ("Allow", "Deny"), f"cluster/iam/{name}: {statement}"
        actions = statement["Action"]
        for action in [actions] if isinstance(actions, str) else actions:
            assert IAM_ACTION.match(action), f"cluster/iam/{name}: {action!r} is no IAM action"
    return document


def test_the_iam_policies_aws_yaml_points_at_exist_and_parse() -> None:
    aws = (CLUSTER / "aws.yaml").read_text()
    assert "cluster/iam/*.json" in aws, "aws.yaml should say where its policies are"
    config = yaml.safe_load(aws)
    profiles = {
        node["node_config"]["IamInstanceProfile"]["Name"]
        for node in config["available_node_types"].values()
    }
    assert profiles == {"breakhis-ray-head", "breakhis-ray-worker"}
    head = config["available_node_types"][config["head_node_type"]]
    assert head["node_config"]["IamInstanceProfile"]["Name"] == "breakhis-ray-head"

    trust = _policy("ec2-trust.json")["Statement"]
    assert [s["Principal"] for s in trust] == [{"Service": "ec2.amazonaws.com"}]
    assert [s["Action"] for s in trust] == ["sts:AssumeRole"]

    # S3: the bucket the cluster's examples use, and nothing beyond it.
    buckets = set(re.findall(r"s3://([a-z0-9.-]+)/", aws))
    resources = {r for s in _policy("s3-data.json")["Statement"] for r in [s["Resource"]]}
    assert {r.removeprefix("arn:aws:s3:::").split("/")[0] for r in resources} == buckets

    # The head may start and stop instances and hand them the worker role, no other role.
    autoscaler = _policy("head-autoscaler.json")["Statement"]
    actions = {
        a
        for s in autoscaler
        for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])
    }
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:CreateTags"} <= actions
    passes = [s for s in autoscaler if s["Action"] == "iam:PassRole"]
    assert [s["Resource"] for s in passes] == ["arn:aws:iam::*:role/breakhis-ray-worker"]

    # The docs create exactly these roles with exactly these files.
    page = (REPO / "docs" / "cluster-and-security.md").read_text()
    for name in ("ec2-trust.json", "s3-data.json", "head-autoscaler.json"):
        assert f"file://cluster/iam/{name}" in page, f"docs/cluster-and-security.md: {name}"
    for profile in profiles:
        assert profile in page


def test_the_bucket_lifecycle_rule_aborts_unfinished_multipart_uploads() -> None:
    rules = json.loads((CLUSTER / "s3-lifecycle.json").read_text())["Rules"]
    aborts = [r for r in rules if "AbortIncompleteMultipartUpload" in r]
    assert aborts and all(r["Status"] == "Enabled" for r in aborts)
    assert all(r["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] >= 1 for r in aborts)
    page = (REPO / "docs" / "cluster-and-security.md").read_text()
    assert "file://cluster/s3-lifecycle.json" in page


def _readme_shell_blocks(with_page: bool = False) -> list:
    """The ```bash blocks of README.md and docs/*.md, continuation lines joined (with
    ``with_page``: (page text, block) pairs)."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    pairs = [
        (text, re.sub(r"\\\n\s*", " ", block))
        for text in (page.read_text() for page in pages)
        for block in re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S)
    ]
    return pairs if with_page else [block for _, block in pairs]


SECRET_NAMES = re.compile(r"PASSWORD|TOKEN|SECRET|ACCESS_KEY|CREDENTIAL", re.I)


def test_readme_job_submissions_are_ones_ray_accepts_without_secrets(monkeypatch) -> None:
    """Each `ray job submit` line parses with Ray's own CLI and builds its runtime env as
    Ray does (which refuses --runtime-env beside --runtime-env-json); no credential travels
    in a runtime env (every token holder reads it); the client has RAY_AUTH_MODE=token."""
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.dashboard.modules.job.cli import submit

    monkeypatch.chdir(REPO)
    seen = 0
    for page, block in _readme_shell_blocks(with_page=True):
        lines = [line for line in block.splitlines() if "ray job submit" in line]
        if not lines:
            continue
        # The client needs the token mode: exported in the block, or the page says so and
        # links the cluster page's auth section.
        said = "RAY_AUTH_MODE=token" in page and "cluster-and-security.md" in page
        assert said or re.search(r"^export [^\n]*\bRAY_AUTH_MODE=token\b", block, re.M), (
            f"docs: `ray job submit` without RAY_AUTH_MODE=token in the client's environment "
            f"(the client then sends no token):\n{block}"
        )
        for line in lines:
            args = shlex.split(line.split("ray job submit", 1)[1], comments=True)
            params = submit.make_context("submit", args).params
            runtime_env = parse_runtime_env_args(
                runtime_env=params["runtime_env"],
                runtime_env_json=params["runtime_env_json"],
                working_dir=params["working_dir"],
            )
            leaked = [k for k in runtime_env.get("env_vars", {}) if SECRET_NAMES.search(k)]
            assert not leaked, f"README: {leaked} in a runtime env: {line}"
            seen += 1
    assert seen >= 8
