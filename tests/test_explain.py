"""`check --explain`: per rule, which mechanism enforces it here and whether it prevents or
only contains. Built from the same plans the session uses, for a given set of host layers."""

from __future__ import annotations

from pathlib import Path

from ebpf_guard.enforce.explain import CONTAINS, LOGS, PREVENTS, HostLayers, explain, render
from ebpf_guard.paths import POLICY_DIR
from ebpf_guard.policy import load_policy
from ebpf_guard.verdicts import Mode
from tests.conftest import requires_root
from tests.helpers import guard

ALL = HostLayers(fanotify=True, landlock_abi=7, cgroup_bpf=True, btf=True, bpf_lsm=False)
NONE = HostLayers(fanotify=False, landlock_abi=0, cgroup_bpf=False, btf=True, bpf_lsm=False)


def rows_for(tmp_path: Path, layers: HostLayers, mode: Mode | None = None) -> dict:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("key")
    ws = tmp_path / "ws"
    ws.mkdir()
    policy = load_policy(POLICY_DIR / "default.yaml")
    return {r.rule: r for r in explain(policy, layers, workspace=str(ws), homes=[str(home)], mode=mode)}


def test_with_every_layer_the_default_policy_prevents_its_kill_and_halt_rules(tmp_path: Path) -> None:
    rows = rows_for(tmp_path, ALL)
    assert rows["ssh-keys"].watch_effect == PREVENTS and "fanotify" in rows["ssh-keys"].watch
    assert rows["exfil-tool"].watch_effect == PREVENTS and "exec hold" in rows["exfil-tool"].watch
    assert rows["network-burst"].watch_effect == PREVENTS and "cgroup-BPF" in rows["network-burst"].watch
    assert rows["mass-delete"].watch_effect == PREVENTS and "rate hold" in rows["mass-delete"].watch
    # Only `run` can jail: the catch-all write rule is contained under watch, prevented under run.
    outside = rows["write-outside-workspace"]
    assert (outside.watch_effect, outside.run_effect) == (CONTAINS, PREVENTS) and "Landlock" in outside.run
    assert rows["io-uring"].watch_effect == CONTAINS  # honest: io_uring_setup happens, then the freeze
    assert rows["io-uring"].run_effect == PREVENTS and "seccomp" in rows["io-uring"].run
    assert rows["ptrace"].watch_effect == LOGS


def test_without_the_layers_file_and_network_rules_are_only_contained(tmp_path: Path) -> None:
    rows = rows_for(tmp_path, NONE)
    assert rows["ssh-keys"].watch_effect == CONTAINS
    assert rows["network-burst"].watch_effect == CONTAINS
    assert rows["write-outside-workspace"].run_effect == CONTAINS  # no Landlock: no jail
    assert rows["exfil-tool"].watch_effect == PREVENTS  # the sensor's exec hold needs none of them


def test_bpf_lsm_takes_the_file_rules_where_the_host_has_it(tmp_path: Path) -> None:
    rows = rows_for(tmp_path, HostLayers(fanotify=True, landlock_abi=7, cgroup_bpf=True, btf=True, bpf_lsm=True))
    assert "BPF-LSM" in rows["credentials"].watch and "fanotify" not in rows["credentials"].watch
    assert "BPF-LSM" in rows["mass-delete"].watch
    # An LSM hook cannot ask the engine who opens a file: ssh-keys (its exception: git's ssh)
    # and ASK rules stay with the gate, which holds the open for the verdict.
    assert "BPF-LSM" not in rows["ssh-keys"].watch and "waits for" in rows["ssh-keys"].watch
    assert "a human's answer" in rows["git-credentials"].watch


def test_audit_mode_prevents_nothing(tmp_path: Path) -> None:
    rows = rows_for(tmp_path, ALL, mode=Mode.AUDIT)
    assert {r.watch_effect for r in rows.values()} <= {LOGS, "allows"}


def test_markdown_is_one_row_per_rule(tmp_path: Path) -> None:
    rows = list(rows_for(tmp_path, ALL).values())
    lines = render(rows, markdown=True)
    assert lines[0].startswith("| rule | verdict | tier |") and len(lines) == len(rows) + 2
    tiers = {r.rule: r.tier for r in rows}
    assert set(tiers.values()) <= {"deny", "allow", "catch-all"} and "" not in tiers.values()


@requires_root
def test_check_explain_probes_this_host() -> None:
    r = guard("check", "--explain", "policies/default.yaml", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "enforcement here (fanotify" in r.stdout
    assert "recursive-rm (exec, KILL): watch prevents" in r.stdout
    assert "[tier deny]" in r.stdout and "[tier catch-all]" in r.stdout
