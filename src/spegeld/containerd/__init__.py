"""containerd over gRPC (grpclib via the one asyncio bridge), as trio-native calls."""

from spegeld.containerd._client import (
    ContainerdClient,
    ContainerdVersion,
    ContentInfo,
    ImageRecord,
    open_containerd,
)
from spegeld.containerd._errors import socket_problem
from spegeld.containerd._events import (
    TOPIC_FILTERS,
    ContainerdEvent,
    ContentCreated,
    ContentDeleted,
    ImageChanged,
    ImageDeleted,
)

__all__ = [
    "TOPIC_FILTERS",
    "ContainerdClient",
    "ContainerdEvent",
    "ContainerdVersion",
    "ContentCreated",
    "ContentDeleted",
    "ContentInfo",
    "ImageChanged",
    "ImageDeleted",
    "ImageRecord",
    "open_containerd",
    "socket_problem",
]
