"""infra/ checked offline: every manifest against the Kubernetes JSON schemas of kubernetes-validate
and, for KubeRay's ray.io/v1 kinds, a minimal schema of the fields we use whose pod templates are the
real Kubernetes ones (schemas.py); then the rules and cross-references a schema can't express:
the lock-down (token auth, NetworkPolicies, securityContext, no API tokens), autoscaling bounds, the
GPU group, nothing exposed, MLflow auth on, no secret values or credentials on a command line, and
every job module, config file, image and COPY source that infra/ names existing in the repo."""
from __future__ import annotations

import configparser
import copy
import dataclasses
import importlib
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator
from packaging.requirements import Requirement

import schemas

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
NAMESPACE = "vaepipe"
IMAGE = "ghcr.io/example/vaepipe:0.1.0"
RAY_AUTH_SECRET = ("vaepipe-ray-auth", "auth_token")     # the key KubeRay's authOptions.secretName expects
OPERATOR_NAMESPACE = "kuberay-system"

MANIFEST_FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))
DOCS = [(p, i, d) for p in MANIFEST_FILES for i, d in enumerate(yaml.safe_load_all(p.read_text())) if d is not None]
TEXT_FILES = sorted(p for p in INFRA.rglob("*") if p.is_file())
README = (INFRA / "README.md").read_text()
DOCKERFILE = INFRA / "docker" / "Dockerfile"
CRONTAB = INFRA / "local" / "crontab.example"


def doc_id(item) -> str:
    path, i, doc = item
    return f"{path.relative_to(INFRA)}#{i}:{doc.get('kind')}"


def of_kind(kind: str) -> list[dict]:
    return [d for _, _, d in DOCS if d.get("kind") == kind]


def one(kind: str, name: str) -> dict:
    found = [d for d in of_kind(kind) if d["metadata"].get("name") == name]
    assert len(found) == 1, f"expected one {kind} {name!r} in infra/, found {len(found)}"
    return found[0]


def ray_cluster_specs() -> list[tuple[str, dict]]:
    """The RayCluster's spec, every RayJob's rayClusterSpec and every RayService's rayClusterConfig."""
    specs = [(f"RayCluster {d['metadata']['name']}", d["spec"]) for d in of_kind("RayCluster")]
    specs += [(f"RayJob {d['metadata'].get('name') or d['metadata']['generateName']}", d["spec"]["rayClusterSpec"])
              for d in of_kind("RayJob") if "rayClusterSpec" in d["spec"]]
    specs += [(f"RayService {d['metadata']['name']}", d["spec"]["rayClusterConfig"]) for d in of_kind("RayService")]
    return specs


def ray_pod_templates(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]


def pod_templates(doc: dict) -> list[dict]:
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind == "Deployment":
        return [spec["template"]]
    if kind == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]]
    if kind == "RayCluster":
        return ray_pod_templates(spec)
    if kind == "RayJob":
        cluster = ray_pod_templates(spec["rayClusterSpec"]) if "rayClusterSpec" in spec else []
        return cluster + ([spec["submitterPodTemplate"]] if "submitterPodTemplate" in spec else [])
    if kind == "RayService":
        return ray_pod_templates(spec["rayClusterConfig"])
    return []


def all_pod_templates() -> list[dict]:
    return [t for _, _, d in DOCS for t in pod_templates(d)]


def job_pod_templates() -> list[dict]:
    """Pods of a Job: the CronJob's and the RayJob submitters' (both run `ray job submit`)."""
    return ([d["spec"]["jobTemplate"]["spec"]["template"] for d in of_kind("CronJob")] +
            [d["spec"]["submitterPodTemplate"] for d in of_kind("RayJob") if "submitterPodTemplate" in d["spec"]])


def ray_node_templates() -> list[dict]:
    return [t for _, spec in ray_cluster_specs() for t in ray_pod_templates(spec)]


def component(template: dict) -> str | None:
    return template["metadata"]["labels"].get("app.kubernetes.io/component")


def containers(template: dict) -> list[dict]:
    return template["spec"]["containers"] + template["spec"].get("initContainers", [])


