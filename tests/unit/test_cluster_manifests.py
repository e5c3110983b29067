"""cluster/: the AWS launcher config passes Ray's own validation, KubeRay manifests parse and match serve_config.yaml,
and every Ray version and image agrees with the pin in pyproject.toml."""
import re

import pytest
import yaml

from conftest import REPO

CLUSTER = REPO / "cluster"
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))


def ray_pin() -> str:
    text = (REPO / "pyproject.toml").read_text()
    return re.search(r'"ray\[[^\]]*\]==([0-9.]+)\.\*"', text).group(1)  # e.g. "2.60"


def manifest(name):
    return yaml.safe_load((CLUSTER / "kuberay" / name).read_text())


def test_aws_config_passes_ray_cluster_config_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` does before it touches AWS
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))  # a CPU head
    gpu = [t for name, t in types.items() if name != config["head_node_type"]]
    assert gpu and all(t["node_config"]["InstanceType"].startswith(("g5", "p4d")) for t in gpu)
    assert all(t["min_workers"] == 0 < t["max_workers"] for t in gpu)  # autoscaling from zero
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())  # S3 without keys


def test_bad_aws_config_is_rejected_by_the_same_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    config["head_node_type"] = "no-such-type"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("path", KUBERAY, ids=[p.name for p in KUBERAY])
def test_kuberay_manifests_parse(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    api = {"RayCluster": "ray.io/v1", "RayJob": "ray.io/v1", "RayService": "ray.io/v1",
           "NetworkPolicy": "networking.k8s.io/v1"}
    assert len(docs) == 1 and docs[0]["metadata"]["name"]
    assert api.get(docs[0]["kind"]) == docs[0]["apiVersion"]


def test_kinds_and_entrypoints():
    kinds = {p.name: yaml.safe_load(p.read_text())["kind"] for p in KUBERAY}
    assert sorted(kinds.values()) == ["NetworkPolicy", "RayCluster", "RayJob", "RayJob", "RayService"]
    cluster = manifest("raycluster.yaml")
    assert any(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
               for g in cluster["spec"]["workerGroupSpecs"])
    for name, script in (("rayjob-train.yaml", "jobs/train.py"), ("rayjob-tune.yaml", "jobs/tune.py")):
        job = manifest(name)
        assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
        assert script in job["spec"]["entrypoint"]
        config = re.search(r"--config \S*(jobs/configs/\S+\.yaml)", job["spec"]["entrypoint"]).group(1)
        assert (REPO / config).is_file()


def test_rayservice_application_is_serve_config_yaml_with_only_the_checkpoint_changed():
    local = yaml.safe_load((REPO / "serve_config.yaml").read_text())["applications"]
    served = yaml.safe_load(manifest("rayservice.yaml")["spec"]["serveConfigV2"])["applications"]
    assert served[0]["args"]["checkpoint"].startswith("s3://")
    for apps in (local, served):
        apps[0]["args"].pop("checkpoint")
    assert served == local


def test_ray_versions_and_images_agree_with_the_pin():
    pin = ray_pin()
    versions = [yaml.safe_load(p.read_text())["spec"].get("rayVersion") for p in KUBERAY]
    service = manifest("rayservice.yaml")["spec"]["rayClusterConfig"]["rayVersion"]
    for version in [v for v in versions if v] + [service]:
        assert version.startswith(pin + "."), version
    images = re.findall(r"rayproject/ray:([0-9.]+)", (CLUSTER / "aws.yaml").read_text() +
                        (CLUSTER / "Dockerfile").read_text())
    assert images and all(tag.startswith(pin + ".") for tag in images), images
    assert len(set(images) | {v for v in versions if v} | {service}) == 1  # one exact Ray version everywhere


def test_the_shipped_sweep_runs_on_a_cluster_whose_gpu_workers_start_at_zero():
    """The RayJob's overrides must not depend on GPUs existing when the sweep starts (the group starts at 0)."""
    import shlex

    from genderid.config import load_config
    from genderid.tune_ray import concurrency

    entry = shlex.split(manifest("rayjob-tune.yaml")["spec"]["entrypoint"])
    config_path = REPO / re.search(r"(jobs/configs/\S+\.yaml)", entry[entry.index("--config") + 1]).group(1)
    config = load_config(config_path, entry[entry.index("--config") + 2:])
    head_only = {"CPU": 8}
    trials = concurrency(config, head_only)
    group = next(g for g in manifest("raycluster.yaml")["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    gpus = int(group["maxReplicas"]) * int(group["template"]["spec"]["containers"][0]["resources"]["limits"]
                                           ["nvidia.com/gpu"])
    assert 1 <= trials and trials * config.scaling.num_workers * config.scaling.gpus_per_worker <= gpus


def _pod_templates(doc):
    """Every pod template of a RayCluster or RayService manifest."""
    spec = doc["spec"].get("rayClusterConfig", doc["spec"])
    return [spec["headGroupSpec"]["template"], *(g["template"] for g in spec.get("workerGroupSpecs", []))]


def test_safe_defaults_local_loopback_cluster_hardened():
    assert yaml.safe_load((REPO / "serve_config.yaml").read_text())["http_options"]["host"] == "127.0.0.1"
    served = yaml.safe_load(manifest("rayservice.yaml")["spec"]["serveConfigV2"])
    assert served["http_options"]["host"] == "0.0.0.0"  # in the cluster, behind the NetworkPolicy
    for name in ("raycluster.yaml", "rayservice.yaml"):
        for template in _pod_templates(manifest(name)):
            assert template["spec"]["securityContext"]["runAsNonRoot"] is True, name
            for container in template["spec"]["containers"]:
                assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
    # Serving only reads checkpoints: its pods use another (read-only) service account than training's.
    serving = {t["spec"]["serviceAccountName"] for t in _pod_templates(manifest("rayservice.yaml"))}
    training = {t["spec"]["serviceAccountName"] for t in _pod_templates(manifest("raycluster.yaml"))}
    assert serving == {"genderid-s3-readonly"} and serving.isdisjoint(training)
    policy = manifest("networkpolicy.yaml")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert all(rule.get("from") for rule in policy["spec"]["ingress"])  # no rule open to everyone

    aws = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    head = " ".join(aws["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    ssh = [p for p in aws["provider"]["security_group"]["IpPermissions"] if p["FromPort"] == 22]
    assert ssh and all(r["CidrIp"] != "0.0.0.0/0" for p in ssh for r in p["IpRanges"])

    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv/", "runs/", ".git/"} <= set(ignored)


def test_the_grafana_dashboard_charts_every_application_metric():
    import json

    dashboard = json.loads((CLUSTER / "grafana" / "genderid.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    source = (REPO / "genderid" / "serve_metrics.py").read_text()
    metrics = set(re.findall(r'(?:Counter|Histogram)\("(genderid_\w+)"', source))
    assert len(metrics) == 8
    for metric in metrics:  # as Ray exports them: a `ray_` prefix, counters with `_total`
        assert f"ray_{metric}" in exprs, metric
