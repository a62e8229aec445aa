#!/usr/bin/env python3
"""Offline checks of everything under deploy/ (run by `cargo xtask deploy-check` and `cargo xtask test`).

Needs PyYAML and kubernetes-validate (installed into the torch venv by `cargo xtask setup`); the
Kubernetes schemas ship inside kubernetes-validate, so nothing is fetched at check time.

  * every YAML file under deploy/ parses;
  * Kubernetes manifests: built-in kinds validate (strictly) against the pinned Kubernetes schema,
    the KEDA ScaledObject and the kustomization are checked structurally, and the objects and
    settings the deployment relies on are present (probes, GPU requests, grace periods, PVCs, ...);
    the coordinators store results in S3: FARM_RESULTS (s3://) and AWS_REGION / AWS_ENDPOINT(_URL)
    come from the ConfigMap, the access keys from the Secret (or, without keys, a workload identity
    ServiceAccount), and no multi-replica coordinator mounts a results volume;
  * compose.yaml: the services, profiles, GPU reservations, volumes and ports; the coordinators
    store results in the objectstore service (s3:// results, AWS_* settings, the bucket created
    first); every variable it uses is documented in .env.example;
  * Dockerfiles: FROM (after ARGs) comes first, images are pinned (no `latest`, no untagged image),
    the runtime stage runs as a non-root USER, the worker stops with SIGTERM and sets LD_LIBRARY_PATH;
  * systemd units: the keys the farm relies on, the S3 results alternative documented in the
    coordinator unit; launch-workers.sh passes `bash -n`;
  * every deploy file that README.md (`k8s/...`, `systemd/...`, ...) or a manifest names exists;
  * every farm_* metric named in deploy/ exists in the coordinator's render_metrics, and
    README.md explains every metric render_metrics emits;
  * when present on this machine, `kubectl kustomize` renders deploy/k8s (optional, offline).
"""

import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

KUBERNETES_VERSION = "1.33.0"

DEPLOY = Path(__file__).resolve().parent
ROOT = DEPLOY.parent
failures = []
notes = []


def fail(where, message):
    failures.append(f"{where}: {message}")


def check(condition, where, message):
    if not condition:
        fail(where, message)
    return condition


def rel(path):
    return str(Path(path).relative_to(ROOT))


try:
    import yaml
except ImportError:
    print("deploy-check: PyYAML is missing from this python; run `cargo xtask setup`", file=sys.stderr)
    sys.exit(2)
try:
    import kubernetes_validate
    from kubernetes_validate import utils as kv_utils
