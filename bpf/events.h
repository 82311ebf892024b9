/* The kernel -> userspace event layout. The single C definition; its ctypes mirror is in
 * ebpf_guard/events.py (RawEvent, RawPathEvent, RawExecEvent, RawConnectEvent). The loader
 * passes the mirror's sizes as -DPY_SIZEOF_* and sensor.c static-asserts them, so the two
 * cannot drift apart silently.
 *
 * Every event starts with struct ev_hdr. Events are submitted with a variable size (header +
 * the bytes actually used) so a short path costs a short record in the perf buffer.
 * All fields are naturally aligned: no implicit padding on either side.
 */
#ifndef EBPF_GUARD_EVENTS_H
#define EBPF_GUARD_EVENTS_H

#define EG_COMM_LEN 16
#define EG_PATH_LEN 256      /* power of two: used as a verifier bound */
#define EG_ARG_LEN 256       /* bytes per argv slot, NUL included */
#define EG_MAX_ARGS 16
#define EG_NAME_LEN 64       /* exec-kill basename key */
#define EG_UNIX_PATH_LEN 108 /* sizeof(sockaddr_un.sun_path) */
#define EG_MAX_CGROUPS 8     /* cgroups watched at once */
#define EG_REAL_LEN 512      /* a kernel-resolved path, at most EG_REAL_LEN - 1 bytes; power of two */
#define EG_STRS_LEN 2048     /* ev_path strings: path, path2, real, real2 (256+256+512+512 max) */

/* ev_hdr.kind; same order as ebpf_guard.events.Kind */
#define EG_K_EXEC 1
#define EG_K_OPEN 2
#define EG_K_UNLINK 3
#define EG_K_CONNECT 4
#define EG_K_FORK 5
#define EG_K_EXIT 6
#define EG_K_CHDIR 7
#define EG_K_RENAME 8
#define EG_K_LINK 9
#define EG_K_SYMLINK 10
#define EG_K_TRUNCATE 11
#define EG_K_MMAP_EXEC 12
#define EG_K_IO_URING 13
#define EG_K_PTRACE 14

/* ev_hdr.flags */
#define EG_F_KILLED 0x1      /* exec: bpf_send_signal(SIGKILL) was sent at syscall entry */
#define EG_F_ARGV_TRUNC 0x2  /* exec: more than EG_MAX_ARGS args, or an arg was cut */
#define EG_F_PATH_TRUNC 0x4  /* the path filled its buffer: it may have been cut */
#define EG_F_NO_PROC 0x8     /* process started before attach and was not seeded: ppid/start_ns = 0 */
#define EG_F_TRACKED 0x10    /* in scope through the pid-tracked set (--pid mode) */
#define EG_F_HELD 0x20       /* exec: bpf_send_signal(SIGSTOP) at syscall entry: held until decided */
#define EG_F_REAL 0x40       /* real (and dev/ino where the kind has an object) came from a BTF walk */
#define EG_F_REAL_CUT 0x80   /* that walk hit a bound: real is only the deepest part */
#define EG_F_REAL2 0x100     /* real2 came from a BTF walk */
#define EG_F_REAL2_CUT 0x200
#define EG_F_SENDTO 0x400    /* connect kind: a sendto() with a destination */
#define EG_F_SENDMSG 0x800   /* connect kind: a sendmsg() with msg_name */
#define EG_F_BY_INODE 0x1000 /* exec/mmap: KILLED or HELD because the file's inode is listed */
#define EG_F_RATE_HELD 0x2000 /* unlink: the deletion rate crossed its threshold: SIGSTOP + held mark */
#define EG_F_CREATED 0x4000  /* open: this open created the file (FMODE_CREATED in f_mode at exit) */
#define EG_F_NOTHING_CUT 0x8000 /* ftruncate: at entry the file had no bytes past the new length */

/* Values of the exec_names / exec_paths maps: what the kernel does at exec entry. */
#define EG_EXEC_KILL 1       /* SIGKILL: the exec is aborted, the program never runs */
#define EG_EXEC_HOLD 2       /* SIGSTOP: stops before its first instruction until userspace decides */

struct ev_hdr {
    __u64 ts_ns;     /* bpf_ktime_get_ns() just before submit */
    __u64 cgroup_id; /* cgroup v2 id of the task */
    __u64 start_ns;  /* process start, monotonic ns (see procs map) */
    __s64 ret;       /* syscall result (open, chdir); 0 where not reported */
    __u32 pid;       /* thread id */
    __u32 tgid;      /* process id */
    __u32 ppid;
    __u32 uid;
    __u32 kind;
    __u32 flags;
    __s32 fd;        /* dirfd (open/unlink/exec), fd (fchdir/connect); AT_FDCWD = -100 */
    __u32 sc_flags;  /* O_* (open), AT_* (unlink, execveat) */
    __u32 child_pid; /* fork: the new process */
    __u32 path_len;  /* bytes read into path, NUL included (0 = none) */
    char comm[EG_COMM_LEN];
};

/* Identity of an object, resolved in the kernel (EG_F_REAL): see sensor.c's walk_path(). */
struct ev_obj {
    __u64 dev;      /* super_block.s_dev, kernel encoding (MAJOR << 20 | MINOR); 0 = none */
    __u64 ino;      /* inode.i_ino; 0 = none */
    __u32 real_len; /* bytes of real (no NUL) */
    __u32 real2_len;
};