def env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def strings(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return []


def joined(text: str) -> str:
    """Shell line continuations joined, so that a command reads as one line."""
    return re.sub(r"\\\n\s*", " ", text)


def command_after(text: str, start: int) -> list[str]:
    """The words of the shell command on text's line from `start`, up to an operator (;, |, >>...)."""
    lex = shlex.shlex(text[start:].split("\n", 1)[0], posix=True, punctuation_chars=";&|<>")
    lex.whitespace_split = True
    words = []
    for w in lex:
        if set(w) <= set(";&|<>"):
            break
        words.append(w)
    return words


JOB_COMMAND = re.compile(r"python -m jobs\.(\w+)")
CONFIG_REF = re.compile(r"configs/[\w.-]+\.ya?ml")


# --- schemas ------------------------------------------------------------------------------------

def test_infra_has_the_expected_manifests():
    names = {str(p.relative_to(INFRA)) for p in MANIFEST_FILES}
    assert {"kuberay/raycluster.yaml", "kuberay/rayjob-train.yaml", "kuberay/nightly-cronjob.yaml",
            "kuberay/rayservice-neighbours.yaml", "kuberay/network-policies.yaml", "mlflow/mlflow.yaml"} <= names
    assert {d["kind"] for _, _, d in DOCS} >= {"RayCluster", "RayJob", "RayService", "CronJob", "Deployment", "Service",
                                               "NetworkPolicy"}


@pytest.mark.parametrize("kind", sorted(k for _, k in schemas.KUBERAY))
def test_kuberay_schemas_are_valid_json_schemas(kind):
    Draft202012Validator.check_schema(schemas.KUBERAY[("ray.io/v1", kind)])


def test_schema_versions_are_the_ones_the_readme_names():
    assert f"Kubernetes {schemas.K8S_VERSIONS[0].rsplit('.', 1)[0]} or later" in README
    assert f"KubeRay operator {schemas.KUBERAY_VERSION}" in README
    assert f"KubeRay operator {schemas.KUBERAY_VERSION}" in (INFRA / "kuberay" / "raycluster.yaml").read_text()


@pytest.mark.parametrize("version", schemas.K8S_VERSIONS)
@pytest.mark.parametrize("item", DOCS, ids=[doc_id(d) for d in DOCS])
def test_manifest_matches_its_schema(item, version):
    _, _, doc = item
    assert schemas.errors(doc, version) == []


@pytest.mark.parametrize("version", schemas.K8S_VERSIONS)
def test_every_pod_template_is_a_kubernetes_podtemplatespec(version):
    templates = all_pod_templates()
    assert len(templates) >= 11         # mlflow, cronjob, 3 in the RayCluster, 3 + submitter in the RayJob,
                                        # 2 in the RayService
    for t in templates:
        assert schemas.pod_template_errors(t, version) == [], t["metadata"]


def _rename(d: dict, old: str, new: str) -> None:
    d[new] = d.pop(old)


def _ray_container(s: dict, group: int = 0) -> dict:
    return s["workerGroupSpecs"][group]["template"]["spec"]["containers"][0]


BREAKAGES = {
    "workerGroupSpec (typo)": ("RayCluster", lambda s: _rename(s, "workerGroupSpecs", "workerGroupSpec"), "workerGroupSpec"),
    "maxReplica (typo)": ("RayCluster", lambda s: _rename(s["workerGroupSpecs"][0], "maxReplicas", "maxReplica"), "maxReplica"),
    "rayStartParams int": ("RayCluster", lambda s: s["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), "num-cpus"),
    "authOptions mode Token": ("RayCluster", lambda s: s["authOptions"].update({"mode": "Token"}), "mode"),
    "readOnlyRootFileSystem (typo, in a worker)": (
        "RayCluster", lambda s: _rename(_ray_container(s)["securityContext"], "readOnlyRootFilesystem", "readOnlyRootFileSystem"),
        "readOnlyRootFileSystem"),
    "seccompProfile as a string": ("RayCluster", lambda s: s["headGroupSpec"]["template"]["spec"]["securityContext"]
                                   .update({"seccompProfile": "RuntimeDefault"}), "seccompProfile"),
    "autoscaler volumeMount without mountPath": ("RayCluster", lambda s: s["autoscalerOptions"]["volumeMounts"][0]
                                                 .pop("mountPath"), "mountPath"),
    "submitter env valueFrom typo": ("RayJob", lambda s: _rename(s["submitterPodTemplate"]["spec"]["containers"][0]["env"][1],
                                                                 "valueFrom", "valueFom"), "valueFom"),
    "upgradeStrategy type Newcluster": ("RayService", lambda s: s["upgradeStrategy"].update({"type": "Newcluster"}),
                                        "Newcluster"),
    "rayClusterSpec in a RayService (the RayJob's name)": ("RayService", lambda s: _rename(s, "rayClusterConfig", "rayClusterSpec"),
                                                           "rayClusterSpec"),
    "serveConfigV2 as a mapping": ("RayService", lambda s: s.update({"serveConfigV2": yaml.safe_load(s["serveConfigV2"])}),
                                   "serveConfigV2"),
    "serve port as a string": ("RayService", lambda s: s["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
                               ["containers"][0]["ports"].append({"name": "serve2", "containerPort": "8001"}), "8001"),
    "env value int": ("Deployment", lambda s: s["template"]["spec"]["containers"][0]["env"].append({"name": "PORT", "value": 5000}), "5000"),
    "imagePulPolicy (typo)": ("Deployment", lambda s: _rename(s["template"]["spec"]["containers"][0], "imagePullPolicy", "imagePulPolicy"),
                              "imagePulPolicy"),
    "automountServiceAccountToken string": ("CronJob", lambda s: s["jobTemplate"]["spec"]["template"]["spec"]
                                            .update({"automountServiceAccountToken": "false"}), "automountServiceAccountToken"),
    "NetworkPolicy matchLabel (typo)": ("NetworkPolicy", lambda s: _rename(s["podSelector"], "matchLabels", "matchLabel"), "matchLabel"),
    "Service port as a string": ("Service", lambda s: s["ports"][0].update({"port": "5000"}), "port"),
}


@pytest.mark.parametrize("version", schemas.K8S_VERSIONS)
@pytest.mark.parametrize("kind, breakage, expected", BREAKAGES.values(), ids=BREAKAGES.keys())
def test_schema_rejects_a_broken_manifest(kind, breakage, expected, version):
    broken = copy.deepcopy(of_kind(kind)[0])
    assert schemas.errors(broken, version) == []
    breakage(broken["spec"])
    errors = schemas.errors(broken, version)
    assert errors and any(expected in e for e in errors), errors


# What the API server checks beyond the OpenAPI schema (which has no enums): the values we use.
API_ENUMS = {
    "imagePullPolicy": {"Always", "IfNotPresent", "Never"}, "restartPolicy": {"Always", "OnFailure", "Never"},
    "concurrencyPolicy": {"Allow", "Forbid", "Replace"}, "protocol": {"TCP", "UDP", "SCTP"},
    "serviceType": {"ClusterIP"}, "type": {"ClusterIP", "Recreate", "RollingUpdate", "RuntimeDefault", "NewCluster"},
}
RESOURCE_NAMES = {"cpu", "memory", "ephemeral-storage", "nvidia.com/gpu"}


def _walk(node, key=None):
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from _walk(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)


def test_enum_values_and_resource_names_the_api_server_accepts():
    for _, _, doc in DOCS:
        for k, v in _walk(doc["spec"]):
            if k in API_ENUMS and isinstance(v, str):
                assert v in API_ENUMS[k], f"{doc['kind']}: {k}: {v!r}"
            if k == "policyTypes":
                assert set(v) <= {"Ingress", "Egress"}, v
    for t in all_pod_templates():
        for c in containers(t):
            for part in ("requests", "limits"):
                assert set(c.get("resources", {}).get(part, {})) <= RESOURCE_NAMES, c["name"]
    for t in job_pod_templates():   # a Job's pods must not restart in place
        assert t["spec"]["restartPolicy"] in ("Never", "OnFailure")


# --- Kubernetes rules -------------------------------------------------------------------------

def test_everything_is_in_the_vaepipe_namespace_and_labelled():
    for _, _, doc in DOCS:
        assert doc["metadata"].get("namespace") == NAMESPACE, doc["metadata"]
        assert doc["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == NAMESPACE, doc["metadata"]
    # the NetworkPolicies let pods in by this label: every pod of ours carries it
    for template in all_pod_templates():
        assert template["metadata"]["labels"].get("app.kubernetes.io/part-of") == NAMESPACE, template["metadata"]


def test_worker_groups_autoscale_within_bounds():
    for where, spec in ray_cluster_specs():
        assert spec.get("enableInTreeAutoscaling") is True, where
        groups = spec["workerGroupSpecs"]
        assert len({g["groupName"] for g in groups}) == len(groups), f"{where}: duplicate groupName"
        for g in groups:
            replicas = g.get("replicas", g["minReplicas"])
            assert 0 <= g["minReplicas"] <= replicas <= g["maxReplicas"], f"{where} group {g['groupName']}"
            assert g["maxReplicas"] >= 1, f"{where} group {g['groupName']} can never run"


def gpu_limit(template: dict) -> int:
    return sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in containers(template))


def test_gpu_group_requests_gpus_and_cpu_groups_do_not():
    for where, spec in ray_cluster_specs():
        by_name = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        if where.startswith("RayService"):   # the neighbour service searches on CPUs: no GPU anywhere
            assert set(by_name) == {"cpu"}, f"{where}: {sorted(by_name)}"
            assert all(gpu_limit(t) == 0 for t in ray_pod_templates(spec)), where
            continue
        assert "gpu" in by_name and "cpu" in by_name, f"{where}: {sorted(by_name)}"
        gpu = by_name["gpu"]["template"]
        assert gpu_limit(gpu) >= 1, f"{where}: the gpu group must set limits nvidia.com/gpu"
        for c in containers(gpu):
            res = c.get("resources", {})
            if "nvidia.com/gpu" in res.get("requests", {}):   # extended resources: requests == limits
                assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
        assert any(t.get("key") == "nvidia.com/gpu" for t in gpu["spec"].get("tolerations", [])), where
        assert gpu_limit(by_name["cpu"]["template"]) == 0 and gpu_limit(spec["headGroupSpec"]["template"]) == 0


def test_ray_version_matches_pyproject():
    deps = {(r := Requirement(s)).name: r for s in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    pinned = str(deps["ray"].specifier).removeprefix("==")
    for where, spec in ray_cluster_specs():
        assert spec["rayVersion"] == pinned == "2.60.0", where


def test_nothing_is_exposed_outside_the_cluster():
    assert not {d["kind"] for _, _, d in DOCS} & {"Ingress", "Route", "Gateway", "HTTPRoute"}
    for svc in of_kind("Service"):
        assert svc["spec"].get("type") == "ClusterIP", f"Service {svc['metadata']['name']} must say type: ClusterIP"
        assert all("nodePort" not in p for p in svc["spec"]["ports"])
    for where, spec in ray_cluster_specs():
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", where
        assert not spec["headGroupSpec"].get("enableIngress", False), where
    for template in all_pod_templates():
        assert not template["spec"].get("hostNetwork")
        for c in containers(template):
            assert all("hostPort" not in p for p in c.get("ports", []))


def test_images_are_the_one_image_in_the_readme():
    images = {c["image"] for t in all_pod_templates() for c in containers(t)}
    assert images == {IMAGE}
    assert set(re.findall(r"ghcr\.io/[\w./-]+:[\w.-]+", README)) == {IMAGE}
    assert f"-t {IMAGE}" in README and f"-t {IMAGE}" in DOCKERFILE.read_text()  # how it is built


# --- secrets ------------------------------------------------------------------------------------

SECRET_ENV = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY|KEY_ID|CREDENTIAL|STORE_URI")
PLACEHOLDER = re.compile(r"^([A-Z][A-Z_]*|\$\{?\w+\}?|\"?\$\(.*)$")   # CHANGE_ME, PASSWORD, ${VAR}, "$(cmd"


def secret_refs() -> set[tuple[str, str]]:
    refs = set()
    for template in all_pod_templates():
        for c in containers(template):
            for e in c.get("env", []):
                if "secretKeyRef" in e.get("valueFrom", {}):
                    refs.add((e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"]))
        for v in template["spec"].get("volumes", []):
            if "secret" in v:
                refs |= {(v["secret"]["secretName"], item["key"]) for item in v["secret"].get("items", [])}
    return refs


def test_sensitive_env_comes_from_secrets_only():
    assert not of_kind("Secret"), "Secrets are created out of band (infra/README.md), never committed"
    checked = 0
    for template in all_pod_templates():
        for c in containers(template):
            for name, e in env(c).items():
                if SECRET_ENV.search(name):
                    assert "value" not in e and "secretKeyRef" in e["valueFrom"], f"{c['name']}: {name} must use secretKeyRef"
                    checked += 1
    assert checked >= 10


def test_no_literal_passwords_in_infra():
    for path in TEXT_FILES:
        text = path.read_text()
        for user_pass in re.findall(r"://[^\s:/@]+:([^\s@/]+)@", text):      # scheme://user:PASSWORD@host
            assert PLACEHOLDER.match(user_pass), f"{path.name}: credentials in a URL: {user_pass!r}"
        for key, value in re.findall(r"(?i)\b(\w*(?:password|passwd|_secret|secret_|_token|token_)\w*)\s*[:=]\s*(\S+)", text):
            assert PLACEHOLDER.match(value), f"{path.name}: {key} = {value!r}"
    # and the parsed manifests: no argument carries a password
    for _, _, doc in DOCS:
        for s in strings(doc):
            assert not re.search(r"(?i)password=\S", s), s


def test_every_secret_referenced_is_created_in_the_readme():
    created = {}
    for m in re.finditer(r"create secret generic ([\w-]+)((?:[^\n]*\\\n)*[^\n]*)", README):
        created[m[1]] = set(re.findall(r"--from-(?:literal|file)=([\w.-]+)=", m[2]))
    for name, key in secret_refs():
        assert key in created.get(name, ()), f"secret {name}/{key} is used but infra/README.md does not create it"


# --- MLflow ---------------------------------------------------------------------------------------

def cli_options(words: list[str]) -> dict[str, str | None]:
    """--flag=value / --flag value / --flag → {flag: value or None}."""
    opts, i = {}, 0
    while i < len(words):
        w = words[i]
        if w.startswith("--"):
            if "=" in w:
                k, v = w.split("=", 1)
            elif i + 1 < len(words) and not words[i + 1].startswith("--"):
                k, v = w, words[i + 1]
                i += 1
            else:
                k, v = w, None
            opts[k] = v
        i += 1
    return opts


def mlflow_container() -> dict:
    [c] = one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    return c


def test_mlflow_server_runs_with_auth_and_an_s3_artifact_store():
    c = mlflow_container()
    assert c["command"][:2] == ["mlflow", "server"]
    opts = cli_options(c["command"][2:] + c.get("args", []))
    assert opts["--app-name"] == "basic-auth"
    assert opts["--artifacts-destination"] == "s3://vaepipe-mlflow/artifacts"
    assert opts["--host"] == "0.0.0.0" and opts["--port"] == "5000"
    e = env(c)
    # the backend store: from a Secret, via the env var `mlflow server` reads for --backend-store-uri
    assert "--backend-store-uri" not in opts or opts["--backend-store-uri"] == "$(MLFLOW_BACKEND_STORE_URI)"
    for name in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert e[name]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-server", name
    # basic_auth.ini mounted from the Secret where MLFLOW_AUTH_CONFIG_PATH points
    ini = Path(e["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    [mount] = [m for m in c["volumeMounts"] if ini.parent == Path(m["mountPath"])]
    [volume] = [v for v in one("Deployment", "mlflow")["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "mlflow-server"
    assert {"key": "basic_auth.ini", "path": ini.name} in volume["secret"]["items"]
    # no MLflow job runner (8 processes for GenAI jobs vaepipe never submits); the tests' servers match
    assert e["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    # in-cluster Host headers are allowed (MLflow refuses unknown hosts)
    svc = one("Service", "mlflow")
    assert f"{svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{svc['spec']['ports'][0]['port']}" in opts["--allowed-hosts"].split(",")


def test_mlflow_probes_and_service_wiring():
    c, svc = mlflow_container(), one("Service", "mlflow")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health" and ports.get(get["port"], get["port"]) == 5000, probe
    pod_labels = one("Deployment", "mlflow")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    [port] = svc["spec"]["ports"]
    assert ports.get(port["targetPort"], port["targetPort"]) == 5000


def test_ray_pods_reach_mlflow_through_its_service_with_the_same_env():
    svc = one("Service", "mlflow")
    uri = f"http://{svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{svc['spec']['ports'][0]['port']}"
    envs = [c.get("env") for _, spec in ray_cluster_specs() for t in ray_pod_templates(spec) for c in containers(t)]
    assert len(envs) >= 8 and all(e == envs[0] for e in envs), "every Ray container gets the same env"
    e = {v["name"]: v for v in envs[0]}
    assert e["MLFLOW_TRACKING_URI"]["value"] == uri
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "secretKeyRef" in e[name]["valueFrom"], name


def test_mlflow_admits_only_ray_pods_on_its_port():
    np = one("NetworkPolicy", "mlflow-ingress")
    assert np["spec"]["podSelector"]["matchLabels"].items() <= \
        one("Deployment", "mlflow")["spec"]["template"]["metadata"]["labels"].items()
    assert np["spec"]["policyTypes"] == ["Ingress"]
    assert np["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/component": "ray-node"}}}],
                                      "ports": [{"protocol": "TCP", "port": 5000}]}]


def test_pods_carry_the_labels_the_policies_select():
    assert {component(t) for t in ray_node_templates()} == {"ray-node"}
    assert {component(t) for t in job_pod_templates()} == {"ray-submitter"}
    others = [t for t in all_pod_templates() if t not in ray_node_templates() + job_pod_templates()]
    assert others and all(component(t) not in ("ray-node", "ray-submitter") for t in others)


def _selects(policy: dict, template: dict) -> bool:
    return policy["spec"]["podSelector"]["matchLabels"].items() <= template["metadata"]["labels"].items()


def test_ray_job_api_admits_only_submitters_of_this_namespace_and_the_operator():
    ray_np = one("NetworkPolicy", "ray-ingress")
    assert ray_np["spec"]["policyTypes"] == ["Ingress"]
    assert all(_selects(ray_np, t) for t in ray_node_templates())
    rules = ray_np["spec"]["ingress"]
    # Ray nodes among themselves, any port; nothing else reaches a Ray pod without a port list
    node_rule = {"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/component": "ray-node"}}}]}
    assert node_rule in rules
    for rule in rules:
        if rule != node_rule:
            assert rule["ports"] == [{"protocol": "TCP", "port": 8265}], rule
    peers = [p for r in rules if r != node_rule for p in r["from"]]
    # the submitters: a podSelector alone (so: this namespace only)
    assert {"podSelector": {"matchLabels": {"app.kubernetes.io/component": "ray-submitter"}}} in peers
    # the operator: its pods AND its namespace, in one peer (two peers would mean either)
    operator = [p for p in peers if "namespaceSelector" in p]
    assert operator == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": OPERATOR_NAMESPACE}},
                         "podSelector": {"matchLabels": {"app.kubernetes.io/component": "kuberay-operator"}}}]
    assert len(peers) == 2
    assert OPERATOR_NAMESPACE in README and "app.kubernetes.io/component: kuberay-operator" in README
    # the dashboard port is the head's
    for _, spec in ray_cluster_specs():
        [head] = spec["headGroupSpec"]["template"]["spec"]["containers"]
        assert {"name": "dashboard", "containerPort": 8265} in head["ports"]


def test_no_ingress_from_any_namespace_or_address():
    for np in of_kind("NetworkPolicy"):
        for peer in (p for rule in np["spec"].get("ingress", []) for p in rule["from"]):
            assert "ipBlock" not in peer and peer.get("podSelector", {}).get("matchLabels"), (np["metadata"]["name"], peer)
            if "namespaceSelector" in peer:
                assert peer["namespaceSelector"].get("matchLabels"), "an empty namespaceSelector admits every namespace"


DNS_PEER = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}


