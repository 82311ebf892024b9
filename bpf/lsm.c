/* ebpf-guard BPF-LSM enforcer: file, exec, delete and SIGCONT rules returned as -EPERM from the
 * kernel's security hooks, for tasks in the watched cgroups only. Loaded by
 * ebpf_guard/enforce/lsm.py, which fills the maps from an LsmPlan.
 *
 * Rules of this file:
 *  - kernel structs are read only through EG_OFF_* offsets from the running kernel's BTF
 *    (ebpf_guard/sensor/btf.py), never through the headers bcc compiles against. Hook arguments
 *    are taken as void * so that bcc rewrites no member access with header offsets.
 *  - every hook asks "is the current task watched?" first; an unwatched task returns 0 at once.
 *  - a member btf.py may not list on every version (file.f_mode, linux_binprm.file) and a hook
 *    older kernels lack (file_truncate, 6.2+) are compiled in only when the loader says so.
 *  - written for 6.1's verifier: the loop over watched cgroups (bound from map memory) and the
 *    ancestor walk are unrolled.
 */

#define EG_MAX_CGROUPS 8
#define EG_RATE_SLOTS 1024     /* the largest deletion count a plan may give */
#define EG_EXEMPT_DEPTH 16     /* ancestors looked at for a directory exempt from the limit */
#define EG_EPERM 1
#define EG_SIGCONT 18
#define EG_PROT_WRITE 0x2
#define EG_PROT_EXEC 0x4
#define EG_MAP_TYPE 0x0f
#define EG_MAP_SHARED 0x01
#define EG_MAP_SHARED_VALIDATE 0x03
#define EG_MAY_WRITE 0x2
#define EG_MAY_READ 0x4
#define EG_FMODE_WRITE 0x2

/* Flags of an inode (lsm.py DENY_*, RATE_EXEMPT). */
#define EG_DENY_OPEN 1         /* any open; reads and writes through fds opened earlier */
#define EG_DENY_WRITE 2        /* writes, truncation, unlink, rename of or over it, link of it */
#define EG_DENY_EXEC 4         /* exec, mmap(PROT_EXEC), and any open (no copy, no ld.so) */
#define EG_RATE_EXEMPT 8       /* a directory: deletions below it do not count */
#define EG_HOLD_EXEC 16        /* exec passes (the sensor holds it until decided); any other open
                                  of it is denied (no copy, no ld.so) */
#define EG_FMODE_EXEC 0x20     /* __FMODE_EXEC in file.f_flags: set only by the kernel's exec open */

/* Denial counters, by hook (lsm.py HOOKS, same order). */
#define H_FILE_OPEN 0
#define H_FILE_PERMISSION 1
#define H_BPRM 2
#define H_MMAP 3
#define H_UNLINK 4
#define H_RMDIR 5
#define H_RENAME 6
#define H_TRUNCATE 7
#define H_FILE_TRUNCATE 8
#define H_LINK 9
#define H_TASK_KILL 10
#define EG_NHOOKS 11

struct lsm_cfg {
    u32 ncgroups;               /* entries used in levels[]/ids[] */
    u32 rate_count;             /* deletions allowed within the window; 0: no limit */
    u64 rate_window_ns;
    u32 levels[EG_MAX_CGROUPS]; /* depth of each watched cgroup (root = 0) */
    u64 ids[EG_MAX_CGROUPS];    /* its cgroup v2 id */
};

struct lsm_inode {
    u64 dev;                    /* super_block.s_dev: (major << 20) | minor */
    u64 ino;
};

struct rate_state {
    u64 seq;                    /* deletions counted so far: the next ring slot */
    u64 tripped;                /* when the limit was reached (ns); 0: not reached */
};

BPF_ARRAY(cfg, struct lsm_cfg, 1);
BPF_HASH(inodes, struct lsm_inode, u8, 16384);
BPF_HASH(held, u32, u8, 4096);                    /* tgid -> 1: SIGCONT from watched tasks refused */
BPF_ARRAY(rate_ring, u64, EG_RATE_SLOTS);         /* when each of the last rate_count deletions was */
BPF_ARRAY(rate_state, struct rate_state, 1);
BPF_PERCPU_ARRAY(denials, u64, EG_NHOOKS);