/* open, unlink, chdir, rename, link, symlink, truncate, mmap_exec. The strings are packed:
 * path (h.path_len bytes, NUL included), path2 (path2_len, NUL included), real (obj.real_len),
 * real2 (obj.real2_len); only the bytes used are submitted.
 *   real: the object (open, ftruncate, mmap: the fd's file; chdir: the new cwd) or, for
 *   kinds that name a directory entry (unlink, rename, link, symlink, truncate(path)), the
 *   real path of the directory the name is relative to (dirfd or cwd).
 *   path2/real2: rename/link/symlink: the new name and its base directory. */
struct ev_path {
    struct ev_hdr h;
    struct ev_obj obj;
    __u32 path2_len;
    __u32 _pad;
    char strs[EG_STRS_LEN];
};

struct ev_exec {
    struct ev_hdr h;
    struct ev_obj obj;  /* the binary that runs (mm->exe_file), at exit; real2: the cwd */
    char real[EG_REAL_LEN];
    char cwd[EG_REAL_LEN]; /* fs->pwd at exit: what relative operands mean */
    char path[EG_PATH_LEN];
    __u32 argc; /* argv slots filled */
    __u32 _pad;
    char argv[EG_MAX_ARGS][EG_ARG_LEN];
};

struct ev_connect {
    struct ev_hdr h;
    __u16 family;  /* AF_INET / AF_INET6 / AF_UNIX */
    __u16 port;    /* network byte order */
    __u32 addrlen; /* as passed to connect() */
    __u8 addr[16]; /* IPv4 in the first 4 bytes */
    char unix_path[EG_UNIX_PATH_LEN];
    /* The socket behind fd, read in the kernel (BTF); all 0 when unknown (no BTF, not a
     * socket). In what was the struct's tail padding: the size is unchanged. */
    __u8 sk_family;    /* sock_common.skc_family: AF_UNIX / AF_INET / AF_INET6 */
    __u8 sk_type;      /* socket.type: SOCK_STREAM 1, SOCK_DGRAM 2, SOCK_RAW 3, SOCK_SEQPACKET 5 */
    __u16 sk_protocol; /* sock.sk_protocol: IPPROTO_* */
};

/* Scope configuration, one entry in an array map, rewritten from Python. Watched cgroups
 * are (depth, id) pairs compared in place: cheaper than a hash lookup, and this check runs
 * on every traced syscall of every process on the host. */
struct scope_cfg {
    __u32 ncgroups;                 /* entries used in levels[]/ids[] */
    __u32 pid_mode;                 /* the tracked-pid set is in use */
    __u32 exec_rules;               /* the exec_names/exec_paths maps are non-empty */
    __u32 owner_tgid;               /* the guard: its SIGCONT to a held process releases it */
    __u32 levels[EG_MAX_CGROUPS];   /* depth of each watched cgroup (root = 0) */
    __u64 ids[EG_MAX_CGROUPS];      /* its cgroup v2 id */
    __u32 rate_count;               /* deletions within rate_window_ns that hold the deleter; 0 = off */
    __u32 _pad;
    __u64 rate_window_ns;
};

struct proc_info {
    __u32 ppid;
    __u32 _pad;
    __u64 start_ns;
};

struct exec_path_key {
    char s[EG_PATH_LEN];
};

struct exec_name_key {
    char s[EG_NAME_LEN];
};

/* exec_inodes: a listed program by its file (dev in kernel encoding), whatever its name. */
struct inode_key {
    __u64 dev;
    __u64 ino;
};

/* held: a process the kernel stopped (exec gate, listed inode, deletion rate), by tgid. While
 * it is marked, a continue by anyone but the guard gets it killed (see sensor.c, "Holds"). */
#define EG_HOLD_ARMING 1    /* SIGSTOP sent at the entry of a syscall that has not returned yet */
#define EG_HOLD_PENDING 2   /* that syscall returned: its thread may not enter another one */
#define EG_HOLD_CONTINUED 3 /* SIGCONT from someone else: killed, at the latest at the next syscall */
#define EG_HOLD_RELEASED 4  /* the guard let it go: the next syscall entry drops the mark */

#define EG_HOLD_BY_EXEC 1   /* exec gate (by name or inode), at sys_exit_execve */
#define EG_HOLD_BY_MMAP 2   /* mmap(PROT_EXEC) of a listed inode */
#define EG_HOLD_BY_RATE 3   /* deletion rate */

struct held_mark {
    __u64 since;  /* bpf_ktime_get_ns() of the hold */
    __u32 state;  /* EG_HOLD_* */
    __u32 tid;    /* the thread the stop was sent from */
    __u32 reason; /* EG_HOLD_BY_* */
    __u32 _pad;
};

/* The timestamps of the last EG_RATE_SLOTS deletions in watched scope (all scopes together):
 * the rate rule fires when rate_count of them lie within rate_window_ns. Power of two. */
#define EG_RATE_SLOTS 64
struct rate_ring {
    __u64 seq; /* deletions counted since the last reset; slot = seq % EG_RATE_SLOTS */
    __u64 ts[EG_RATE_SLOTS];
};

/* lost[]: samples perf_submit could not write, per buffer (0 urgent, 1 bulk), counted in the
 * kernel so the guard sees a loss on its next poll, not with the next sample on that CPU. */
#define EG_LOST_URGENT 0
#define EG_LOST_BULK 1

#endif
