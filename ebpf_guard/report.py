"""`ebpf-guard report`: what happened, from the verdict log (text, JSON, or one HTML file).

Everything in the log and the incident files came from the watched agent (paths, argv, comm,
cmdlines) and is untrusted: the text renderer neutralises control characters (no terminal
escapes), the HTML renderer escapes everything and loads nothing (a CSP forbids it anyway).
Reading is tolerant: bad lines, unknown record types and missing fields are reported, not fatal.
The hash chain is checked too (`main_report`): a broken chain is stated at the top of the report,
and records the writer could not write (`unwritten_before`, see auditlog) are listed as gaps.
"""

from __future__ import annotations

import html
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson

from ebpf_guard.auditlog import LOSS_KEY, VerifyResult, log_files, read_error, verify_log
from ebpf_guard.files import read_regular

VERDICT_ORDER = ("KILL", "HALT", "ASK", "FLAG", "SAFE")
FORMATS = ("text", "json", "html")
RECENT_SHOWN = 20  # recent events listed per incident
MAX_INDENT = 20  # process-tree levels indented (a fork chain can be thousands deep)
_KNOWN = {"type", "seq", "prev", "hash", "ts", LOSS_KEY}


class ReportError(Exception):
    """No report can be made (unknown format, log unreadable or not a log); one line for the
    user. `damaged`: the log is there but is not a log (exit 4), else it cannot be read (1)."""

    def __init__(self, message: str, *, damaged: bool = False) -> None:
        super().__init__(message)
        self.damaged = damaged


# ---------------------------------------------------------------------------------------- model
@dataclass(slots=True)
class Entry:
    """One non-SAFE verdict in the timeline."""

    ts: datetime | None
    seq: int | None
    verdict: str
    rule: str
    reason: str
    mode: str
    action: str
    process: str  # "comm[tgid] uid N"
    what: str  # "exec /usr/bin/curl [curl …]"
    incident: str | None
    severity: str = ""  # the rule's (policy `severity`, else the verdict's); "" in older logs
    tags: list[str] = field(default_factory=list)  # the rule's `tags`


@dataclass(slots=True)
class Done:
    """Something that was done or decided: an outcome, an approval, a session start/end."""

    ts: datetime | None
    kind: str  # outcome | approval | session | <other record type>
    text: str
    verdict: str = ""  # for colouring; "" when none applies


@dataclass(slots=True)
class Proc:
    """One process of an incident's tree; depth is its indentation."""

    depth: int
    pid: int | None
    ppid: int | None
    exe: str
    cmdline: str
    cwd: str
    user: str
    started: str
    status: str
    open_files: list[str]
    sockets: list[str]
    errors: list[str]
    trigger: bool  # the process whose event caused the incident


@dataclass(slots=True)
class Incident:
    path: str
    ts: datetime | None
    verdict: str
    rule: str
    reason: str
    process: str
    what: str
    tree: list[Proc] = field(default_factory=list)
    recent: list[str] = field(default_factory=list)
    error: str = ""  # why the file could not be read, "" if it was


@dataclass(slots=True)
class Gap:
    """Records the writer could not write (disk full, I/O error), as the log itself tells."""

    ts: datetime | None
    seq: int | None  # the record that carries the count (lost records came before it)
    count: int
    at_end: bool = False  # after the last record: only the head file knows (seq = last record)

    @property
    def text(self) -> str:
        if self.at_end:
            return (f"{self.count} records after seq {self.seq}, the last record (counted in the "
                    "head file; nothing was written after them)")
        return f"{self.count} records before seq {self.seq}"


@dataclass(slots=True)
class Report:
    sources: list[str]
    generated: datetime
    since: datetime | None  # start of the --last-hours window
    first: datetime | None  # first and last record shown
    last: datetime | None
    records: int
    verdicts: dict[str, int]
    rules: dict[str, dict[str, int]]  # rule -> verdict -> count
    timeline: list[Entry]
    incidents: list[Incident]
    done: list[Done]
    warnings: list[str]
    gaps: list[Gap] = field(default_factory=list)
    chain: str = ""  # hash-chain check result, when the caller ran one
    chain_ok: bool | None = None  # None: not checked

    @property
    def unwritten(self) -> int:
        """Records that could NOT be written to the log (in the window shown)."""
        return sum(g.count for g in self.gaps)


