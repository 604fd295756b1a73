"""The deployment files in cluster/: every manifest parses and has the fields its kind needs, all of them use
the one image and Ray version, and every command they would run works against this checkout.

The last part is what keeps the manifests honest: each entrypoint (the RayJobs', the RayCronJob's, the RayJob
that the CronJob's script creates, the `ray job submit` commands of cluster/README.md and the YAML headers) is
run with `--dry-run` from the repository root in place of the image's working directory, so a renamed flag, a
moved script or a job spec field that no longer exists fails here. The dry runs share one interpreter (each
`python script.py` would spend ~10 s importing torch and Ray) that starts in the background with the module.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
IMAGE_WORKDIR = "/home/ray/janus-batch"  # where cluster/Dockerfile puts the repository
SAMPLE_SLOT = "29650000"  # a CronJob slot: minutes since the epoch (2026-05-17 06:40 UTC)
KUBECTL_CONTAINER = "create-rayjob"  # the one container that does not run the project image


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


FILES = {p.relative_to(CLUSTER).as_posix(): load_all(p) for p in sorted(CLUSTER.rglob("*.yaml"))}
K8S = [(name, doc) for name, docs in FILES.items() for doc in docs if "kind" in doc and "apiVersion" in doc]


def one(kind: str, name: str | None = None) -> dict:
    found = [doc for file, doc in K8S if doc["kind"] == kind and (name is None or file == name)]
    assert len(found) == 1, f"expected one {kind} in {name or 'cluster/'}, found {len(found)}"
    return found[0]


def get(doc: dict, dotted: str):
    value = doc
    for key in dotted.split("."):
        assert isinstance(value, dict) and key in value, f"missing {dotted!r} (at {key!r})"
        value = value[key]
    return value


def cron_rayjob_template() -> str:
    return one("ConfigMap", "cronjob-synthesize.yaml")["data"]["rayjob.yaml"]


def cron_rayjob(slot: str = SAMPLE_SLOT) -> dict:
    """The RayJob the CronJob's script creates for `slot` (the script's sed, in Python; checked against it below)."""
    return yaml.safe_load(cron_rayjob_template().replace("__SLOT__", slot))


# ---- the fields each kind needs ---------------------------------------------------------------------------

API_VERSION = {
    "RayCluster": "ray.io/v1",
    "RayJob": "ray.io/v1",
    "RayCronJob": "ray.io/v1",
    "RayService": "ray.io/v1",
    "CronJob": "batch/v1",
    "ConfigMap": "v1",
    "ServiceAccount": "v1",
    "Role": "rbac.authorization.k8s.io/v1",
    "RoleBinding": "rbac.authorization.k8s.io/v1",
}
RAYJOB_SPEC = ["entrypoint", "submissionMode", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "backoffLimit"]
REQUIRED = {
    "RayCluster": [
        "spec.rayVersion",
        "spec.enableInTreeAutoscaling",
        "spec.headGroupSpec.rayStartParams",
        "spec.headGroupSpec.template.spec.containers",
        "spec.workerGroupSpecs",
    ],
    "RayJob": [f"spec.{key}" for key in RAYJOB_SPEC],
    "RayCronJob": ["spec.schedule", "spec.jobTemplate.rayClusterSpec"] + [f"spec.jobTemplate.{k}" for k in RAYJOB_SPEC],
    "RayService": ["spec.serveConfigV2", "spec.rayClusterConfig"],
    "CronJob": [
        "spec.schedule",
        "spec.concurrencyPolicy",
        "spec.startingDeadlineSeconds",
        "spec.jobTemplate.spec.template.spec.serviceAccountName",
        "spec.jobTemplate.spec.template.spec.restartPolicy",
        "spec.jobTemplate.spec.template.spec.containers",
    ],
    "ConfigMap": ["data"],
    "ServiceAccount": [],
    "Role": ["rules"],
    "RoleBinding": ["subjects", "roleRef.kind", "roleRef.name"],
    # Files that are not Kubernetes objects, by name.
    "aws-cluster.yaml": [
        "cluster_name",
        "max_workers",
        "provider.type",
        "provider.region",
        "docker.image",
        "available_node_types",
        "head_node_type",
    ],
    "runtime_env.yaml": ["env_vars"],
    "jobs/synthesize.yaml": ["kind", "input.path", "model.source", "output.path", "resources.max_actors"],
    "jobs/caption.yaml": ["kind", "input.path", "model.source", "output.path", "resources.max_actors"],
}
CASES = [(f"{file}:{doc['kind']}", doc, doc["kind"]) for file, doc in K8S]
CASES += [("cronjob-synthesize.yaml:ConfigMap:rayjob.yaml", cron_rayjob(), "RayJob")]
CASES += [(name, docs[0], name) for name, docs in FILES.items() if name in REQUIRED]


def test_every_file_is_covered():
    kinds = {doc["kind"] for _, doc in K8S}
    assert kinds == set(API_VERSION), f"kinds without a row in the table: {kinds ^ set(API_VERSION)}"
    for name, docs in FILES.items():
        assert docs, f"{name} is empty"
        assert name in REQUIRED or all("kind" in d and "apiVersion" in d for d in docs), f"{name}: unknown file"
    assert (CLUSTER / "Dockerfile").is_file() and (CLUSTER / "README.md").is_file()


@pytest.mark.parametrize("case,doc,kind", CASES, ids=[c[0] for c in CASES])
def test_required_fields(case, doc, kind):
    if kind in API_VERSION:
        assert doc["apiVersion"] == API_VERSION[kind]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", get(doc, "metadata.name")), "not a DNS label"
    for dotted in REQUIRED[kind]:
        get(doc, dotted)


def rayjob_specs() -> list[tuple[str, dict]]:
    specs = [(f"{file}:{doc['metadata']['name']}", doc["spec"]) for file, doc in K8S if doc["kind"] == "RayJob"]
    specs.append(("cronjob-synthesize.yaml:ConfigMap", cron_rayjob()["spec"]))
    specs.append(("raycronjob-synthesize.yaml:jobTemplate", one("RayCronJob")["spec"]["jobTemplate"]))
    return specs


@pytest.mark.parametrize("where,spec", rayjob_specs(), ids=[w for w, _ in rayjob_specs()])
def test_rayjob_specs(where, spec):
    assert "rayClusterSpec" in spec or "clusterSelector" in spec
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 1, "a retry resumes the run (same run id): allow some"


def test_name_lengths():
    # KubeRay rejects RayJob names over 47 characters; KubeRay 1.7 appends -<10 digits> to a RayCronJob's name
    # for its RayJobs (so <= 36); a CronJob's Job name is its name + 11 characters, at most 63 (so <= 52).
    for _, doc in K8S:
        if doc["kind"] == "RayJob":
            assert len(doc["metadata"]["name"]) <= 47
    assert len(cron_rayjob("9" * 10)["metadata"]["name"]) <= 47
    assert len(one("RayCronJob")["metadata"]["name"]) <= 36
    assert len(one("CronJob")["metadata"]["name"]) <= 52


# ---- one cluster shape, one image, one Ray version --------------------------------------------------------


def cluster_specs() -> list[tuple[str, dict]]:
    specs = []
    for file, doc in K8S:
        if doc["kind"] == "RayCluster":
            specs.append((file, doc["spec"]))
        elif doc["kind"] == "RayJob":
            specs.append((file, doc["spec"]["rayClusterSpec"]))
        elif doc["kind"] == "RayCronJob":
            specs.append((file, doc["spec"]["jobTemplate"]["rayClusterSpec"]))
        elif doc["kind"] == "RayService":  # the same cluster, with the Serve app's token on its GPU workers
            spec = copy.deepcopy(doc["spec"]["rayClusterConfig"])
            containers(gpu_group(spec))[0].pop("env")
            specs.append((file, spec))
    specs.append(("cronjob-synthesize.yaml:ConfigMap", cron_rayjob()["spec"]["rayClusterSpec"]))
    return specs


def gpu_group(spec: dict) -> dict:
    groups = [g for g in spec["workerGroupSpecs"] if "nvidia.com/gpu" in containers(g)[0]["resources"]["limits"]]
    assert len(groups) == 1, "one GPU worker group"
    return groups[0]


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_cluster_shape():
    specs = cluster_specs()
    assert len(specs) == 6
    reference = one("RayCluster")["spec"]
    for where, spec in specs:
        assert spec == reference, f"{where}: the cluster spec differs from raycluster.yaml's"
    assert reference["enableInTreeAutoscaling"] is True
    head = reference["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0", "no model on the head"
    assert not any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in containers(head))
    gpu = gpu_group(reference)
    assert 0 == gpu["minReplicas"] <= gpu["maxReplicas"]
    worker = containers(gpu)[0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1 == worker["resources"]["requests"]["nvidia.com/gpu"]
    for container in containers(head) + containers(gpu):  # S3 keys from a Secret when there is no IRSA
        assert {"secretRef": {"name": "janus-batch-aws", "optional": True}} in container["envFrom"]


def test_job_specs_fit_the_cluster():
    from janus_batch.jobs import KINDS

    gpu = gpu_group(one("RayCluster")["spec"])
    for name in ("jobs/synthesize.yaml", "jobs/caption.yaml"):
        data = FILES[name][0]
        spec = KINDS[data["kind"]].spec.model_validate(data)
        assert spec.run_id is None, f"{name}: the run id comes from the command line"
        assert spec.resources.gpus_per_actor == 1 and spec.resources.max_actors <= gpu["maxReplicas"]
        assert spec.output.path.startswith("s3://") and spec.input.path.startswith("s3://")


def documented_image() -> str:
    found = re.findall(r"docker build -f cluster/Dockerfile -t (\S+) \.", (CLUSTER / "README.md").read_text())
    assert found, "cluster/README.md documents the image with `docker build -f cluster/Dockerfile -t IMAGE .`"
    assert len(set(found)) == 1
    return found[0]


def walk_images(node, path=""):
    if isinstance(node, dict):
        if isinstance(node.get("image"), str) and "name" in node:  # a container
            yield node["name"], node["image"]
        for key, value in node.items():
            yield from walk_images(value, f"{path}.{key}")
    elif isinstance(node, list):
        for item in node:
            yield from walk_images(item, path)


def test_one_image():
    image = documented_image()
    pyproject = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    assert image.rsplit(":", 1)[1] == version, "the image tag is the package version"
    seen = 0
    for _, doc in K8S + [("template", cron_rayjob())]:
        for container, used in walk_images(doc):
            if container != KUBECTL_CONTAINER:
                assert used == image, f"container {container} runs {used}, not {image}"
                seen += 1
    assert seen == 2 * len(cluster_specs()), "a head and a GPU worker per cluster spec"
    assert FILES["aws-cluster.yaml"][0]["docker"]["image"] == image
    assert f"-t {image} ." in (CLUSTER / "Dockerfile").read_text()


def dockerfile() -> str:
    return (CLUSTER / "Dockerfile").read_text()


def test_dockerfile():
    text = dockerfile()
    base = re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-gpu\s*$", text, re.M)
    assert base, "FROM rayproject/ray:X.Y.Z-py3NN-gpu"
    ray_version, python_minor = base.group(1), int(base.group(2))
    pin = re.search(r'"ray\[[^\]]*\]==(\d+\.\d+)\.\*"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert ray_version.startswith(pin + "."), f"image Ray {ray_version} vs the pin {pin}.*"
    assert python_minor >= 10, "requires-python >= 3.10"
    for where, spec in cluster_specs():
        assert spec["rayVersion"] == ray_version, where
    assert re.search(rf"^WORKDIR {re.escape(IMAGE_WORKDIR)}\s*$", text, re.M)
    copied = {m.group(1) for m in re.finditer(r"^COPY (?:--\S+ )*(.+?) \S+\s*$", text, re.M)}
    copied = {part for line in copied for part in line.split()}
    for needed in ("pyproject.toml", "README.md", "janus_batch", "pipelines", "cluster/jobs"):
        assert needed in copied, f"the image needs {needed}"
    assert re.search(r'pip install [^\n]*"\.\[ray\]"', text)


def dockerfile_env() -> dict[str, str]:
    return dict(re.findall(r"(HF_HOME|JANUS_BATCH_CACHE)=(\S+)", dockerfile()))


def test_caches_on_the_volume():
    env = dockerfile_env()
    assert set(env) == {"HF_HOME", "JANUS_BATCH_CACHE"}
    worker = containers(gpu_group(one("RayCluster")["spec"]))[0]
    cache = next(m["mountPath"] for m in worker["volumeMounts"] if m["name"] == "cache")
    assert all(path.startswith(cache + "/") for path in env.values())


# ---- RayService, runtime_env, the AWS launcher ------------------------------------------------------------


def test_rayservice_serve_config():
    from ray.serve.schema import ServeDeploySchema

    from janus_batch.serve import ServeArgs

    service = one("RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert config == yaml.safe_load((ROOT / "janus_batch" / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    gpu = gpu_group(service["spec"]["rayClusterConfig"])
    for app in config["applications"]:
        args = ServeArgs.model_validate(app["args"])
        assert args.num_gpus <= containers(gpu)[0]["resources"]["limits"]["nvidia.com/gpu"]
        assert args.max_replicas <= gpu["maxReplicas"]


def test_runtime_env():
    from ray.runtime_env import RuntimeEnv

    data = FILES["runtime_env.yaml"][0]
    RuntimeEnv(**data)
    assert data["env_vars"] == dockerfile_env(), "the same caches as the image"


def test_aws_launcher():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = FILES["aws-cluster.yaml"][0]
    validate_config(prepare_config(config))  # Ray's own schema, after Ray fills in its AWS defaults
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and "InstanceMarketOptions" not in head["node_config"]
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert len(workers) == 1
    gpu = workers[0]
    assert gpu["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert 0 == gpu["min_workers"] <= gpu["max_workers"] <= config["max_workers"]
    assert "--gpus all" in gpu["docker"]["worker_run_options"]
    assert gpu["max_workers"] == gpu_group(one("RayCluster")["spec"])["maxReplicas"]


# ---- the CronJob that creates a RayJob --------------------------------------------------------------------


def creator() -> dict:
    (container,) = get(one("CronJob"), "spec.jobTemplate.spec.template.spec.containers")
    assert container["name"] == KUBECTL_CONTAINER
    return container


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_cronjob_wiring():
    cron = one("CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert cron["spec"]["startingDeadlineSeconds"] > 0
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    env = env_of(creator())
    # The Job's name, hence the slot, from the downward API.
    assert env["JOB_NAME"] == {"fieldRef": {"fieldPath": "metadata.labels['batch.kubernetes.io/job-name']"}}
    assert env["NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["CRONJOB_NAME"] == cron["metadata"]["name"]
    # The RayJob template: the ConfigMap in this file, mounted where TEMPLATE points.
    configmap = one("ConfigMap", "cronjob-synthesize.yaml")
    (volume,) = pod["volumes"]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    (mount,) = creator()["volumeMounts"]
    assert mount["name"] == volume["name"]
    (key,) = configmap["data"]
    assert env["TEMPLATE"] == f"{mount['mountPath']}/{key}"
    # RBAC: the pod's ServiceAccount may create and get RayJobs, in its namespace.
    account, role, binding = one("ServiceAccount"), one("Role"), one("RoleBinding")
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get"]} in role["rules"]
    assert binding["roleRef"] == dict(apiGroup="rbac.authorization.k8s.io", kind="Role", name=role["metadata"]["name"])
    assert {"kind": "ServiceAccount", "name": account["metadata"]["name"]} in binding["subjects"]
    # Its RayJobs must not be named like the CronJob's Jobs: KubeRay names the submitter Job after the RayJob.
    assert not cron_rayjob()["metadata"]["name"].startswith(cron["metadata"]["name"] + "-")


FAKE_KUBECTL = """#!/bin/sh
printf '%s\\n' "$*" > "$FAKE_DIR/args"
cat > "$FAKE_DIR/stdin"
case "$FAKE_KUBECTL" in
  ok) echo "rayjob.ray.io/created" ;;
  exists) echo 'Error from server (AlreadyExists): error when creating "STDIN": rayjobs.ray.io "x" already exists' >&2
          exit 1 ;;
  *) echo 'Error from server (Forbidden): rayjobs.ray.io is forbidden' >&2; exit 1 ;;
