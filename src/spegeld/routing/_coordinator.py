"""What the peer network says about the coordinator: gossip reports it, the election acts on it.

It lives here, below both, so that it is one type: gossip and the election are peers
in the layering and do not import each other.
"""

from __future__ import annotations

import enum


class CoordinatorView(enum.Enum):
    """What gossip knows about the coordinator (the node it names comes alongside)."""

    ALIVE = "alive"  # a live coordinator is known (this node, or a member): followers stay quiet
    GONE = "gone"  # members exist, but none alive is flagged: suspect, dead, left or stepped down
    NONE = "none"  # no gossip view at all (no members yet): read the Lease to find a seed
