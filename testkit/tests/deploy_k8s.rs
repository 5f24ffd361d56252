//! The Kubernetes manifests of deploy/k8s, validated (issue 13).
//!
//! 1. Schema: every manifest (all but kustomization.yaml) is checked with
//!    `kubernetes-validate --strict` (PyPI; the JSON schemas of each Kubernetes release are
//!    in the package, so no cluster and no network is needed) against Kubernetes 1.27 and
//!    1.37. scripts/test.sh installs it into target/pyenv; the test fails without it.
//!    A copy with a misspelt field must fail, so the validator is known to validate.
//! 2. Structure (the YAML read by PyYAML, which kubernetes-validate brings, then checked
//!    here): storenodes are a StatefulSet with a volumeClaimTemplate mounted on the data
//!    dir; proxies a Deployment with a Service and a HorizontalPodAutoscaler on CPU;
//!    placement is given an etcd endpoint; every skv container has a liveness probe on
//!    /healthz and a readiness probe on /readyz of the port its --metrics-listen names;
//!    every component has a PodDisruptionBudget and every Service selects pods that exist;
//!    the placement URLs name the placement StatefulSet's pods; kustomization.yaml lists
//!    every manifest.
//!
//! No kubectl or cluster is available here: `kubectl --dry-run=server` is not run.

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};

use skv_testkit::repo_root;