def test_every_pod_has_an_egress_policy_with_dns_and_listed_ports():
    egress = [np for np in of_kind("NetworkPolicy") if "Egress" in np["spec"]["policyTypes"]]
    for t in all_pod_templates():
        mine = [np for np in egress if _selects(np, t)]
        assert mine, f"no egress policy selects {t['metadata']['labels']}"
        rules = [r for np in mine for r in np["spec"]["egress"]]
        assert any(r["to"] == [DNS_PEER] and {"protocol": "UDP", "port": 53} in r["ports"] for r in rules)
    for np in egress:
        for rule in np["spec"]["egress"]:
            for peer in rule["to"]:
                if "ipBlock" in peer:     # outside the cluster: named ports only, never the metadata endpoint
                    assert rule.get("ports"), (np["metadata"]["name"], rule)
                    assert "169.254.169.254/32" in peer["ipBlock"].get("except", []), rule
    # submitters: DNS and the job API, nothing else; no ingress at all
    sub = one("NetworkPolicy", "ray-submitter")
    assert sub["spec"]["policyTypes"] == ["Ingress", "Egress"] and sub["spec"]["ingress"] == []
    assert all(_selects(sub, t) for t in job_pod_templates())
    assert [r for r in sub["spec"]["egress"] if r["to"] != [DNS_PEER]] == [
        {"to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/component": "ray-node"}}}],
         "ports": [{"protocol": "TCP", "port": 8265}]}]


