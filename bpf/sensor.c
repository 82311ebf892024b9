/* ebpf-guard sensor: syscall + task tracepoints, scoped in the kernel to watched cgroups or a
 * tracked-pid set. Loaded by ebpf_guard/sensor.py with -I bpf/.
 *
 * Rules of this file (see docs/sensor.md):
 *  - kernel structs are read only through EG_OFF_* offsets, which the loader takes from the
 *    running kernel's BTF (ebpf_guard/sensor/btf.py), never through the headers bcc compiles
 *    against (they do not match the running kernel: offsets would be wrong, reads silently
 *    0). Without BTF (no EG_HAVE_BTF) nothing is walked: events carry only what the process
 *    passed, and userspace says so.
 *  - an out-of-scope task costs one scope check and emits nothing; every syscall on the host
 *    also pays one array read (held_count) in raw_syscalls:sys_enter, for the holds.
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
#define EG_SIGCHLD 17
#define EG_SIGCONT 18
#define EG_CLD_CONTINUED 6 /* si_code of the SIGCHLD a continued process sends its parent */
#define EG_SIGSTOP 19
#define EG_CREAT_FLAGS 01101 /* what creat(2) opens with: O_CREAT | O_TRUNC | O_WRONLY */

#define EG_PROT_EXEC 0x4
#define EG_MAP_ANONYMOUS 0x20
#define EG_PTRACE_ATTACH 16
#define EG_PTRACE_SEIZE 0x4206
#define EG_MAX_DEPTH 40      /* dentries + mount crossings walked per path */
#define EG_S_IFMT 0170000
#define EG_S_IFSOCK 0140000
/* include/linux/fs.h: 0x100000 since 4.19 (FMODE_CREATED), also as (1 << 20) after 6.9's
 * rewrite of the FMODE_* list; checked against 6.1's headers and by tests/test_sensor_facts.py
 * on 6.18. */
#define EG_FMODE_CREATED 0x100000

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
BPF_HASH(stash, u64, struct ev_path, 4096);

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
/* Exec/mmap rules by file identity: value EG_EXEC_KILL or EG_EXEC_HOLD. */
BPF_HASH(exec_inodes, struct inode_key, u8, 4096);
BPF_PERCPU_ARRAY(lost, u64, 2);

/* Holds (see "Holds" below). held_count is the number of marks in held: the one check every
 * syscall on the host pays while nothing is held. */
BPF_ARRAY(held_count, u64, 1);
BPF_HASH(held, u32, struct held_mark, 1024);            /* tgid -> mark */
BPF_PERCPU_ARRAY(markbuf, struct held_mark, 1);         /* a new mark, built off the full stack */
/* Deletion rate: the last deletions' times, and the directories whose deletions do not count
 * (by identity: dev in kernel encoding, inode). */
BPF_ARRAY(rate, struct rate_ring, 1);
BPF_HASH(scratch_dirs, struct inode_key, u8, 256);
/* The open(2) flags of a watched thread's open in progress (tid -> O_*), for the fanotify
 * gate, which sees the file but not how it is being opened. */
BPF_HASH(open_flags, u32, u32, 4096);

/* perf_submit, counting what it could not write (see events.h, lost[]). Functions, not
 * macros: bcc rewrites map calls only outside macros. */
static __always_inline void count_lost(u32 which)
{
    u64 *n = lost.lookup(&which);
    if (n)
        (*n)++;
}

static __always_inline void submit_urgent(void *ctx, void *data, u32 size)
{
    if (urgent.perf_submit(ctx, data, size) < 0)
        count_lost(EG_LOST_URGENT);
}

static __always_inline void submit_bulk(void *ctx, void *data, u32 size)
{
    if (bulk.perf_submit(ctx, data, size) < 0)
        count_lost(EG_LOST_BULK);
}

/* ---- kernel objects, read with the running kernel's BTF offsets ------------------------ */

/* The walk's state lives in this map value, not in registers: the verifier does not track
 * values through map memory, so every iteration reaches the loop head in the same state and
 * is pruned (in registers, each (offset, crossed-a-mount) history was a new state and 40
 * steps exceeded the verifier's budget). */
struct walk_buf {
    u64 dentry;
    u64 vfsmnt;
    u64 mnt;         /* struct mount * of vfsmnt */
    u64 root_dentry; /* the task's root: where the walk stops */
    u64 root_mnt;
    u32 off;         /* the path is b[off .. EG_REAL_LEN) */
    u32 state;       /* 0 walking, 1 done, 2 cut */
    u32 scan;        /* EG_SCAN_*: look for a scratch directory among the ancestors walked */
    u32 _pad;
    struct inode_key key; /* scratch_dirs lookups: in map memory, the stack is full */
    char b[2 * EG_REAL_LEN];
};
BPF_PERCPU_ARRAY(walkbuf, struct walk_buf, 1);

#define EG_SCAN_OFF 0
#define EG_SCAN_LOOK 1
#define EG_SCAN_FOUND 2

struct kpath {
    void *dentry;
    void *mnt; /* struct vfsmount * */
};

#ifdef EG_HAVE_BTF
#include "kread.h"

static __always_inline void *task(void)
{
    return (void *)bpf_get_current_task();
}

/* The file behind fd in the current task's table, or 0. */
static __always_inline void *file_of_fd(int fd)
{
    if (fd < 0)
        return 0;
    void *files = kptr(task(), OFF(task_struct, files));
    if (!files)
        return 0;
    void *fdt = kptr(files, OFF(files_struct, fdt));
    if (!fdt || (u32)fd >= ku32(fdt, OFF(fdtable, max_fds)))
        return 0;
    void *arr = kptr(fdt, OFF(fdtable, fd));
    if (!arr)
        return 0;
    return kptr(arr, (u32)fd * sizeof(void *));
}

