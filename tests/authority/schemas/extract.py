"""Rewrite the schema files in this folder from the upstream CRDs (run by hand, not by tests).

    python tests/authority/schemas/extract.py LINKERD2_GIT_DIR ISTIO_GIT_DIR

reads each CRD at the commit its file already names (or HEAD with --head), and writes the
version's `openAPIV3Schema` with the source: repository, path, commit, CRD and version.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).parent
SOURCES = {
    "linkerd-externalworkload-v1beta1.json": (
        "linkerd/linkerd2",
        "charts/linkerd-crds/templates/workload/external-workload.yaml",
        "externalworkloads.workload.linkerd.io",
        "v1beta1",
    ),
    "istio-workloadentry-v1.json": (
        "istio/istio",
        "manifests/charts/base/files/crd-all.gen.yaml",
        "workloadentries.networking.istio.io",
        "v1",
    ),
}


def main(linkerd2: str, istio: str, head: bool) -> None:
    dirs = {"linkerd/linkerd2": linkerd2, "istio/istio": istio}
    for out, (repo, path, crd, version) in SOURCES.items():
        target = HERE / out
        commit = "HEAD" if head or not target.exists() else json.loads(target.read_text())["source"]["commit"]
        git = ["git", "-C", dirs[repo]]
        commit = subprocess.run(
            [*git, "rev-parse", commit], capture_output=True, text=True, check=True
        ).stdout.strip()
        text = subprocess.run(
            [*git, "show", f"{commit}:{path}"], capture_output=True, text=True, check=True
        ).stdout
        # Linkerd's CRDs are Helm templates: the templated lines are all in metadata.
        text = "\n".join(line for line in text.splitlines() if "{{" not in line)
        doc = next(d for d in yaml.safe_load_all(text) if d and d["metadata"]["name"] == crd)
        ver = next(v for v in doc["spec"]["versions"] if v["name"] == version)
        data = {
            "source": {
                "repository": repo,
                "path": path,
                "commit": commit,
                "crd": crd,
                "version": version,
                "served": ver.get("served"),
                "storage": ver.get("storage"),
                "subresources": ver.get("subresources", {}),
            },
            "openAPIV3Schema": ver["schema"]["openAPIV3Schema"],
        }
        target.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        print(f"{out}: {repo}@{commit[:12]} {path}")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--head"]
    main(args[0], args[1], "--head" in sys.argv)