# --- the neighbour service (RayService) -----------------------------------------------------------

SERVE_PORT = 8000
NEIGHBOURS_CLIENT = {"app.kubernetes.io/component": "neighbours-client"}


def rayservice() -> dict:
    return one("RayService", "vaepipe-neighbours")


def serve_config() -> dict:
    return yaml.safe_load(rayservice()["spec"]["serveConfigV2"])


def serve_app() -> dict:
    [app] = serve_config()["applications"]
    return app


def cpus(quantity: str | int) -> float:
    q = str(quantity)
    return int(q[:-1]) / 1000 if q.endswith("m") else float(q)


def nightly_config():
    """The nightly CronJob's `python -m jobs.nightly …`, parsed with the job's own flags."""
    from jobs.cli import parse_config
    from jobs.nightly import Config

    [(_, _, argv)] = [(w, j, a) for w, j, a in job_command_lines() if w.startswith("nightly-cronjob.yaml")]
    return parse_config(Config, argv, prog="vaepipe nightly")


def test_serve_config_is_yaml_that_ray_serve_accepts():
    from ray.serve.schema import (DeploymentSchema, HTTPOptionsSchema, LoggingConfig, RayActorOptionsSchema,
                                  ServeApplicationSchema, ServeDeploySchema)

    config = serve_config()
    assert isinstance(config, dict)
    ServeDeploySchema.model_validate(config)       # Ray Serve's own schema: types, import_path's form
    # It ignores unknown fields, as Serve does (a misspelt one would be dropped silently): none allowed
    assert set(config) <= set(ServeDeploySchema.model_fields)
    assert set(config["http_options"]) <= set(HTTPOptionsSchema.model_fields)
    for app in config["applications"]:
        assert set(app) <= set(ServeApplicationSchema.model_fields), app["name"]
        assert set(app.get("logging_config", {})) <= set(LoggingConfig.model_fields)
        for d in app.get("deployments", []):
            assert set(d) <= set(DeploymentSchema.model_fields), d["name"]
            assert set(d.get("ray_actor_options", {})) <= set(RayActorOptionsSchema.model_fields), d["name"]
    assert config["http_options"] == {"host": "0.0.0.0", "port": SERVE_PORT}
    app = serve_app()
    assert (app["name"], app["route_prefix"]) == ("vaepipe-neighbours", "/")
    assert rayservice()["spec"]["upgradeStrategy"] == {"type": "NewCluster"}