/// The Python of target/pyenv (or SKV_PYTHON), which scripts/test.sh sets up.
fn python() -> PathBuf {
    if let Ok(p) = std::env::var("SKV_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = repo_root().join("target/pyenv/bin/python");
    assert!(
        venv.exists(),
        "no Python venv with kubernetes-validate: run ./scripts/test.sh (it creates target/pyenv), or set SKV_PYTHON"
    );
    venv
}

fn validator() -> PathBuf {
    let py = python();
    let bin = py.parent().map(|d| d.join("kubernetes-validate")).unwrap_or_default();
    assert!(
        bin.exists(),
        "{} not found: install it with `{} -m pip install kubernetes-validate` (scripts/test.sh does)",
        bin.display(),
        py.display()
    );
    bin
}

use skv_testkit::run_captured as run;

use skv_testkit::output_text as text;

fn manifests() -> Vec<PathBuf> {
    let dir = repo_root().join("deploy/k8s");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .filter(|p| !p.ends_with("kustomization.yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "too few manifests in deploy/k8s: {files:?}");
    files
}

fn validate(files: &[PathBuf], version: &str) -> Output {
    run(Command::new(validator())
        .args(["--strict", "--quiet", "-k", version])
        .args(files))
}

#[test]
fn k8s_manifests_pass_the_kubernetes_schemas() {
    let files = manifests();
    for version in ["1.27.0", "1.37.0"] {
        let o = validate(&files, version);
        assert!(
            o.status.success(),
            "kubernetes-validate --strict -k {version} failed:\n{}",
            text(&o)
        );
    }
    // The validator catches a misspelt field and a wrong type.
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let proxy = std::fs::read_to_string(repo_root().join("deploy/k8s/proxy.yaml")).unwrap_or_default();
    for (from, to) in [
        ("  replicas: 2", "  replicass: 2"),
        ("containerPort: 7400", "containerPort: \"x\""),
    ] {
        assert!(proxy.contains(from), "proxy.yaml has no {from:?}");
        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, proxy.replacen(from, to, 1)).unwrap_or_else(|e| panic!("write: {e}"));
        let o = validate(&[bad], "1.27.0");
        assert!(!o.status.success(), "a manifest with {to:?} passed:\n{}", text(&o));
    }
}

/// Every document of every manifest, as JSON (PyYAML, a dependency of kubernetes-validate).
fn documents(files: &[PathBuf]) -> Vec<Value> {
    let o = run(Command::new(python())
        .arg("-c")
        .arg(
            "import json, sys, yaml\n\
             docs = [d for f in sys.argv[1:] for d in yaml.safe_load_all(open(f)) if d]\n\
             print(json.dumps(docs))",
        )
        .args(files));
    assert!(o.status.success(), "PyYAML failed:\n{}", text(&o));
    serde_json::from_slice::<Value>(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON: {e}"))
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter().find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// `selector` (a map of labels) selects pods labelled `pod`.
fn selects(selector: &BTreeMap<String, String>, pod: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| pod.get(k) == Some(v))
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)?
        .get("value")?
        .as_str()
}

#[test]
fn k8s_manifests_have_the_required_structure() {
    let files = manifests();
    let docs = documents(&files);

    // kustomization.yaml lists every manifest.
    let kust = std::fs::read_to_string(repo_root().join("deploy/k8s/kustomization.yaml")).unwrap_or_default();
    for f in &files {
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        assert!(
            kust.lines().any(|l| l.trim() == format!("- {name}")),
            "kustomization.yaml does not list {name}"
        );
    }

    // The three skv workloads.
    let store = find(&docs, "StatefulSet", "skv-storenode").unwrap_or_else(|| panic!("no StatefulSet skv-storenode"));
    let proxy = find(&docs, "Deployment", "skv-proxy").unwrap_or_else(|| panic!("no Deployment skv-proxy"));
    let placement = find(&docs, "StatefulSet", "skv-placement")
        .or_else(|| find(&docs, "Deployment", "skv-placement"))
        .unwrap_or_else(|| panic!("no workload skv-placement"));
    let workloads = [
        ("skv-placement", placement),
        ("skv-storenode", store),
        ("skv-proxy", proxy),
    ];

    // Storenodes: a claim template mounted on the data dir.
    let claims: Vec<&str> = store["spec"]["volumeClaimTemplates"]
        .as_array()
        .map(|a| a.iter().filter_map(|c| c["metadata"]["name"].as_str()).collect())
        .unwrap_or_default();
    assert!(!claims.is_empty(), "skv-storenode has no volumeClaimTemplates");
    let sc = &store["spec"]["template"]["spec"]["containers"][0];
    let data_dir = env(sc, "SKV_DATA_DIR").unwrap_or_else(|| panic!("storenode has no SKV_DATA_DIR"));
    assert!(
        sc["volumeMounts"].as_array().is_some_and(|m| m
            .iter()
            .any(|m| claims.contains(&m["name"].as_str().unwrap_or_default()) && m["mountPath"] == data_dir)),
        "no claim template is mounted on the storenode's data dir {data_dir}"
    );

    // Proxies: a Service, and an HPA on CPU (which needs a CPU request).
    let proxy_pods = labels(&proxy["spec"]["template"]["metadata"]["labels"]);
    let svc = find(&docs, "Service", "skv-proxy").unwrap_or_else(|| panic!("no Service skv-proxy"));
    assert!(
        selects(&labels(&svc["spec"]["selector"]), &proxy_pods),
        "Service skv-proxy selects no proxy pod"
    );
    let hpa = docs
        .iter()
        .find(|d| d["kind"] == "HorizontalPodAutoscaler" && d["spec"]["scaleTargetRef"]["name"] == "skv-proxy")
        .unwrap_or_else(|| panic!("no HorizontalPodAutoscaler for skv-proxy"));
    assert_eq!(hpa["apiVersion"], "autoscaling/v2");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "Deployment");
    assert!(
        hpa["spec"]["minReplicas"].as_u64().unwrap_or(0) >= 2,
        "HPA may scale proxies below 2"
    );
    assert!(
        !proxy["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"].is_null(),
        "the proxy has no CPU request (the HPA's utilization needs one)"
    );
    let pc = &proxy["spec"]["template"]["spec"]["containers"][0];
    assert!(
        env(pc, "SKV_JWT_HS256_SECRET_FILE").is_some(),
        "the proxy is given no JWT secret file"
    );

    // Placement: an etcd endpoint; its URLs as the others use them.
    let plc = &placement["spec"]["template"]["spec"]["containers"][0];
    let etcd = env(plc, "SKV_ETCD").unwrap_or_else(|| panic!("placement has no SKV_ETCD"));
    assert!(etcd.starts_with("http"), "SKV_ETCD {etcd:?}");
    let replicas = placement["spec"]["replicas"].as_u64().unwrap_or(1);
    for (name, w) in [("skv-storenode", store), ("skv-proxy", proxy)] {
        let c = &w["spec"]["template"]["spec"]["containers"][0];
        let urls = env(c, "SKV_PLACEMENT").unwrap_or_else(|| panic!("{name} has no SKV_PLACEMENT"));
        for i in 0..replicas {
            assert!(
                urls.contains(&format!("http://skv-placement-{i}.skv-placement:")),
                "{name}'s SKV_PLACEMENT {urls:?} misses placement pod {i}"
            );
        }
    }

    // Probes on /healthz and /readyz of the metrics port.
    for (name, w) in workloads {
        for c in w["spec"]["template"]["spec"]["containers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            let listen = env(&c, "SKV_METRICS_LISTEN").unwrap_or_else(|| panic!("{name}: no SKV_METRICS_LISTEN"));
            let port: u64 = listen
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("{name}: SKV_METRICS_LISTEN {listen:?}"));
            let named = c["ports"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["containerPort"] == port))
                .and_then(|p| p["name"].as_str())
                .map(str::to_string);
            for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
                let g = &c[probe]["httpGet"];
                assert_eq!(g["path"], path, "{name}: {probe} is not on {path}");
                let on_port = g["port"] == port || named.as_deref().is_some_and(|n| g["port"] == n);
                assert!(on_port, "{name}: {probe} is not on the metrics port {port}");
            }
        }
    }

    // A PodDisruptionBudget per component, and Services that select pods.
    let mut pods: Vec<(String, BTreeMap<String, String>)> = docs
        .iter()
        .filter(|d| ["StatefulSet", "Deployment"].contains(&d["kind"].as_str().unwrap_or_default()))
        .map(|d| {
            (
                d["metadata"]["name"].as_str().unwrap_or_default().to_string(),
                labels(&d["spec"]["template"]["metadata"]["labels"]),
            )
        })
        .collect();
    pods.sort();
    for (name, pod) in &pods {
        assert!(
            docs.iter().any(|d| d["kind"] == "PodDisruptionBudget"
                && d["apiVersion"] == "policy/v1"
                && selects(&labels(&d["spec"]["selector"]["matchLabels"]), pod)),
            "no PodDisruptionBudget covers {name}"
        );
    }
    for s in docs.iter().filter(|d| d["kind"] == "Service") {
        let sel = labels(&s["spec"]["selector"]);
        assert!(
            pods.iter().any(|(_, p)| selects(&sel, p)),
            "Service {} selects no pod",
            s["metadata"]["name"]
        );
    }
    for name in ["skv-placement", "skv-storenode", "skv-proxy", "etcd"] {
        assert!(pods.iter().any(|(n, _)| n == name), "no workload {name}");
    }
}