/* ---- scope ----------------------------------------------------------------------------- */

static __always_inline int watched(void)
{
    u32 zero = 0;
    struct lsm_cfg *c = cfg.lookup(&zero);
    if (!c)
        return 0;
    u32 n = c->ncgroups;
#pragma unroll
    for (int i = 0; i < EG_MAX_CGROUPS; i++) {
        if (i >= n)
            break;
        /* The ancestor at the watched cgroup's depth is that cgroup iff the task is in or below it. */
        if (bpf_get_current_ancestor_cgroup_id(c->levels[i]) == c->ids[i])
            return 1;
    }
    return 0;
}

static __always_inline int deny(u32 hook)
{
    u64 *n = denials.lookup(&hook);
    if (n)
        (*n)++;
    return -EG_EPERM;
}

/* ---- kernel objects, at BTF offsets ----------------------------------------------------- */

#include "kread.h"

static __always_inline u8 inode_flags(void *inode)
{
    if (!inode)
        return 0;
    void *sb = kptr(inode, OFF(inode, i_sb));
    if (!sb)
        return 0;
    struct lsm_inode k = {};
    bpf_probe_read_kernel(&k.ino, sizeof(k.ino), (char *)inode + OFF(inode, i_ino));
    k.dev = ku32(sb, OFF(super_block, s_dev));
    u8 *f = inodes.lookup(&k);
    return f ? *f : 0;
}

static __always_inline u8 file_flags(void *file)
{
    return file ? inode_flags(kptr(file, OFF(file, f_inode))) : 0;
}

static __always_inline u8 dentry_flags(void *dentry)
{
    return dentry ? inode_flags(kptr(dentry, OFF(dentry, d_inode))) : 0;
}

/* ---- the deletion limit ----------------------------------------------------------------- */

/* Below a directory the plan spares (/tmp, the workspace's .git)? Walks d_parent up to the
 * filesystem's root, EG_EXEMPT_DEPTH steps at most (deeper: counted). */
static __always_inline int rate_exempt(void *dentry)
{
    void *d = dentry;
#pragma unroll
    for (int i = 0; i < EG_EXEMPT_DEPTH; i++) {
        void *parent = kptr(d, OFF(dentry, d_parent));
        if (!parent || parent == d)
            return 0;
        if (dentry_flags(parent) & EG_RATE_EXEMPT)
            return 1;
        d = parent;
    }
    return 0;
}

/* 1 if this deletion is over the limit. A ring of the last rate_count deletions' times: the
 * slot about to be overwritten holds the one rate_count deletions ago; if that is within the
 * window the limit is reached, and stays reached until userspace resets the state. */
static __always_inline int over_rate(void *dentry)
{
    u32 zero = 0;
    struct lsm_cfg *c = cfg.lookup(&zero);
    if (!c || !c->rate_count)
        return 0;
    u64 count = c->rate_count, window = c->rate_window_ns;
    if (rate_exempt(dentry))
        return 0;
    struct rate_state *st = rate_state.lookup(&zero);
    if (!st)
        return 0;
    if (st->tripped)
        return 1;
    u64 now = bpf_ktime_get_ns();
    u64 seq = __sync_fetch_and_add(&st->seq, 1);
    u32 slot = seq % count;
    u64 *then = rate_ring.lookup(&slot);
    if (!then)
        return 0;
    if (*then && now - *then < window) {
        st->tripped = now;
        return 1;
    }
    *then = now;
    return 0;
}

/* ---- hooks ------------------------------------------------------------------------------ */

LSM_PROBE(file_open, void *file)
{
    if (!watched())
        return 0;
    u8 f = file_flags(file);
    if (f & (EG_DENY_OPEN | EG_DENY_EXEC))
        return deny(H_FILE_OPEN);
    if ((f & EG_HOLD_EXEC) && !(ku32(file, OFF(file, f_flags)) & EG_FMODE_EXEC))
        return deny(H_FILE_OPEN);
#ifdef EG_OFF_file__f_mode
    if ((f & EG_DENY_WRITE) && (ku32(file, OFF(file, f_mode)) & EG_FMODE_WRITE))
        return deny(H_FILE_OPEN);
#endif
    return 0;
}