def test_serve_app_is_built_by_the_repos_builder_from_its_args():
    """The import_path names a module and attribute of the image (the repo), and the builder takes
    the args: ServeConfig checks them and the Serve application is built, without starting Ray."""
    import ray
    from ray.serve import Application

    from pipeline.serving.ray_app import ServeConfig

    app = serve_app()
    module, _, attr = app["import_path"].partition(":")
    assert module and attr, app["import_path"]
    builder = getattr(importlib.import_module(module), attr)
    assert builder.__module__ == "pipeline.serving.ray_app"
    args = app["args"]
    # ServeConfig's fields, less those the cluster decides: the proxy's host and port (http_options),
    # the tracking URI (MLFLOW_TRACKING_URI on every pod), the Ray address and work folder
    assert set(args) <= {f.name for f in dataclasses.fields(ServeConfig)} - {
        "host", "port", "tracking_uri", "ray_address", "workdir"}, sorted(args)
    was_up = ray.is_initialized()              # another test module may share this process's Ray
    built = builder(args)
    assert isinstance(built, Application) and ray.is_initialized() == was_up   # building starts no Ray
    # the deployments the config tunes are the application's (Serve refuses a name it doesn't have),
    # and their replica count is the one the args give
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == {built._bound_deployment.name}
    assert deployments[built._bound_deployment.name]["num_replicas"] == args["replicas"]


def test_serve_app_reads_what_the_nightly_writes(monkeypatch):
    monkeypatch.chdir(REPO)                        # the image's WORKDIR /app is the repo root
    nightly, args = nightly_config(), serve_app()["args"]
    assert args["latents"] == nightly.output == "s3://vaepipe-data/latents/"
    assert nightly.index == "ivf-flat"             # each night's commits get the index the replicas poll
    assert args["model"] == nightly.model          # the model that encoded the table encodes the queries
    assert json.loads(args.get("storage_options") or "{}") == json.loads(nightly.storage_options or "{}")
    assert args["poll_s"] > 0