esac
"""


def run_creator(tmp_path: Path, job_name: str, kubectl: str) -> subprocess.CompletedProcess:
    """The CronJob pod's own command, with a fake kubectl on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "kubectl").write_text(FAKE_KUBECTL)
    (bin_dir / "kubectl").chmod(0o755)
    template = tmp_path / "rayjob.yaml"
    template.write_text(cron_rayjob_template())
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "JOB_NAME": job_name,
        "CRONJOB_NAME": env_of(creator())["CRONJOB_NAME"],
        "NAMESPACE": "batch",
        "TEMPLATE": str(template),
        "FAKE_KUBECTL": kubectl,
        "FAKE_DIR": str(tmp_path),
    }
    return subprocess.run(creator()["command"], env=env, capture_output=True, text=True, timeout=30)


def test_cronjob_script_creates_the_slot_rayjob(tmp_path):
    cron_name = one("CronJob")["metadata"]["name"]
    done = run_creator(tmp_path, f"{cron_name}-{SAMPLE_SLOT}", "ok")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "args").read_text().split() == ["create", "-n", "batch", "-f", "-"]
    created = yaml.safe_load((tmp_path / "stdin").read_text())
    assert created == cron_rayjob(SAMPLE_SLOT)
    assert created["metadata"]["name"] == f"janus-synthesize-{SAMPLE_SLOT}"
    assert f"--run-id synthesize-{SAMPLE_SLOT}" in created["spec"]["entrypoint"]
    assert "__SLOT__" not in (tmp_path / "stdin").read_text()


