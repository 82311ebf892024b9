/* ebpf-guard sensor: syscall + task tracepoints, scoped in the kernel to watched cgroups or a
 * tracked-pid set. Loaded by ebpf_guard/sensor.py with -I bpf/.
 *
 * Rules of this file (see docs/sensor.md):
 *  - never read kernel structs: bcc compiles against headers that do not match the running
 *    kernel, so offsets are wrong. Only tracepoint args (bcc reads their format at runtime)
 *    and BPF helpers.
 *  - an out-of-scope task costs one scope check and emits nothing.
 *  - events bigger than the 512-byte stack are built in per-CPU scratch maps.
 *  - written for the strictest verifier of the matrix (Debian 12's 6.1; also 6.12, 6.18):
 *    tests/test_sensor_load.py loads every program, run it on each (vagrant/qemu.sh). A loop
 *    whose trip count comes from map memory is unrolled: 6.1 lost its bound and rejected the
 *    indexing ("invalid access to map value ... min value is outside of the allowed memory
 *    range") where 6.18 accepted it. Loops with a constant bound stay rolled: 6.1 verifies
 *    them, and unrolling only grows the code clang must compile (most of the time to attach).
 */
#include <uapi/linux/ptrace.h>
#include "events.h"

#define EG_AT_FDCWD -100
#define EG_CLONE_THREAD 0x00010000ULL
#define EG_AF_UNIX 1
#define EG_AF_INET 2
#define EG_AF_INET6 10
#define EG_SIGKILL 9
#define EG_SIGSTOP 19

/* Layout cross-check with the ctypes mirror (values passed by the loader). */
_Static_assert(sizeof(struct ev_hdr) == PY_SIZEOF_HDR, "ev_hdr != events.RawEvent");
_Static_assert(sizeof(struct ev_path) == PY_SIZEOF_PATH, "ev_path != events.RawPathEvent");
_Static_assert(sizeof(struct ev_exec) == PY_SIZEOF_EXEC, "ev_exec != events.RawExecEvent");
_Static_assert(sizeof(struct ev_connect) == PY_SIZEOF_CONNECT, "ev_connect != events.RawConnectEvent");

/* Transport: urgent = exec/fork/exit/chdir (woken per event), bulk = open/unlink/connect. */
BPF_PERF_OUTPUT(urgent);
BPF_PERF_OUTPUT(bulk);

/* Scope. */
BPF_ARRAY(scope, struct scope_cfg, 1);
BPF_HASH(tracked, u32, u8, 65536);               /* --pid mode: tgid -> 1 */
/* Every process forked since attach (plus seeds from /proc): tgid -> ppid, start_ns.
 * LRU so that a missed exit can never fill it up. */
BPF_TABLE("lru_hash", u32, struct proc_info, procs, 65536);

/* Exec kill fast path. */
/* Exec rules compiled from the policy: value EG_EXEC_KILL or EG_EXEC_HOLD. */
BPF_HASH(exec_paths, struct exec_path_key, u8, 1024);
BPF_HASH(exec_names, struct exec_name_key, u8, 1024);

/* Per-thread open/chdir state between sys_enter and sys_exit (key: pid_tgid). */
BPF_HASH(stash, u64, struct ev_path, 16384);

/* Scratch (per CPU): the biggest event, and zeroed lookup keys for the kill maps. */
BPF_PERCPU_ARRAY(scratch, struct ev_exec, 1);
/* Exec events between syscall entry (argv read) and exit (result known), keyed by tgid. */
BPF_HASH(exec_stash, u32, struct ev_exec, 1024);
struct exec_keys {
    struct exec_path_key path;
    struct exec_name_key name;
    u32 base;
};
BPF_PERCPU_ARRAY(keybuf, struct exec_keys, 1);

