"""A container image built here, with no registry: an OCI image layout in a tar, for `ctr import`.

Layers are uncompressed tars (``application/vnd.oci.image.layer.v1.tar``), so each layer's diff
ID is its own digest. ``chain_id`` names the snapshot containerd unpacks the image's top layer
into, the parent of a container's writable snapshot.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import tarfile
from dataclasses import dataclass
from pathlib import Path

LAYER = "application/vnd.oci.image.layer.v1.tar"
CONFIG = "application/vnd.oci.image.config.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
#: containerd's own annotation: `ctr import` names the image after it.
IMAGE_NAME = "io.containerd.image.name"
REF_NAME = "org.opencontainers.image.ref.name"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(files: dict[str, bytes]) -> bytes:
    """Return a tar of these files (paths relative to the root; their directories are added)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({str(p) for name in files for p in Path(name).parents if str(p) != "."})
        for name in dirs:
            entry = tarfile.TarInfo(name)
            entry.type, entry.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(entry)
        for name, data in files.items():
            entry = tarfile.TarInfo(name)
            entry.size, entry.mode = len(data), 0o644
            tar.addfile(entry, io.BytesIO(data))
    return out.getvalue()


def chain_id(diff_ids: list[str]) -> str:
    """The OCI chain ID of a stack of layers: containerd's snapshot key for its top layer."""
    chain = diff_ids[0]
    for diff_id in diff_ids[1:]:
        chain = sha256(f"{chain} {diff_id}".encode())
    return chain


@dataclass
class Image:
    name: str  # repository:tag
    layers: list[dict[str, bytes]]  # each layer's files

    @property
    def diff_ids(self) -> list[str]:
        return [sha256(layer_tar(files)) for files in self.layers]

    @property
    def top_chain_id(self) -> str:
        return chain_id(self.diff_ids)

    def write_layout_tar(self, path: Path) -> None:
        """Write the image as an OCI image layout tar (oci-layout, index.json, blobs/)."""
        blobs: dict[str, bytes] = {}

        def blob(media_type: str, data: bytes) -> dict[str, object]:
            blobs[sha256(data)] = data
            return {"mediaType": media_type, "digest": sha256(data), "size": len(data)}

        layers = [blob(LAYER, layer_tar(files)) for files in self.layers]
        arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
        config = {
            "architecture": arch,
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": self.diff_ids},
        }
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "layers": layers,
            "config": blob(CONFIG, json.dumps(config).encode()),
        }
        tag = self.name.rsplit(":", 1)[1]
        top = blob(MANIFEST, json.dumps(manifest).encode())
        top["platform"] = {"architecture": arch, "os": "linux"}
        top["annotations"] = {IMAGE_NAME: self.name, REF_NAME: tag}
        index = {"schemaVersion": 2, "mediaType": INDEX, "manifests": [top]}
        members = {
            "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
            "index.json": json.dumps(index).encode(),
            **{f"blobs/sha256/{d.removeprefix('sha256:')}": data for d, data in blobs.items()},
        }
        with tarfile.open(path, "w") as tar:
            for name in ("blobs", "blobs/sha256"):
                entry = tarfile.TarInfo(name)
                entry.type, entry.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(entry)
            for name, data in members.items():
                entry = tarfile.TarInfo(name)
                entry.size, entry.mode = len(data), 0o644
                tar.addfile(entry, io.BytesIO(data))