# ---------------------------------------------------------------------------------------- build
def _ts(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def _read(paths: list[Path], warnings: list[str]) -> list[dict]:
    records: list[dict] = []
    for path in paths:
        try:
            with read_regular(path) as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        warnings.append(f"{path.name}:{n}: not JSON, skipped")
                        continue
                    if isinstance(rec, dict):
                        records.append(rec)
                    else:
                        warnings.append(f"{path.name}:{n}: not a JSON object, skipped")
        except OSError as e:
            warnings.append(read_error(path, e))
    return records


def _s(value: Any) -> str:
    """Any field as display text ("" for missing)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple):
        return " ".join(_s(v) for v in value)
    return orjson.dumps(value).decode() if isinstance(value, dict) else str(value)


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def describe(ev: Any) -> str:
    """What an event (as logged) did, in one line."""
    if not isinstance(ev, dict):
        return ""
    kind = _s(ev.get("kind"))
    path = _s(ev.get("path") or ev.get("raw_path"))
    real = _s(ev.get("real_path"))
    if real and real != path:
        path = f"{path} -> {real}"  # what the kernel reached (a symlink, hard link, alias)
    if ev.get("dev_ino"):
        path += f" [{_s(ev.get('dev_ino'))}]"
    if kind in ("rename", "link", "symlink"):
        dest = _s(ev.get("dest_real_path") or ev.get("dest_path") or ev.get("dest_raw_path"))
        return f"{kind} {path} => {dest}"
    if kind == "exec":
        argv = _s(ev.get("argv")) + (" …" if ev.get("argv_truncated") else "")
        return f"exec {path} [{argv}]" if argv else f"exec {path}"
    if kind == "open":
        return f"open {path} ({','.join(map(_s, _list(ev.get('access')))) or '-'})"
    if kind == "connect":
        dest = _s(ev.get("dest")) or f"{_s(ev.get('addr'))}:{_s(ev.get('port'))}"
        return f"connect {_s(ev.get('family'))} {dest}".replace("  ", " ")
    if kind == "fork":
        return f"fork child {_s(ev.get('child_pid'))}"
    return f"{kind} {path}".strip()


def _process(ev: Any) -> str:
    if not isinstance(ev, dict):
        return ""
    pid = ev.get("tgid", ev.get("pid"))
    out = f"{_s(ev.get('comm'))}[{_s(pid)}]"
    return out + (f" uid {_s(ev['uid'])}" if ev.get("uid") is not None else "")


def _extra(rec: dict, known: set[str]) -> str:
    return ", ".join(f"{k}={_s(v)}" for k, v in rec.items() if k not in _KNOWN | known)


def _approval(rec: dict) -> tuple[str, set[str], str]:
    """An ASK answered: by whom, how, after how long. Reads approvals.py's record
    (decision/by_user/by_uid/login_user) and the simpler allow/user/uid/who form."""
    allow = rec.get("allow")
    if not isinstance(allow, bool) and rec.get("decision") in ("allow", "deny"):
        allow = rec["decision"] == "allow"
    word = "ALLOWED" if allow is True else "DENIED" if allow is False else "answered"
    if rec.get("via") == "timeout":
        who = "timeout"
    else:
        who = _s(rec.get("by_user") or rec.get("user") or rec.get("who")) or "?"
        uid = rec.get("by_uid", rec.get("uid") if "by_user" not in rec else None)
        if uid is not None:
            who += f" (uid {_s(uid)})"
        if rec.get("login_user") and rec["login_user"] != rec.get("by_user"):
            who += f", login {_s(rec['login_user'])}"
    text = f"{word} {_s(rec.get('rule')) or '(default)'} by {who}"
    if rec.get("via") and rec["via"] != "timeout":
        text += f" via {_s(rec['via'])}"
    if isinstance(rec.get("waited_s"), int | float):
        text += f" after {rec['waited_s']:.1f}s"
    if rec.get("remember"):
        text += ", remembered"
    if rec.get("comm") or rec.get("what"):
        text += f" — {_s(rec.get('comm'))}[{_s(rec.get('pid'))}] {_s(rec.get('what'))}".rstrip()
    if rec.get("id"):
        text += f" [id {_s(rec['id'])}]"
    known = {"allow", "decision", "who", "user", "uid", "by_user", "by_uid", "login_user", "by_pid",
             "via", "waited_s", "remember", "id", "rule", "reason", "session", "asked_at",
             "decided_at", "timeout_s", "default", "pid", "comm", "what"}
    return text, known, ""


def _done(rec: dict, kind: str, ts: datetime | None) -> Done:
    if kind == "outcome":
        rule = _s(rec.get("rule")) or "(default)"
        text = f"{_s(rec.get('verdict'))} {rule}: {_s(rec.get('action'))}"
        if rec.get("pid") is not None:
            text += f" (pid {_s(rec['pid'])})"
        known = {"verdict", "rule", "action", "pid"}
        verdict = _s(rec.get("verdict"))
    elif kind == "approval":
        text, known, verdict = _approval(rec)
    elif kind == "session":
        phase = next((_s(rec[k]) for k in ("event", "phase", "state") if rec.get(k)), "")
        parts = [f"session {phase}".strip()]
        fields = ("mode", "policy", "cgroup", "command")
        parts += [f"{k} {_s(rec[k])}" for k in fields if rec.get(k)]
        known = {"event", "phase", "state", *fields}
        text = ", ".join(parts)
        verdict = ""
    else:
        text, known, verdict = "", set(), ""
    extra = _extra(rec, known)
    text = f"{text}; {extra}" if text and extra else text or extra
    return Done(ts, kind, text, verdict)


def _tree(procs: list[Any], trigger: Any) -> list[Proc]:
    """The snapshot's processes as an indented tree (children under parents, by pid)."""
    by_pid = {p.get("pid"): p for p in procs
              if isinstance(p, dict) and isinstance(p.get("pid"), int | str)}
    kids: dict[Any, list[Any]] = defaultdict(list)
    roots = []
    for pid, p in by_pid.items():
        ppid = p.get("ppid")
        if isinstance(ppid, int | str) and ppid in by_pid and ppid != pid:
            kids[ppid].append(pid)
        else:
            roots.append(pid)

    def key(pid: Any) -> tuple[int, str]:
        return (pid if isinstance(pid, int) else 1 << 62, str(pid))

    out: list[Proc] = []
    seen: set[Any] = set()
    # Roots first; the second pass picks up pid cycles. Iterative: fork chains can be deep.
    for root in sorted(roots, key=key) + sorted(by_pid, key=key):
        stack = [(root, 0)]
        while stack:
            pid, depth = stack.pop()
            if pid in seen:
                continue
            seen.add(pid)
            out.append(_proc(by_pid[pid], depth, pid == trigger))
            stack += [(child, depth + 1) for child in sorted(kids[pid], key=key, reverse=True)]
    return out


def _proc(p: dict, depth: int, trigger: bool) -> Proc:
    start = p.get("start_time")
    started = ""
    if isinstance(start, int | float):
        started = datetime.fromtimestamp(start, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    user = _s(p.get("username"))
    if p.get("uid") is not None:
        user = f"{user} (uid {_s(p['uid'])})".strip()
    files = []
    for f in _list(p.get("open_files")):
        if isinstance(f, dict):
            mode = f" ({_s(f['mode'])})" if f.get("mode") else ""
            files.append(f"fd {_s(f.get('fd'))} {_s(f.get('path'))}{mode}")
    socks = []
    for c in _list(p.get("sockets")):
        if isinstance(c, dict):
            family = _s(c.get("family")).removeprefix("AF_")
            kind = f"{family}/{_s(c.get('type')).removeprefix('SOCK_')}"
            addrs = _s(c.get("laddr")) + (f" -> {_s(c['raddr'])}" if c.get("raddr") else "")
            status = _s(c.get("status")) if c.get("status") not in (None, "NONE") else ""
            socks.append(f"fd {_s(c.get('fd'))} {kind.lower()} {addrs} {status}".strip())
    errors = p.get("errors") if isinstance(p.get("errors"), dict) else {}
    return Proc(
        depth=depth, pid=p.get("pid"), ppid=p.get("ppid"), exe=_s(p.get("exe")),
        cmdline=_s(p.get("cmdline")), cwd=_s(p.get("cwd")), user=user, started=started,
        status=_s(p.get("status")), open_files=files, sockets=socks,
        errors=[f"{k}: {_s(v)}" for k, v in errors.items()], trigger=trigger,
    )


def _incident(rec: dict, ts: datetime | None, log_dir: Path) -> Incident:
    ev = rec.get("event")
    path = Path(_s(rec.get("incident")))
    if not path.is_absolute():
        path = log_dir / path
    inc = Incident(str(path), ts, _s(rec.get("verdict")), _s(rec.get("rule")),
                   _s(rec.get("reason")), _process(ev), describe(ev))
    try:
        doc = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        inc.error = "incident file not found"
        return inc
    except (OSError, orjson.JSONDecodeError) as e:
        inc.error = f"cannot read incident file: {getattr(e, 'strerror', None) or e}"
        return inc
    if not isinstance(doc, dict):
        inc.error = "incident file is not a JSON object"
        return inc
    trigger = ev.get("tgid", ev.get("pid")) if isinstance(ev, dict) else None
    if trigger is None and isinstance(doc.get("record"), dict):
        dev = doc["record"].get("event")
        trigger = dev.get("tgid", dev.get("pid")) if isinstance(dev, dict) else None
    inc.tree = _tree(_list(doc.get("process_tree", doc.get("tree"))), trigger)
    recent = [e for e in _list(doc.get("recent_events")) if isinstance(e, dict)][-RECENT_SHOWN:]
    t0 = ev.get("ts_ns") if isinstance(ev, dict) else None
    for e in recent:
        when = ""
        if isinstance(t0, int) and isinstance(e.get("ts_ns"), int):
            when = f"{(e['ts_ns'] - t0) / 1e9:+.3f}s "
        inc.recent.append(f"{when}{_process(e)} {describe(e)}")
    return inc


def build_report(log_paths: list[Path], *, last_hours: float | None,
                 now: datetime | None = None) -> Report:
    """Summarise the records of `log_paths` (in chain order: oldest file first)."""
    now = now or datetime.now(timezone.utc)
    try:
        since = now - timedelta(hours=last_hours) if last_hours is not None else None
    except OverflowError:
        since = None  # a window reaching back past year 1 holds everything
    warnings: list[str] = []
    gaps: list[Gap] = []
    verdicts: Counter[str] = Counter()
    rules: dict[str, Counter[str]] = defaultdict(Counter)
    timeline: list[Entry] = []
    incidents: list[Incident] = []
    done: list[Done] = []
    seen_incidents: set[str] = set()
    first = last = prev_ts = None
    shown = 0
    log_dir = log_paths[-1].parent if log_paths else Path(".")
    for rec in _read(log_paths, warnings):
        ts = _ts(rec.get("ts")) or prev_ts  # an undated record belongs with the one before it
        prev_ts = ts
        if since is not None and (ts is None or ts < since):
            continue
        shown += 1
        if ts is not None:
            first, last = first or ts, ts
        lost = rec.get(LOSS_KEY)
        if type(lost) is int and lost > 0:
            gaps.append(Gap(ts, rec.get("seq") if isinstance(rec.get("seq"), int) else None, lost))
        kind = _s(rec.get("type")) or "?"
        if kind != "verdict":
            done.append(_done(rec, kind, ts))
            continue
        verdict, rule = _s(rec.get("verdict")) or "?", _s(rec.get("rule")) or "(default)"
        verdicts[verdict] += 1
        rules[rule][verdict] += 1
        if verdict == "SAFE":
            continue
        ev = rec.get("event")
        seq = rec.get("seq") if isinstance(rec.get("seq"), int) else None
        timeline.append(Entry(ts, seq, verdict, rule, _s(rec.get("reason")), _s(rec.get("mode")),
                              _s(rec.get("action")), _process(ev), describe(ev),
                              _s(rec.get("incident")) or None, _s(rec.get("severity")),
                              [_s(t) for t in _list(rec.get("tags"))]))
        if rec.get("incident") and _s(rec["incident"]) not in seen_incidents:
            seen_incidents.add(_s(rec["incident"]))
            incidents.append(_incident(rec, ts, log_dir))
    return Report(
        sources=[str(p) for p in log_paths], generated=now, since=since, first=first, last=last,
        records=shown, verdicts=dict(sorted(verdicts.items(), key=lambda kv: _vkey(kv[0]))),
        rules={r: dict(sorted(c.items(), key=lambda kv: _vkey(kv[0])))
               for r, c in sorted(rules.items(), key=lambda kv: (-_worst(kv[1]), kv[0]))},
        timeline=timeline, incidents=incidents, done=done, warnings=warnings, gaps=gaps,
    )


def _vkey(verdict: str) -> tuple[int, str]:
    known = verdict in VERDICT_ORDER
    return (VERDICT_ORDER.index(verdict) if known else len(VERDICT_ORDER), verdict)


def _worst(counts: dict[str, int]) -> int:
    return max((len(VERDICT_ORDER) - _vkey(v)[0] for v in counts), default=0)


# ----------------------------------------------------------------------------------------- text
# C0/C1 controls (terminal escapes) and bidi overrides / line separators (visual spoofing).
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(32), *range(127, 160))}
_CONTROL |= {c: f"\\u{c:04x}" for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A),
                                         0x2028, 0x2029, 0x200E, 0x200F)}


