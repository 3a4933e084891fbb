#!/usr/bin/env python3
"""Renders and lints deploy/helm/ferry with Helm's own code (helm-python-sdk
bundles Helm's Go SDK) for the chart's defaults and for non-default values,
validates every rendered manifest against the Kubernetes schemas
(kubernetes-validate, strict: unknown fields are errors), and checks what
operators rely on. Prints one line per check; exits 1 on the first failure.

Run by tests/tests/helm.rs; `scripts/ensure-deps.sh test` installs the two
packages.
"""
import json
import logging
import os
import sys

import yaml

logging.disable(logging.CRITICAL)
import helm_python  # noqa: E402
import kubernetes_validate  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHART = os.path.join(ROOT, "deploy", "helm", "ferry")
KUBE = os.environ.get("FERRY_KUBE_VERSION", "1.30.0")
CRDS = {"ServiceMonitor", "PrometheusRule"}
checks = 0


def check(ok, what):
    global checks
    if not ok:
        print(f"FAIL: {what}", flush=True)
        sys.exit(1)
    checks += 1


def render(values):
    chart = helm_python.Chart.load(CHART)
    try:
        out = chart.render(values=values, name="ferry", namespace="mesh", is_install=True)
    finally:
        chart.close()
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        for d in yaml.safe_load_all(text):
            if d:
                docs.append(d)
    return docs, out


def lint(values):
    r = helm_python.lint(CHART, values=values, strict=True, kube_version=f"v{KUBE}")
    errors = [m for m in r["messages"] if m["severity"] >= 2] + [{"error": e} for e in r["errors"]]
    check(not errors, f"helm lint (strict) with {values}: {errors}")
    print(f"lint ok ({len(r['messages'])} info message(s))")


def validate(docs, label):
    kinds = []
    for d in docs:
        kinds.append(d["kind"])
        if d["kind"] in CRDS:
            continue  # CRD schemas are not in kubernetes-validate; checked below by hand
        try:
            kubernetes_validate.validate(d, KUBE, strict=True)
        except kubernetes_validate.ValidationError as e:
            check(False, f"{label}: {d['kind']} {d['metadata']['name']}: {e.message} at {list(e.path)}")
    print(f"{label}: {len(docs)} manifests valid for Kubernetes {KUBE}: {', '.join(kinds)}")


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def env_of(container):
    return {e["name"]: e for e in container["env"]}


# -- defaults (with the one required value) ------------------------------------
base = {"jurisdiction": "DE"}
lint(base)
docs, raw = render(base)
validate(docs, "defaults")
sts = by_kind(docs, "StatefulSet")[0]
spec, pod = sts["spec"], sts["spec"]["template"]["spec"]
c = pod["containers"][0]
env = env_of(c)
window = int(env["FERRY_DRAIN_GRACE_SECS"]["value"])
check(spec["volumeClaimTemplates"][0]["metadata"]["name"] == "data", "a volume claim for the data dir")
check(any(m["name"] == "data" and m["mountPath"] == "/var/lib/ferry" for m in c["volumeMounts"]),
      "the claim holds /var/lib/ferry (keys and store)")
check(c["livenessProbe"]["httpGet"]["path"] == "/livez", "liveness on /livez")
check(c["readinessProbe"]["httpGet"]["path"] == "/readyz", "readiness on /readyz")
check(c["readinessProbe"]["httpGet"]["port"] == "metrics", "probes use the metrics listener")
pre = c["lifecycle"]["preStop"]["exec"]["command"]
check(pre[:2] == ["ferry", "drain"] and "--transient" in pre and "--wait" in pre,
      f"preStop drains and waits, not persisted: {pre}")
check(pre[pre.index("--in") + 1] == f"{window}s", "preStop drains for the drain window")
check(pod["terminationGracePeriodSeconds"] > window,
      f"grace period {pod['terminationGracePeriodSeconds']} s > drain window {window} s")
check(env["FERRY_ADVERTISE_LINK"]["value"] == "$(POD_IP):7000"
      and env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
      and "hostNetwork" not in pod,
      "each pod advertises its own address")