def test_serve_port_is_the_heads_and_replicas_run_on_workers():
    spec = rayservice()["spec"]
    cluster = spec["rayClusterConfig"]
    [head] = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    # KubeRay's serve Service and its probes use the head container's port named "serve"
    assert {"name": "serve", "containerPort": SERVE_PORT} in head["ports"]
    assert serve_config()["http_options"]["port"] == SERVE_PORT
    # The head serves no traffic and KubeRay doesn't probe its proxy (which would take an ingress
    # rule for the operator on 8000); so every replica must run on a worker, behind that worker's
    # proxy: it asks for CPUs, and the head has none.
    assert spec["excludeHeadPodFromServeSvc"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    deployments = serve_app()["deployments"]
    assert all(d["ray_actor_options"]["num_cpus"] > 0 for d in deployments)
    needed = sum(d["num_replicas"] * d["ray_actor_options"]["num_cpus"] for d in deployments)
    groups = cluster["workerGroupSpecs"]

    def worker_cpus(g: dict) -> float:
        [c] = g["template"]["spec"]["containers"]
        return cpus(c["resources"]["limits"]["cpu"])

    assert sum(g["minReplicas"] * worker_cpus(g) for g in groups) >= needed, "the smallest cluster holds every replica"


def test_serve_port_is_reachable_only_from_neighbours_clients_of_this_namespace():
    np = one("NetworkPolicy", "neighbours-ingress")
    assert np["spec"]["policyTypes"] == ["Ingress"]
    service_pods = ray_pod_templates(rayservice()["spec"]["rayClusterConfig"])
    assert all(_selects(np, t) for t in service_pods)
    # the service's pods only: not the RayCluster's, a RayJob's or MLflow's
    assert not [t for t in all_pod_templates() if _selects(np, t) and not any(t is s for s in service_pods)]
    client_rule = {"from": [{"podSelector": {"matchLabels": NEIGHBOURS_CLIENT}}],
                   "ports": [{"protocol": "TCP", "port": SERVE_PORT}]}
    assert np["spec"]["ingress"] == [client_rule]    # a podSelector alone: this namespace only
    # nothing else opens 8000 on the service's pods, but Ray nodes among themselves (every port)
    node_rule = {"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/component": "ray-node"}}}]}
    for other in of_kind("NetworkPolicy"):
        if any(_selects(other, t) for t in service_pods):
            for rule in other["spec"].get("ingress", []):
                if "ports" not in rule or any(p["port"] == SERVE_PORT for p in rule["ports"]):
                    assert rule in (node_rule, client_rule), (other["metadata"]["name"], rule)
    # and no pod of ours is a client: whoever deploys one labels it
    assert all(component(t) != NEIGHBOURS_CLIENT["app.kubernetes.io/component"] for t in all_pod_templates())
    assert "app.kubernetes.io/component: neighbours-client" in README


# --- lock-down: pods --------------------------------------------------------------------------------

# Containers allowed a writable root filesystem, with the reason. None today: every image write goes
# to an emptyDir (/tmp, /tmp/ray, /dev/shm).
READ_WRITE_ROOT: dict[str, str] = {}
WRITABLE = {"/tmp", "/tmp/ray", "/dev/shm"}


def security_contexts() -> list[tuple[str, dict, dict]]:
    """(where, pod securityContext, container securityContext) for every container of ours, the
    autoscaler sidecars KubeRay adds (autoscalerOptions.securityContext) included."""
    found = []
    for t in all_pod_templates():
        for c in containers(t):
            found.append((c["name"], t["spec"].get("securityContext", {}), c.get("securityContext", {})))
    for where, spec in ray_cluster_specs():
        head_pod = spec["headGroupSpec"]["template"]["spec"].get("securityContext", {})
        found.append((f"{where} autoscaler", head_pod, spec.get("autoscalerOptions", {}).get("securityContext", {})))
    return found


def test_every_container_is_non_root_unprivileged_with_a_read_only_root():
    checked = security_contexts()
    assert len(checked) >= 14           # a container per pod template (11) and the 3 clusters' autoscalers
    for where, pod, ctr in checked:
        assert ctr.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, where
        assert ctr.get("runAsUser", pod.get("runAsUser")) == 10001, where     # the image's USER
        assert ctr.get("allowPrivilegeEscalation") is False, where
        assert not ctr.get("privileged", False), where
        assert ctr.get("capabilities", {}).get("drop") == ["ALL"] and not ctr["capabilities"].get("add"), where
        assert ctr.get("readOnlyRootFilesystem") is True or where in READ_WRITE_ROOT, where
        assert pod.get("seccompProfile") == {"type": "RuntimeDefault"}, where


def test_read_only_pods_get_emptydirs_where_they_write():
    for t in all_pod_templates():
        volumes = {v["name"]: v for v in t["spec"].get("volumes", [])}
        for c in containers(t):
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts and "emptyDir" in volumes[mounts["/tmp"]], c["name"]
            for path in WRITABLE & set(mounts):
                assert "emptyDir" in volumes[mounts[path]], (c["name"], path)
    for t in ray_node_templates():   # Ray's session dir and object store
        [c] = t["spec"]["containers"]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert {"/tmp", "/tmp/ray", "/dev/shm"} <= set(mounts)
        assert mounts["/tmp/ray"] == "ray-logs"                  # KubeRay's name: the autoscaler shares it
        assert {v["name"]: v for v in t["spec"]["volumes"]}[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory"}
    assert "HOME=/tmp" in DOCKERFILE.read_text()


def test_no_service_account_token_but_the_autoscalers():
    for t in all_pod_templates():
        assert t["spec"].get("automountServiceAccountToken") is False, t["metadata"]["labels"]
        for c in containers(t):   # no container mounts an API token, whatever the volume
            assert all("kubernetes.io/serviceaccount" not in m["mountPath"] for m in c.get("volumeMounts", [])), c["name"]
    for where, spec in ray_cluster_specs():
        # the autoscaler sidecar scales the worker groups through the API: it alone mounts a token,
        # a projected one from the head pod's service account (what automounting would have given)
        assert spec["enableInTreeAutoscaling"] is True
        mounts = {m["mountPath"]: m for m in spec["autoscalerOptions"]["volumeMounts"]}
        sa = mounts["/var/run/secrets/kubernetes.io/serviceaccount"]
        assert sa["readOnly"] is True
        [vol] = [v for v in spec["headGroupSpec"]["template"]["spec"]["volumes"] if v["name"] == sa["name"]]
        sources = {k for src in vol["projected"]["sources"] for k in src}
        assert sources == {"serviceAccountToken", "configMap", "downwardAPI"}, where
        assert {"/tmp", "/tmp/ray"} <= set(mounts), where


def test_ray_token_auth_on_every_ray_pod_and_submitter():
    name, key = RAY_AUTH_SECRET
    for where, spec in ray_cluster_specs():
        assert spec["authOptions"] == {"mode": "token", "secretName": name}, where
    ray_containers = [c for t in ray_node_templates() for c in t["spec"]["containers"]]
    submitters = [c for t in job_pod_templates() for c in t["spec"]["containers"]]
    assert len(ray_containers) >= 8 and len(submitters) >= 2    # RayCluster 3, RayJob 3, RayService 2
    for c in ray_containers + submitters:
        e = env(c)
        assert e["RAY_AUTH_MODE"] == {"name": "RAY_AUTH_MODE", "value": "token"}, c["name"]
        assert e["RAY_AUTH_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": name, "key": key}}, c["name"]
    # submitters hold the token and nothing else secret: the job's credentials are the cluster's
    for c in submitters:
        assert {n for n in env(c) if SECRET_ENV.search(n)} == {"RAY_AUTH_TOKEN"}, c["name"]
    assert f"create secret generic {name}" in README


