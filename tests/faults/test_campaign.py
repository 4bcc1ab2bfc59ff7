"""The campaign's short mode: a few fixed seeds, about a minute of faults each, against a
real three-node cluster. The long mode is `python tests/faults/campaign.py --duration S --seed N`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import campaign  # noqa: E402
import workload  # noqa: E402
from nemesis import KINDS, LINK_KINDS  # noqa: E402

# Fixed seeds, the kinds each draws from and how many faults hold at once; four to six faults
# each in a minute, and between them every kind of fault (seed 1: restart, slow, full, lossy;
# 3: pause, restart, slow, kill, slow-disk, lossy; 5: isolate the controller, term, pause, kill,
# slow-disk, full; 7: the partitions of links between nodes: one-way, partition, bridge,
# isolate; 9: pairs on two nodes: slow-disk with slow, term with one-way, kill with bridge).
NODE_KINDS = tuple(k for k in KINDS if k not in LINK_KINDS)
SEEDS = [(1, NODE_KINDS, 1), (3, NODE_KINDS, 1), (5, NODE_KINDS, 1),
         (7, LINK_KINDS + ("isolate",), 1), (9, KINDS, 2)]
DURATION_S = float(os.environ.get("WEIR_FAULTS_SHORT_S", "60"))


@pytest.fixture(scope="session")
def weir_bin() -> str:
    path = os.environ.get("WEIR_BIN")
    if not path or not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail(f"WEIR_BIN={path!r} is not an executable weir binary (tests/run sets it)",
                    pytrace=False)
    return os.path.abspath(path)


@pytest.fixture(scope="session")
def plugin_dir() -> str:
    path = os.environ.get("WEIR_PLUGIN_DIR", "")
    if not os.path.isfile(os.path.join(path, "passthrough.wasm")):
        pytest.fail(f"WEIR_PLUGIN_DIR={path!r} does not hold the example plugins (tests/run "
                    f"builds them with `weir plugin build plugins-sdk/examples`)", pytrace=False)
    return path


@pytest.mark.parametrize("seed,kinds,at_once", SEEDS,
                         ids=[f"{s}" if n == 1 else f"{s}-{n}-at-once" for s, _, n in SEEDS])
def test_no_acknowledged_value_is_lost_under_faults(seed, kinds, at_once, weir_bin, plugin_dir,
                                                    tmp_path):
    outcome = campaign.run(campaign.Options(seed=seed, duration=DURATION_S, weir_bin=weir_bin,
                                            plugin_dir=plugin_dir, workdir=tmp_path,
                                            kinds=kinds, at_once=at_once))
    if not outcome.verdict.ok:
        logs = "\n".join(f"--- {p.name} (last 40 lines) ---\n" +
                         "\n".join(p.read_text(errors="replace").splitlines()[-40:])
                         for p in sorted(tmp_path.glob("node*.log")))
        pytest.fail(f"{outcome.summary()}\n{campaign.report(outcome.verdict)}\n"
                    f"work directory: {tmp_path}\n{logs}", pytrace=False)


def test_a_transactional_client_killed_mid_call_keeps_exactly_once(weir_bin, plugin_dir, tmp_path,
                                                                  monkeypatch):
    """Client crashes: the transactional copier's process is killed with -9 whenever a call
    of its takes longer than a second (inside init_transactions, send_offsets_to_transaction,
    commit_transaction, ...) and started again, while links are slowed; each new instance
    fences the last, and the copy still holds every value once."""
    monkeypatch.setattr(workload.TxnCopier, "HUNG_AFTER_S", 1.0)
    outcome = campaign.run(campaign.Options(seed=11, duration=30, weir_bin=weir_bin,
                                            plugin_dir=plugin_dir, workdir=tmp_path,
                                            kinds=("slow",)))
    assert outcome.copier_restarts > 0, "no call of the copier took over a second: nothing killed"
    if not outcome.verdict.ok:
        pytest.fail(f"{outcome.summary()}\n{campaign.report(outcome.verdict)}\n"
                    f"work directory: {tmp_path}", pytrace=False)