check(env["FERRY_BOOTSTRAP"]["value"].split(",")[0] == "ferry-0.ferry-mesh.mesh.svc.cluster.local:7100",
      "bootstrap through the release's own pods by DNS name")
psc, sc = pod["securityContext"], c["securityContext"]
check(psc["runAsNonRoot"] and psc["runAsUser"] != 0, "runs as non-root")
check(sc["readOnlyRootFilesystem"] is True, "read-only root filesystem")
check(sc["capabilities"]["drop"] == ["ALL"], "all capabilities dropped")
check(sc["allowPrivilegeEscalation"] is False, "no privilege escalation")
check(env["FERRY_LOG_FORMAT"]["value"] == "json", "JSON logs by default")
headless = [s for s in by_kind(docs, "Service") if s["spec"].get("clusterIP") == "None"]
check(len(headless) == 1 and headless[0]["metadata"]["name"] == spec["serviceName"],
      "a headless service gives each pod its address")
check(headless[0]["spec"]["publishNotReadyAddresses"] is True, "peers resolve before they are ready")
pdb = by_kind(docs, "PodDisruptionBudget")
check(len(pdb) == 1 and pdb[0]["spec"]["selector"]["matchLabels"] == spec["selector"]["matchLabels"],
      "a PodDisruptionBudget over the pods")
check(not by_kind(docs, "ServiceMonitor"), "no ServiceMonitor unless asked")
dash = by_kind(docs, "ConfigMap")
check(len(dash) == 1, "the dashboard ConfigMap")
with open(os.path.join(ROOT, "deploy", "grafana", "ferry-dashboard.json")) as f:
    shipped = json.load(f)
check(json.loads(dash[0]["data"]["ferry-dashboard.json"]) == shipped,
      "the ConfigMap holds the shipped dashboard")
check(dash[0]["metadata"]["labels"].get("grafana_dashboard") == "1", "labelled for Grafana's sidecar")
check("WARNING: no authority keys" in raw["ferry/templates/NOTES.txt"], "NOTES warn without authority keys")
print("defaults: StatefulSet, probes, preStop drain, security context, PDB, dashboard checked")