static __always_inline int kpath_of_file(void *file, struct kpath *p)
{
    if (!file)
        return 0;
    p->dentry = kptr(file, OFF(file, f_path) + OFF(path, dentry));
    p->mnt = kptr(file, OFF(file, f_path) + OFF(path, mnt));
    return p->dentry && p->mnt;
}

/* The directory a name passed with dirfd is relative to: the fd's file, or the cwd. */
static __always_inline int kpath_of_dirfd(int dfd, struct kpath *p)
{
    if (dfd == EG_AT_FDCWD) {
        void *fs = kptr(task(), OFF(task_struct, fs));
        if (!fs)
            return 0;
        p->dentry = kptr(fs, OFF(fs_struct, pwd) + OFF(path, dentry));
        p->mnt = kptr(fs, OFF(fs_struct, pwd) + OFF(path, mnt));
        return p->dentry && p->mnt;
    }
    return kpath_of_file(file_of_fd(dfd), p);
}

static __always_inline void obj_of_file(void *file, struct ev_obj *o)
{
    void *inode = kptr(file, OFF(file, f_inode));
    if (!inode)
        return;
    bpf_probe_read_kernel(&o->ino, sizeof(o->ino), (char *)inode + OFF(inode, i_ino));
    void *sb = kptr(inode, OFF(inode, i_sb));
    if (sb)
        o->dev = ku32(sb, OFF(super_block, s_dev));
}

/* Is the dentry a registered scratch directory (scratch_dirs, by its inode's identity)? */
static __always_inline int scratch_dir(struct walk_buf *wb, void *dentry)
{
    void *inode = kptr(dentry, OFF(dentry, d_inode));
    if (!inode)
        return 0;
    struct inode_key *k = &wb->key;
    k->ino = 0;
    k->dev = 0;
    bpf_probe_read_kernel(&k->ino, sizeof(k->ino), (char *)inode + OFF(inode, i_ino));
    void *sb = kptr(inode, OFF(inode, i_sb));
    if (sb)
        k->dev = ku32(sb, OFF(super_block, s_dev));
    return scratch_dirs.lookup(k) != 0;
}

/* d_path() without kprobes: walk dentry -> d_parent up to the task's root, crossing mount
 * points (struct mount holds the vfsmount), writing components backwards into the per-CPU
 * walk buffer. Returns the start offset: the path is b[start .. EG_REAL_LEN), no NUL.
 * *cut is set when a bound (EG_MAX_DEPTH steps, EG_REAL_LEN - 1 bytes) stopped the walk.
 * With wb->scan = EG_SCAN_LOOK (unlink under a rate rule), each directory passed is also
 * checked against scratch_dirs; a hit leaves EG_SCAN_FOUND. A cut walk may miss one: the
 * deletion then counts, the safe side. */
static __always_inline u32 walk_path(struct walk_buf *wb, struct kpath *p, u32 *cut)
{
    volatile struct walk_buf *w = wb;
    void *fs = kptr(task(), OFF(task_struct, fs));
    w->root_dentry = (u64)kptr(fs, OFF(fs_struct, root) + OFF(path, dentry));
    w->root_mnt = (u64)kptr(fs, OFF(fs_struct, root) + OFF(path, mnt));
    w->dentry = (u64)p->dentry;
    w->vfsmnt = (u64)p->mnt;
    w->mnt = (u64)p->mnt - OFF(mount, mnt);
    w->off = EG_REAL_LEN;
    w->state = 0;
#pragma clang loop unroll(disable)
    for (int i = 0; i < EG_MAX_DEPTH; i++) {
        if (w->state)
            break;
        void *dentry = (void *)w->dentry;
        void *vfsmnt = (void *)w->vfsmnt;
        if (w->scan == EG_SCAN_LOOK && scratch_dir(wb, dentry))
            w->scan = EG_SCAN_FOUND;
        if (w->dentry == w->root_dentry && w->vfsmnt == w->root_mnt) {
            w->state = 1;
            continue;
        }
        void *mnt_root = kptr(vfsmnt, OFF(vfsmount, mnt_root));
        void *parent = kptr(dentry, OFF(dentry, d_parent));
        if (dentry == mnt_root || dentry == parent) {
            void *mnt = (void *)w->mnt;
            void *mparent = kptr(mnt, OFF(mount, mnt_parent));
            if (dentry != mnt_root || mparent == mnt || !mparent) {
                w->state = 1; /* the top of the mount tree (or of a detached/internal mount) */
                continue;
            }
            w->dentry = (u64)kptr(mnt, OFF(mount, mnt_mountpoint));
            w->mnt = (u64)mparent;
            w->vfsmnt = (u64)mparent + OFF(mount, mnt);
            continue;
        }
        u32 len = ku32(dentry, OFF(dentry, d_name) + OFF(qstr, len));
        void *name = kptr(dentry, OFF(dentry, d_name) + OFF(qstr, name));
        if (len > 255)
            len = 255;
        u32 off = w->off;
        if (len + 1 >= off) {
            w->state = 2;
            continue;
        }
        off -= len + 1;
        w->off = off;
        u32 at = off & (EG_REAL_LEN - 1);
        wb->b[at] = '/';
        /* The clamp above lets clang drop a mask here, and 6.12's verifier then loses the
         * unsigned bound (Debian 13: "R2 unbounded memory access"); the empty asm hides the
         * value from clang, so the mask stays in the program. */
        asm volatile("" : "+r"(len));
        bpf_probe_read_kernel(&wb->b[at + 1], len & 255, name);
        w->dentry = (u64)parent;
    }
    *cut = w->state != 1;
    u32 off = w->off;
    if (off >= EG_REAL_LEN) {
        off = EG_REAL_LEN - 1;
        wb->b[off] = '/'; /* the root itself */
    }
    return off;
}