def clean(value: Any) -> str:
    """Untrusted text made safe to print: control characters (ESC, CR, …) become \\xNN."""
    return _s(value).translate(_CONTROL)


def _deep(p: Proc) -> str:
    """Indentation stops at MAX_INDENT levels; deeper processes say how deep they are."""
    return f"[depth {p.depth}] " if p.depth > MAX_INDENT else ""


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{clean(v)} {n}" for v, n in counts.items())


def _when(ts: datetime | None) -> str:
    return ts.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if ts else "?"


def _range(r: Report) -> str:
    span = f"{_when(r.first)} .. {_when(r.last)} UTC" if r.first else "no records"
    if r.since:
        span += f" (last {(r.generated - r.since).total_seconds() / 3600:g}h)"
    return span


def render_text(r: Report) -> str:
    out = ["ebpf-guard report", f"Log:      {', '.join(map(clean, r.sources)) or '-'}",
           f"Range:    {_range(r)}", f"Records:  {r.records}"]
    if r.chain:
        out.append(f"Chain:    {clean(r.chain)}")
    if r.gaps:
        out.append(f"Lost:     {r.unwritten} records could NOT be written to the log "
                   "(disk full or I/O error): the counts below do not include them")
        out.append(f"\nLog gaps ({len(r.gaps)}):")
        out += [f"  {'end' if g.at_end else _when(g.ts):<19}  {clean(g.text)}" for g in r.gaps]
    out += ["", "Verdicts: " + (_counts(r.verdicts) or "none")]
    if r.rules:
        out.append("\nRules:")
        width = min(max(len(clean(k)) for k in r.rules), 40)
        for rule, counts in r.rules.items():
            out.append(f"  {clean(rule):<{width}}  {_counts(counts)}")
    out.append(f"\nTimeline ({len(r.timeline)} non-SAFE):")
    rule_w = min(max((len(clean(e.rule)) for e in r.timeline), default=0), 24)
    proc_w = min(max((len(clean(e.process)) for e in r.timeline), default=0), 28)
    for e in r.timeline:
        out.append(f"  {_when(e.ts)}  {clean(e.verdict):<4}  {clean(e.rule):<{rule_w}}  "
                   f"{clean(e.process):<{proc_w}}  {clean(e.what)}  -> {clean(e.action) or '-'}")
        if e.reason:
            out.append(f"      why: {clean(e.reason)}")
        if e.severity or e.tags:
            out.append(f"      severity {clean(e.severity) or '-'}"
                       + (f", tags: {clean(', '.join(e.tags))}" if e.tags else ""))
    if not r.timeline:
        out.append("  (none)")
    for inc in r.incidents:
        out.append(f"\nIncident {clean(inc.verdict)} {clean(inc.rule)} at {_when(inc.ts)}: "
                   f"{clean(inc.path)}")
        out.append(f"  trigger: {clean(inc.process)} {clean(inc.what)}")
        if inc.error:
            out.append(f"  ({clean(inc.error)})")
        if inc.tree:
            out.append("  process tree:")
        for p in inc.tree:
            pad = "    " + "  " * min(p.depth, MAX_INDENT)
            mark = "  <== trigger" if p.trigger else ""
            out.append(f"{pad}{_deep(p)}{clean(p.pid)} {clean(p.exe) or '?'}  "
                       f"[{clean(p.cmdline)}]{mark}")
            out.append(f"{pad}   user {clean(p.user) or '?'}, cwd {clean(p.cwd) or '?'}"
                       + (f", started {p.started}" if p.started else "")
                       + (f", {clean(p.status)}" if p.status else ""))
            out += [f"{pad}   file   {clean(f)}" for f in p.open_files]
            out += [f"{pad}   socket {clean(s)}" for s in p.sockets]
            out += [f"{pad}   error  {clean(e)}" for e in p.errors]
        if inc.recent:
            out.append(f"  last {len(inc.recent)} events before it:")
            out += [f"    {clean(line)}" for line in inc.recent]
    out.append(f"\nWhat was done ({len(r.done)}):")
    out += [f"  {_when(d.ts)}  {clean(d.kind):<8}  {clean(d.text)}" for d in r.done]
    out += [] if r.done else ["  (nothing)"]
    if r.warnings:
        out.append(f"\nWarnings ({len(r.warnings)}):")
        out += [f"  {clean(w)}" for w in r.warnings]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------- json