/* 0 = out of scope; otherwise EG_F_TRACKED or 1. */
static __always_inline u32 in_scope(u32 tgid, struct scope_cfg *cfg)
{
    if (cfg->pid_mode && tracked.lookup(&tgid))
        return EG_F_TRACKED;
    u32 n = cfg->ncgroups;
    /* Unrolled: the trip count is min(n, 8) with n from map memory, and 6.1's verifier lost
     * the bound of a rolled loop's index (it let i reach 8: ids[8] is past the value). */
#pragma unroll
    for (int i = 0; i < EG_MAX_CGROUPS; i++) {
        if (i >= n)
            break;
        /* The current cgroup's ancestor at the watched cgroup's depth is the watched
         * cgroup itself iff the task is in it or in a descendant. */
        if (bpf_get_current_ancestor_cgroup_id(cfg->levels[i]) == cfg->ids[i])
            return 1;
    }
    return 0;
}

static __always_inline struct scope_cfg *get_cfg(void)
{
    u32 zero = 0;
    return scope.lookup(&zero);
}

static __always_inline void fill_hdr(struct ev_hdr *h, u32 kind, u64 id, u32 scope_flag)
{
    u32 tgid = id >> 32;
    h->ts_ns = bpf_ktime_get_ns();
    h->cgroup_id = bpf_get_current_cgroup_id();
    h->ret = 0;
    h->pid = (u32)id;
    h->tgid = tgid;
    h->uid = (u32)bpf_get_current_uid_gid();
    h->kind = kind;
    h->flags = scope_flag == EG_F_TRACKED ? EG_F_TRACKED : 0;
    h->fd = EG_AT_FDCWD;
    h->sc_flags = 0;
    h->child_pid = 0;
    h->path_len = 0;
    struct proc_info *pi = procs.lookup(&tgid);
    if (pi) {
        h->ppid = pi->ppid;
        h->start_ns = pi->start_ns;
    } else {
        h->ppid = 0;
        h->start_ns = 0;
        h->flags |= EG_F_NO_PROC;
    }
    bpf_get_current_comm(h->comm, sizeof(h->comm));
}

/* The scope check every program starts with: 0 when the process is not watched (the
 * out-of-scope majority stops here), else its scope flag. */
static __always_inline u32 watched(u32 tgid)
{
    struct scope_cfg *cfg = get_cfg();
    return cfg ? in_scope(tgid, cfg) : 0;
}

/* The per-CPU scratch buffer (events outgrow the 512-byte stack), header filled in. */
static __always_inline void *new_event(u32 kind, u64 id, u32 sc)
{
    u32 zero = 0;
    struct ev_hdr *h = (struct ev_hdr *)scratch.lookup(&zero);
    if (h)
        fill_hdr(h, kind, id, sc);
    return h;
}

/* Read a user string into an event path; sets path_len and the truncation flag. */
static __always_inline void read_path(struct ev_hdr *h, char *dst, const char *src)
{
    int n = bpf_probe_read_user_str(dst, EG_PATH_LEN, src);
    if (n < 0) {
        dst[0] = 0;
        n = 0;
    }
    h->path_len = n;
    if (n >= EG_PATH_LEN)
        h->flags |= EG_F_PATH_TRUNC;
}

static __always_inline u32 path_event_size(u32 n)
{
    /* Header + the bytes read. The mask and clamp give the verifier its bound. */
    n &= (2 * EG_PATH_LEN - 1);
    if (n > EG_PATH_LEN)
        n = EG_PATH_LEN;
    return sizeof(struct ev_hdr) + n;
}

/* ---- open / chdir: stash at enter, emit at exit with the result --------------------- */

/* Stash the path at entry (user memory is only guaranteed readable now); the exit
 * handler adds ret and emits. Only in-scope threads stash, so the exit handlers' scope
 * check is a single stash lookup. */
static __always_inline int stash_enter(u32 kind, int dfd, const char *fname, u32 flags)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 sc = watched(id >> 32);
    if (!sc)
        return 0;
    struct ev_path *ev = new_event(kind, id, sc);
    if (!ev)
        return 0;
    ev->h.fd = dfd;
    ev->h.sc_flags = flags;
    if (fname)
        read_path(&ev->h, ev->path, fname);
    stash.update(&id, ev);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_openat)
{
    return stash_enter(EG_K_OPEN, (int)args->dfd, args->filename, (u32)args->flags);
}

TRACEPOINT_PROBE(syscalls, sys_enter_open)
{
    return stash_enter(EG_K_OPEN, EG_AT_FDCWD, args->filename, (u32)args->flags);
}