/* Walk p and append the result to dst at a bounded offset; returns its length. */
static __always_inline u32 walk_into(char *dst, struct kpath *p, u32 *cut)
{
    u32 zero = 0;
    struct walk_buf *wb = walkbuf.lookup(&zero);
    if (!wb)
        return 0;
    u32 start = walk_path(wb, p, cut) & (EG_REAL_LEN - 1);
    u32 n = (EG_REAL_LEN - start) & (EG_REAL_LEN - 1);
    bpf_probe_read_kernel(dst, n, &wb->b[start]);
    return n;
}

/* The socket behind fd: its family, type and protocol, left 0 when fd is no socket. A socket's
 * file has a sockfs inode (S_IFSOCK) and its private_data is the struct socket, which points
 * back at the file (a socket file on disk opened with O_PATH has the mode but no socket). */
static __always_inline void sock_of_fd(int fd, struct ev_connect *ev)
{
    void *file = file_of_fd(fd);
    if (!file)
        return;
    void *inode = kptr(file, OFF(file, f_inode));
    if (!inode || (ku16(inode, OFF(inode, i_mode)) & EG_S_IFMT) != EG_S_IFSOCK)
        return;
    void *sock = kptr(file, OFF(file, private_data));
    if (!sock || kptr(sock, OFF(socket, file)) != file)
        return;
    void *sk = kptr(sock, OFF(socket, sk));
    if (!sk)
        return;
    ev->sk_type = (u8)ku16(sock, OFF(socket, type));
    ev->sk_family = (u8)ku16(sk, OFF(sock, __sk_common) + OFF(sock_common, skc_family));
    ev->sk_protocol = ku16(sk, OFF(sock, sk_protocol));
}

static __always_inline u32 real_parent_tgid(void)
{
    void *parent = kptr(task(), OFF(task_struct, real_parent));
    return parent ? ku32(parent, OFF(task_struct, tgid)) : 0;
}
#endif /* EG_HAVE_BTF */

/* Where the strings of an ev_path go: each offset masked so the verifier sees its bound. */
static __always_inline u32 strs_real_at(struct ev_path *ev)
{
    return ((ev->h.path_len & (EG_PATH_LEN * 2 - 1)) + (ev->path2_len & (EG_PATH_LEN * 2 - 1))) & 1023;
}

/* Resolve the object of a file into ev (dev, ino, real path). */
static __always_inline void set_real_file(struct ev_path *ev, void *file)
{
#ifdef EG_HAVE_BTF
    struct kpath p = {};
    if (!kpath_of_file(file, &p))
        return;
    obj_of_file(file, &ev->obj);
    u32 cut = 0;
    ev->obj.real_len = walk_into(&ev->strs[strs_real_at(ev)], &p, &cut);
    ev->h.flags |= EG_F_REAL | (cut ? EG_F_REAL_CUT : 0);
#endif
}

/* Resolve the base directory of a name passed with dirfd (first or second name). Only for
 * a relative name: an absolute one does not depend on it. */
static __always_inline void set_real_dir(struct ev_path *ev, int dfd, int second)
{
#ifdef EG_HAVE_BTF
    struct kpath p = {};
    if (!kpath_of_dirfd(dfd, &p))
        return;
    u32 cut = 0;
    if (!second) {
        ev->obj.real_len = walk_into(&ev->strs[strs_real_at(ev)], &p, &cut);
        ev->h.flags |= EG_F_REAL | (cut ? EG_F_REAL_CUT : 0);
    } else {
        u32 at = strs_real_at(ev) + (ev->obj.real_len & (EG_REAL_LEN - 1)); /* <= 1534 */
        ev->obj.real2_len = walk_into(&ev->strs[at], &p, &cut);
        ev->h.flags |= EG_F_REAL2 | (cut ? EG_F_REAL2_CUT : 0);
    }
#endif
}

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
#ifdef EG_HAVE_BTF
    /* The parent now (a reparented orphan's is the subreaper), from the task itself. */
    u32 rp = real_parent_tgid();
    if (rp)
        h->ppid = rp;
#endif
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

static __always_inline u32 path_event_size(struct ev_path *ev)
{
    /* Header + the bytes used. The masks and clamp give the verifier its bound. */
    u32 n = (ev->h.path_len & 511) + (ev->path2_len & 511) + (ev->obj.real_len & 511) +
            (ev->obj.real2_len & 511);
    n += offsetof(struct ev_path, strs);
    return n > sizeof(struct ev_path) ? sizeof(struct ev_path) : n;
}

/* ---- Holds: a stop the held process cannot undo ------------------------------------------
 * SIGSTOP alone can be undone by any process of the same user (a SIGCONT loop) or a ptracer.
 * Every stop the kernel sends also marks the process in `held` (by tgid), and a continued
 * process is killed (SIGKILL):
 *  - SIGCONT from anyone but the guard condemns it (signal_generate, in the sender). If it was
 *    stopped, it dies on its way out of the stop, before any instruction or syscall
 *    (held_continues); else, or if its parent asked for no stop notifications, at its next
 *    syscall entry (raw_syscalls:sys_enter).
 *  - the thread the stop was sent from, entering a syscall after the one that stopped it: it
 *    cannot get there without passing the stop, so the stop was flushed (a SIGCONT that came
 *    first) or dropped (a ptracer). Other threads are left alone until a SIGCONT: a group stop
 *    reaches them one by one, and a syscall on the way is no sign of a continue.
 * A syscall-entry kill lets that syscall run (a tracepoint cannot fail it); nothing after it.
 * The guard releases with Sensor.release_held() (state RELEASED, dropped at the next syscall
 * entry) or by sending SIGCONT itself (scope_cfg.owner_tgid). The mark goes at exit, so a
 * reused pid is never hit. */

