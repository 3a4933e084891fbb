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
import re
import subprocess
import sys
import tempfile

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


def mounts_of(container):
    return {m["name"]: m for m in container.get("volumeMounts", [])}


def run_init(container, paths, env):
    """Runs an init container's `sh -c` script on this machine, its absolute
    paths mapped to folders here; returns (exit code, stderr)."""
    check(container["command"] == ["sh", "-c"] and len(container["args"]) == 1,
          f"init container runs one sh -c script: {container['command']} {container['args']}")
    there = "|".join(re.escape(p) for p in sorted(paths, key=len, reverse=True))
    script = re.sub(rf"(?<![\w./-])({there})(?![\w-])", lambda m: paths[m.group(1)], container["args"][0])
    r = subprocess.run(["sh", "-c", script], env={"PATH": os.environ["PATH"], **env},
                       capture_output=True, text=True)
    return r.returncode, r.stderr


def mode(path):
    return os.stat(path).st_mode & 0o777


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
check(env["FERRY_THREADS"]["value"] == "0", "worker threads: one per CPU by default")
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
check("initContainers" not in pod and "--admit-with" not in c["args"], "no admission unless asked")
check("WARNING: no admission" in raw["ferry/templates/NOTES.txt"], "NOTES warn without admission")
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
    "admission": {"certificates": {"existingSecret": "ferry-ch-admission"}},
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
    "threads": 2,
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
check(env["FERRY_THREADS"]["value"] == "2", "worker threads")
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
check("WARNING" not in raw["ferry/templates/NOTES.txt"], "no warning with authority keys and admission")
check("ferry-ch-admission" in raw["ferry/templates/NOTES.txt"], "NOTES name the admission Secret")
print("custom: every value reaches the manifests")

# -- admission.certificates: each pod's keys and certificate from a Secret ------
check(len(pod.get("initContainers", [])) == 1, "one init container with admission.certificates")
init = pod["initContainers"][0]
check(init["name"] == "admission" and init["image"] == c["image"]
      and init["imagePullPolicy"] == c["imagePullPolicy"], "the init container runs the node's image")
check(init["securityContext"] == c["securityContext"], "the init container has the node's security context")
check(env_of(init)["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name",
      "the init container knows its pod's name")
im = mounts_of(init)
check(im["data"]["mountPath"] == "/var/lib/ferry" and not im["data"].get("readOnly"),
      "the init container writes the key dir on the data volume")
check(im["admission"]["mountPath"] == "/admission" and im["admission"]["readOnly"] is True,
      "the Secret mounted read-only in the init container")
check("admission" not in mounts_of(c) and "authority" not in mounts_of(c), "the node does not mount the Secret")
vols = {v["name"]: v for v in pod["volumes"]}
check(vols["admission"]["secret"] == {"secretName": "ferry-ch-admission", "defaultMode": 0o400},
      f"the admission Secret volume, mode 0400: {vols['admission']}")
check(c["args"] == ["node", "--config", "/etc/ferry/ferry.toml", "--create-keys"], f"node args: {c['args']}")
with tempfile.TemporaryDirectory() as t:
    sec, kd = os.path.join(t, "admission"), os.path.join(t, "keys")
    os.makedirs(sec)
    os.makedirs(kd)
    paths = {"/admission": sec, "/var/lib/ferry": kd}

    def put(name, text):
        path = os.path.join(sec, name)
        if os.path.exists(path):
            os.chmod(path, 0o600)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o440)  # what a Secret volume gives under fsGroup

    def read(name):
        with open(os.path.join(kd, name)) as f:
            return f.read()

    put("ferry-ch-1.identity.key", "id-1")
    put("ferry-ch-1.noise.key", "noise-1")
    code, err = run_init(init, paths, {"POD_NAME": "ferry-ch-1"})
    check(code != 0 and "ferry-ch-admission has no ferry-ch-1.cert" in err,
          f"a pod whose files are missing does not start, saying which: {code} {err}")
    check(not os.listdir(kd), "nothing copied when a file is missing")
    put("ferry-ch-1.cert", "cert-1")
    put("ferry-ch-0.cert", "cert-0")
    code, err = run_init(init, paths, {"POD_NAME": "ferry-ch-1"})
    check(code == 0, f"init: {err}")
    check([read(f) for f in ("identity.key", "noise.key", "node.cert")] == ["id-1", "noise-1", "cert-1"],
          "the pod's own three files copied into the key dir")
    check(all(mode(os.path.join(kd, f)) == 0o600 for f in os.listdir(kd)), "copied with mode 0600")
    put("ferry-ch-1.cert", "cert-1-renewed")
    code, err = run_init(init, paths, {"POD_NAME": "ferry-ch-1"})
    check(code == 0 and read("node.cert") == "cert-1-renewed" and mode(os.path.join(kd, "node.cert")) == 0o600,
          f"a renewed certificate for the same identity replaces node.cert: {err}")
    with open(os.path.join(kd, "identity.key"), "w") as f:
        f.write("id-other")
    put("ferry-ch-1.cert", "cert-1-again")
    code, err = run_init(init, paths, {"POD_NAME": "ferry-ch-1"})
    check(code == 0 and read("node.cert") == "cert-1-renewed" and read("identity.key") == "id-other",
          f"a key dir with node.cert and another identity is left alone: {err}")
    for f in os.listdir(sec):
        os.chmod(os.path.join(sec, f), 0o600)
        os.remove(os.path.join(sec, f))
    code, err = run_init(init, paths, {"POD_NAME": "ferry-ch-1"})
    check(code == 0 and read("node.cert") == "cert-1-renewed",
          f"an admitted pod starts after its files leave the Secret: {err}")