# -- non-default values ---------------------------------------------------------
custom = {
    "jurisdiction": "ch",
    "replicas": 5,
    "roles": ["relay", "exit"],
    "family": "acme",
    "image": {"repository": "registry.example/ferry", "tag": "1.2.3"},
    "mesh": {"bootstrap": ["ferry-0.ferry-mesh.other.svc.cluster.local:7100"], "bootstrapSelf": False},
    "authority": {"existingSecret": "ferry-authority", "key": "pub", "threshold": 2},
    "exit": {"allowPrivate": True, "rules": ["allow 10.1.0.0/16:443", "deny 0.0.0.0/0"]},
    "drain": {"windowSeconds": 300},
    "terminationGracePeriodSeconds": 360,
    "persistence": {"size": "5Gi", "storageClassName": "fast"},
    "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
    "podDisruptionBudget": {"enabled": True, "maxUnavailable": 2},
    "serviceMonitor": {"enabled": True, "interval": "30s", "labels": {"release": "kube-prometheus"}},
    "prometheusRule": {"enabled": True},
    "dashboard": {"enabled": False},
    "configOverride": "[node]\njurisdiction = \"CH\"\nroles = [\"relay\"]\n",
    "extraEnv": [{"name": "RUST_LOG", "value": "info"}],
    "logFormat": "text",
    "dataPlane": {"address": "hostIP"},
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "topology.kubernetes.io/region", "operator": "In", "values": ["eu-central"]}]}]}}},
    "logLevel": "debug",
}
lint(custom)
docs, raw = render(custom)
validate(docs, "custom")
sts = by_kind(docs, "StatefulSet")[0]
pod = sts["spec"]["template"]["spec"]
c = pod["containers"][0]
env = env_of(c)
check(sts["spec"]["replicas"] == 5, "replicas")
check(env["FERRY_JURISDICTION"]["value"] == "CH", "jurisdiction upper-cased")
check(env["FERRY_ROLES"]["value"] == "relay,exit", "roles")
check(env["FERRY_BOOTSTRAP"]["value"] == "ferry-0.ferry-mesh.other.svc.cluster.local:7100", "bootstrap peers")
ref = env["FERRY_AUTHORITY_KEYS"]["valueFrom"]["secretKeyRef"]
check(ref == {"name": "ferry-authority", "key": "pub"}, "authority keys from the existing Secret")
check(env["FERRY_AUTHORITY_THRESHOLD"]["value"] == "2", "threshold")
check(env["FERRY_EXIT_RULES"]["value"] == "allow 10.1.0.0/16:443,deny 0.0.0.0/0", "exit rules")
check(env["RUST_LOG"]["value"] == "info", "extra env")
check(env["FERRY_LOG_FORMAT"]["value"] == "text" and env["FERRY_LOG"]["value"] == "debug", "log settings")
check(c["image"] == "registry.example/ferry:1.2.3", "image")
check(pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet", "host networking")
check(env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP", "advertises the node's address")
anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
check(anti["topologyKey"] == "kubernetes.io/hostname"
      and anti["labelSelector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"], "one pod per node")
check("nodeAffinity" in pod["affinity"], "the node affinity given is kept")
check(c["resources"]["limits"]["memory"] == "2Gi", "resources")
pre = c["lifecycle"]["preStop"]["exec"]["command"]
check(pre[pre.index("--in") + 1] == "300s" and pod["terminationGracePeriodSeconds"] == 360, "drain window")
vct = sts["spec"]["volumeClaimTemplates"][0]["spec"]
check(vct["storageClassName"] == "fast" and vct["resources"]["requests"]["storage"] == "5Gi", "persistence")
check(any(m["mountPath"] == "/etc/ferry/ferry.toml" for m in c["volumeMounts"]), "config override mounted")
check("checksum/config" in sts["spec"]["template"]["metadata"]["annotations"], "config change rolls the pods")
check(by_kind(docs, "PodDisruptionBudget")[0]["spec"]["maxUnavailable"] == 2, "PDB maxUnavailable")
sm = by_kind(docs, "ServiceMonitor")
check(len(sm) == 1, "a ServiceMonitor when enabled")
sm = sm[0]
check(sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["metadata"]["labels"]["release"] == "kube-prometheus",
      "ServiceMonitor labels")
metrics_svc = [s for s in by_kind(docs, "Service") if s["spec"].get("clusterIP") != "None"][0]
check(all(metrics_svc["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items()),
      "the ServiceMonitor selects the metrics service")
ep = sm["spec"]["endpoints"][0]
check(ep["port"] in [p["name"] for p in metrics_svc["spec"]["ports"]] and ep["path"] == "/metrics"
      and ep["interval"] == "30s", "ServiceMonitor endpoint")
check({"targetLabel": "job", "replacement": "ferry"} in ep["relabelings"], "job=\"ferry\", as the dashboard expects")
pr = by_kind(docs, "PrometheusRule")
with open(os.path.join(ROOT, "deploy", "prometheus", "ferry-rules.yml")) as f:
    rules = yaml.safe_load(f)
check(len(pr) == 1 and pr[0]["spec"]["groups"] == rules["groups"], "PrometheusRule holds the shipped rules")
check(not [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")],
      "no dashboard when disabled")
check("WARNING" not in raw["ferry/templates/NOTES.txt"], "no warning with authority keys")
print("custom: every value reaches the manifests")

# -- refusals -------------------------------------------------------------------
for values, needle in [
    ({}, "jurisdiction is required"),
    ({"jurisdiction": "DEU"}, "not an ISO 3166-1 alpha-2 code"),
    ({"jurisdiction": "DE", "drain": {"windowSeconds": 120}}, "must be longer than drain.windowSeconds"),
    ({"jurisdiction": "DE", "roles": ["entry"]}, "is not relay or exit"),
    ({"jurisdiction": "DE", "logFormat": "xml"}, "is not json or text"),
    ({"jurisdiction": "DE", "dataPlane": {"address": "nodePort"}}, "is not podIP or hostIP"),
]:
    try:
        render(values)
        check(False, f"{values} rendered")
    except helm_python.HelmError as e:
        check(needle in str(e), f"{values}: refusal says `{needle}`: {e}")
print("refusals name the value at fault")
print(f"chart: all {checks} checks passed")