static __always_inline u64 *held_counter(void)
{
    u32 zero = 0;
    return held_count.lookup(&zero);
}

static __always_inline int anything_held(void)
{
    u64 *n = held_counter();
    return n && *n;
}

/* Drop tgid's mark; only the caller whose delete succeeded counts it down. */
static __always_inline void unmark(u32 tgid)
{
    if (held.delete(&tgid) == 0) {
        u64 *n = held_counter();
        if (n)
            __sync_fetch_and_add(n, -1);
    }
}

/* SIGSTOP the current process and mark it held. The count goes up before the mark exists, so
 * a mark is never there while the count reads 0. */
static __always_inline void hold_current(u32 state, u32 reason)
{
    bpf_send_signal(EG_SIGSTOP);
    u32 zero = 0;
    u64 *n = held_counter();
    struct held_mark *m = markbuf.lookup(&zero);
    if (!n || !m)
        return;
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    m->since = bpf_ktime_get_ns();
    m->state = state;
    m->tid = (u32)id;
    m->reason = reason;
    m->_pad = 0;
    __sync_fetch_and_add(n, 1);
    if (held.insert(&tgid, m) == 0)
        return;
    __sync_fetch_and_add(n, -1);
    struct held_mark *old = held.lookup(&tgid);
    if (!old) {
        /* Dropped in between (released, its first syscall): a new mark after all. */
        __sync_fetch_and_add(n, 1);
        if (held.insert(&tgid, m) != 0)
            __sync_fetch_and_add(n, -1);
        return;
    }
    if (old->state == EG_HOLD_CONTINUED)
        return; /* already condemned: its next syscall kills it */
    old->since = m->since;
    old->state = state;
    old->tid = m->tid;
    old->reason = reason;
}

/* At the exit of a syscall whose entry held the process: from now on its thread may not enter
 * another syscall. (Marked at entry as ARMING, not PENDING: the raw sys_enter program may run
 * after the entry program of the same syscall, and must not take that entry for the next.) */
static __always_inline void hold_arm(void)
{
    if (!anything_held())
        return;
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    struct held_mark *m = held.lookup(&tgid);
    if (m && m->state == EG_HOLD_ARMING && m->tid == (u32)id)
        m->state = EG_HOLD_PENDING;
}

/* A syscall entry of a thread of a held process: kill it if the thread was continued. */
static __always_inline void held_syscall(void)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    u32 tid = id;
    struct held_mark *m = held.lookup(&tgid);
    if (!m)
        return;
    u32 state = m->state;
    if (state == EG_HOLD_RELEASED) {
        unmark(tgid);
        return;
    }
    if (state == EG_HOLD_CONTINUED || (state == EG_HOLD_PENDING && m->tid == tid)) {
        bpf_send_signal(EG_SIGKILL);
        m->state = EG_HOLD_CONTINUED;
    }
}

/* ---- path syscalls: stashed at enter (user memory is only sure to be readable then, and
 * a dirfd is resolved as it was when the call was made), emitted at exit with the result --
 * Only in-scope threads stash, so the exit handlers' scope check is one stash lookup. */

#define EG_BASE_NONE 0  /* the name needs no base directory (or has none: fchdir) */
#define EG_BASE_DIRFD 1 /* resolve the dirfd (or cwd) the name is relative to */

static __always_inline struct ev_path *path_enter(u32 kind, int dfd, const char *fname, u32 flags,
                                                  int base)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 sc = watched(id >> 32);
    if (!sc)
        return 0;
    struct ev_path *ev = new_event(kind, id, sc);
    if (!ev)
        return 0;
    ev->obj.dev = 0;
    ev->obj.ino = 0;
    ev->obj.real_len = 0;
    ev->obj.real2_len = 0;
    ev->path2_len = 0;
    ev->h.fd = dfd;
    ev->h.sc_flags = flags;
    if (fname)
        read_path(&ev->h, ev->strs, fname);
    if (base == EG_BASE_DIRFD && fname && ev->strs[0] != '/')
        set_real_dir(ev, dfd, 0);
    return ev;
}

static __always_inline int stash_enter(u32 kind, int dfd, const char *fname, u32 flags, int base)
{
    struct ev_path *ev = path_enter(kind, dfd, fname, flags, base);
    if (ev) {
        u64 id = bpf_get_current_pid_tgid();
        stash.update(&id, ev);
    }
    return 0;
}

/* Two names (rename, link, symlink): the second one and its base directory. */
static __always_inline int stash_enter2(u32 kind, int odfd, const char *oldname, int ndfd,
                                        const char *newname, u32 flags, int old_base)
{
    /* The first name's base is walked after the second name is read: strings are packed
     * in the order path, path2, real, real2. */
    struct ev_path *ev = path_enter(kind, odfd, oldname, flags, EG_BASE_NONE);
    if (!ev)
        return 0;
    u32 at = ev->h.path_len & (EG_PATH_LEN * 2 - 1); /* <= EG_PATH_LEN */
    int n = bpf_probe_read_user_str(&ev->strs[at], EG_PATH_LEN, newname);
    if (n < 0) {
        ev->strs[at] = 0;
        n = 0;
    }
    if (n >= EG_PATH_LEN)
        ev->h.flags |= EG_F_PATH_TRUNC;
    ev->path2_len = n;
    ev->h.child_pid = (u32)ndfd; /* the second name's dirfd (AT_FDCWD = -100 as u32) */
    if (old_base == EG_BASE_DIRFD && ev->h.path_len > 0 && ev->strs[0] != '/')
        set_real_dir(ev, odfd, 0);
    if (n > 0 && ev->strs[at] != '/')
        set_real_dir(ev, ndfd, 1);
    u64 id = bpf_get_current_pid_tgid();
    stash.update(&id, ev);
    return 0;
}

