"""`ebpf-guard doctor` loads the real sensor and probes each prevention mechanism for real.

Its output is checked against what is known of the host from elsewhere: facts the kernel
publishes (kprobe PMU or kprobe_events, the active LSMs) and, for the hosts of the test matrix,
what was measured there (/work/shared/kernel-facts.md; vagrant/qemu.sh for the Debian guests).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
from pathlib import Path

import pytest

from ebpf_guard import doctor, host
from ebpf_guard.sensor import SOURCE
from tests.conftest import requires_bpf
from tests.helpers import guard

pytestmark = requires_bpf

MECHANISMS = ["bpf-lsm", "kprobes", "fentry", "fanotify", "landlock", "cgroup-bpf"]
TRACEPOINT_PROBE = re.compile(r"^(?:RAW_)?TRACEPOINT_PROBE\(", re.MULTILINE)

# What each mechanism is on the hosts of the matrix, as measured there (kernel release pattern).
MEASURED: dict[str, dict[str, str]] = {
    # This VM (6.18, a hypervisor's kernel): BPF-LSM is active but its programs, like fentry
    # ones, are refused with EPERM; no kprobes at all.
    r"-fc-": {"bpf-lsm": "absent", "kprobes": "absent", "fentry": "absent", "fanotify": "avail",
              "landlock": "avail", "cgroup-bpf": "avail"},
    # Debian 12 (6.1) and Debian 13 (6.12), stock kernels: everything.
    r"^6\.1\.\d+-\d+-amd64$": dict.fromkeys(MECHANISMS, "avail"),
    r"^6\.12\.\d+\+deb13-amd64$": dict.fromkeys(MECHANISMS, "avail"),
}


def parse(stdout: str) -> dict[str, tuple[str, str]]:
    """Doctor's lines -> {check: (status, detail)}; the summary line and the per-rule
    enforcement lines after the checks are left out."""
    out = {}
    for line in stdout.splitlines()[:-1]:
        if line.startswith("enforcement of "):
            break
        status, name, detail = line.split(None, 2)
        out[name] = (status, detail)
    return out


def expected_here() -> dict[str, str]:
    """Mechanism -> status, from what the kernel publishes and, on a known host, measurements."""
    want = {}
    for pattern, states in MEASURED.items():
        if re.search(pattern, platform.release()):
            want.update(states)
    # The kernel publishes these two: the kprobe PMU (or the legacy kprobe_events file), and
    # the LSMs it runs (Landlock's syscall answers only when it is one of them).
    want["kprobes"] = "avail" if (Path("/sys/bus/event_source/devices/kprobe").exists()
                                  or (host.TRACEFS / "kprobe_events").exists()) else "absent"
    lsms = (host.SECURITYFS / "lsm").read_text().strip().split(",")
    want["landlock"] = "avail" if "landlock" in lsms else "absent"
    if "bpf" not in lsms:
        want["bpf-lsm"] = "absent"
    return want


def test_doctor_loads_the_sensor_and_probes_every_mechanism() -> None:
    r = guard("doctor", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[-1] == "ok: this host can run ebpf-guard"
    checks = parse(r.stdout)
    status, detail = checks["sensor"]
    programs = len(TRACEPOINT_PROBE.findall(SOURCE.read_text()))
    assert status == "ok", detail
    assert f"all {programs} programs loaded and attached on kernel {platform.release()}" in detail
    assert list(checks)[-len(MECHANISMS):] == MECHANISMS
    for name, want in expected_here().items():
        status, detail = checks[name]
        assert status == want, f"{name}: {status} {detail}"
    for name in MECHANISMS:
        status, detail = checks[name]
        assert status in ("avail", "absent"), f"{name}: {status} {detail}"
        if status == "absent":
            assert ": " in detail and detail.rsplit(": ", 1)[1], f"{name}: no reason: {detail}"


@pytest.fixture
def bpf_copy(tmp_path: Path) -> Path:
    """A copy of bpf/ to break."""
    copy = tmp_path / "bpf"
    shutil.copytree(SOURCE.parent, copy)
    return copy


# Rejected by every verifier: a read past the end of the scope map's value. Appended after the
# real programs, so bcc has attached those when it reaches this one (they must be undone).
BROKEN_PROGRAM = """
TRACEPOINT_PROBE(syscalls, sys_enter_getppid)
{
    u32 zero = 0;
    struct scope_cfg *cfg = scope.lookup(&zero);
    return cfg ? ((u32 *)cfg)[64] : 0;
}
"""


def test_a_program_the_verifier_rejects_is_a_failure_with_its_reason(bpf_copy: Path) -> None:
    with open(bpf_copy / "sensor.c", "a") as f:
        f.write(BROKEN_PROGRAM)
    before = host.bpf_prog_fds()
    lines: list[str] = []
    rc = doctor.run_checks(lines.append, source=bpf_copy / "sensor.c")
    assert rc == 1
    assert lines[-1] == "FAIL: required checks failed: sensor"
    (line,) = [x for x in lines if x.split()[1] == "sensor"]
    assert line.startswith("FAIL "), line
    assert f"on kernel {platform.release()}" in line, line
    assert "program syscalls:sys_enter_getppid refused by the kernel (Permission denied)" in line, line
    assert "invalid access to map value" in line, line  # the verifier's own words
    log = Path(re.search(r"full bcc output: (\S+)\)", line).group(1))
    try:
        assert "invalid access to map value" in log.read_text()
    finally:
        log.unlink()
    assert host.bpf_prog_fds() == before, "programs attached before the failure were left loaded"
    assert [x.split()[1] for x in lines[-1 - len(MECHANISMS):-1]] == MECHANISMS  # still probed


def test_a_compile_error_is_a_failure_with_clangs_words(bpf_copy: Path) -> None:
    src = bpf_copy / "sensor.c"
    text = src.read_text()
    src.write_text(text.replace("u32 n = cfg->ncgroups;", "u32 n = cfg->ncgroups + no_such_name;", 1))
    line_no = text[:text.index("u32 n = cfg->ncgroups;")].count("\n") + 1
    check = doctor.check_sensor(src)
    assert check.status == "FAIL"
    assert f"on kernel {platform.release()}: compile error: sensor.c:{line_no}:" in check.detail, check.detail
    assert "use of undeclared identifier 'no_such_name'" in check.detail, check.detail
    os.unlink(re.search(r"full bcc output: (\S+)\)", check.detail).group(1))