def test_no_credentials_on_a_command_line():
    """The Ray dashboard shows every job's entrypoint to whoever can read it: credentials go through
    the pods' environment (Secrets), never into an entrypoint, a `ray job submit` or a runtime env."""
    lines = [d["spec"]["entrypoint"] for d in of_kind("RayJob")] + [d["spec"].get("runtimeEnvYAML", "") for d in of_kind("RayJob")]
    lines += [d["spec"]["serveConfigV2"] for d in of_kind("RayService")]    # the dashboard's Serve page shows it
    lines += [a for t in all_pod_templates() for c in containers(t) for a in c.get("command", []) + c.get("args", [])]
    lines += [w for _, _, argv in job_command_lines() for w in argv]
    for text in lines:
        assert "--storage-options" not in text and "env_vars" not in text, text
        assert not re.search(r"(?i)aws_secret|password|://[^/\s:@]+:[^/\s@]+@", text), text


def test_basic_auth_ini_example_has_placeholders_only():
    ini = configparser.ConfigParser()
    ini.read(INFRA / "mlflow" / "basic_auth.ini.example")
    m = ini["mlflow"]
    assert m["admin_password"] == "CHANGE_ME_FROM_SECRET"
    assert m["database_uri"].startswith("postgresql://")        # not a SQLite file lost with the pod
    assert m["default_permission"] in {"READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS"}
    assert "Secret" in (INFRA / "mlflow" / "basic_auth.ini.example").read_text()


# --- jobs, schedules, image -----------------------------------------------------------------------

def test_referenced_job_modules_exist():
    found = {m for p in TEXT_FILES for m in JOB_COMMAND.findall(p.read_text())}
    assert {"train", "nightly"} <= found
    for name in found:
        assert (REPO / "jobs" / f"{name}.py").is_file(), f"infra/ runs python -m jobs.{name}: jobs/{name}.py missing"
    cron_jobs = re.findall(r"bin/vaepipe (\w+)", CRONTAB.read_text())
    assert cron_jobs == ["nightly"]
    assert (REPO / "jobs" / "nightly.py").is_file()


def test_referenced_config_files_exist():
    found = {m for p in TEXT_FILES for m in CONFIG_REF.findall(p.read_text())}
    assert {"configs/train-mnist.yaml", "configs/nightly.yaml"} <= found
    missing = sorted(f for f in found if not (REPO / f).is_file())
    assert not missing, f"infra/ refers to config files that do not exist: {missing}"


def job_command_lines() -> list[tuple[str, str, list[str]]]:
    """(where, job, argv) for every `python -m jobs.X …` in the manifests' strings, the README's
    code blocks and the crontab, and for the crontab's `vaepipe X …`."""
    sources = [(f"{p.name}#{i}", s) for p, i, d in DOCS for s in strings(d)]
    sources += [("README.md", block) for block in re.findall(r"```bash\n(.*?)```", README, re.S)]
    sources += [(CRONTAB.name, CRONTAB.read_text())]
    found = []
    for where, text in sources:
        text = joined(text)
        found += [(where, m[1], command_after(text, m.end())) for m in JOB_COMMAND.finditer(text)]
        if where == CRONTAB.name:
            found += [(where, m[1], command_after(text, m.end())) for m in re.finditer(r"bin/vaepipe (\w+)", text)]
    return found


@pytest.mark.parametrize("where, job, argv", job_command_lines(), ids=lambda v: v if isinstance(v, str) else None)
def test_job_command_line_parses_with_the_jobs_own_flags(where, job, argv, monkeypatch):
    from jobs.cli import parse_config

    monkeypatch.chdir(REPO)                        # the image's WORKDIR /app is the repo root
    module = importlib.import_module(f"jobs.{job}")
    cfg = parse_config(module.Config, argv, prog=f"vaepipe {job}")
    for field in ("input", "output", "model"):     # what a scheduled run must be told
        if hasattr(cfg, field):
            assert getattr(cfg, field), f"{where}: jobs.{job} without --{field}"