/* open: the event, and the flags in open_flags until the call returns. */
static __always_inline int open_enter(int dfd, const char *fname, u32 flags)
{
    struct ev_path *ev = path_enter(EG_K_OPEN, dfd, fname, flags, EG_BASE_NONE);
    if (!ev)
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = id;
    open_flags.update(&tid, &flags);
    stash.update(&id, ev);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_openat)
{
    return open_enter((int)args->dfd, args->filename, (u32)args->flags);
}

TRACEPOINT_PROBE(syscalls, sys_enter_open)
{
    return open_enter(EG_AT_FDCWD, args->filename, (u32)args->flags);
}

TRACEPOINT_PROBE(syscalls, sys_enter_openat2)
{
    u64 how_flags = 0;
    bpf_probe_read_user(&how_flags, sizeof(how_flags), (void *)args->how); /* open_how.flags */
    return open_enter((int)args->dfd, args->filename, (u32)how_flags);
}

#ifdef EG_HAVE_CREAT
/* creat(2): an open with O_CREAT|O_WRONLY|O_TRUNC (x86_64 has it; arm64 has no such syscall). */
TRACEPOINT_PROBE(syscalls, sys_enter_creat)
{
    return open_enter(EG_AT_FDCWD, args->pathname, EG_CREAT_FLAGS);
}
#endif

TRACEPOINT_PROBE(syscalls, sys_enter_chdir)
{
    return stash_enter(EG_K_CHDIR, EG_AT_FDCWD, args->filename, 0, EG_BASE_NONE);
}

TRACEPOINT_PROBE(syscalls, sys_enter_fchdir)
{
    return stash_enter(EG_K_CHDIR, (int)args->fd, 0, 0, EG_BASE_NONE);
}

/* The timestamp is taken at exit, right before the submit, not at entry: an open that
 * blocked (a FIFO) must not carry a time older than the events written while it blocked,
 * or poll()'s time cut (see transport.py) would deliver it after them. */
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
    return ev;
}

static __always_inline int emit_stashed(void *ctx, struct ev_path *ev, int to_urgent)
{
    ev->h.ts_ns = bpf_ktime_get_ns();
    if (to_urgent)
        submit_urgent(ctx, ev, path_event_size(ev));
    else
        submit_bulk(ctx, ev, path_event_size(ev));
    u64 id = bpf_get_current_pid_tgid();
    stash.delete(&id);
    return 0;
}

static __always_inline int emit_bulk(void *ctx, long ret)
{
    struct ev_path *ev = stash_take(ret);
    return ev ? emit_stashed(ctx, ev, 0) : 0;
}

/* open: the object is the file the returned fd is, whatever name reached it (a symlink, a
 * hard link, /proc/self/root/..., a path too long for the requested-path buffer). */
static __always_inline int open_exit(void *ctx, long ret)
{
    u64 id = bpf_get_current_pid_tgid();
    if (!watched(id >> 32))
        return 0;
    u32 tid = id;
    open_flags.delete(&tid);
    struct ev_path *ev = stash.lookup(&id);
    if (!ev)
        return 0;
    ev->h.ret = ret;
#ifdef EG_HAVE_BTF
    if (ret >= 0) {
        void *file = file_of_fd((int)ret);
        set_real_file(ev, file);
        /* Set by the open that created the file (O_CREAT of a new name), not by one that
         * found it: an O_TRUNC open without it emptied an existing file. */
        if (file && (ku32(file, OFF(file, f_mode)) & EG_FMODE_CREATED))
            ev->h.flags |= EG_F_CREATED;
    }
#endif
    return emit_stashed(ctx, ev, 0);
}

static __always_inline int chdir_exit(void *ctx, long ret)
{
    struct ev_path *ev = stash_take(ret);
    if (!ev)
        return 0;
    if (ret == 0)
        set_real_dir(ev, EG_AT_FDCWD, 0); /* the new cwd, as the kernel holds it */
    return emit_stashed(ctx, ev, 1);
}