def test_cronjob_script_second_firing_is_a_no_op(tmp_path):
    done = run_creator(tmp_path, f"{one('CronJob')['metadata']['name']}-{SAMPLE_SLOT}", "exists")
    assert done.returncode == 0, done.stderr
    assert "AlreadyExists" in done.stdout and f"slot {SAMPLE_SLOT} already has its RayJob" in done.stdout


def test_cronjob_script_fails_on_other_errors(tmp_path):
    cron_name = one("CronJob")["metadata"]["name"]
    done = run_creator(tmp_path, f"{cron_name}-{SAMPLE_SLOT}", "forbidden")
    assert done.returncode != 0 and "Forbidden" in done.stderr
    for bad in ("manual-run", f"{cron_name}-abc", f"other-{SAMPLE_SLOT}", f"{cron_name}-"):
        (tmp_path / "args").unlink(missing_ok=True)
        done = run_creator(tmp_path, bad, "ok")
        assert done.returncode != 0, bad
        assert not (tmp_path / "args").exists(), f"{bad}: kubectl must not run"


# ---- every entrypoint, dry-run against this checkout ------------------------------------------------------


def documented_commands() -> list[tuple[str, str]]:
    """`ray job submit ... -- python ...` in cluster/README.md code blocks and in the YAML files' comments."""
    found = []
    readme = (CLUSTER / "README.md").read_text()
    for block in re.findall(r"```bash\n(.*?)```", readme, re.S):
        found += [("README.md", line) for line in block.replace("\\\n", " ").splitlines()]
    for path in sorted(CLUSTER.glob("*.yaml")):
        comments = "\n".join(line.lstrip()[1:] for line in path.read_text().splitlines() if line.lstrip()[:1] == "#")
        found += [(path.name, line) for line in comments.replace("\\\n", " ").splitlines()]
    found = [(where, " ".join(line.split())) for where, line in found]
    return [(where, line) for where, line in found if "ray job submit" in line and " -- python " in line]