def test_rayjob_trains_from_the_image_with_checkpoints_on_s3():
    [job] = of_kind("RayJob")
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python -m jobs.train --config configs/train-mnist.yaml")
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == {"working_dir": workdir()}
    opts = cli_options(shlex.split(spec["entrypoint"]))
    # Ray Train checkpoints: on object storage, which every node reaches with the same credentials
    # (AWS_* from the vaepipe-s3 Secret); no shared volume
    assert opts["--storage-path"] == "s3://vaepipe-data/checkpoints"
    assert not of_kind("PersistentVolumeClaim")
    for t in ray_pod_templates(spec["rayClusterSpec"]):
        assert not [v for v in t["spec"]["volumes"] if "persistentVolumeClaim" in v]
        for c in containers(t):
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env(c)), c["name"]
    # --use-gpu: the gpu group can hold every Ray Train worker
    if "--use-gpu" in opts:
        workers = int(opts.get("--workers") or yaml.safe_load((REPO / opts["--config"]).read_text()).get("workers", 1))
        [gpu] = [g for g in spec["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
        assert gpu["maxReplicas"] * gpu_limit(gpu["template"]) >= workers


def test_cronjob_submits_the_nightly_job_to_the_raycluster():
    cj = one("CronJob", "vaepipe-nightly")["spec"]
    assert cj["schedule"] == "0 2 * * *" and cj["concurrencyPolicy"] == "Forbid"
    assert cj["startingDeadlineSeconds"] > 0
    [c] = cj["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["bash", "-c"]
    [script] = c["args"]
    assert script.lstrip().startswith("set -euo pipefail")
    script = joined(script)
    assert "--submission-id nightly-$(date +%Y%m%d) " in script     # one submission a day
    words = command_after(script, script.index("ray job submit"))
    sep = words.index("--")
    opts = cli_options(words[3:sep])
    [cluster] = of_kind("RayCluster")
    assert opts["--address"] == f"http://{cluster['metadata']['name']}-head-svc.{NAMESPACE}.svc.cluster.local:8265"
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert opts["--working-dir"] == workdir()
    assert words[sep + 1:sep + 5] == ["python", "-m", "jobs.nightly", "--config"]


def test_crontab_runs_nightly_under_flock_with_a_log():
    lines = [l for l in CRONTAB.read_text().splitlines() if l.strip() and not l.startswith("#") and "=" not in l.split()[0]]
    assert len(lines) == 1
    fields = lines[0].split()
    assert fields[:5] == ["0", "2", "*", "*", "*"]
    assert fields[5] == "flock" and "-n" in fields[6:8]
    assert "%" not in lines[0], "cron turns % into a newline"
    argv = command_after(lines[0], lines[0].index("bin/vaepipe") + len("bin/vaepipe"))
    assert argv[0] == "nightly" and cli_options(argv)["--model"] == "models:/vae@production"
    assert re.search(r">> ?/\S+\.log 2>&1", lines[0])


def dockerfile() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instr = [tuple((l.split(None, 1) + [""])[:2]) for l in text.splitlines() if l.strip() and not l.lstrip().startswith("#")]
    args = {k: v for i, rest in instr if i == "ARG" and "=" in rest for k, v in [rest.split("=", 1)]}
    return [(i, re.sub(r"\$\{(\w+)\}", lambda m: args.get(m[1], m[0]), rest)) for i, rest in instr]


def workdir() -> str:
    return [rest for i, rest in dockerfile() if i == "WORKDIR"][-1]


def test_dockerfile_builds_from_the_repo():
    instr = dockerfile()
    assert instr[0][0] == "FROM" and re.search(r"nvidia/cuda:[\w.-]*runtime|rayproject/ray:2\.60\.0-[\w-]*gpu", instr[0][1])
    assert workdir() == "/app"
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    copied = []
    for _, rest in (x for x in instr if x[0] == "COPY"):
        words = [w for w in rest.split() if not w.startswith("--")]
        for src in words[:-1]:
            assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the repo"
            assert "*" not in ignore or f"!{src.rstrip('/')}/" in ignore or f"!{src}" in ignore, f"{src} is .dockerignored"
            copied.append(src)
    assert {"pyproject.toml", "README.md", "constraints.txt", "vae", "pipeline", "jobs", "configs"} <= set(copied)
    run = " ".join(rest for i, rest in instr if i == "RUN")
    m = re.search(r"--index-url (https://download\.pytorch\.org/whl/cu\d+) torch==([\d.]+)", run)
    assert m and m[1].endswith("cu128"), run
    torch_req = next(Requirement(s) for s in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
                     if s.startswith("torch"))
    assert m[2] in torch_req.specifier, f"torch {m[2]} outside pyproject's {torch_req}"
    assert re.search(r"pip install --constraint /app/constraints\.txt \"?/app(\[[\w,]+\])?\"?", run)
    # every pip install but torch's (the CUDA build, from the PyTorch index) takes the pins
    installs = [i for rest in (r for x, r in instr if x == "RUN") for i in re.findall(r"pip install [^&]*", rest)]
    unpinned = [i for i in installs if "--constraint /app/constraints.txt" not in i]
    assert len(unpinned) == 1 and "torch==" in unpinned[0], unpinned
    pinned = {Requirement(l).name.lower() for l in (REPO / "constraints.txt").read_text().splitlines()
              if l.strip() and not l.startswith("#")}
    image_only = re.findall(r"(?<=\s)\"?([A-Za-z][\w-]*)(?:\[[\w,]+\])?\"?(?=\s|$)",
                            installs[-1].split("constraints.txt", 1)[1])
    assert image_only and {n.lower() for n in image_only} <= pinned, image_only
    assert re.search(r"^USER \d+$", DOCKERFILE.read_text(), re.M), "numeric non-root USER (runAsNonRoot)"


def test_readme_covers_deploy_order_local_server_and_every_file():
    for path in TEXT_FILES:
        if path.name not in ("README.md", "Dockerfile.dockerignore"):
            assert str(path.relative_to(INFRA)) in README, f"infra/README.md does not mention {path.relative_to(INFRA)}"
    order = [README.index(f"-f infra/{f}") for f in
             ("mlflow/mlflow.yaml", "kuberay/network-policies.yaml", "kuberay/raycluster.yaml",
              "kuberay/rayjob-train.yaml", "kuberay/nightly-cronjob.yaml", "kuberay/rayservice-neighbours.yaml")]
    assert order == sorted(order), ("deploy MLflow, the Ray policies, the RayCluster, then the RayJob and the CronJob, "
                                    "then the neighbour service (it needs the nightly's index)")
    assert ("mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow.db "
            "--artifacts-destination ./mlartifacts") in README
    assert "RayCronJob" in README
