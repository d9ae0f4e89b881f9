"""The deployment files in infra/ and the Dockerfile, parsed and checked for the fields we rely on.

Nothing here talks to Kubernetes, AWS or Docker (none runs on the CI machine): the checks are the
contract between these files and the code, e.g. that the RayJob entrypoint is a valid training
command whose paths live on the shared volume, or that the image installs the pinned torch.
"""

from __future__ import annotations

import gzip
import os
import re
import shlex
import subprocess
import tomllib
import warnings
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[3]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
LAUNCHER = INFRA / "cluster-launcher" / "aws-gpu.yaml"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
IMAGE = f"eiw-flow:{PYPROJECT['project']['version']}"
SHARED = "/shared"
GPUS_PER_NODE = 8  # worker pods and launcher nodes are whole 8-GPU machines
# Instance types the launcher config may name for its GPU workers: 8 GPUs each (AWS's specs).
AWS_8_GPU_TYPES = {"p4d.24xlarge", "p4de.24xlarge", "p5.48xlarge", "p5e.48xlarge", "p5en.48xlarge"}


def k8s_docs() -> dict[tuple[str, str], dict]:
    docs = {}
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            assert "apiVersion" in doc and "kind" in doc, path
            name = doc["metadata"]["name"] if "metadata" in doc else str(path.relative_to(K8S))
            docs[(doc["kind"], name)] = doc
    return docs


DOCS = k8s_docs()


