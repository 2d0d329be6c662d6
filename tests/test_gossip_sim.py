"""The simulator's fixed scenarios behave exactly as they did: a refactor's proof.

``python -m spegeld.gossip.sim`` hashes every datagram of every scenario and every
node's final table (``spegeld.gossip._scenarios``). The lines below were recorded
before the gossip core was split into a member table, a failure detector and
anti-entropy (issue 15); a change that means to keep behaviour keeps them. A change
that means to alter the protocol updates them, and says why in its commit.

``loss`` was re-pinned when the lagging peers' pulls stopped going out in set order
(PYTHONHASHSEED's): the same pulls, in the order the lags were noticed.
"""

from __future__ import annotations

import os
import subprocess
import sys

PINNED = """\
join da9d15be451a4533b5adbc4545e255430a8c74283227a875d496d3398ed294ff 2247 0
keys 7d2161093c9a5e624e52a21ac932c2fa4bfe6cd1412d0c069e813d697b6d6742 2985 0
kill 45a38cf514b5c458da98d2a501b4527a53dce5904edd3bea49faf4cdd3223c94 3941 76
refute d36d66d909f118202e837d9e1a06c7c945ad7f2fa2aa5c03c11d80608ef7fa57 3181 50
restart 4318f4ae011553792b43f224d95b0f45f56f735538e56d0cad0bf9b731c4310c 2690 67
partition 56fa53d220df91d18db9cc90966d8231d7f55614ed5af37a1c7ca98e2e278a83 6828 733
loss c7718e5ef7585c1b13ef5c488da2bf06b7d52d7b9f0abdb607fd5b11cdafbcc2 9269 3968
steady 4d56c65bbfe840150d75d2d824d0835c2bab96753b10ea113d02483b5f823189 26148 11094
chunks d55cc37a78c4027e5ef89ae1264611a5e1423f23b5c735c1493cfae0f0284afd 1593 512
coordinator-and-leave c3415b26c069dea59352f774b6c397c8982e273b1ca5b8a5de8c36214773bf3a 911 0
"""


def _sim(*args: str, hash_seed: str = "0") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    return subprocess.run(
        [sys.executable, "-m", "spegeld.gossip.sim", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_every_scenario_hashes_as_pinned() -> None:
    done = _sim()
    assert done.returncode == 0, done.stderr
    assert done.stdout == PINNED


def test_scenarios_hash_the_same_under_other_hash_seeds() -> None:
    """A simulation's seed fixes its run, whatever PYTHONHASHSEED is.

    pytest runs under a fresh hash seed each time; when the core sent its pulls in the
    order of a set of names, every sim-based test ran a different simulation in each CI
    run, and test_thirty_percent_loss_still_converges failed for 2.7 % of hash seeds.
    ``loss`` and ``chunks`` pull from several lagging peers at once.
    """
    names = ["loss", "chunks"]
    code = f"from spegeld.gossip._scenarios import run; print(*run({names!r}), sep='\\n')"
    expected = [line for line in PINNED.splitlines() if line.split()[0] in names]
    for hash_seed in ("1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == expected, hash_seed


def test_the_simulator_refuses_an_unpinned_hash_seed_and_unknown_scenarios() -> None:
    done = _sim("join", hash_seed="1")
    assert done.returncode == 2
    assert "PYTHONHASHSEED=0" in done.stderr
    done = _sim("nope")
    assert done.returncode == 2
    assert "unknown scenario 'nope'" in done.stderr
