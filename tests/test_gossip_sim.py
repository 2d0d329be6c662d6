"""The simulator's fixed scenarios behave exactly as they did: a refactor's proof.

``python -m spegeld.gossip.sim`` hashes every datagram of every scenario and every
node's final table (``spegeld.gossip._scenarios``). The lines below were recorded
before the gossip core was split into a member table, a failure detector and
anti-entropy (issue 15); a change that means to keep behaviour keeps them. A change
that means to alter the protocol updates them, and says why in its commit.

``loss`` was re-pinned when the lagging peers' pulls stopped going out in set order
(PYTHONHASHSEED's): the same pulls, in the order the lags were noticed.

Every line was re-pinned for datagram version 2 (issue 13): each line now also carries
the *outcome*, the final tables without byte counts. The nodes speak version 2; with
``--v1`` they speak version 1 (PINNED_V1), and both runs send the same datagrams in the
same order and end with the same outcome: version 2 changed the framing and nothing
else. ``steady`` (no joins) in version 1 still hashes as before version 2; in the others
a StatePull from a node the receiver does not hold yet is no longer answered at its
source (the reflection fix), which moves the join phase's datagrams.
"""

from __future__ import annotations

import os
import subprocess
import sys

PINNED = """\
join 0c8897185e0f11658332b364cbe937ed5123b7c697c54ee3c77467a8c58b02aa 7672314c829efcab9b5d63d33c948a77739b723a225ec0e5d803a29ad0a68f31 2308 0
keys f0f937b6f13dd36b598a7a68f7465be2f974b80aed6d329f319ba3eeb099e606 489621a6b0a74f37fc9edf3db91008253295a5f1fda93b86757066511dd2499f 3061 0
kill 20c2df62e1e79d49e93731300d4533742f3b338c66fab5d236e0702689109a66 8c0ee5747e89d378fdb71d06ef03b4da4abefb368ea5144332550f3e7c2c8d63 4061 76
refute 42fa13851029adb9c3f7c6d238d6c7346cff7ea7a76f5ba2efc9e33ba3a8ff03 4faea2f91accb9e85123297cac1ab98ea9c522f3de2bd1bb7d26fd7aa75853b4 3265 50
restart 9f59f5a2ddaa49138836777dee9aac84f9176e4725a1b3ceb4589f75a8a635d7 45cfb9fea24ed0a3a6e062c8b8be7203daf64a455b61e9b3414873849faf13a5 2791 67
partition 1019f08009f2b6b2ed8c9fc92f1584ee87b77b7d8d1ca8db2e95ec932581a742 c6f4a0c2ecb3eda27dc831fcd1faf12ad22f6b4751a81137d5fa7f7ca715d651 6956 779
loss b41b75b2a503d00b8b928aabb2f42a32a5f49ff06032bbbd1553961c40551786 d82dcf4fc80cfe9e15fe26c925bab7f959b98e5ed8086e4d778c943981c0c443 9175 3926
steady 70094e1c985b3f54916afd5cbf4f218940cbfdf5319e6f63ddb682243710e5ae 6dd74abe126d62a7bef7ff1ccca032a1492a3f9eeffbab44d97e2edbe1941558 26148 11094
chunks 27280d463f7072ad4e3828f9dd585a7f92d86e53a2014f8d07981ba4a162a2a1 809f4c41f64315d3301c4b6f262dca7580eb4f1d3f2b5972fd0b7593a76fe21b 1567 501
coordinator-and-leave 79d29b6384cc748753b33de693164989d5fd928d84ac2a528bc6e997838b0f82 9e159f8d189cf70cc05b3d122d172f8e6327f711c4b8b2cec3503c684a1915c9 925 0
"""
# The same scenarios with every node speaking only datagram version 1 (``--v1``).
PINNED_V1 = """\
join 1793bb888cd07c3634430ce1a41e44d5be783ee5668154667ae0da50aa19c416 7672314c829efcab9b5d63d33c948a77739b723a225ec0e5d803a29ad0a68f31 2308 0
keys 185319d1cdea6adff5f5966ae2702d774a8f4697cb4d76e05f722628993313d3 489621a6b0a74f37fc9edf3db91008253295a5f1fda93b86757066511dd2499f 3061 0
kill e89206c0e6e0c86cdac028a7e92937ba7f65088a2c195d534a21ca48a8310c19 8c0ee5747e89d378fdb71d06ef03b4da4abefb368ea5144332550f3e7c2c8d63 4061 76
refute 02ea1b101a543a4548dbd2d6938cc3f971dad82e0f6038466b227843c24265b6 4faea2f91accb9e85123297cac1ab98ea9c522f3de2bd1bb7d26fd7aa75853b4 3265 50
restart 0b8f551b7ef36ce08f92fd6504f1129572544e1961b6e1199b99d2dc43962e21 45cfb9fea24ed0a3a6e062c8b8be7203daf64a455b61e9b3414873849faf13a5 2791 67
partition 86e0df3936c235340918a58693f0ac62b4a709f1f1817e0f6703f475e520fa1b c6f4a0c2ecb3eda27dc831fcd1faf12ad22f6b4751a81137d5fa7f7ca715d651 6956 779
loss 22e9b3c9ff87c6209fbf410ef8807edc2d475344b2df0a3114aecc718b6e57e0 d82dcf4fc80cfe9e15fe26c925bab7f959b98e5ed8086e4d778c943981c0c443 9175 3926
steady 4d56c65bbfe840150d75d2d824d0835c2bab96753b10ea113d02483b5f823189 6dd74abe126d62a7bef7ff1ccca032a1492a3f9eeffbab44d97e2edbe1941558 26148 11094
chunks ea4bd04a06889b3c961f64d5b1073842c0d9634dd9b181040055e5e3cd704ae2 809f4c41f64315d3301c4b6f262dca7580eb4f1d3f2b5972fd0b7593a76fe21b 1567 501
coordinator-and-leave fd4bc7ee8d9f014d0d76d0ca8d6ca9b6505eb8011412f6178e8a574ea144a5d8 9e159f8d189cf70cc05b3d122d172f8e6327f711c4b8b2cec3503c684a1915c9 925 0
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


def test_version_1_sends_the_same_datagrams_to_the_same_outcome() -> None:
    done = _sim("--v1")
    assert done.returncode == 0, done.stderr
    assert done.stdout == PINNED_V1
    for v2, v1 in zip(PINNED.splitlines(), PINNED_V1.splitlines(), strict=True):
        name, _, outcome, delivered, lost = v2.split()
        assert v1.split()[0] == name and v1.split()[2:] == [outcome, delivered, lost], name
    # Before version 2 (and the reflection fix), 'steady' hashed exactly so.
    before = "4d56c65bbfe840150d75d2d824d0835c2bab96753b10ea113d02483b5f823189"
    assert PINNED_V1.splitlines()[7].split()[:2] == ["steady", before]


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
