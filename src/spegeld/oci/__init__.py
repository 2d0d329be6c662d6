"""Pure OCI vocabulary: digests, media types, references, documents. No I/O."""

from spegeld.oci._digest import Digest, digest_hex, is_digest, parse_digest
from spegeld.oci._filter import ShareFilter
from spegeld.oci._manifest import Descriptor, Index, IndexEntry, Manifest, parse_document
from spegeld.oci._media import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    is_index,
    is_manifest,
)
from spegeld.oci._reference import (
    MAX_NAME_LENGTH,
    NAME_RE,
    REGISTRY_RE,
    TAG_RE,
    Reference,
    parse_reference,
    tag_key,
)

__all__ = [
    "MAX_NAME_LENGTH",
    "NAME_RE",
    "REGISTRY_RE",
    "TAG_RE",
    "DOCKER_CONFIG",
    "DOCKER_LAYER_GZIP",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "OCI_CONFIG",
    "OCI_INDEX",
    "OCI_LAYER_GZIP",
    "OCI_MANIFEST",
    "Descriptor",
    "Digest",
    "Index",
    "IndexEntry",
    "Manifest",
    "Reference",
    "ShareFilter",
    "digest_hex",
    "is_digest",
    "is_index",
    "is_manifest",
    "parse_digest",
    "parse_document",
    "parse_reference",
    "tag_key",
]
