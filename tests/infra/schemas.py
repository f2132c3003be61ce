"""Offline JSON Schemas for the objects in infra/.

Kubernetes objects (Deployment, Service, CronJob, NetworkPolicy…): the JSON schemas shipped by the
`kubernetes-validate` package (a pinned dev dependency), in their *strict* form (an unknown or
misspelt field is an error, where `kubectl apply` may drop it), for every version in K8S_VERSIONS:
the oldest Kubernetes that infra/README.md supports and the newest the package ships.

KubeRay objects (ray.io/v1 RayCluster, RayJob, RayService): no PyPI package ships KubeRay's CRD
schemas, and we commit no content copied from public repositories, so this file holds a minimal
hand-written schema of the ray.io/v1 fields our manifests use, each checked by hand against the CRDs
of KUBERAY_VERSION (the release infra/README.md names) for existence and type. Everything Kubernetes
inside them (the pod templates, the autoscaler's securityContext, env and volume mounts, object
metadata) is validated against the real Kubernetes definitions from kubernetes-validate. Like the
CRDs' structural schemas, which prune unknown fields silently, it allows no other fields.
"""
from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import importlib_resources
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

Schema = dict[str, Any]

K8S_VERSIONS = ("1.27.0", "1.37.0")
KUBERAY_VERSION = "v1.7.0"
DEFS = "https://kubernetes.io/api/_definitions.json"


def _schema_dir(version: str):
    return importlib_resources.files("kubernetes_validate").joinpath("kubernetes-json-schema", f"v{version}-local-strict")


@lru_cache(maxsize=None)
def _registry(version: str) -> Registry:
    defs = json.loads(_schema_dir(version).joinpath("_definitions.json").read_text())
    return Resource.from_contents(defs) @ Registry()


def k8s(name: str) -> Schema:
    """A reference to a Kubernetes definition, e.g. k8s("core.v1.PodTemplateSpec")."""
    prefix = "io.k8s.apimachinery.pkg.apis." if name.startswith("meta.") else "io.k8s.api."
    return {"$ref": f"{DEFS}#/$defs/{prefix}{name}"}


def obj(required: tuple[str, ...] = (), **props: Schema) -> Schema:
    return {"type": "object", "properties": props, "required": list(required), "additionalProperties": False}


def array(items: Schema) -> Schema:
    return {"type": "array", "items": items}


STR = {"type": "string", "minLength": 1}
BOOL = {"type": "boolean"}
NONNEG = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}      # the CRDs' int32 fields
STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}

# --- KubeRay ray.io/v1, the fields we use (checked against KUBERAY_VERSION's CRDs) -----------------

# KubeRay passes these to `ray start --key=value`: a map of strings (num-cpus: 0 unquoted is wrong).
RAY_START_PARAMS = STR_MAP
AUTH_OPTIONS = obj(mode={"enum": ["disabled", "token"]}, secretName=STR, enableK8sTokenAuth=BOOL)
AUTOSCALER_OPTIONS = obj(upscalingMode={"enum": ["Default", "Aggressive", "Conservative"]},
                         idleTimeoutSeconds=NONNEG, resources=k8s("core.v1.ResourceRequirements"), image=STR,
                         imagePullPolicy=STR, env=array(k8s("core.v1.EnvVar")),
                         securityContext=k8s("core.v1.SecurityContext"), volumeMounts=array(k8s("core.v1.VolumeMount")))
HEAD_GROUP = obj(("template",), rayStartParams=RAY_START_PARAMS, template=k8s("core.v1.PodTemplateSpec"),
                 serviceType=STR, enableIngress=BOOL)
WORKER_GROUP = obj(("groupName", "template", "minReplicas", "maxReplicas"),
                   groupName=STR, replicas=NONNEG, minReplicas=NONNEG, maxReplicas=NONNEG, numOfHosts=NONNEG,
                   suspend=BOOL, rayStartParams=RAY_START_PARAMS, template=k8s("core.v1.PodTemplateSpec"))
RAY_CLUSTER_SPEC = obj(("headGroupSpec",), rayVersion=STR, authOptions=AUTH_OPTIONS,
                       enableInTreeAutoscaling=BOOL, autoscalerOptions=AUTOSCALER_OPTIONS, suspend=BOOL,
                       headGroupSpec=HEAD_GROUP, workerGroupSpecs=array(WORKER_GROUP))
RAY_JOB_SPEC = obj(entrypoint=STR, runtimeEnvYAML=STR, rayClusterSpec=RAY_CLUSTER_SPEC, clusterSelector=STR_MAP,
                   shutdownAfterJobFinishes=BOOL, ttlSecondsAfterFinished=NONNEG, activeDeadlineSeconds=NONNEG,
                   suspend=BOOL, submissionMode={"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                   submitterPodTemplate=k8s("core.v1.PodTemplateSpec"))
# serveConfigV2 is Ray Serve's config as a YAML string (test_manifests.py parses and checks it);
# upgradeStrategy.type is a free string in the CRD, these three the operator's validation accepts.
RAY_SERVICE_SPEC = obj(("rayClusterConfig",), serveConfigV2=STR, rayClusterConfig=RAY_CLUSTER_SPEC,
                       upgradeStrategy=obj(type={"enum": ["NewCluster", "NewClusterWithIncrementalUpgrade", "None"]}),
                       excludeHeadPodFromServeSvc=BOOL, rayClusterDeletionDelaySeconds=NONNEG, suspend=BOOL)


def _custom_resource(kind: str, spec: Schema) -> Schema:
    return obj(("apiVersion", "kind", "metadata", "spec"), apiVersion={"const": "ray.io/v1"}, kind={"const": kind},
               metadata=k8s("meta.v1.ObjectMeta"), spec=spec)


KUBERAY: dict[tuple[str, str], Schema] = {
    ("ray.io/v1", "RayCluster"): _custom_resource("RayCluster", RAY_CLUSTER_SPEC),
    ("ray.io/v1", "RayJob"): _custom_resource("RayJob", RAY_JOB_SPEC),
    ("ray.io/v1", "RayService"): _custom_resource("RayService", RAY_SERVICE_SPEC),
}


def k8s_schema(api_version: str, kind: str, version: str) -> Schema:
    """kubernetes-validate's schema for a built-in kind (`apps/v1` Deployment → deployment-apps-v1.json)."""
    group = api_version.split("/")[0].split(".")[0] + "-" if "/" in api_version else ""
    path = _schema_dir(version).joinpath(f"{kind.lower()}-{group}{api_version.split('/')[-1]}.json")
    if not path.is_file():
        raise LookupError(f"kubernetes-validate {version} has no schema for {api_version} {kind}")
    return json.loads(path.read_text())


@lru_cache(maxsize=None)
def validator(api_version: str, kind: str, version: str) -> Draft202012Validator:
    """A validator for one kind at one Kubernetes version (KubeRay kinds: ours, with its references
    into that version's Kubernetes definitions)."""
    schema = KUBERAY.get((api_version, kind)) or k8s_schema(api_version, kind, version)
    return Draft202012Validator(schema, registry=_registry(version))


def errors(doc: dict, version: str) -> list[str]:
    v = validator(doc.get("apiVersion"), doc.get("kind"), version)
    found = sorted(v.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in found]


def pod_template_errors(template: dict, version: str) -> list[str]:
    """A pod template alone, against the Kubernetes PodTemplateSpec definition."""
    v = Draft202012Validator(k8s("core.v1.PodTemplateSpec"), registry=_registry(version))
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in v.iter_errors(template)]
