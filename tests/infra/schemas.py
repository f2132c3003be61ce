"""Offline JSON Schemas (draft 2020-12) for the Kubernetes and KubeRay objects in infra/.

Hand-written from the Kubernetes API reference and KubeRay's ray.io/v1 CRDs, covering only the
fields our manifests use. Every modelled object sets `additionalProperties: false`, so a misspelt
or misplaced key is an error here, where `kubectl apply` would drop it silently (CRDs prune
unknown fields) or reject it only against a live cluster.
"""
from __future__ import annotations

from typing import Any

Schema = dict[str, Any]


def obj(required: tuple[str, ...] = (), **props: Schema) -> Schema:
    return {"type": "object", "properties": props, "required": list(required), "additionalProperties": False}


def array(items: Schema, min_items: int = 0) -> Schema:
    return {"type": "array", "items": items, "minItems": min_items}


def map_of(values: Schema, keys: Schema | None = None) -> Schema:
    return {"type": "object", "additionalProperties": values, **({"propertyNames": keys} if keys else {})}


def one_of_keys(*keys: str) -> Schema:
    """Exactly one of these keys is present (volume sources, probe handlers...)."""
    return {"oneOf": [{"required": [k]} for k in keys]}


STR = {"type": "string", "minLength": 1}
BOOL = {"type": "boolean"}
NONNEG = {"type": "integer", "minimum": 0}
POSITIVE = {"type": "integer", "minimum": 1}
DNS_LABEL = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
DNS_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
PORT_OR_NAME = {"anyOf": [PORT, {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 15}]}
QUANTITY = {"anyOf": [{"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$"},
                      {"type": "number", "minimum": 0}]}