TRACEPOINT_PROBE(syscalls, sys_enter_openat2)
{
    u64 how_flags = 0;
    bpf_probe_read_user(&how_flags, sizeof(how_flags), (void *)args->how); /* open_how.flags */
    return stash_enter(EG_K_OPEN, (int)args->dfd, args->filename, (u32)how_flags);
}

TRACEPOINT_PROBE(syscalls, sys_enter_chdir)
{
    return stash_enter(EG_K_CHDIR, EG_AT_FDCWD, args->filename, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_fchdir)
{
    return stash_enter(EG_K_CHDIR, (int)args->fd, 0, 0);
}

/* The timestamp is taken at exit, right before the submit, not at entry: an open that
 * blocked (a FIFO) must not carry a time older than the events written while it blocked,
 * or poll()'s time cut (see sensor.py) would deliver it after them. */
static __always_inline struct ev_path *stash_take(long ret)
{
    /* Scope first: for the out-of-scope majority a helper call and a compare are
     * cheaper than the stash hash lookup. */
    u64 id = bpf_get_current_pid_tgid();
    if (!watched(id >> 32))
        return 0;
    struct ev_path *ev = stash.lookup(&id);
    if (!ev)
        return 0;
    ev->h.ret = ret;
    ev->h.ts_ns = bpf_ktime_get_ns();
    return ev;
}

static __always_inline int emit_stashed(void *ctx, long ret, int to_urgent)
{
    struct ev_path *ev = stash_take(ret);
    if (!ev)
        return 0;
    if (to_urgent)
        urgent.perf_submit(ctx, ev, path_event_size(ev->h.path_len));
    else
        bulk.perf_submit(ctx, ev, path_event_size(ev->h.path_len));
    u64 id = bpf_get_current_pid_tgid();
    stash.delete(&id);
    return 0;
}

#define emit_bulk(ctx, ret) emit_stashed(ctx, ret, 0)
#define emit_urgent(ctx, ret) emit_stashed(ctx, ret, 1)

TRACEPOINT_PROBE(syscalls, sys_exit_openat) { return emit_bulk(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_open) { return emit_bulk(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_openat2) { return emit_bulk(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_chdir) { return emit_urgent(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_fchdir) { return emit_urgent(args, args->ret); }

/* ---- unlink: stashed at entry, emitted at exit with the result ----------------------
 * Rate rules count deletions that happened: git, editors and build tools unlink files that
 * do not exist (ENOENT) all the time, and those must not add up to a "mass delete". */

TRACEPOINT_PROBE(syscalls, sys_enter_unlinkat)
{
    return stash_enter(EG_K_UNLINK, (int)args->dfd, args->pathname, (u32)args->flag);
}

TRACEPOINT_PROBE(syscalls, sys_enter_unlink)
{
    return stash_enter(EG_K_UNLINK, EG_AT_FDCWD, args->pathname, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_rmdir)
{
    return stash_enter(EG_K_UNLINK, EG_AT_FDCWD, args->pathname, 0x200 /* AT_REMOVEDIR */);
}

TRACEPOINT_PROBE(syscalls, sys_exit_unlinkat) { return emit_bulk(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_unlink) { return emit_bulk(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_rmdir) { return emit_bulk(args, args->ret); }

/* ---- connect ---------------------------------------------------------------------- */

TRACEPOINT_PROBE(syscalls, sys_enter_connect)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 sc = watched(id >> 32);
    if (!sc)
        return 0;
    const char *ua = (const char *)args->uservaddr;
    u16 family = 0;
    bpf_probe_read_user(&family, sizeof(family), ua);
    if (family != EG_AF_INET && family != EG_AF_INET6 && family != EG_AF_UNIX)
        return 0;
    struct ev_connect *ev = new_event(EG_K_CONNECT, id, sc);
    if (!ev)
        return 0;
    ev->h.fd = (int)args->fd;
    ev->family = family;
    ev->addrlen = (u32)args->addrlen;
    ev->port = 0;
    if (family == EG_AF_INET) {
        bpf_probe_read_user(&ev->port, 2, ua + 2);   /* sockaddr_in.sin_port */
        bpf_probe_read_user(ev->addr, 4, ua + 4);    /* sin_addr */
    } else if (family == EG_AF_INET6) {
        bpf_probe_read_user(&ev->port, 2, ua + 2);   /* sin6_port */
        bpf_probe_read_user(ev->addr, 16, ua + 8);   /* sin6_addr */
    } else {
        /* Raw bytes, not a C string: abstract sockets start with a NUL. */
        u32 n = ev->addrlen > 2 ? ev->addrlen - 2 : 0;
        n &= 127;
        if (n > EG_UNIX_PATH_LEN)
            n = EG_UNIX_PATH_LEN;
        if (n > 0)
            bpf_probe_read_user(ev->unix_path, n, ua + 2);
    }
    bulk.perf_submit(args, ev, sizeof(struct ev_connect));
    return 0;
}

/* ---- exec ------------------------------------------------------------------------- */

static __always_inline u32 exec_event_size(u32 argc)
{
    u32 size = offsetof(struct ev_exec, argv) + (argc & 31) * EG_ARG_LEN;
    return size > sizeof(struct ev_exec) ? sizeof(struct ev_exec) : size;
}

/* What the exec rules say of the filename, as given (exact path, then basename): 0 or an
 * EG_EXEC_* action. */
static __always_inline int exec_action(const char *fname)
{
    u32 zero = 0;
    struct exec_keys *k = keybuf.lookup(&zero);
    if (!k)
        return 0;
    /* Hash keys compare every byte: zero the buffers so bytes after the NUL match. */
    __builtin_memset(k, 0, sizeof(*k));
    int n = bpf_probe_read_user_str(k->path.s, EG_PATH_LEN, fname);
    if (n <= 0)
        return 0;
    u8 *act = exec_paths.lookup(&k->path);
    if (act)
        return *act;
    /* The basename offset lives in map memory, not a register: the verifier does not
     * track values through map memory (volatile keeps clang from
     * caching it in a register), so the '/' and not-'/' branches of each iteration
     * reach the same state and prune (a register here made verification take ~1 s). */
    volatile u32 *vbase = &k->base;
    *vbase = 0;
#pragma clang loop unroll(disable)
    for (u32 i = 0; i < EG_PATH_LEN; i++) {
        char c = k->path.s[i];
        if (c == 0)
            break;
        if (c == '/')
            *vbase = i + 1;
    }
    u32 base = *vbase;
    if (base >= EG_PATH_LEN)
        return 0;
    /* Re-read the basename from user memory: simpler for the verifier than a copy at a
     * variable offset. A basename that does not fit the key cannot match any entry. */
    n = bpf_probe_read_user_str(k->name.s, EG_NAME_LEN, fname + base);
    if (n <= 0 || n >= EG_NAME_LEN)
        return 0;
    act = exec_names.lookup(&k->name);
    return act ? *act : 0;
}

static __always_inline int exec_enter(void *ctx, int dfd, const char *fname,
                                      const char *const *argv, u32 flags)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 sc = watched(id >> 32);
    if (!sc)
        return 0;
    struct scope_cfg *cfg = get_cfg();
    if (!cfg)
        return 0;

    /* Kill first, before anything else can fail: SIGKILL at execve entry aborts the exec,
     * the new program never runs (and the exit tracepoint may not fire: emit now). */
    int act = cfg->exec_rules ? exec_action(fname) : 0;
    if (act == EG_EXEC_KILL)
        bpf_send_signal(EG_SIGKILL);

    struct ev_exec *ev = new_event(EG_K_EXEC, id, sc);
    if (!ev)
        return 0;
    if (act == EG_EXEC_KILL)
        ev->h.flags |= EG_F_KILLED;
    else if (act == EG_EXEC_HOLD)
        ev->h.flags |= EG_F_HELD; /* the stop itself is sent at exit, if the exec succeeded */
    ev->h.fd = dfd;
    ev->h.sc_flags = flags;
    read_path(&ev->h, ev->path, fname);

    /* argv must be read now: a successful exec replaces the memory it lives in. */
    u32 argc = 0;
#pragma clang loop unroll(disable)
    for (int i = 0; i < EG_MAX_ARGS; i++) {
        const char *p = 0;
        if (bpf_probe_read_user(&p, sizeof(p), &argv[i]) || !p)
            break;
        int r = bpf_probe_read_user_str(ev->argv[i], EG_ARG_LEN, p);
        if (r < 0)
            ev->argv[i][0] = 0;
        else if (r >= EG_ARG_LEN)
            ev->h.flags |= EG_F_ARGV_TRUNC;
        argc++;
    }
    if (argc == EG_MAX_ARGS) {
        const char *p = 0;
        bpf_probe_read_user(&p, sizeof(p), &argv[EG_MAX_ARGS]);
        if (p)
            ev->h.flags |= EG_F_ARGV_TRUNC;
    }
    ev->argc = argc;
    if (act == EG_EXEC_KILL) {
        urgent.perf_submit(ctx, ev, exec_event_size(argc));
        return 0;
    }
    /* Everything else is emitted at exit with the result: execvp() tries each PATH entry,
     * and the failed attempts (ENOENT) must not each be judged as "ran curl". Keyed by
     * tgid: a thread that execs takes over the thread-group leader's pid. */
    u32 tgid = id >> 32;
    exec_stash.update(&tgid, ev);
    return 0;
}

static __always_inline int exec_exit(void *ctx, long ret)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct ev_exec *ev = exec_stash.lookup(&tgid);
    if (!ev)
        return 0;
    ev->h.ret = ret;
    ev->h.ts_ns = bpf_ktime_get_ns();
    /* The exec gate: SIGSTOP on the way back to user space, after the new image is in place
     * and before its first instruction; the guard sends SIGCONT or SIGKILL once decided. A
     * failed attempt is not stopped: nothing new would run. */
    if ((ev->h.flags & EG_F_HELD) && ret == 0)
        bpf_send_signal(EG_SIGSTOP);
    else
        ev->h.flags &= ~EG_F_HELD;
    urgent.perf_submit(ctx, ev, exec_event_size(ev->argc));
    exec_stash.delete(&tgid);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_execve)
{
    return exec_enter(args, EG_AT_FDCWD, args->filename, args->argv, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_execveat)
{
    return exec_enter(args, (int)args->fd, args->filename, args->argv, (u32)args->flags);
}

TRACEPOINT_PROBE(syscalls, sys_exit_execve) { return exec_exit(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_execveat) { return exec_exit(args, args->ret); }

/* ---- process lifecycle ------------------------------------------------------------ */

/* task_newtask rather than sched_process_fork: same parent context, same moment (before
 * the child can run), but it carries clone_flags, so threads can be told apart from
 * processes without reading task_struct. */
TRACEPOINT_PROBE(task, task_newtask)
{
    if (args->clone_flags & EG_CLONE_THREAD)
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    u32 ptgid = id >> 32;
    u32 child = (u32)args->pid;
    /* Recorded for every process (forks are rare next to syscalls): ppid and start_ns
     * must be known even for a process that enters a watched cgroup after its fork. */
    struct proc_info pi = {.ppid = ptgid, .start_ns = bpf_ktime_get_ns()};
    procs.update(&child, &pi);
    u8 one = 1;
    if (tracked.lookup(&ptgid))
        tracked.update(&child, &one); /* --pid mode follows every descendant */

    u32 sc = watched(ptgid);
    if (!sc)
        return 0;
    struct ev_hdr *h = new_event(EG_K_FORK, id, sc);
    if (!h)
        return 0;
    h->child_pid = child;
    urgent.perf_submit(args, h, sizeof(struct ev_hdr));
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    stash.delete(&id); /* a thread killed inside open/chdir */
#ifdef HAVE_GROUP_DEAD
    if (!args->group_dead)
        return 0;
#else
    if ((u32)id != tgid)
        return 0;
#endif
    u32 sc = watched(tgid);
    struct ev_hdr *h = sc ? new_event(EG_K_EXIT, id, sc) : 0;
    if (h)
        urgent.perf_submit(args, h, sizeof(struct ev_hdr));
    procs.delete(&tgid);
    tracked.delete(&tgid);
    return 0;
}
