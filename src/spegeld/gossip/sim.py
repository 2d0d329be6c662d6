"""The gossip simulator (``_simulation``) and, run as a program, its pinned scenarios.

``PYTHONHASHSEED=0 python -m spegeld.gossip.sim [scenario ...]`` prints one hash line per
scenario (``_scenarios``); tests/test_gossip_sim.py pins them.
"""

from ._scenarios import SCENARIOS, main
from ._simulation import NetworkRules, Simulation

__all__ = ["SCENARIOS", "NetworkRules", "Simulation", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