LABELS = map_of({"type": "string", "maxLength": 63},
                keys={"type": "string", "pattern": r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"})
PROTOCOL = {"enum": ["TCP", "UDP", "SCTP"]}

# --- core/v1 pieces ---------------------------------------------------------------------------

OBJECT_META = {
    **obj(name=DNS_NAME, generateName={"type": "string", "pattern": r"^[a-z0-9][-a-z0-9]*-$"},
          namespace=DNS_LABEL, labels=LABELS, annotations=map_of({"type": "string"})),
    "anyOf": [{"required": ["name"]}, {"required": ["generateName"]}],
}
TEMPLATE_META = obj(labels=LABELS, annotations=map_of({"type": "string"}))

KEY_REF = obj(("name", "key"), name=DNS_NAME, key={"type": "string", "pattern": r"^[-._a-zA-Z0-9]+$"}, optional=BOOL)
ENV_VAR = {
    **obj(("name",), name={"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]*$"},
          value={"type": "string"},  # an integer here is rejected by the API server
          valueFrom={**obj(secretKeyRef=KEY_REF, configMapKeyRef=KEY_REF, fieldRef=obj(("fieldPath",), fieldPath=STR)),
                     **one_of_keys("secretKeyRef", "configMapKeyRef", "fieldRef")}),
    **one_of_keys("value", "valueFrom"),
}
PROBE = {
    **obj(httpGet=obj(("port",), path={"type": "string", "pattern": "^/"}, port=PORT_OR_NAME, scheme={"enum": ["HTTP", "HTTPS"]}),
          exec=obj(("command",), command=array(STR, 1)),
          tcpSocket=obj(("port",), port=PORT_OR_NAME),
          initialDelaySeconds=NONNEG, periodSeconds=POSITIVE, timeoutSeconds=POSITIVE,
          successThreshold=POSITIVE, failureThreshold=POSITIVE),
    **one_of_keys("httpGet", "exec", "tcpSocket"),
}
RESOURCE_LIST = map_of(QUANTITY, keys={"enum": ["cpu", "memory", "ephemeral-storage", "nvidia.com/gpu"]})
RESOURCES = obj(requests=RESOURCE_LIST, limits=RESOURCE_LIST)
CONTAINER_SECURITY = obj(runAsNonRoot=BOOL, runAsUser=NONNEG, runAsGroup=NONNEG, privileged=BOOL,
                         allowPrivilegeEscalation=BOOL, readOnlyRootFilesystem=BOOL,
                         capabilities=obj(add=array(STR), drop=array(STR)))
POD_SECURITY = obj(runAsNonRoot=BOOL, runAsUser=NONNEG, runAsGroup=NONNEG, fsGroup=NONNEG,
                   seccompProfile=obj(("type",), type={"enum": ["RuntimeDefault", "Localhost", "Unconfined"]}))
CONTAINER = obj(
    ("name", "image"),
    name=DNS_LABEL, image=STR, imagePullPolicy={"enum": ["Always", "IfNotPresent", "Never"]},
    command=array(STR), args=array({"type": "string"}), workingDir=STR,
    env=array(ENV_VAR),
    ports=array(obj(("containerPort",), name=PORT_OR_NAME, containerPort=PORT, protocol=PROTOCOL)),
    resources=RESOURCES,
    volumeMounts=array(obj(("name", "mountPath"), name=DNS_LABEL, mountPath={"type": "string", "pattern": "^/"},
                           readOnly=BOOL, subPath=STR)),
    readinessProbe=PROBE, livenessProbe=PROBE, startupProbe=PROBE,
    securityContext=CONTAINER_SECURITY,
)
VOLUME = {
    **obj(("name",), name=DNS_LABEL,
          emptyDir=obj(medium={"enum": ["", "Memory"]}, sizeLimit=QUANTITY),
          secret=obj(("secretName",), secretName=DNS_NAME, optional=BOOL,
                     defaultMode={"type": "integer", "minimum": 0, "maximum": 0o777},
                     items=array(obj(("key", "path"), key=STR, path=STR))),
          configMap=obj(("name",), name=DNS_NAME, items=array(obj(("key", "path"), key=STR, path=STR))),
          persistentVolumeClaim=obj(("claimName",), claimName=DNS_NAME, readOnly=BOOL)),
    **one_of_keys("emptyDir", "secret", "configMap", "persistentVolumeClaim"),
}
TOLERATION = obj(key=STR, operator={"enum": ["Exists", "Equal"]}, value={"type": "string"},
                 effect={"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]}, tolerationSeconds=NONNEG)
POD_SPEC = obj(
    ("containers",),
    containers=array(CONTAINER, 1), initContainers=array(CONTAINER), volumes=array(VOLUME),
    restartPolicy={"enum": ["Always", "OnFailure", "Never"]},
    serviceAccountName=DNS_NAME, automountServiceAccountToken=BOOL, securityContext=POD_SECURITY,
    tolerations=array(TOLERATION), nodeSelector=map_of({"type": "string"}),
    terminationGracePeriodSeconds=NONNEG, imagePullSecrets=array(obj(("name",), name=DNS_NAME)),
)
POD_TEMPLATE = obj(("spec",), metadata=TEMPLATE_META, spec=POD_SPEC)
# Pods of a Job (CronJob, RayJob submitter) must not restart in place.
JOB_POD_TEMPLATE = {"allOf": [POD_TEMPLATE, {"properties": {"spec": {
    "required": ["restartPolicy"], "properties": {"restartPolicy": {"enum": ["Never", "OnFailure"]}}}}}]}
SELECTOR = obj(("matchLabels",), matchLabels={**LABELS, "minProperties": 1})


def top_level(api_version: str, kind: str, spec: Schema) -> Schema:
    return obj(("apiVersion", "kind", "metadata", "spec"), apiVersion={"const": api_version},
               kind={"const": kind}, metadata=OBJECT_META, spec=spec)


DEPLOYMENT = top_level("apps/v1", "Deployment", obj(
    ("selector", "template"), replicas=NONNEG, selector=SELECTOR, template=POD_TEMPLATE,
    revisionHistoryLimit=NONNEG, strategy=obj(("type",), type={"enum": ["Recreate", "RollingUpdate"]})))

SERVICE = top_level("v1", "Service", obj(
    ("ports",), type={"enum": ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"]},
    selector=LABELS,
    ports=array(obj(("port",), name=PORT_OR_NAME, port=PORT, targetPort=PORT_OR_NAME, protocol=PROTOCOL), 1)))

PEER = {**obj(podSelector=obj(matchLabels=LABELS), namespaceSelector=obj(matchLabels=LABELS),
              ipBlock=obj(("cidr",), cidr=STR, **{"except": array(STR)})), "minProperties": 1}
NETWORK_POLICY = top_level("networking.k8s.io/v1", "NetworkPolicy", obj(
    ("podSelector",), podSelector=SELECTOR, policyTypes=array({"enum": ["Ingress", "Egress"]}, 1),
    ingress=array(obj(("from",), **{"from": array(PEER, 1)},
                      ports=array(obj(("port",), protocol=PROTOCOL, port=PORT_OR_NAME)))),
    egress=array(obj(to=array(PEER), ports=array(obj(("port",), protocol=PROTOCOL, port=PORT_OR_NAME))))))

PVC = top_level("v1", "PersistentVolumeClaim", obj(
    ("accessModes", "resources"),
    accessModes=array({"enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]}, 1),
    resources=obj(("requests",), requests=obj(("storage",), storage=QUANTITY)),
    storageClassName=STR, volumeMode={"enum": ["Filesystem", "Block"]}))

JOB_SPEC = obj(("template",), template=JOB_POD_TEMPLATE, backoffLimit=NONNEG, activeDeadlineSeconds=POSITIVE,
               ttlSecondsAfterFinished=NONNEG, parallelism=NONNEG, completions=NONNEG)
CRON_JOB = top_level("batch/v1", "CronJob", obj(
    ("schedule", "jobTemplate"),
    schedule={"type": "string", "pattern": r"^(\S+\s+){4}\S+$"}, timeZone=STR,
    concurrencyPolicy={"enum": ["Allow", "Forbid", "Replace"]}, startingDeadlineSeconds=NONNEG,
    successfulJobsHistoryLimit=NONNEG, failedJobsHistoryLimit=NONNEG, suspend=BOOL,
    jobTemplate=obj(("spec",), metadata=TEMPLATE_META, spec=JOB_SPEC)))

# --- KubeRay ray.io/v1 --------------------------------------------------------------------------

# KubeRay passes these to `ray start --key=value`: a map of strings (num-cpus: 0 unquoted is wrong).
# rayStartParams became optional in KubeRay 1.1; we require it so older operators accept the CRs.
RAY_START_PARAMS = map_of({"type": "string"}, keys={"type": "string", "pattern": r"^[a-z][a-z0-9-]*$"})
HEAD_GROUP = obj(("rayStartParams", "template"), rayStartParams=RAY_START_PARAMS, template=POD_TEMPLATE,
                 serviceType={"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}, enableIngress=BOOL)
WORKER_GROUP = obj(("groupName", "rayStartParams", "template", "minReplicas", "maxReplicas"),
                   groupName=DNS_LABEL, replicas=NONNEG, minReplicas=NONNEG, maxReplicas=NONNEG,
                   numOfHosts=POSITIVE, suspend=BOOL, rayStartParams=RAY_START_PARAMS, template=POD_TEMPLATE)
AUTOSCALER_OPTIONS = obj(upscalingMode={"enum": ["Default", "Aggressive", "Conservative"]},
                         idleTimeoutSeconds=NONNEG, resources=RESOURCES, image=STR,
                         imagePullPolicy={"enum": ["Always", "IfNotPresent", "Never"]},
                         env=array(ENV_VAR), securityContext=CONTAINER_SECURITY)
RAY_CLUSTER_SPEC = obj(("rayVersion", "headGroupSpec"),
                       rayVersion={"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
                       enableInTreeAutoscaling=BOOL, autoscalerOptions=AUTOSCALER_OPTIONS, suspend=BOOL,
                       headGroupSpec=HEAD_GROUP, workerGroupSpecs=array(WORKER_GROUP))
RAY_CLUSTER = top_level("ray.io/v1", "RayCluster", RAY_CLUSTER_SPEC)
RAY_JOB = top_level("ray.io/v1", "RayJob", {
    **obj(("entrypoint",), entrypoint=STR, runtimeEnvYAML=STR, rayClusterSpec=RAY_CLUSTER_SPEC,
          clusterSelector=LABELS, shutdownAfterJobFinishes=BOOL, ttlSecondsAfterFinished=NONNEG,
          activeDeadlineSeconds=POSITIVE, suspend=BOOL,
          submissionMode={"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
          submitterPodTemplate=JOB_POD_TEMPLATE),
    **one_of_keys("rayClusterSpec", "clusterSelector"),
})

SCHEMAS: dict[tuple[str, str], Schema] = {
    ("apps/v1", "Deployment"): DEPLOYMENT,
    ("v1", "Service"): SERVICE,
    ("v1", "PersistentVolumeClaim"): PVC,
    ("networking.k8s.io/v1", "NetworkPolicy"): NETWORK_POLICY,
    ("batch/v1", "CronJob"): CRON_JOB,
    ("ray.io/v1", "RayCluster"): RAY_CLUSTER,
    ("ray.io/v1", "RayJob"): RAY_JOB,
}