def render_json(r: Report) -> str:
    doc = asdict(r) | {"unwritten": r.unwritten}
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_UTC_Z).decode()


# ----------------------------------------------------------------------------------------- html
_COLOURS = {"SAFE": "#2e7d32", "FLAG": "#b26a00", "ASK": "#1565c0", "HALT": "#c62828",
            "KILL": "#6a1b1b"}
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;
 background:#f4f5f7;color:#1d2330}
main{max-width:1200px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:17px;margin:28px 0 8px;border-bottom:2px solid #d7dbe2}
.meta{color:#555;margin:0}.meta b{color:#1d2330}
.card{background:#fff;border:1px solid #d7dbe2;border-radius:6px;padding:12px 16px;margin:10px 0}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #e4e7ec;vertical-align:top}
th{background:#eceff3;font-weight:600}
.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px;overflow-wrap:anywhere}
.nowrap{white-space:nowrap}
.badge{display:inline-block;min-width:38px;text-align:center;color:#fff;border-radius:4px;
 padding:1px 6px;font-weight:700;font-size:12px;background:#666}
.bars{display:grid;grid-template-columns:60px 1fr 50px;gap:6px 10px;align-items:center;
 max-width:620px}
.bar{height:14px;border-radius:3px;background:#666;min-width:2px}
.proc{border-left:3px solid #c5cad3;padding:4px 10px;margin:6px 0;background:#fafbfc}
.proc.trigger{border-left-color:#c62828;background:#fff3f2}
.proc ul{margin:2px 0 0 0;padding-left:18px}.warn{color:#8a4b00}
summary{cursor:pointer;font-weight:600}
"""


def _e(value: Any) -> str:
    return html.escape(clean(value), quote=True)


def _vclass(verdict: str) -> str:
    return f"v-{verdict}" if verdict in _COLOURS else "v-other"


def _badge(verdict: str) -> str:
    return f'<span class="badge {_vclass(verdict)}">{_e(verdict)}</span>' if verdict else ""


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _td(value: Any, cls: str = "") -> str:
    return f'<td class="{cls}">{_e(value)}</td>' if cls else f"<td>{_e(value)}</td>"


def _html_proc(p: Proc) -> str:
    items = [f"<li>file {_e(f)}</li>" for f in p.open_files]
    items += [f"<li>socket {_e(s)}</li>" for s in p.sockets]
    items += [f'<li class="warn">error {_e(e)}</li>' for e in p.errors]
    extra = f"<ul class=\"mono\">{''.join(items)}</ul>" if items else ""
    mark = " &larr; trigger" if p.trigger else ""
    started = f", started {_e(p.started)}" if p.started else ""
    status = f", {_e(p.status)}" if p.status else ""
    cls = "proc trigger" if p.trigger else "proc"
    return (f'<div class="{cls}" style="margin-left:{min(p.depth, MAX_INDENT) * 28}px">'
            f'{_deep(p)}<b>{_e(p.pid)}</b> <span class="mono">{_e(p.exe) or "?"}</span>{mark}<br>'
            f'<span class="mono">{_e(p.cmdline)}</span><br>'
            f"user {_e(p.user) or '?'}, cwd <span class=\"mono\">{_e(p.cwd) or '?'}</span>"
            f"{started}{status}{extra}</div>")


def _html_incident(inc: Incident) -> str:
    parts = [f'<div class="card"><details open><summary>{_badge(inc.verdict)} {_e(inc.rule)} '
             f"&middot; {_e(_when(inc.ts))}</summary>",
             f'<p class="meta">{_e(inc.reason)}<br>trigger: <span class="mono">{_e(inc.process)} '
             f'{_e(inc.what)}</span><br>file: <span class="mono">{_e(inc.path)}</span></p>']
    if inc.error:
        parts.append(f'<p class="warn">{_e(inc.error)}</p>')
    if inc.tree:
        parts.append("<h3>Process tree</h3>" + "".join(_html_proc(p) for p in inc.tree))
    if inc.recent:
        rows = "".join(f"<li>{_e(line)}</li>" for line in inc.recent)
        parts.append(f'<h3>Last {len(inc.recent)} events</h3><ol class="mono">{rows}</ol>')
    return "".join(parts) + "</details></div>"


def _html_tags(e: Entry) -> str:
    if not (e.severity or e.tags):
        return ""
    tags = f", tags: {_e(', '.join(e.tags))}" if e.tags else ""
    return f"<br><small>severity {_e(e.severity or '-')}{tags}</small>"


def render_html(r: Report) -> str:
    colours = "".join(f".v-{v}{{background:{c}}}" for v, c in _COLOURS.items())
    total = max(sum(r.verdicts.values()), 1)
    bars = "".join(
        f'<span>{_badge(v)}</span><div class="bar {_vclass(v)}" '
        f'style="width:{100 * n / total:.1f}%"></div><span>{n}</span>'
        for v, n in r.verdicts.items())
    rules = _table(["Rule", "Verdicts"], [
        [_td(rule, "mono"), "<td>" + " ".join(f"{_badge(v)} {n}" for v, n in c.items()) + "</td>"]
        for rule, c in r.rules.items()])
    timeline = _table(["Time (UTC)", "Verdict", "Rule", "Process", "What", "Action"], [
        [_td(_when(e.ts), "nowrap"), f"<td>{_badge(e.verdict)}</td>",
         f'<td class="mono">{_e(e.rule)}<br><small>{_e(e.reason)}</small>{_html_tags(e)}</td>',
         _td(e.process, "mono"), _td(e.what, "mono"), _td(e.action)] for e in r.timeline])
    done = _table(["Time (UTC)", "Kind", "What"], [
        [_td(_when(d.ts), "nowrap"), f"<td>{_e(d.kind)}&nbsp;{_badge(d.verdict)}</td>",
         _td(d.text, "mono")]
        for d in r.done])
    warnings = "".join(f"<li>{_e(w)}</li>" for w in r.warnings)
    broken = ' class="warn"' if r.chain_ok is False else ""
    chain = f"<br>Chain: <b{broken}>{_e(r.chain)}</b>" if r.chain else ""
    gaps = "".join(f"<li>{_e('end' if g.at_end else _when(g.ts))}: {_e(g.text)}</li>" for g in r.gaps)
    if gaps:
        gaps = (f'<h2>Log gaps</h2><div class="card warn"><b>{r.unwritten} records could NOT be '
                "written to the log</b> (disk full or I/O error): the counts below do not include "
                f"them.<ul>{gaps}</ul></div>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>ebpf-guard report</title><style>{_CSS}{colours}</style></head>
<body><main>
<h1>ebpf-guard report</h1>
<p class="meta">Range: <b>{_e(_range(r))}</b> &middot; {r.records} records &middot;
generated {_e(_when(r.generated))} UTC<br>
Log: <span class="mono">{_e(", ".join(r.sources))}</span>{chain}</p>
{gaps}<h2>Verdicts</h2><div class="card bars">{bars or "no verdicts"}</div>
<h2>Rules</h2>{rules if r.rules else "<p>none</p>"}
<h2>Timeline ({len(r.timeline)} non-SAFE)</h2>{timeline if r.timeline else "<p>none</p>"}
<h2>Incidents ({len(r.incidents)})</h2>{"".join(map(_html_incident, r.incidents)) or "<p>none</p>"}
<h2>What was done ({len(r.done)})</h2>{done if r.done else "<p>nothing</p>"}
{f'<h2>Warnings</h2><ul class="warn">{warnings}</ul>' if warnings else ""}
</main></body></html>
"""


# ------------------------------------------------------------------------------------------ cli
RENDERERS = {"text": render_text, "json": render_json, "html": render_html}


@dataclass(slots=True)
class Rendered:
    """A rendered report and the chain check behind it (the CLI's exit status follows it)."""

    text: str
    check: VerifyResult


def main_report(log: Path, last_hours: float | None, fmt: str,
                now: datetime | None = None) -> Rendered:
    """The `ebpf-guard report` command: `log` and its rotated predecessors, rendered as `fmt`.

    Raises ReportError when there is nothing to report from: the log cannot be read at all, or
    is no log file (a directory). A broken chain is rendered, and stated, not raised."""
    if fmt not in RENDERERS:
        raise ReportError(f"unknown report format {fmt!r} (one of: {', '.join(FORMATS)})")
    check = verify_log(log)
    if check.unreadable:
        raise ReportError(check.problem)
    try:
        files = [f for f in log_files(log) if not f.is_dir()]
    except OSError as e:
        raise ReportError(read_error(log, e)) from None
    if not files:
        raise ReportError(check.problem, damaged=True)
    report = build_report(files, last_hours=last_hours, now=now)
    report.chain_ok = check.ok
    if check.ok:
        report.chain = f"intact ({check.records} records)"
    else:
        distrust = (f"; records from seq {check.first_bad_seq} on cannot be trusted"
                    if check.first_bad_seq is not None else "")
        report.chain = f"BROKEN: {check.problem}{distrust}"
    if check.unwritten_at_end:
        report.gaps.append(Gap(None, check.last_seq, check.unwritten_at_end, at_end=True))
    return Rendered(RENDERERS[fmt](report), check)