def entrypoints() -> list[tuple[str, str]]:
    found = [(f"{f}:{d['metadata']['name']}", d["spec"]["entrypoint"]) for f, d in K8S if d["kind"] == "RayJob"]
    found.append(("raycronjob-synthesize.yaml", one("RayCronJob")["spec"]["jobTemplate"]["entrypoint"]))
    found.append(("cronjob-synthesize.yaml:ConfigMap", cron_rayjob()["spec"]["entrypoint"]))
    for i, (where, line) in enumerate(documented_commands()):
        found.append((f"{where}:submit{i}", line.split(" -- ", 1)[1]))
    return found


ENTRYPOINTS = entrypoints()
IDS = [where for where, _ in ENTRYPOINTS]


def local_argv(entrypoint: str) -> list[str]:
    """The entrypoint's argv with the image's working directory replaced by this checkout."""
    argv = shlex.split(entrypoint, comments=True)
    assert argv[0] == "python", "entrypoints run `python SCRIPT ...`"
    return [arg.replace(IMAGE_WORKDIR, str(ROOT)) for arg in argv[1:]]


def option(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def test_entrypoints_found():
    assert len(ENTRYPOINTS) >= 6
    assert sum(where.startswith("README.md") for where in IDS) == 2
    assert {where.split(":")[0] for where, _ in documented_commands()} == {
        "README.md",
        "aws-cluster.yaml",
        "raycluster.yaml",
        "runtime_env.yaml",
    }
    for _, entrypoint in ENTRYPOINTS:
        argv = local_argv(entrypoint)
        assert Path(argv[0]).is_file() and argv[0].endswith(".py") and "/pipelines/" in f"/{argv[0]}"
        assert option(argv, "--config") and option(argv, "--run-id"), "every run names its spec and its run id"


def load_parser(script: str):
    import importlib.util

    path = ROOT / script if not Path(script).is_absolute() else Path(script)
    spec = importlib.util.spec_from_file_location(f"_cluster_test_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parser()


@pytest.mark.parametrize("entrypoint", [e for _, e in ENTRYPOINTS], ids=IDS)
def test_entrypoint_flags_exist(entrypoint):
    argv = local_argv(entrypoint)
    known = load_parser(argv[0])._option_string_actions
    for arg in argv[1:]:
        if arg.startswith("--"):
            assert arg.split("=", 1)[0] in known, f"{argv[0]} has no {arg}"
    assert Path(option(argv, "--config")).is_file()


def test_ray_job_submit_flags_exist():
    from ray.dashboard.modules.job.cli import submit

    known = {opt for param in submit.params for opt in param.opts}
    for where, line in documented_commands():
        submit_args = shlex.split(line.split(" -- ", 1)[0].split("ray job submit", 1)[1])
        for arg in submit_args:
            if arg.startswith("--"):
                assert arg in known, f"{where}: `ray job submit` has no {arg}"
        if "--runtime-env" in submit_args:
            assert (ROOT / option(submit_args, "--runtime-env")).is_file()


DRIVER = r"""
import contextlib, io, json, runpy, sys, traceback
commands_path, results_path = sys.argv[1:3]  # read now: sys.argv is each command's below
commands, results = json.load(open(commands_path)), []
for argv in commands:
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv = argv
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:
            code = 1
            traceback.print_exc()
    results.append({"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
json.dump(results, open(results_path, "w"))
"""


class DryRuns:
    """Every entrypoint with --dry-run, in one background interpreter started from the repository root."""

    def __init__(self, tmp: Path):
        self.commands = [local_argv(entrypoint) + ["--dry-run"] for _, entrypoint in ENTRYPOINTS]
        (tmp / "commands.json").write_text(json.dumps(self.commands))
        self.output = tmp / "results.json"
        self.started = datetime.now(timezone.utc)
        self.process = subprocess.Popen(
            [sys.executable, "-c", DRIVER, str(tmp / "commands.json"), str(self.output)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.results = None

    def result(self, index: int) -> dict:
        if self.results is None:
            log, _ = self.process.communicate(timeout=300)
            assert self.process.returncode == 0 and self.output.exists(), log[-3000:]
            self.results = json.loads(self.output.read_text())
            self.finished = datetime.now(timezone.utc)
        return self.results[index]


@pytest.fixture(scope="module", autouse=True)
def dry_runs(tmp_path_factory):
    runs = DryRuns(tmp_path_factory.mktemp("dry-runs"))
    yield runs
    if runs.process.poll() is None:
        runs.process.kill()
        runs.process.wait()


@pytest.mark.parametrize("index", range(len(ENTRYPOINTS)), ids=IDS)
def test_entrypoint_dry_run(dry_runs, index):
    argv = dry_runs.commands[index]
    result = dry_runs.result(index)
    assert result["returncode"] == 0, f"{shlex.join(argv)}\n{result['stderr'][-3000:]}"
    printed, plan = result["stdout"].split("\nplan (", 1)
    spec = json.loads(printed[printed.index("{") :])
    run_id = option(argv, "--run-id")
    if "{now:" in run_id:  # resolved in UTC when the driver starts, between these two instants
        expected = {run_id.format(now=t) for t in (dry_runs.started, dry_runs.finished)}
        assert spec["run_id"] in expected, f"{run_id} resolved to {spec['run_id']}, expected one of {expected}"
    else:
        assert spec["run_id"] == run_id
    config = yaml.safe_load(Path(option(argv, "--config")).read_text())
    assert spec["kind"] == config["kind"] and plan.startswith(f"{config['kind']}):")
    assert spec["input"]["path"] == config["input"]["path"]
    assert spec["model"]["source"] == config["model"]["source"]
    assert spec["output"]["path"] == config["output"]["path"]
    assert f"to {config['output']['path']}/{spec['run_id']}/data" in plan, "every run writes under OUTPUT/RUN_ID/"