/* Every read and write (read(2), write(2), splice, copy_file_range, fallocate, io_uring): writes
 * to a protected file through any fd, and reads or writes of an open-denied file through an fd
 * opened before the rules were loaded. */
LSM_PROBE(file_permission, void *file, int mask)
{
    if (!(mask & (EG_MAY_READ | EG_MAY_WRITE)) || !watched())
        return 0;
    u8 f = file_flags(file);
    if ((f & EG_DENY_OPEN) || ((f & EG_DENY_WRITE) && (mask & EG_MAY_WRITE)))
        return deny(H_FILE_PERMISSION);
    return 0;
}

#ifdef EG_OFF_linux_binprm__file
LSM_PROBE(bprm_check_security, void *bprm)
{
    if (!watched())
        return 0;
    if (file_flags(kptr(bprm, OFF(linux_binprm, file))) & EG_DENY_EXEC)
        return deny(H_BPRM);
    return 0;
}
#endif

LSM_PROBE(mmap_file, void *file, unsigned long reqprot, unsigned long prot, unsigned long flags)
{
    if (!file)
        return 0;
    u32 type = flags & EG_MAP_TYPE;
    int shared_write = (prot & EG_PROT_WRITE) && (type == EG_MAP_SHARED || type == EG_MAP_SHARED_VALIDATE);
    if (!(prot & EG_PROT_EXEC) && !shared_write)
        return 0;
    if (!watched())
        return 0;
    u8 f = file_flags(file);
    if (((prot & EG_PROT_EXEC) && (f & EG_DENY_EXEC)) || (shared_write && (f & EG_DENY_WRITE)))
        return deny(H_MMAP);
    return 0;
}

LSM_PROBE(path_unlink, void *dir, void *dentry)
{
    if (!watched())
        return 0;
    if (dentry_flags(dentry) & EG_DENY_WRITE)
        return deny(H_UNLINK);
    if (over_rate(dentry))
        return deny(H_UNLINK);
    return 0;
}

LSM_PROBE(path_rmdir, void *dir, void *dentry)
{
    if (!watched())
        return 0;
    if (over_rate(dentry))
        return deny(H_RMDIR);
    return 0;
}

/* Renaming a protected file away, or another file over it (the new dentry is negative, with
 * no inode, when nothing is replaced). */
LSM_PROBE(path_rename, void *old_dir, void *old_dentry, void *new_dir, void *new_dentry)
{
    if (!watched())
        return 0;
    if ((dentry_flags(old_dentry) | dentry_flags(new_dentry)) & EG_DENY_WRITE)
        return deny(H_RENAME);
    return 0;
}

LSM_PROBE(path_truncate, void *path)
{
    if (!watched())
        return 0;
    if (dentry_flags(kptr(path, OFF(path, dentry))) & EG_DENY_WRITE)
        return deny(H_TRUNCATE);
    return 0;
}

#ifdef EG_HAVE_FILE_TRUNCATE
LSM_PROBE(file_truncate, void *file)
{
    if (!watched())
        return 0;
    if (file_flags(file) & EG_DENY_WRITE)
        return deny(H_FILE_TRUNCATE);
    return 0;
}
#endif

/* A new name for a protected file or a listed tool is a way around a name-based check. */
LSM_PROBE(path_link, void *old_dentry, void *new_dir, void *new_dentry)
{
    if (!watched())
        return 0;
    if (dentry_flags(old_dentry) & (EG_DENY_OPEN | EG_DENY_WRITE | EG_DENY_EXEC | EG_HOLD_EXEC))
        return deny(H_LINK);
    return 0;
}

/* A process the guard holds (stopped pending a decision) is not resumed by the agent. */
LSM_PROBE(task_kill, void *p, void *info, int sig, void *cred)
{
    if (sig != EG_SIGCONT || !p || !watched())
        return 0;
    u32 tgid = ku32(p, OFF(task_struct, tgid));
    if (held.lookup(&tgid))
        return deny(H_TASK_KILL);
    return 0;
}