TRACEPOINT_PROBE(syscalls, sys_exit_openat) { return open_exit(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_open) { return open_exit(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_openat2) { return open_exit(args, args->ret); }
#ifdef EG_HAVE_CREAT
TRACEPOINT_PROBE(syscalls, sys_exit_creat) { return open_exit(args, args->ret); }
#endif
TRACEPOINT_PROBE(syscalls, sys_exit_chdir) { return chdir_exit(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_fchdir) { return chdir_exit(args, args->ret); }

/* ---- unlink: rate rules count deletions that happened: git, editors and build tools
 * unlink files that do not exist (ENOENT) all the time, and those must not add up to a
 * "mass delete". */

/* The deletion rate, in the kernel: the first response to a mass delete, before the events
 * reach Python. Attempts are counted at entry (a superset of the deletions the engine counts),
 * over all watched scopes together (at least as sensitive as per process tree). Each deletion
 * takes a slot of the ring; the rule fires when rate_count of the last EG_RATE_SLOTS times lie
 * within the window: the engine's sliding window, exactly. The slot is claimed and written with
 * fully ordered atomics before the slots are read, so of two concurrent deletions at least the
 * later reader sees both. */
static __always_inline int rate_hit(struct scope_cfg *cfg)
{
    u32 zero = 0;
    struct rate_ring *r = rate.lookup(&zero);
    if (!r)
        return 0;
    u64 now = bpf_ktime_get_ns();
    u64 seq = __sync_fetch_and_add(&r->seq, 1);
    __sync_lock_test_and_set(&r->ts[seq & (EG_RATE_SLOTS - 1)], now);
    u64 window = cfg->rate_window_ns;
    u64 horizon = now > window ? now - window : 0;
    /* Branch-free: (horizon - ts) is negative, its top bit set, iff ts > horizon (times are far
     * below 2^63). 64 compares with branches made 6.1's verifier walk 2^n paths (E2BIG). */
    u32 recent = 0;
#pragma unroll
    for (int i = 0; i < EG_RATE_SLOTS; i++)
        recent += (u32)((horizon - r->ts[i]) >> 63);
    return recent >= cfg->rate_count;
}

/* A deletion: the event, and under a rate rule the count. A deletion beneath a scratch
 * directory (found during the walk of the name's base directory) does not count; an absolute
 * name is not walked, so it always counts. Crossing the threshold stops the deleter at this
 * deletion: SIGSTOP does not abort the syscall, so this one happens and the next does not. */
static __always_inline int unlink_enter(int dfd, const char *name, u32 flags)
{
    u32 zero = 0;
    struct scope_cfg *cfg = get_cfg();
    u32 rated = cfg ? cfg->rate_count : 0;
    volatile struct walk_buf *wb = walkbuf.lookup(&zero);
    if (wb)
        wb->scan = rated ? EG_SCAN_LOOK : EG_SCAN_OFF;
    struct ev_path *ev = path_enter(EG_K_UNLINK, dfd, name, flags, EG_BASE_DIRFD);
    u32 scan = EG_SCAN_OFF;
    if (wb) {
        scan = wb->scan;
        wb->scan = EG_SCAN_OFF; /* other walks on this CPU do not look */
    }
    if (!ev)
        return 0;
    if (cfg && rated && scan != EG_SCAN_FOUND && rate_hit(cfg)) {
        hold_current(EG_HOLD_ARMING, EG_HOLD_BY_RATE);
        ev->h.flags |= EG_F_RATE_HELD;
    }
    u64 id = bpf_get_current_pid_tgid();
    stash.update(&id, ev);
    return 0;
}

static __always_inline int unlink_exit(void *ctx, long ret)
{
    hold_arm();
    return emit_bulk(ctx, ret);
}

TRACEPOINT_PROBE(syscalls, sys_enter_unlinkat)
{
    return unlink_enter((int)args->dfd, args->pathname, (u32)args->flag);
}

TRACEPOINT_PROBE(syscalls, sys_enter_unlink)
{
    return unlink_enter(EG_AT_FDCWD, args->pathname, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_rmdir)
{
    return unlink_enter(EG_AT_FDCWD, args->pathname, 0x200 /* AT_REMOVEDIR */);
}

TRACEPOINT_PROBE(syscalls, sys_exit_unlinkat) { return unlink_exit(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_unlink) { return unlink_exit(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_rmdir) { return unlink_exit(args, args->ret); }

/* ---- rename, link, symlink, truncate ------------------------------------------------ */

TRACEPOINT_PROBE(syscalls, sys_enter_renameat2)
{
    return stash_enter2(EG_K_RENAME, (int)args->olddfd, args->oldname, (int)args->newdfd,
                        args->newname, (u32)args->flags, EG_BASE_DIRFD);
}

TRACEPOINT_PROBE(syscalls, sys_enter_renameat)
{
    return stash_enter2(EG_K_RENAME, (int)args->olddfd, args->oldname, (int)args->newdfd,
                        args->newname, 0, EG_BASE_DIRFD);
}

TRACEPOINT_PROBE(syscalls, sys_enter_rename)
{
    return stash_enter2(EG_K_RENAME, EG_AT_FDCWD, args->oldname, EG_AT_FDCWD, args->newname, 0,
                        EG_BASE_DIRFD);
}

TRACEPOINT_PROBE(syscalls, sys_enter_linkat)
{
    return stash_enter2(EG_K_LINK, (int)args->olddfd, args->oldname, (int)args->newdfd,
                        args->newname, (u32)args->flags, EG_BASE_DIRFD);
}

TRACEPOINT_PROBE(syscalls, sys_enter_link)
{
    return stash_enter2(EG_K_LINK, EG_AT_FDCWD, args->oldname, EG_AT_FDCWD, args->newname, 0,
                        EG_BASE_DIRFD);
}

/* symlink: the first name is the link's target, stored as text and never resolved. */
TRACEPOINT_PROBE(syscalls, sys_enter_symlinkat)
{
    return stash_enter2(EG_K_SYMLINK, EG_AT_FDCWD, args->oldname, (int)args->newdfd,
                        args->newname, 0, EG_BASE_NONE);
}

TRACEPOINT_PROBE(syscalls, sys_enter_symlink)
{
    return stash_enter2(EG_K_SYMLINK, EG_AT_FDCWD, args->oldname, EG_AT_FDCWD, args->newname, 0,
                        EG_BASE_NONE);
}

TRACEPOINT_PROBE(syscalls, sys_enter_truncate)
{
    return stash_enter(EG_K_TRUNCATE, EG_AT_FDCWD, args->path, 0, EG_BASE_DIRFD);
}

/* ftruncate: no name; the object is the fd's file. */
TRACEPOINT_PROBE(syscalls, sys_enter_ftruncate)
{
    struct ev_path *ev = path_enter(EG_K_TRUNCATE, (int)args->fd, 0, 0, EG_BASE_NONE);
    if (!ev)
        return 0;
#ifdef EG_HAVE_BTF
    void *file = file_of_fd((int)args->fd);
    set_real_file(ev, file);
    /* The size before the call: by its exit the cut bytes are gone. */
    void *inode = file ? kptr(file, OFF(file, f_inode)) : 0;
    if (inode) {
        s64 size = 0;
        bpf_probe_read_kernel(&size, sizeof(size), (char *)inode + OFF(inode, i_size));
        if (size <= (s64)args->length)
            ev->h.flags |= EG_F_NOTHING_CUT;
    }
#endif
    u64 id = bpf_get_current_pid_tgid();
    stash.update(&id, ev);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_renameat2) { return emit_bulk(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_renameat) { return emit_bulk(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_rename) { return emit_bulk(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_linkat) { return emit_bulk(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_link) { return emit_bulk(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_symlinkat) { return emit_bulk(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_symlink) { return emit_bulk(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_truncate) { return emit_bulk(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_ftruncate) { return emit_bulk(args, args->ret); }

/* ---- code loaded without an exec: mmap(PROT_EXEC) of a file ----------------------------
 * `ld.so /usr/bin/curl` runs curl with ld.so as the exec'd program; curl arrives here. A
 * listed program (exec_inodes) is stopped before its code can be mapped. */

static __always_inline int inode_action(struct ev_obj *o)
{
    struct inode_key k = {.dev = o->dev, .ino = o->ino};
    u8 *act = exec_inodes.lookup(&k);
    return act ? *act : 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_mmap)
{
    if (!(args->prot & EG_PROT_EXEC) || (args->flags & EG_MAP_ANONYMOUS) || (int)args->fd < 0)
        return 0;
    struct ev_path *ev = path_enter(EG_K_MMAP_EXEC, (int)args->fd, 0, (u32)args->prot, EG_BASE_NONE);
    if (!ev)
        return 0;
#ifdef EG_HAVE_BTF
    set_real_file(ev, file_of_fd((int)args->fd));
    struct scope_cfg *cfg = get_cfg();
    if (cfg && cfg->exec_rules && ev->obj.ino) {
        int act = inode_action(&ev->obj);
        if (act == EG_EXEC_KILL) {
            bpf_send_signal(EG_SIGKILL);
            ev->h.flags |= EG_F_KILLED | EG_F_BY_INODE;
        } else if (act == EG_EXEC_HOLD) {
            hold_current(EG_HOLD_ARMING, EG_HOLD_BY_MMAP);
            ev->h.flags |= EG_F_HELD | EG_F_BY_INODE;
        }
    }
#endif
    submit_urgent(args, ev, path_event_size(ev));
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_mmap)
{
    hold_arm();
    return 0;
}

/* ---- io_uring and ptrace: events of their own ------------------------------------------ */

static __always_inline int emit_hdr(void *ctx, u32 kind, u32 sc_flags, u32 target, long ret)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 sc = watched(id >> 32);
    if (!sc)
        return 0;
    struct ev_hdr *h = new_event(kind, id, sc);
    if (!h)
        return 0;
    h->sc_flags = sc_flags;
    h->child_pid = target;
    h->ret = ret;
    submit_urgent(ctx, h, sizeof(struct ev_hdr));
    return 0;
}

/* io_uring's own opens, reads and connects do not pass the syscall tracepoints. At exit, with
 * its result: a setup that seccomp refused (run's jail) never reaches the enter tracepoint
 * (seccomp runs first), but its exit is traced, so the attempt is still seen and judged. */
TRACEPOINT_PROBE(syscalls, sys_exit_io_uring_setup)
{
    return emit_hdr(args, EG_K_IO_URING, 0, 0, args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_enter_ptrace)
{
    long req = args->request;
    if (req != EG_PTRACE_ATTACH && req != EG_PTRACE_SEIZE)
        return 0;
    return emit_hdr(args, EG_K_PTRACE, (u32)req, (u32)args->pid, 0);
}

/* ---- connect ---------------------------------------------------------------------- */

/* A destination passed to connect, or to sendto/sendmsg without a connect (UDP, TCP Fast
 * Open): one connect-kind event, via told apart by EG_F_SENDTO / EG_F_SENDMSG. */
static __always_inline int dest_event(void *ctx, int fd, const char *ua, u32 addrlen, u32 via,
                                      u32 sc_flags)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 sc = watched(id >> 32);
    if (!sc || !ua)
        return 0;
    u16 family = 0;
    bpf_probe_read_user(&family, sizeof(family), ua);
    if (family != EG_AF_INET && family != EG_AF_INET6 && family != EG_AF_UNIX)
        return 0;
    struct ev_connect *ev = new_event(EG_K_CONNECT, id, sc);
    if (!ev)
        return 0;
    ev->h.fd = fd;
    ev->h.flags |= via;
    ev->h.sc_flags = sc_flags;
    ev->family = family;
    ev->addrlen = addrlen;
    ev->port = 0;
    ev->sk_family = 0;
    ev->sk_type = 0;
    ev->sk_protocol = 0;
#ifdef EG_HAVE_BTF
    sock_of_fd(fd, ev); /* which protocol: a policy may allow DNS over UDP and not over TCP */
#endif
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
    submit_bulk(ctx, ev, sizeof(struct ev_connect));
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_connect)
{
    return dest_event(args, (int)args->fd, (const char *)args->uservaddr, (u32)args->addrlen, 0, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_sendto)
{
    return dest_event(args, (int)args->fd, (const char *)args->addr, (u32)args->addr_len,
                      EG_F_SENDTO, (u32)args->flags);
}

/* struct user_msghdr (uapi): msg_name at 0, msg_namelen at 8. */
static __always_inline int msg_dest(void *ctx, int fd, const void *msg, u32 flags)
{
    const char *name = 0;
    u32 namelen = 0;
    bpf_probe_read_user(&name, sizeof(name), msg);
    bpf_probe_read_user(&namelen, sizeof(namelen), (const char *)msg + 8);
    return dest_event(ctx, fd, name, namelen, EG_F_SENDMSG, flags);
}

TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg)
{
    return msg_dest(args, (int)args->fd, (const void *)args->msg, (u32)args->flags);
}

/* sendmmsg: the first message's destination (struct mmsghdr starts with its msghdr). */
TRACEPOINT_PROBE(syscalls, sys_enter_sendmmsg)
{
    return msg_dest(args, (int)args->fd, (const void *)args->mmsg, (u32)args->flags);
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
    u32 tid = id;
    open_flags.delete(&tid); /* an open the thread never returned from: an exec is no open */

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
    ev->obj.dev = 0;
    ev->obj.ino = 0;
    ev->obj.real_len = 0;
    ev->obj.real2_len = 0;
    if (act == EG_EXEC_KILL) {
        submit_urgent(ctx, ev, exec_event_size(argc));
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
#ifdef EG_HAVE_BTF
    if (ret == 0) {
        /* The binary that runs, whatever name reached it: mm->exe_file of the new image. */
        void *mm = kptr(task(), OFF(task_struct, mm));
        void *file = mm ? kptr(mm, OFF(mm_struct, exe_file)) : 0;
        struct kpath p = {};
        if (kpath_of_file(file, &p)) {
            obj_of_file(file, &ev->obj);
            u32 cut = 0;
            ev->obj.real_len = walk_into(ev->real, &p, &cut);
            ev->h.flags |= EG_F_REAL | (cut ? EG_F_REAL_CUT : 0);
            struct kpath cwd = {};
            if (kpath_of_dirfd(EG_AT_FDCWD, &cwd)) {
                ev->obj.real2_len = walk_into(ev->cwd, &cwd, &cut);
                ev->h.flags |= EG_F_REAL2 | (cut ? EG_F_REAL2_CUT : 0);
            }
            /* A listed program under another name (symlink, hard link): stopped here,
             * before its first instruction, as at entry by name. */
            struct scope_cfg *cfg = get_cfg();
            int act = (cfg && cfg->exec_rules && ev->obj.ino) ? inode_action(&ev->obj) : 0;
            if (act == EG_EXEC_KILL) {
                bpf_send_signal(EG_SIGKILL);
                ev->h.flags |= EG_F_KILLED | EG_F_BY_INODE;
                ev->h.flags &= ~EG_F_HELD;
            } else if (act == EG_EXEC_HOLD) {
                ev->h.flags |= EG_F_HELD | EG_F_BY_INODE;
            }
        }
    }
#endif
    ev->h.ts_ns = bpf_ktime_get_ns();
    /* The exec gate: SIGSTOP on the way back to user space, after the new image is in place
     * and before its first instruction; the guard sends SIGCONT or SIGKILL once decided. A
     * failed attempt is not stopped: nothing new would run. */
    if ((ev->h.flags & EG_F_HELD) && ret == 0)
        hold_current(EG_HOLD_PENDING, EG_HOLD_BY_EXEC);
    else
        ev->h.flags &= ~EG_F_HELD;
    submit_urgent(ctx, ev, exec_event_size(ev->argc));
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
    submit_urgent(args, h, sizeof(struct ev_hdr));
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    u32 tid = id;
    stash.delete(&id); /* a thread killed inside open/chdir */
    open_flags.delete(&tid);
#ifdef HAVE_GROUP_DEAD
    if (!args->group_dead)
        return 0;
#else
    if ((u32)id != tgid)
        return 0;
#endif
    if (anything_held())
        unmark(tgid); /* a pid reused later is not held */
    u32 sc = watched(tgid);
    struct ev_hdr *h = sc ? new_event(EG_K_EXIT, id, sc) : 0;
    if (h)
        submit_urgent(args, h, sizeof(struct ev_hdr));
    procs.delete(&tgid);
    tracked.delete(&tgid);
    return 0;
}

/* ---- Holds: the programs that keep them (see "Holds" above) ---------------------------- */

/* Every syscall on the host comes here: while nothing is held it costs one array read. A raw
 * tracepoint (no argument record is built): ~56 ns per syscall here, against ~93 for the
 * TRACEPOINT_PROBE form. */
RAW_TRACEPOINT_PROBE(sys_enter)
{
    if (anything_held())
        held_syscall();
    return 0;
}

/* The continued process itself, in get_signal() on its way out of the stop, notifying its
 * parent (SIGCHLD, CLD_CONTINUED): killed here it dies before any instruction or syscall. The
 * notification is skipped when the parent ignores SIGCHLD or set SA_NOCLDSTOP; then the
 * syscall rules catch it (and that first syscall runs). */
static __always_inline void held_continues(void)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct held_mark *m = held.lookup(&tgid);
    if (!m || m->state == EG_HOLD_RELEASED)
        return;
    bpf_send_signal(EG_SIGKILL);
    m->state = EG_HOLD_CONTINUED;
}

/* A SIGCONT to a held process: from the guard it releases, from anyone else it condemns (the
 * process dies at its next syscall, or sooner: held_continues). Runs in the sender, under the
 * target's siglock: the target cannot run on before this is done. Matched by the target's pid,
 * so a SIGCONT sent to one thread (tgkill) is caught by the other rules instead. */
TRACEPOINT_PROBE(signal, signal_generate)
{
    int sig = args->sig;
    if ((sig != EG_SIGCONT && sig != EG_SIGCHLD) || !anything_held())
        return 0;
    if (sig == EG_SIGCHLD) {
        if (args->code == EG_CLD_CONTINUED)
            held_continues();
        return 0;
    }
    u32 target = args->pid;
    struct held_mark *m = held.lookup(&target);
    if (!m)
        return 0;
    struct scope_cfg *cfg = get_cfg();
    u32 sender = bpf_get_current_pid_tgid() >> 32;
    if (cfg && cfg->owner_tgid && sender == cfg->owner_tgid)
        unmark(target);
    else if (m->state != EG_HOLD_RELEASED)
        m->state = EG_HOLD_CONTINUED;
    return 0;
}
