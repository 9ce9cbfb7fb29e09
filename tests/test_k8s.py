"""k8s/: every overlay renders with kustomize (kubectl's built-in), every object validates
against the Kubernetes schemas, and names, ports, paths and CLI flags agree across objects."""
import re
import shlex
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
K8S_VERSION = "1.33"
KUSTOMIZATIONS = ["base", "overlays/dev", "overlays/prod", "training"]
POD_KINDS = {"Deployment", "Job", "CronJob", "TFJob"}


def render(path: str) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(K8S / path)], check=True,
                         capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module", params=KUSTOMIZATIONS)
def rendered(request):
    return request.param, render(request.param)


def pod_specs(obj: dict) -> list[tuple[str, dict]]:
    """(where, pod spec) for every pod template an object carries."""
    kind, spec = obj["kind"], obj.get("spec", {})
    if kind in ("Deployment", "Job"):
        return [(kind, spec["template"]["spec"])]
    if kind == "CronJob":
        return [(kind, spec["jobTemplate"]["spec"]["template"]["spec"])]
    if kind == "TFJob":
        return [(f"TFJob/{role}", r["template"]["spec"]) for role, r in spec["tfReplicaSpecs"].items()]
    return []


def containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


def by_kind(objs, kind):
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def test_objects_validate_against_kubernetes_schemas(rendered):
    name, objs = rendered
    assert objs, f"{name} rendered nothing"
    for obj in objs:
        if obj["kind"] == "TFJob":
            continue  # a CRD: checked structurally in test_tfjob_follows_kubeflow_conventions
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_pods_are_hardened_and_bounded(rendered):
    name, objs = rendered
    for obj in objs:
        for where, pod in pod_specs(obj):
            label = f"{name}: {where} {obj['metadata']['name']}"
            assert pod["securityContext"]["runAsNonRoot"] is True, label
            for c in containers(pod):
                sc = c["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True, f"{label}/{c['name']}"
                assert sc["allowPrivilegeEscalation"] is False, f"{label}/{c['name']}"
                for part in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(c["resources"][part]), f"{label}/{c['name']} {part}"
                # read-only root: anything that writes scratch files needs a writable /tmp
                assert any(m["mountPath"] == "/tmp" for m in c.get("volumeMounts", [])), label


def test_references_resolve(rendered):
    name, objs = rendered
    pvcs, cms = by_kind(objs, "PersistentVolumeClaim"), by_kind(objs, "ConfigMap")
    for obj in objs:
        for where, pod in pod_specs(obj):
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for v in volumes.values():
                if "persistentVolumeClaim" in v and obj["kind"] != "TFJob":
                    assert v["persistentVolumeClaim"]["claimName"] in pvcs, (name, where)
                if "configMap" in v:
                    assert v["configMap"]["name"] in cms, (name, where)
            for c in containers(pod):
                for m in c.get("volumeMounts", []):
                    assert m["name"] in volumes, (name, where, c["name"], m["name"])


def test_services_select_pods_and_ports(rendered):
    name, objs = rendered
    deployments = by_kind(objs, "Deployment")
    for svc in by_kind(objs, "Service").values():
        selected = [d for d in deployments.values()
                    if svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(selected) == 1, f"{name}: Service {svc['metadata']['name']} selects {len(selected)} Deployments"
        ports = {p["name"]: p["containerPort"] for c in selected[0]["spec"]["template"]["spec"]["containers"]
                 for p in c["ports"]}
        for p in svc["spec"]["ports"]:
            target = p["targetPort"]
            assert target in ports or target in ports.values(), (name, svc["metadata"]["name"], target)
    for kind in ("HorizontalPodAutoscaler", "PodDisruptionBudget"):
        for obj in by_kind(objs, kind).values():
            if kind == "HorizontalPodAutoscaler":
                assert obj["spec"]["scaleTargetRef"]["name"] in deployments
            else:
                labels = deployments["retrieval"]["spec"]["template"]["metadata"]["labels"]
                assert obj["spec"]["selector"]["matchLabels"].items() <= labels.items()


def _args(container: dict) -> dict:
    return dict(a.lstrip("-").split("=", 1) for a in container.get("args", []) if a.startswith("--") and "=" in a)


@pytest.mark.parametrize("overlay", KUSTOMIZATIONS[:3])
def test_tf_serving_matches_the_official_image_conventions(overlay):
    objs = render(overlay)
    dep = by_kind(objs, "Deployment")["tf-serving"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    image, tag = c["image"].rsplit(":", 1)
    assert image == "tensorflow/serving" and tag.startswith("2.20"), c["image"]
    assert "command" not in c  # the image's entrypoint supplies ports, name and base path
    env = {e["name"]: e["value"] for e in c["env"]}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": 8500, "http": 8501}  # the entrypoint's --port / --rest_api_port
    args = _args(c)
    assert args["enable_grpc_healthcheck_service"] == "true"
    # readiness asks for the served model's metadata, which exists only once it is AVAILABLE
    assert c["readinessProbe"]["httpGet"]["path"] == f"/v1/models/{env['MODEL_NAME']}/metadata"
    # both config files are ConfigMap keys mounted where the flags point
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    cm = by_kind(objs, "ConfigMap")["tf-serving-config"]["data"]

    def config_file(flag):
        return cm[Path(args[flag]).relative_to(mount["mountPath"]).as_posix()]

    assert "/monitoring/prometheus/metrics" in config_file("monitoring_config_file")
    models = config_file("model_config_file")
    assert re.search(r'name: "(\S+)"', models).group(1) == env["MODEL_NAME"]
    base_path = re.search(r'base_path: "(\S+)"', models).group(1)
    assert base_path == f"{env['MODEL_BASE_PATH']}/{env['MODEL_NAME']}"
    assert "num_versions: 2" in models
    assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(ports["http"])


def test_retrieval_service_points_at_tf_serving_and_the_shared_layout():
    objs = render("base")
    deps, svcs = by_kind(objs, "Deployment"), by_kind(objs, "Service")
    (c,) = deps["retrieval"]["spec"]["template"]["spec"]["containers"]
    args = _args(c)
    host, port = args["model-address"].split(":")
    assert host in svcs and int(port) in {p["port"] for p in svcs[host]["spec"]["ports"]}
    assert int(port) == 8500
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert int(args["port"]) == ports["grpc"] and int(args["metrics-port"]) == ports["metrics"]
    assert c["readinessProbe"]["grpc"]["port"] == ports["grpc"]
    assert c["livenessProbe"]["grpc"] == {"port": ports["grpc"], "service": "liveness"}
    grace = deps["retrieval"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(args["drain-delay"]) + float(args["drain-seconds"])
    # the schema hash check needs the tower's metadata beside the remote model address
    assert args["model"] == "/artifacts/models/query_tower"
    # the index the service reads is the one the index jobs publish, under the same mount
    jobs = by_kind(objs, "Job")
    assert _args(jobs["index-build"]["spec"]["template"]["spec"]["containers"][0])["output"] == args["index"]
    embed_out = _args(jobs["embed-documents"]["spec"]["template"]["spec"]["containers"][0])["output"]
    assert _args(jobs["index-build"]["spec"]["template"]["spec"]["containers"][0])["embeddings"] == embed_out
    # TF Serving serves MODEL_BASE_PATH/MODEL_NAME from the volume's models/ directory, the
    # same directory the embed job reads the doc tower from
    tfs = deps["tf-serving"]["spec"]["template"]["spec"]["containers"][0]
    models_mount = next(m for m in tfs["volumeMounts"] if m["name"] == "artifacts")
    assert models_mount["subPath"] == "models"
    assert _args(jobs["embed-documents"]["spec"]["template"]["spec"]["containers"][0])["model"].startswith(
        "/artifacts/models/")


def test_ebr_commands_in_manifests_parse_with_the_real_cli():
    from ebr.cli import build_parser

    parser = build_parser()
    seen = 0
    for path in KUSTOMIZATIONS[:3]:
        for obj in render(path):
            for where, pod in pod_specs(obj):
                for c in containers(pod):
                    if c.get("command") == ["ebr"]:
                        args = parser.parse_args(c["args"])  # SystemExit on an unknown flag
                        assert callable(args.func)
                        seen += 1
    assert seen >= 4


def parse_trainer_args(args: list[str]):
    """What `python -m trainer.task` makes of these flags; unknown config keys raise."""
    import argparse

    from trainer import task

    parser = argparse.ArgumentParser()
    task.add_arguments(parser)
    return task.config_from_args(parser.parse_args(args))


def test_tfjob_follows_kubeflow_conventions():
    (job,) = render("training")
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "TFJob"
    specs = job["spec"]["tfReplicaSpecs"]
    assert set(specs) <= {"Chief", "Worker", "PS", "Evaluator"} and specs["Chief"]["replicas"] == 1
    for role, spec in specs.items():
        (c,) = spec["template"]["spec"]["containers"]
        assert c["name"] == "tensorflow", role
        assert {"name": "tfjob-port", "containerPort": 2222} in c["ports"], role
        assert c["command"] == ["python", "-m", "trainer.task"]
        config = parse_trainer_args(c["args"])
        assert config.data_dir and config.model_dir


def test_vertex_custom_job_runs_trainer_task():
    spec = yaml.safe_load((K8S / "training" / "vertex-customjob.yaml").read_text())
    pools = spec["jobSpec"]["workerPoolSpecs"]
    assert pools[0]["replicaCount"] == 1  # pool 0 is the chief
    assert spec["jobSpec"]["baseOutputDirectory"]["outputUriPrefix"].startswith("gs://")
    for pool in pools:
        pkg = pool["pythonPackageSpec"]
        assert pkg["pythonModule"] == "trainer.task"
        config = parse_trainer_args(pkg["args"])
        assert config.data_dir.startswith("gs://")
        # the towers go where prod's TF Serving polls (k8s/overlays/prod)
        assert config.model_dir == "gs://YOUR_BUCKET/ebr/models"


def test_prod_keeps_every_artifact_in_the_bucket():
    """prod reads and writes gs:// only: no stage of it uses the local /artifacts volume for
    an artifact (k8s/overlays/prod)."""
    docs = render("overlays/prod")
    args = []
    for d in docs:
        pod = d.get("spec", {}).get("template", {}).get("spec") or \
            d.get("spec", {}).get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec")
        for c in (pod or {}).get("containers", []) + (pod or {}).get("initContainers", []):
            args += [a for a in c.get("args", []) if a.startswith("--") and "=" in a]
    paths = [a.split("=", 1)[1] for a in args if a.split("=", 1)[0] in
             ("--model", "--corpus", "--output", "--embeddings", "--index")]
    assert len(paths) >= 10 and all(p.startswith("gs://YOUR_BUCKET/ebr/") for p in paths), paths
    config = by_kind(docs, "ConfigMap")["tf-serving-config"]["data"]["models.config"]
    assert 'base_path: "gs://YOUR_BUCKET/ebr/models/query_tower"' in config


def test_dockerfile_agrees_with_the_manifests():
    text = (ROOT / "Dockerfile").read_text()
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", text, re.M) for p in line.split()}
    (c,) = by_kind(render("base"), "Deployment")["retrieval"]["spec"]["template"]["spec"]["containers"]
    assert exposed == {p["containerPort"] for p in c["ports"]}
    user = re.findall(r"^USER (\S+)$", text, re.M)[-1]
    pod = by_kind(render("base"), "Deployment")["retrieval"]["spec"]["template"]["spec"]
    assert int(user) == pod["securityContext"]["runAsUser"] != 0
    # every package the image installs exists, so `pip install .` in the image sees all of them
    for src in re.findall(r"^COPY (\S+) \S+$", text, re.M):
        for part in shlex.split(src):
            assert (ROOT / part).exists(), part