def pinned(name: str) -> str:
    """The exact version pyproject.toml pins for ``name`` (``name==X``)."""
    for dep in PYPROJECT["project"]["dependencies"]:
        m = re.fullmatch(rf"{re.escape(name)}==([\w.]+)", dep)
        if m:
            return m.group(1)
    raise AssertionError(f"{name} is not pinned with == in pyproject.toml")


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def secret_ref(env: dict[str, dict], name: str) -> dict:
    assert name in env, f"{name} missing"
    assert "value" not in env[name], f"{name} must come from a secret, not a literal"
    return env[name]["valueFrom"]["secretKeyRef"]


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity with a binary suffix ("96Gi") in bytes."""
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)", quantity)
    assert m, f"expected a binary-suffixed quantity, got {quantity!r}"
    return int(m.group(1)) * 1024 ** ("KMGT".index(m.group(2)[0]) + 1)


def ray_cluster_specs() -> list[tuple[str, dict]]:
    return [
        ("RayCluster", DOCS[("RayCluster", "eiw-flow")]["spec"]),
        ("RayJob", DOCS[("RayJob", "eiw-flow-imagenet64")]["spec"]["rayClusterSpec"]),
    ]


def test_every_manifest_has_kind_and_namespace_and_kustomize_lists_it():
    kustomization = DOCS[("Kustomization", "kustomization.yaml")]
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    # The RayJob is per run (kubectl create -k infra/k8s/run), not part of the services; both
    # kustomizations take the image rewrite from the one registry component.
    run = DOCS[("Kustomization", "run/kustomization.yaml")]
    assert run["resources"] == ["rayjob.yaml"] and run["namespace"] == "eiw-flow"
    assert kustomization["components"] == ["registry"] and run["components"] == ["../registry"]
    (image,) = DOCS[("Component", "registry/kustomization.yaml")]["images"]
    assert f"{image['name']}:{image['newTag']}" == IMAGE
    for (kind, name), doc in DOCS.items():
        if kind in ("Kustomization", "Component", "Namespace"):
            continue
        assert doc["metadata"].get("namespace") == "eiw-flow", (kind, name)
    assert DOCS[("RayCluster", "eiw-flow")]["apiVersion"] == "ray.io/v1"
    assert DOCS[("RayJob", "eiw-flow-imagenet64")]["apiVersion"] == "ray.io/v1"
    assert DOCS[("Deployment", "mlflow")]["apiVersion"] == "apps/v1"


@pytest.mark.parametrize("kind, spec", ray_cluster_specs(), ids=["raycluster", "rayjob"])
def test_ray_cluster_spec_gpu_workers_shared_storage_and_secrets(kind, spec):
    ray_minor = re.fullmatch(
        r"ray\[[\w,]+\]==([\d.]+)\.\*",
        next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray[")),
    ).group(1)
    assert spec["rayVersion"].startswith(ray_minor + ".")
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no training worker on the head
    (gpu_group,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    pods = [("head", head["template"]["spec"]), ("gpu", gpu_group["template"]["spec"])]
    for role, pod in pods:
        (container,) = pod["containers"]
        assert container["image"] == IMAGE, role
        ref = secret_ref(env_of(container), "MLFLOW_TRACKING_URI")
        assert ref == {"name": "eiw-flow-mlflow", "key": "tracking-uri"}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        shared = volumes[mounts[SHARED]]
        assert shared["persistentVolumeClaim"]["claimName"] == "eiw-flow-shared", role
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    (worker,) = gpu_group["template"]["spec"]["containers"]
    # One Ray worker pod per 8-GPU node; Ray Train then places one training worker per GPU.
    for bound in ("requests", "limits"):
        assert int(worker["resources"][bound]["nvidia.com/gpu"]) == GPUS_PER_NODE
    assert worker["resources"]["requests"] == worker["resources"]["limits"]  # Guaranteed QoS
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu_group["template"]["spec"]["tolerations"])
    # /dev/shm for 8 workers' DataLoader processes, NCCL and Ray's object store, which must fit in it;
    # a memory-backed emptyDir counts against the container's memory limit.
    worker_pod = gpu_group["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
    shm = {v["name"]: v for v in worker_pod["volumes"]}[mounts["/dev/shm"]]["emptyDir"]
    shm_bytes = quantity_bytes(shm["sizeLimit"])
    assert shm_bytes >= 32 * 2**30
    assert int(gpu_group["rayStartParams"]["object-store-memory"]) < shm_bytes
    assert shm_bytes < quantity_bytes(worker["resources"]["limits"]["memory"]) // 2
    # NCCL is told which network to use between nodes.
    nccl = env_of(worker)
    assert nccl["NCCL_SOCKET_IFNAME"]["value"] == "eth0"
    assert "NCCL_DEBUG" in nccl
    pvc = DOCS[("PersistentVolumeClaim", "eiw-flow-shared")]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # every node mounts it


def test_rayjob_entrypoint_is_a_valid_training_command_on_shared_paths():
    spec = DOCS[("RayJob", "eiw-flow-imagenet64")]["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:4] == ["python", "-m", "pipeline.train", "--config"]
    config_path = REPO / argv[4]
    assert config_path.is_file()
    cfg = load_config(config_path, argv[5:])  # every override names a real key with a valid value
    assert cfg.data.root.startswith(SHARED + "/") and cfg.run.root.startswith(SHARED + "/")
    assert cfg.mlflow.tracking_uri == ""  # so the driver takes MLFLOW_TRACKING_URI from the secret
    (gpu_group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    (worker,) = gpu_group["template"]["spec"]["containers"]
    limits = worker["resources"]["limits"]
    assert cfg.ray.use_gpu is True and cfg.ray.gpus_per_worker == 1
    # Fixed size: nodes = replicas, and every GPU of every node runs one training worker.
    assert spec["rayClusterSpec"]["enableInTreeAutoscaling"] is False
    nodes = gpu_group["replicas"]
    assert gpu_group["minReplicas"] == nodes == gpu_group["maxReplicas"]
    workers_per_pod = int(limits["nvidia.com/gpu"]) // cfg.ray.gpus_per_worker
    assert cfg.ray.num_workers == nodes * workers_per_pod
    assert workers_per_pod * cfg.ray.cpus_per_worker < int(limits["cpu"])  # room for Ray's own processes


def test_rayjob_runs_the_recipe_as_written_at_its_global_batch():
    spec = DOCS[("RayJob", "eiw-flow-imagenet64")]["spec"]
    argv = shlex.split(spec["entrypoint"])
    recipe = load_config(REPO / argv[4])
    cfg = load_config(REPO / argv[4], argv[5:])
    assert (cfg.model, cfg.optim, cfg.data.batch_size) == (recipe.model, recipe.optim, recipe.data.batch_size)
    assert cfg.optim.reference_batch is not None
    assert cfg.data.batch_size * cfg.ray.num_workers == cfg.optim.reference_batch
    from pipeline.step import learning_rate

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the global-batch warning would fail here
        assert learning_rate(cfg) == recipe.optim.lr


def test_mlflow_server_uses_postgres_and_s3_by_reference():
    deployment = DOCS[("Deployment", "mlflow")]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == IMAGE
    assert container["command"][:2] == ["mlflow", "server"]
    assert "--serve-artifacts" in container["command"]
    assert any(a.startswith("--allowed-hosts=") for a in container["command"])
    env = env_of(container)
    assert secret_ref(env, "MLFLOW_BACKEND_STORE_URI")["key"] == "backend-store-uri"
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"].startswith("s3://")
    secret_ref(env, "AWS_ACCESS_KEY_ID")
    secret_ref(env, "AWS_SECRET_ACCESS_KEY")
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    service = DOCS[("Service", "mlflow")]
    assert service["spec"]["ports"][0]["port"] == 5000
    (postgres,) = DOCS[("StatefulSet", "postgres")]["spec"]["template"]["spec"]["containers"]
    secret_ref(env_of(postgres), "POSTGRES_PASSWORD")


def test_cluster_launcher_config():
    config = yaml.safe_load(LAUNCHER.read_text())
    assert config["provider"]["type"] == "aws"
    assert config["docker"]["image"].endswith("/" + IMAGE)
    options = config["docker"]["run_options"]
    assert f"-v {SHARED}:{SHARED}" in options
    env_file = next(o.split()[1] for o in options if o.startswith("--env-file"))
    assert env_file in config["file_mounts"]
    assert config["file_mounts"][env_file].startswith("~/")  # from the operator's machine, not the repo
    mounts = [c for c in config["initialization_commands"] if "mount -t nfs4" in c]
    assert mounts and mounts[0].rstrip().endswith(" " + SHARED)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert any("--num-cpus=0" in c for c in config["head_start_ray_commands"])
    types = config["available_node_types"]
    (gpu_type,) = [t for name, t in types.items() if name != config["head_node_type"]]
    assert gpu_type["node_config"]["InstanceType"] in AWS_8_GPU_TYPES
    assert gpu_type["max_workers"] <= config["max_workers"]
    worker_options = config["docker"]["worker_run_options"]
    (shm,) = [o for o in worker_options if o.startswith("--shm-size=")]
    assert int(re.fullmatch(r"--shm-size=(\d+)g", shm).group(1)) >= 32
    assert any(o.startswith("--env NCCL_SOCKET_IFNAME=") for o in worker_options)
    assert any(o.startswith("--shm-size=") for o in config["docker"]["head_run_options"])


# Literal credentials: user:password@ in URIs (placeholders <...>, shell $... and *** excepted), AWS
# access keys, private keys, and password/secret/token keys with a literal value.
SECRET_PATTERNS = [
    re.compile(r"://[^/\s:@'\"]+:(?![<$*])[^@\s/'\"]+@"),
    re.compile(r"AKIA[0-9A-Z]{16}"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    # on one line: a YAML `secret:` key opening a volume source is structure, not a value
    re.compile(r"(?i)\b(password|passwd|secret|token)[ \t]*[:=][ \t]*['\"]?[A-Za-z0-9+/]{8,}"),
]


def test_no_literal_secrets_in_infra_or_the_image():
    files = [p for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    files += [REPO / "Dockerfile", REPO / ".dockerignore"]
    assert len(files) >= 10
    for path in files:
        # The vendored CRD schemas (infra/k8s/schemas/*.json.gz) are compressed: scan their JSON.
        text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
        for pattern in SECRET_PATTERNS:
            match = pattern.search(text)
            assert match is None, f"{path.relative_to(REPO)}: looks like a literal secret: {match.group(0)!r}"
    for (kind, name), doc in DOCS.items():
        for container in _containers(doc):
            for env in container.get("env", []):
                if (
                    re.search(r"PASSWORD|SECRET|TOKEN|_URI$", env["name"])
                    and env["name"] != "MLFLOW_ARTIFACTS_DESTINATION"
                ):
                    assert "valueFrom" in env, (kind, name, env["name"])


def _containers(node) -> list[dict]:
    if isinstance(node, dict):
        found = list(node.get("containers", []))
        for value in node.values():
            found += _containers(value)
        return found
    if isinstance(node, list):
        return [c for item in node for c in _containers(item)]
    return []


def test_dockerfile_installs_the_project_as_pyproject_pins_it():
    text = (REPO / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert re.fullmatch(r"FROM python:3\.11[\w.-]*", lines[0])
    runs = [line.removeprefix("RUN ").strip() for line in lines if line.startswith("RUN ")]
    torch_line = next(r for r in runs if "torch==" in r)
    assert torch_line == f"pip install torch=={pinned('torch')} torchvision=={pinned('torchvision')}"
    assert "pip install --no-deps -e ." in runs
    # Every package setuptools installs is copied in before `pip install --no-deps -e .`, and the
    # dependencies (read from pyproject.toml, the only file copied before them) are installed before
    # any code is copied: a code change must not reinstall Ray and MLflow.
    copied = {m.group(1) for m in re.finditer(r"^COPY (\w+) \./\1$", text, re.M)}
    for include in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert include.rstrip("*") in copied
    deps_at = text.index("pip install -r /tmp/requirements.txt")
    first_code_copy = min(text.index(f"COPY {p.rstrip('*')} ") for p in copied)
    assert text.index("COPY pyproject.toml ./") < deps_at < first_code_copy
    assert text.index("pip install --no-deps -e .") > first_code_copy
    apt = re.search(r"apt-get install (.*)", text).group(1)
    assert {"gcc", "g++", "libc6-dev"} <= set(apt.split())  # torch.compile compiles at run time
    assert 'NVIDIA_REQUIRE_CUDA="cuda>=13.0"' in text  # torch 2.14.1's PyPI wheel is a CUDA 13.0 build
    assert any(line.startswith("USER ") and line != "USER root" for line in lines)
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "data", "runs"} <= ignored


SCRIPTS = sorted((INFRA / "local").glob("*.sh"))


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s.name != "common.sh"], ids=lambda p: p.name)
def test_local_scripts_parse_and_explain_their_usage(script, tmp_path):
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    env = {"PATH": os.environ["PATH"], "INFRA_STATE_DIR": str(tmp_path)}
    usage = subprocess.run(["bash", str(script), "no-such-command"], env=env, capture_output=True, text=True)
    if "binaries not found" in usage.stderr:
        pytest.skip("PostgreSQL server binaries are not installed")
    assert usage.returncode == 2
    assert "start" in usage.stderr and "stop" in usage.stderr and "status" in usage.stderr


def test_mlflow_server_binds_loopback_unless_told_otherwise(tmp_path):
    script = INFRA / "local" / "mlflow_server.sh"
    env = {"PATH": os.environ["PATH"], "INFRA_STATE_DIR": str(tmp_path)}
    default = subprocess.run(["bash", str(script), "uri"], env=env, capture_output=True, text=True)
    assert default.stdout.strip() == "http://127.0.0.1:5000"
    text = script.read_text()
    assert 'HOST="${MLFLOW_HOST:-127.0.0.1}"' in text and '--host "$HOST"' in text


@pytest.mark.parametrize("variable", ["PG_DB", "PG_USER"])
def test_postgres_script_refuses_names_that_are_not_identifiers(variable, tmp_path):
    """The names reach SQL and a URI; a quote in one must stop the script before anything starts."""
    script = INFRA / "local" / "postgres.sh"
    env = {"PATH": os.environ["PATH"], "INFRA_STATE_DIR": str(tmp_path / "state dir")}
    env[variable] = "mlflow'; DROP DATABASE postgres; --"
    started = subprocess.run(["bash", str(script), "start"], env=env, capture_output=True, text=True)
    assert started.returncode == 1
    assert "must be plain identifiers" in started.stderr and "DROP DATABASE" in started.stderr
    assert not (tmp_path / "state dir" / "postgres").exists()


AUTH_SECRET = "eiw-flow-mlflow-auth"


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "matchExpressions are not used here"
    match = selector.get("matchLabels", {})
    return bool(match) and match.items() <= labels.items()


def test_mlflow_server_requires_credentials_from_a_secret():
    from importlib.metadata import entry_points

    from mlflow.environment_variables import (
        MLFLOW_AUTH_ADMIN_PASSWORD,
        MLFLOW_AUTH_ADMIN_USERNAME,
        MLFLOW_AUTH_CONFIG_PATH,
    )

    pod = DOCS[("Deployment", "mlflow")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "--app-name=basic-auth" in container["command"]
    assert "basic-auth" in {e.name for e in entry_points(group="mlflow.app")}  # the installed MLflow has it
    env = env_of(container)
    for name in (
        MLFLOW_AUTH_ADMIN_USERNAME.name,
        MLFLOW_AUTH_ADMIN_PASSWORD.name,
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
    ):
        assert secret_ref(env, name)["name"] == AUTH_SECRET
    # The auth app's config (its database URI holds a password) is a file mounted from the Secret.
    config = Path(env[MLFLOW_AUTH_CONFIG_PATH.name]["value"])
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[str(config.parent)].get("readOnly") is True
    volume = {v["name"]: v for v in pod["volumes"]}[mounts[str(config.parent)]["name"]]
    assert volume["secret"]["secretName"] == AUTH_SECRET
    assert config.name in [item["path"] for item in volume["secret"]["items"]]
    assert volume["secret"]["defaultMode"] & 0o007 == 0  # not world-readable
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"] != 0
    # Its users live in their own database, which the PostgreSQL init script creates.
    (postgres,) = DOCS[("StatefulSet", "postgres")]["spec"]["template"]["spec"]["containers"]
    assert "/docker-entrypoint-initdb.d" in {m["mountPath"] for m in postgres["volumeMounts"]}
    init = DOCS[("ConfigMap", "postgres-init")]["data"]
    assert any("CREATE DATABASE mlflow_auth" in sql for sql in init.values())
    assert "postgres:5432/mlflow_auth" in (REPO / "docs" / "operations.md").read_text()


def test_network_policy_admits_only_ray_pods_and_the_ingress_to_mlflow():
    mlflow_labels = DOCS[("Deployment", "mlflow")]["spec"]["template"]["metadata"]["labels"]
    policies = [doc for (kind, _), doc in DOCS.items() if kind == "NetworkPolicy"]
    (policy,) = [p for p in policies if _selects(p["spec"]["podSelector"], mlflow_labels)]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert [(p["protocol"], p["port"]) for p in rule["ports"]] == [("TCP", 5000)]
    in_namespace = [peer["podSelector"] for peer in rule["from"] if "namespaceSelector" not in peer]
    elsewhere = [peer for peer in rule["from"] if "namespaceSelector" in peer]
    assert in_namespace and all(peer["namespaceSelector"]["matchLabels"] for peer in elsewhere)
    assert all(peer["podSelector"]["matchLabels"] for peer in elsewhere)  # the ingress controller's pods
    # Every Ray pod (long-lived cluster and per-run RayJob, head and workers) is admitted and
    # carries the client credentials; the server's other neighbours are not admitted.
    for kind, spec in ray_cluster_specs():
        templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for template in templates:
            assert any(_selects(s, template["metadata"]["labels"]) for s in in_namespace), kind
            (container,) = template["spec"]["containers"]
            env = env_of(container)
            assert secret_ref(env, "MLFLOW_TRACKING_USERNAME") == {
                "name": "eiw-flow-mlflow",
                "key": "username",
            }
            assert secret_ref(env, "MLFLOW_TRACKING_PASSWORD") == {
                "name": "eiw-flow-mlflow",
                "key": "password",
            }
    postgres_labels = DOCS[("StatefulSet", "postgres")]["spec"]["template"]["metadata"]["labels"]
    assert not any(_selects(s, postgres_labels) for s in in_namespace)
    assert not any(_selects(s, mlflow_labels) for s in in_namespace)