print("admission.certificates: init container, Secret volume and its script (run here) checked")

# -- admission.testAuthority: a test cluster's authority key --------------------
test_values = {"jurisdiction": "DE",
               "admission": {"testAuthority": {"existingSecret": "ferry-test-authority", "key": "auth.key"}}}
lint(test_values)
docs, raw = render(test_values)
validate(docs, "testAuthority")
pod = by_kind(docs, "StatefulSet")[0]["spec"]["template"]["spec"]
c = pod["containers"][0]
check(c["args"] == ["node", "--config", "/etc/ferry/ferry.toml", "--create-keys",
                    "--admit-with", "/authority/authority.key"], f"the node admits itself: {c['args']}")
check(mounts_of(c)["authority"]["mountPath"] == "/authority" and mounts_of(c)["authority"]["readOnly"] is True,
      "the node reads the key from /authority")
vols = {v["name"]: v for v in pod["volumes"]}
check(vols["authority-secret"]["secret"] == {"secretName": "ferry-test-authority", "defaultMode": 0o400,
                                             "items": [{"key": "auth.key", "path": "authority.key"}]},
      f"the Secret's key, mode 0400: {vols['authority-secret']}")
check(vols["authority"]["emptyDir"]["medium"] == "Memory", "the key's copy stays in memory")
check("admission" not in vols, "no certificates Secret")
psc = pod["securityContext"]
check(psc["runAsUser"] == 10001 and psc["fsGroup"] == 10001,
      "user 10001 reads the Secret's file (group fsGroup) and owns the copy")
check(len(pod["initContainers"]) == 1, "one init container with admission.testAuthority")
init = pod["initContainers"][0]
check(init["image"] == c["image"] and init["securityContext"] == c["securityContext"]
      and "runAsUser" not in init["securityContext"], "the init container runs the node's image as the node's user")
im = mounts_of(init)
check(im["authority-secret"]["mountPath"] == "/authority-secret" and im["authority-secret"]["readOnly"] is True
      and im["authority"]["mountPath"] == "/authority" and not im["authority"].get("readOnly")
      and "data" not in im, "the init container copies the key from the Secret into /authority")
with tempfile.TemporaryDirectory() as t:
    sec, out = os.path.join(t, "secret"), os.path.join(t, "authority")
    os.makedirs(sec)
    os.makedirs(out)
    with open(os.path.join(sec, "authority.key"), "w") as f:
        f.write("ab" * 32 + "\n")
    os.chmod(os.path.join(sec, "authority.key"), 0o440)
    code, err = run_init(init, {"/authority-secret": sec, "/authority": out}, {})
    copy = os.path.join(out, "authority.key")
    check(code == 0 and open(copy).read() == "ab" * 32 + "\n" and mode(copy) == 0o600,
          f"the key copied with mode 0600 (the node refuses a group-readable key): {err}")
notes = raw["ferry/templates/NOTES.txt"]
check("WARNING: test cluster admission" in notes and "ferry-test-authority" in notes,
      "NOTES warn that the test authority admits nodes")
check("WARNING: no admission" not in notes and "WARNING: no authority keys" not in notes,
      "the test authority's key is trusted: no other warning")
print("admission.testAuthority: --admit-with, Secret, in-memory copy and its script (run here) checked")

# -- refusals -------------------------------------------------------------------
for values, needle in [
    ({}, "jurisdiction is required"),
    ({"jurisdiction": "DEU"}, "not an ISO 3166-1 alpha-2 code"),
    ({"jurisdiction": "DE", "drain": {"windowSeconds": 120}}, "must be longer than drain.windowSeconds"),
    ({"jurisdiction": "DE", "roles": ["entry"]}, "is not relay or exit"),
    ({"jurisdiction": "DE", "logFormat": "xml"}, "is not json or text"),
    ({"jurisdiction": "DE", "threads": -1}, "threads: -1 is not a whole number"),
    ({"jurisdiction": "DE", "threads": "many"}, "threads: many is not a whole number"),
    ({"jurisdiction": "DE", "threads": 5000}, "threads: 5000 is more than 1024"),
    ({"jurisdiction": "DE", "dataPlane": {"address": "nodePort"}}, "is not podIP or hostIP"),
    ({"jurisdiction": "DE", "admission": {"certificates": {"existingSecret": "a"},
                                          "testAuthority": {"existingSecret": "b"}}},
     "admission.certificates.existingSecret and admission.testAuthority.existingSecret are both set"),
]:
    try:
        render(values)
        check(False, f"{values} rendered")
    except helm_python.HelmError as e:
        check(needle in str(e), f"{values}: refusal says `{needle}`: {e}")
print("refusals name the value at fault")
print(f"chart: all {checks} checks passed")
