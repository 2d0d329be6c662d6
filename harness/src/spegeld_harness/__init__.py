"""Reusable harness for tests, the demo and benchmarks.

* :class:`PrivateContainerd` runs a private containerd (Debian's 1.6, or a 2.x build with
  ``bin_dir``; CRI off unless ``cri=True``) per simulated node, with its own root, state,
  sockets and log; stopped by PID.
* :class:`ManagedProcess` is the lifecycle they all share (log file, readiness deadline,
  stop by PID, nothing left behind at exit); :class:`UpstreamRegistry` and
  :class:`SpegeldProcess` are the others.
* :func:`build_image` builds real OCI / Docker images (single platform or multi-platform
  index) with random layers, writable as OCI image-layout archives for ``ctr images import``
  and ``skopeo copy oci-archive:...``.

Plain synchronous stdlib code, usable from sync fixtures, scripts and trio tests alike.
"""

from spegeld_harness._cluster import (
    Cluster,
    Node,
    PullResult,
    clean_leftovers,
    missing_requirement,
)
from spegeld_harness._containerd import (
    CtrError,
    HarnessUnavailable,
    PrivateContainerd,
    containerd_unavailable_reason,
)
from spegeld_harness._images import (
    ANNOTATION_IMAGE_NAME,
    ANNOTATION_REF_NAME,
    DOCKER_MEDIA_TYPES,
    OCI_MEDIA_TYPES,
    BlobInfo,
    BuiltImage,
    MediaTypes,
    PlatformImage,
    build_image,
    host_platform,
    split_name,
)
from spegeld_harness._netns import (
    NetnsContainerd,
    NetnsSpegeld,
    Network,
    in_netns_wrapper,
)
from spegeld_harness._netns6 import Network6
from spegeld_harness._process import ManagedProcess
from spegeld_harness._registry import (
    RegistryRequest,
    RegistryResponse,
    UpstreamError,
    UpstreamRegistry,
    default_repository,
    parse_access_log,
    registry_unavailable_reason,
)
from spegeld_harness._spegeld import SpegeldProcess, free_port, host_port, write_cluster_key

__all__ = [
    "Cluster",
    "Node",
    "PullResult",
    "clean_leftovers",
    "missing_requirement",
    "NetnsContainerd",
    "NetnsSpegeld",
    "Network",
    "Network6",
    "in_netns_wrapper",
    "ManagedProcess",
    "SpegeldProcess",
    "free_port",
    "host_port",
    "write_cluster_key",
    "ANNOTATION_IMAGE_NAME",
    "ANNOTATION_REF_NAME",
    "DOCKER_MEDIA_TYPES",
    "OCI_MEDIA_TYPES",
    "BlobInfo",
    "BuiltImage",
    "CtrError",
    "HarnessUnavailable",
    "MediaTypes",
    "PlatformImage",
    "PrivateContainerd",
    "build_image",
    "containerd_unavailable_reason",
    "host_platform",
    "split_name",
    "UpstreamError",
    "RegistryRequest",
    "RegistryResponse",
    "UpstreamRegistry",
    "default_repository",
    "parse_access_log",
    "registry_unavailable_reason",
]
