"""examples/demo.py tells the truth: when the guard cannot start, it says so and exits non-zero."""

from __future__ import annotations

import subprocess
import sys

from ebpf_guard.enforce import cgroups
from tests.conftest import requires_root
from tests.helpers import REPO, cgroup_leftovers, scaled


@requires_root
def test_demo_with_a_guard_that_cannot_start_says_so(tmp_path) -> None:
    missing = tmp_path / "no-such-policy.yaml"
    r = subprocess.run([sys.executable, str(REPO / "examples" / "demo.py"), "--policy", str(missing)],
                       capture_output=True, text=True, timeout=scaled(120), cwd=REPO)
    assert r.returncode != 0, r.stdout
    assert "[demo] FAILED: audit run: ebpf-guard never started watching (exit 2;" in r.stdout, r.stdout
    assert str(missing) in r.stdout  # the guard's own reason is passed on
    # No claim about an agent that never ran, and no second act.
    for claim in ("[agent]", "reached its last step", "killed by ebpf-guard", "enforce run", "the evidence"):
        assert claim not in r.stdout, claim
    assert not cgroup_leftovers(cgroups.find_v2_mount(), "ebpf-guard-demo-")