except ImportError:
    print("deploy-check: kubernetes-validate is missing from this python; run `cargo xtask setup`", file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------- YAML parse
def load_all_yaml():
    docs = {}
    for path in sorted(DEPLOY.rglob("*")):
        if path.suffix not in (".yaml", ".yml") or not path.is_file():
            continue
        try:
            with open(path, encoding="utf-8") as f:
                docs[path] = [d for d in yaml.safe_load_all(f) if d is not None]
        except yaml.YAMLError as e:
            fail(rel(path), f"does not parse: {e}")
    check(docs, "deploy/", "no YAML files found")
    return docs


# ---------------------------------------------------------------- Kubernetes
def containers(pod_spec, init=False):
    return pod_spec.get("initContainers" if init else "containers") or []


def find(objects, kind, name):
    for path, obj in objects:
        if obj.get("kind") == kind and obj.get("metadata", {}).get("name") == name:
            return obj
    return None


S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def check_coordinator_results(w, spec, pod, c, settings):
    """Results in S3, wired like compose: the URL and endpoint from the ConfigMap, keys from the Secret."""
    # FARM_RESULTS: an s3:// URL from the ConfigMap the container reads through envFrom, not a value
    # of its own (an `env` entry would override envFrom).
    from_cm = any(e.get("configMapRef", {}).get("name") == "farm-settings" for e in c.get("envFrom", []))
    check(from_cm, w, "coordinator must read the ConfigMap farm-settings through envFrom")
    env = {e.get("name"): e for e in c.get("env", [])}
    for key in ("FARM_RESULTS", "AWS_REGION", "AWS_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ALLOW_HTTP"):
        check(key not in env, w, f"coordinator sets {key} itself; it belongs in the ConfigMap farm-settings")
    results = str(settings.get("FARM_RESULTS", ""))
    if check(results.startswith("s3://"), w, f"ConfigMap FARM_RESULTS must be an s3://BUCKET/PREFIX URL, not {results!r}"):
        bucket, _, prefix = results[len("s3://"):].partition("/")
        check(S3_BUCKET.match(bucket), w, f"ConfigMap FARM_RESULTS: {bucket!r} is not a valid bucket name")
        parts = prefix.strip("/").split("/") if prefix.strip("/") else []
        check(not any(part in ("", ".", "..") for part in parts), w, f"ConfigMap FARM_RESULTS: bad prefix {prefix!r}")
    check("AWS_REGION" in settings, w, "ConfigMap farm-settings lacks AWS_REGION")
    endpoints = [k for k in ("AWS_ENDPOINT", "AWS_ENDPOINT_URL") if k in settings]
    check(len(endpoints) <= 1, w, "ConfigMap sets both AWS_ENDPOINT and AWS_ENDPOINT_URL; keep one")
    for key in endpoints:
        url = str(settings[key])
        check(url.startswith(("http://", "https://")), w, f"ConfigMap {key} must be an http(s):// URL")
        if url.startswith("http://"):
            check(str(settings.get("AWS_ALLOW_HTTP", "")).lower() == "true", w,
                  f"ConfigMap {key} is plain http://: AWS_ALLOW_HTTP must be \"true\" (the coordinator refuses otherwise)")
    for key in AWS_KEYS + ("AWS_SESSION_TOKEN",):
        check(key not in settings, w, f"ConfigMap farm-settings holds {key}: credentials belong in the Secret farm-secrets")
    # Credentials: both keys from the Secret, or neither (then a workload identity ServiceAccount).
    present = [k for k in AWS_KEYS if k in env]
    if present:
        for key in AWS_KEYS:
            ref = env.get(key, {}).get("valueFrom", {}).get("secretKeyRef", {})
            check(ref.get("name") == "farm-secrets" and ref.get("key") == key and not ref.get("optional"), w,
                  f"coordinator {key} must come from secretKeyRef farm-secrets/{key} (not optional)")
    else:
        check(pod.get("serviceAccountName"), w,
              "coordinator has no AWS access keys from farm-secrets and no serviceAccountName for a workload identity")
    check(not any("secretRef" in e for e in c.get("envFrom", [])), w,
          "coordinator must take single keys from farm-secrets (secretKeyRef), not the whole Secret through envFrom")
    # No results volume: with several replicas a ReadWriteOnce claim pins them to one node (or fails).
    if spec.get("replicas", 1) >= 2:
        for v in pod.get("volumes", []):
            check("persistentVolumeClaim" not in v and "hostPath" not in v, w,
                  f"coordinator volume {v.get('name')}: {spec['replicas']} replicas must not share a results volume (results are in S3)")


def check_k8s(docs):
    k8s = DEPLOY / "k8s"
    objects = [(p, d) for p, ds in docs.items() if p.parent == k8s for d in ds]
    builtin_skip = {"Kustomization", "ScaledObject"}
    for path, obj in objects:
        where = f"{rel(path)} {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        if obj.get("kind") in builtin_skip:
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kv_utils.ValidationError as e:
            fail(where, f"schema (Kubernetes {KUBERNETES_VERSION}): {'.'.join(str(x) for x in e.path)}: {e.message}")
        except kv_utils.SchemaNotFoundError as e:
            fail(where, f"no schema for this kind/apiVersion in Kubernetes {KUBERNETES_VERSION}: {e}")
        if obj.get("kind") != "Namespace":
            check(obj.get("metadata", {}).get("namespace") == "newbie-farm", where, "namespace must be newbie-farm")

    # kustomization: lists every manifest except the example Secret, and only existing files.
    kust = next((d for p, ds in docs.items() if p == k8s / "kustomization.yaml" for d in ds), None)
    if check(kust is not None, "deploy/k8s", "kustomization.yaml missing"):
        listed = set(kust.get("resources", []))
        for name in listed:
            check((k8s / name).is_file(), "deploy/k8s/kustomization.yaml", f"lists missing file {name}")
        for path in docs:
            if path.parent == k8s and path.name not in ("kustomization.yaml", "secret.example.yaml"):
                check(path.name in listed, "deploy/k8s/kustomization.yaml", f"does not list {path.name}")
        check("secret.example.yaml" not in listed, "deploy/k8s/kustomization.yaml", "must not apply the example Secret")

    w = "deploy/k8s"
    check(find(objects, "Namespace", "newbie-farm"), w, "Namespace newbie-farm missing")
    cm = find(objects, "ConfigMap", "farm-settings")
    if check(cm, w, "ConfigMap farm-settings missing"):
        data = cm.get("data", {})
        for key in ("FARM_LISTEN", "FARM_METRICS_LISTEN", "FARM_RESULTS", "FARM_DB_POOL", "FARM_LEASE_TTL_MS", "FARM_HEARTBEAT_MS"):
            check(key in data, w, f"ConfigMap farm-settings lacks {key}")
        if "FARM_LEASE_TTL_MS" in data and "FARM_HEARTBEAT_MS" in data:
            check(int(data["FARM_LEASE_TTL_MS"]) >= 2 * int(data["FARM_HEARTBEAT_MS"]), w,
                  "FARM_LEASE_TTL_MS must be at least twice FARM_HEARTBEAT_MS (the coordinator refuses to start)")
    secret = find(objects, "Secret", "farm-secrets")
    if check(secret, w, "example Secret farm-secrets missing"):
        data = secret.get("stringData", {})
        for key in ("DATABASE_URL", "REDIS_URL", "FARM_WORKER_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            check(key in data, w, f"Secret example lacks {key}")
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            check("REPLACE" in str(data.get(key, "REPLACE")), w, f"Secret example: {key} must be an obvious placeholder (REPLACE...)")

    coord = find(objects, "Deployment", "farm-coordinator")
    if check(coord, w, "Deployment farm-coordinator missing"):
        spec = coord["spec"]
        check(spec.get("replicas", 1) >= 2, w, "farm-coordinator needs at least 2 replicas")
        tmpl = spec["template"]
        ann = tmpl.get("metadata", {}).get("annotations", {})
        check(ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") == "9090", w,
              "coordinator pods need prometheus.io/scrape and prometheus.io/port annotations")
        c = containers(tmpl["spec"])[0]
        for probe in ("readinessProbe", "livenessProbe"):
            check(c.get(probe, {}).get("grpc", {}).get("port") == 50051, w, f"coordinator {probe} must be a grpc probe on 50051")
        ports = {p.get("name"): p.get("containerPort") for p in c.get("ports", [])}
        check(ports.get("grpc") == 50051 and ports.get("metrics") == 9090, w, "coordinator ports grpc:50051 and metrics:9090")
        check_coordinator_results(w, spec, tmpl["spec"], c, (cm or {}).get("data", {}))
    pdb = find(objects, "PodDisruptionBudget", "farm-coordinator")
    check(pdb, w, "PodDisruptionBudget farm-coordinator missing")
    svc = find(objects, "Service", "farm-coordinator")
    if check(svc, w, "Service farm-coordinator missing"):
        ports = {p.get("name"): p.get("port") for p in svc["spec"].get("ports", [])}
        check(ports.get("grpc") == 50051 and ports.get("metrics") == 9090, w, "Service ports grpc:50051 and metrics:9090")
    job = find(objects, "Job", "farm-migrate")
    if check(job, w, "Job farm-migrate missing"):
        check(containers(job["spec"]["template"]["spec"])[0].get("args") == ["migrate"], w, "farm-migrate must run `migrate`")

    models_pvc = find(objects, "PersistentVolumeClaim", "farm-models")
    if check(models_pvc, w, "PVC farm-models missing"):
        check(models_pvc["spec"]["accessModes"] == ["ReadOnlyMany"], w, "farm-models must be ReadOnlyMany")
    for path, obj in objects:
        if obj.get("kind") == "PersistentVolumeClaim" and obj is not models_pvc:
            fail(f"{rel(path)} PersistentVolumeClaim/{obj.get('metadata', {}).get('name')}",
                 "results are in S3; the only PVC is farm-models")

    worker = find(objects, "Deployment", "farm-worker")
    if check(worker, w, "Deployment farm-worker missing"):
        pod = worker["spec"]["template"]["spec"]
        check(pod.get("terminationGracePeriodSeconds", 30) >= 300, w, "worker terminationGracePeriodSeconds must be >= 300 (drain)")
        c = containers(pod)[0]
        check(str(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")) == "1", w, "worker must ask for nvidia.com/gpu: 1")
        terms = (pod.get("affinity", {}).get("nodeAffinity", {})
                 .get("requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms", []))
        keys = {e.get("key") for t in terms for e in t.get("matchExpressions", [])}
        check("nvidia.com/gpu.product" in keys or "nvidia.com/gpu.product" in pod.get("nodeSelector", {}), w,
              "worker must select GPU nodes on nvidia.com/gpu.product")
        vols = {v["name"]: v for v in pod.get("volumes", [])}
        models = [n for n, v in vols.items() if v.get("persistentVolumeClaim", {}).get("claimName") == "farm-models"]
        check(models and any(m["name"] == models[0] and m.get("readOnly") for m in c.get("volumeMounts", [])), w,
              "worker must mount farm-models read-only")
        args = c.get("args", [])
        check("--device" in args and "--model" in args, w, "worker args must name --model and --device")

    so = next((d for _, d in objects if d.get("kind") == "ScaledObject"), None)
    if check(so, w, "KEDA ScaledObject missing"):
        check(so.get("apiVersion") == "keda.sh/v1alpha1", w, "ScaledObject apiVersion must be keda.sh/v1alpha1")
        spec = so.get("spec", {})
        target = spec.get("scaleTargetRef", {})
        check(target.get("name") == "farm-worker", w, "ScaledObject must target Deployment farm-worker")
        triggers = spec.get("triggers", [])
        prom = [t for t in triggers if t.get("type") == "prometheus"]
        if check(prom, w, "ScaledObject needs a prometheus trigger"):
            md = prom[0].get("metadata", {})
            check(re.search(r'farm_tasks\{[^}]*state="queued"', md.get("query", "")), w, 'trigger query must use farm_tasks{state="queued"}')
            for key in ("serverAddress", "threshold"):
                check(key in md and isinstance(md[key], str), w, f"prometheus trigger metadata.{key} must be a string")
        check(spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100), w, "minReplicaCount > maxReplicaCount")

    kubectl = shutil.which("kubectl")
    if kubectl:
        r = subprocess.run([kubectl, "kustomize", str(k8s)], capture_output=True, text=True, timeout=60)
        check(r.returncode == 0, w, f"`kubectl kustomize` failed: {r.stderr.strip()}")
        notes.append("kubectl kustomize deploy/k8s: " + ("ok" if r.returncode == 0 else "FAILED"))
    else:
        notes.append("kubectl not installed: kustomize rendering skipped")


# ---------------------------------------------------------------- compose
def check_compose(docs):
    path = DEPLOY / "compose.yaml"
    w = rel(path)
    if not check(path in docs and docs[path], w, "missing or empty"):
        return
    c = docs[path][0]
    services = c.get("services", {})
    for name in ("postgres", "redis", "objectstore", "create-bucket", "migrate", "coordinator-a", "coordinator-b",
                 "worker", "worker-cpu"):
        check(name in services, w, f"service {name} missing")
    if {"objectstore", "create-bucket"} <= set(services):
        store, bucket = services["objectstore"], services["create-bucket"]
        check("healthcheck" in store, w, "objectstore needs a healthcheck (create-bucket waits for it)")
        check(any(str(v).split(":")[0] == "objects" and str(v).split(":")[1] == "/data" for v in store.get("volumes", [])),
              w, "objectstore must keep its data in the named volume objects at /data")
        check(bucket.get("depends_on", {}).get("objectstore", {}).get("condition") == "service_healthy", w,
              "create-bucket must wait for a healthy objectstore")
        check(bucket.get("restart") == "no" and "mb" in bucket.get("command", []), w, "create-bucket must be a one-shot `mc mb`")
    if set(services) >= {"migrate", "coordinator-a", "coordinator-b", "worker", "worker-cpu"}:
        check(services["migrate"].get("command") == ["migrate"], w, "migrate must run `migrate`")
        host_ports = []
        for name in ("coordinator-a", "coordinator-b"):
            s = services[name]
            check(s.get("command") == ["serve"], w, f"{name} must run `serve`")
            env = s.get("environment", {})
            for key in ("DATABASE_URL", "REDIS_URL", "FARM_RESULTS", "FARM_LISTEN", "FARM_METRICS_LISTEN",
                        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT"):
                check(key in env, w, f"{name} lacks {key}")
            # Both replicas share the object store, not a volume.
            check(str(env.get("FARM_RESULTS", "")).startswith("s3://"), w, f"{name}: FARM_RESULTS must be an s3:// URL")
            check("objectstore:9000" in str(env.get("AWS_ENDPOINT", "")), w, f"{name}: AWS_ENDPOINT must default to the objectstore service")
            check(not s.get("volumes"), w, f"{name}: results are in the object store; no volume is needed")
            dep = s.get("depends_on", {})
            check(dep.get("migrate", {}).get("condition") == "service_completed_successfully", w, f"{name} must wait for migrate")
            check(dep.get("create-bucket", {}).get("condition") == "service_completed_successfully", w,
                  f"{name} must wait for create-bucket (the coordinator lists the bucket at start)")
            host_ports += [p.split(":")[0] for p in s.get("ports", [])]
        check(len(host_ports) == len(set(host_ports)) and len(host_ports) >= 4, w, "coordinators need distinct host ports")
        gpu = services["worker"]
        devices = gpu.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        check(any("gpu" in d.get("capabilities", []) for d in devices), w, "worker needs a GPU reservation (capabilities [gpu])")
        check("replicas" not in gpu.get("deploy", {}) and "container_name" not in gpu, w, "worker must stay scalable (--scale worker=N)")
        for name in ("worker", "worker-cpu"):
            s = services[name]
            check(str(s.get("stop_grace_period", "")) in ("300s", "5m"), w, f"{name} needs stop_grace_period 300s (drain)")
            check(s.get("stop_signal", "SIGTERM") == "SIGTERM", w, f"{name} must stop with SIGTERM")
            check("FARM_WORKER_TOKEN" in s.get("environment", {}), w, f"{name} needs FARM_WORKER_TOKEN")
        cpu = services["worker-cpu"]
        cmd = " ".join(cpu.get("command", []))
        check("cpu" in cpu.get("profiles", []), w, "worker-cpu must be in the cpu profile")
        check("--model tiny" in cmd and "--device cpu" in cmd, w, "worker-cpu must run --model tiny --device cpu")
        check("deploy" not in cpu, w, "worker-cpu must not reserve a GPU")
        # The tiny model refuses a model directory, and the shared worker settings and the image set one.
        entry = " ".join(cpu.get("entrypoint", []))
        check("-u FARM_MODEL_DIR" in entry and entry.endswith("farm-worker"), w,
              "worker-cpu must start farm-worker without FARM_MODEL_DIR (env -u FARM_MODEL_DIR)")
    check("objects" in (c.get("volumes") or {}), w, "named volume objects missing")
    for name, s in services.items():
        image = s.get("image", "")
        check(image and not image.endswith(":latest") and ":" in image, w, f"{name}: image must carry a pinned tag")
    # Every ${VAR} is documented in .env.example.
    text = path.read_text(encoding="utf-8")
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", text))
    example = DEPLOY / ".env.example"
    if check(example.is_file(), "deploy/.env.example", "missing"):
        documented = set(re.findall(r"^([A-Z0-9_]+)=", example.read_text(encoding="utf-8"), re.M))
        for var in sorted(used - documented - {"RUST_LOG", "FARM_COORDINATOR"}):
            fail("deploy/.env.example", f"does not document {var} (used by compose.yaml)")


# ---------------------------------------------------------------- Dockerfiles
def dockerfile_instructions(text):
    """(line number, INSTRUCTION, arguments) with continuations joined and comments dropped."""
    out, buf, start = [], "", 0
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((start, word.upper(), rest.strip()))
        buf = ""
    return out


def check_dockerfile(path, worker):
    w = rel(path)
    ins = dockerfile_instructions(path.read_text(encoding="utf-8"))
    if not check(ins, w, "empty"):
        return
    first = next((i for i in ins if i[1] != "ARG"), None)
    check(first and first[1] == "FROM", w, "the first instruction (after global ARGs) must be FROM")
    args = {}
    for _, word, rest in ins:
        if word == "FROM":
            break
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k.strip()] = v.strip().strip('"')
    stages = []
    for line, word, rest in ins:
        if word == "FROM":
            parts = [p for p in rest.split() if not p.startswith("--")]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), parts[0])
            stage_names = [s[1] for s in stages]
            if image not in stage_names and image != "scratch":
                check("$" not in image, w, f"line {line}: FROM {parts[0]}: ARG without default")
                tag = image.split("@")[0].rsplit("/", 1)[-1]
                check(":" in tag or "@" in image, w, f"line {line}: image {image} has no tag")
                check(not tag.endswith(":latest"), w, f"line {line}: image {image} uses latest")
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append((line, name, []))
        elif stages:
            stages[-1][2].append((line, word, rest))
    check(len(stages) >= 2, w, "must be multi-stage (builder and runtime)")
    runtime = stages[-1][2] if stages else []
    users = [rest for _, word, rest in runtime if word == "USER"]
    check(users and users[-1].split(":")[0] not in ("root", "0"), w, "the runtime stage must switch to a non-root USER")
    check(any(word in ("ENTRYPOINT", "CMD") for _, word, _ in runtime), w, "the runtime stage needs ENTRYPOINT or CMD")
    check(not any(word == "ADD" and "http" in rest for _, word, rest in ins), w, "no ADD of remote URLs")
    all_text = " ".join(rest for _, _, rest in ins)
    if worker:
        check(any(word == "STOPSIGNAL" and rest == "SIGTERM" for _, word, rest in runtime), w, "worker runtime needs STOPSIGNAL SIGTERM")
        check(any(word == "ENV" and "LD_LIBRARY_PATH=" in rest and "torch/lib" in rest for _, word, rest in runtime), w,
              "worker runtime must put torch's lib/ on LD_LIBRARY_PATH")
        check("torch==${TORCH_VERSION}" in all_text and args.get("TORCH_VERSION") == "2.11.0", w, "worker must pin torch==2.11.0")
        check("LIBTORCH_USE_PYTORCH=1" in all_text and "-p farm-worker" in all_text, w, "worker build must use LIBTORCH_USE_PYTORCH=1 and -p farm-worker")
        check("nvidia/cuda:13" in args.get("RUNTIME_IMAGE", ""), w, "worker runtime must be a CUDA 13 image")
    else:
        check("-p farm-coordinator" in all_text, w, "coordinator build must use -p farm-coordinator")
        check("torch" not in all_text, w, "the coordinator image must not need torch")


def check_dockerfiles():
    d = DEPLOY / "docker"
    for name, worker in (("coordinator.Dockerfile", False), ("worker.Dockerfile", True)):
        if check((d / name).is_file(), rel(d), f"{name} missing"):
            check_dockerfile(d / name, worker)
    ignore = ROOT / ".dockerignore"
    if check(ignore.is_file(), ".dockerignore", "missing"):
        lines = {l.strip() for l in ignore.read_text(encoding="utf-8").splitlines()}
        for entry in ("target", ".git"):
            check(entry in lines, ".dockerignore", f"must exclude {entry}")


# ---------------------------------------------------------------- systemd
def read_unit(path):
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",), comment_prefixes=("#", ";"))
    parser.optionxform = str
    parser.read(path, encoding="utf-8")
    return parser


def check_systemd():
    d = DEPLOY / "systemd"
    coord, worker = d / "farm-coordinator.service", d / "farm-worker@.service"
    for path in (coord, worker):
        if not check(path.is_file(), rel(d), f"{path.name} missing"):
            return
        u = read_unit(path)
        for section in ("Unit", "Service", "Install"):
            check(u.has_section(section), rel(path), f"[{section}] missing")
    c = read_unit(coord)
    check("farm-coordinator serve" in c.get("Service", "ExecStart", fallback=""), rel(coord), "ExecStart must run `farm-coordinator serve`")
    check(c.get("Service", "EnvironmentFile", fallback="").lstrip("-").startswith("/etc/farm/"), rel(coord), "EnvironmentFile under /etc/farm")
    # The S3 alternative to the local results directory, as environment-file lines in the comments.
    comments = "\n".join(l.lstrip("#").strip() for l in coord.read_text(encoding="utf-8").splitlines() if l.startswith("#"))
    for line in ("FARM_RESULTS=s3://", "AWS_ACCESS_KEY_ID=", "AWS_SECRET_ACCESS_KEY=", "AWS_REGION=", "AWS_ENDPOINT_URL="):
        check(re.search("^" + re.escape(line), comments, re.M), rel(coord), f"comments must show the S3 results setting {line}...")
    u = read_unit(worker)
    s = dict(u.items("Service")) if u.has_section("Service") else {}
    wr = rel(worker)
    check("--device cuda:%i" in s.get("ExecStart", ""), wr, "ExecStart must pass --device cuda:%i")
    check(s.get("EnvironmentFile") == "/etc/farm/worker.env", wr, "EnvironmentFile=/etc/farm/worker.env")
    check(s.get("KillSignal") == "SIGTERM", wr, "KillSignal=SIGTERM")
    check(s.get("TimeoutStopSec") == "300", wr, "TimeoutStopSec=300")
    check(s.get("Restart") == "on-failure", wr, "Restart=on-failure")
    script = d / "launch-workers.sh"
    if check(script.is_file(), rel(d), "launch-workers.sh missing"):
        check(os.access(script, os.X_OK), rel(script), "must be executable")
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        check(r.returncode == 0, rel(script), f"bash -n: {r.stderr.strip()}")
        check("nvidia-smi" in script.read_text(encoding="utf-8"), rel(script), "must list GPUs with nvidia-smi")


# ---------------------------------------------------------------- metrics
def check_metrics():
    server = ROOT / "coordinator/src/server.rs"
    src = server.read_text(encoding="utf-8")
    body = src[src.find("fn render_metrics"):]
    body = body[: body.find("\n}\n")]
    emitted = set(re.findall(r'"(farm_[a-z_]+)"', body)) | set(re.findall(r"# TYPE (farm_[a-z_]+)", body))
    if not check(emitted, rel(server), "no metric names found in render_metrics (did it move?)"):
        return
    readme = DEPLOY / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    check(text, "deploy/README.md", "missing")
    for name in sorted(emitted):
        check(f"`{name}" in text, "deploy/README.md", f"does not explain metric {name}")
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and path.suffix in (".yaml", ".yml", ".md"):
            for name in set(re.findall(r"\b(farm_[a-z_]+)\b", path.read_text(encoding="utf-8"))):
                if name not in emitted:
                    fail(rel(path), f"names metric {name}, which render_metrics does not emit")


def check_references():
    """Every deploy file that README.md or a Kubernetes manifest names exists (nothing points at a
    removed manifest)."""
    readme = DEPLOY / "README.md"
    if not readme.is_file():
        return
    text = readme.read_text(encoding="utf-8")
    for name in sorted(set(re.findall(r"\b((?:deploy/)?(?:k8s|systemd|docker)/[A-Za-z0-9_.@-]+\.(?:yaml|service|sh|Dockerfile))", text))):
        path = ROOT / name if name.startswith("deploy/") else DEPLOY / name
        check(path.is_file(), "deploy/README.md", f"names {name}, which does not exist")
    # The manifests' comments name their neighbours (worker.yaml, configmap.yaml, ...).
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for name in sorted(set(re.findall(r"(?<![\w./-])([a-z0-9][a-z0-9.-]*\.yaml)\b", path.read_text(encoding="utf-8")))):
            check((path.parent / name).is_file() or (DEPLOY / name).is_file(), rel(path), f"names {name}, which does not exist")


def main():
    docs = load_all_yaml()
    check_k8s(docs)
    check_compose(docs)
    check_dockerfiles()
    check_systemd()
    check_metrics()
    check_references()
    n_yaml = sum(len(v) for v in docs.values())
    for note in notes:
        print(f"deploy-check: {note}")
    if failures:
        for f in failures:
            print(f"deploy-check: FAIL {f}", file=sys.stderr)
        print(f"deploy-check: {len(failures)} problem(s)", file=sys.stderr)
        return 1
    print(f"deploy-check: ok ({len(docs)} YAML files, {n_yaml} documents; Kubernetes schemas {KUBERNETES_VERSION}; "
          f"compose, Dockerfiles, systemd units, metric names)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
