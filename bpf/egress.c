// Network egress decided in the kernel: cgroup-BPF sock_addr programs for connect4/connect6
// (also TCP Fast Open: sendto(MSG_FASTOPEN) passes the pre_connect hook) and sendmsg4/sendmsg6
// (UDP sendto/sendmsg with an explicit destination). Returning 0 makes the caller's syscall fail
// with EPERM before any packet is built. Attached to the watched cgroup, so only its processes
// (and its descendants') are judged.
//
// The policy is compiled in Python (ebpf_guard/enforce/egress.py): every address prefix the
// policy names is a key of an LPM trie whose value says, per port range, what the kernel does.
// Prefixes are nested or disjoint, so the longest matching prefix alone decides. The action is
// a word of 4-bit nibbles, one per protocol class of the socket (eg_class: a rule with
// `protocol: [udp]` holds for UDP sockets only). Only struct bpf_sock_addr (uapi, stable) is
// read; no other kernel layout.
#include <uapi/linux/bpf.h>

#define EG_MAX_SEGS 16      // port ranges per prefix (segments that differ from `base`)
#define EG_MAX_BURST 4096   // the largest burst count judged in the kernel
#define EG_MAX_PREFIXES 16384
#define EG_MAX_PINS 4096

// Action bits, per port range of a prefix.
#define EG_DENY 1    // the policy denies it (ASK, HALT, KILL): EPERM
#define EG_COUNT 2   // the burst (rate) rule counts it
#define EG_TRIP 4    // once the burst tripped: EPERM (the rate rule's verdict would win here)

// Counters (per-CPU array; Python sums them).
#define EG_C_SEEN 0      // connects/sendmsgs judged
#define EG_C_DENIED 1    // denied by the policy
#define EG_C_BURST 2     // denied because the burst tripped
#define EG_C_COUNTED 3   // counted towards the burst
#define EG_C_PINNED 4    // allowed by the operator (Egress.allow) over a policy deny
#define EG_NCOUNTERS 5

// Protocol classes: the nibble of the action word that applies. The same names, in the same
// order, as enforce/egress.py PROTOCOLS; the same mapping as sensor/decode.py socket_protocol().
#define EG_P_TCP 0
#define EG_P_UDP 1
#define EG_P_RAW 2
#define EG_P_ICMP 3
#define EG_P_SCTP 4
#define EG_P_OTHER 5
#define EG_CLASS_BITS 4

struct eg_key4 {
    u32 prefixlen;
    u32 addr;           // network byte order, as in the sockaddr
};

struct eg_key6 {
    u32 prefixlen;
    u32 addr[4];
};

struct eg_seg {
    u16 lo;
    u16 hi;
    u32 action;
};

struct eg_dest {
    u32 base;           // action for ports in no segment
    u32 nseg;
    struct eg_seg seg[EG_MAX_SEGS];
};

// A destination the operator allowed (an approved ASK): family 4 (also IPv4-mapped) or 6.
struct eg_pin {
    u32 family;
    u32 port;           // host byte order
    u32 addr[4];        // IPv4 in addr[0], the rest zero
};

struct eg_config {
    u32 enforce;        // 0: judge and count, deny nothing (audit)
    u32 burst_count;    // 0: no burst rule in the kernel
    u64 burst_window_ns;
};

struct eg_burst {
    u64 next;           // how many connects were counted (the ring's write position)
    u32 tripped;        // set on the count+1-th connect within the window; cleared by Python
    u32 pad;
};

BPF_LPM_TRIE(eg_v4, struct eg_key4, struct eg_dest, EG_MAX_PREFIXES);
BPF_LPM_TRIE(eg_v6, struct eg_key6, struct eg_dest, EG_MAX_PREFIXES);
// IPv4 destinations reached through an IPv6 socket (::ffff:a.b.c.d): matched by the IPv4
// address, with the rules of family ipv6, as the engine reads them.
BPF_LPM_TRIE(eg_m4, struct eg_key4, struct eg_dest, EG_MAX_PREFIXES);
BPF_HASH(eg_pins, struct eg_pin, u32, EG_MAX_PINS);
BPF_ARRAY(eg_config, struct eg_config, 1);
BPF_ARRAY(eg_burst_state, struct eg_burst, 1);
BPF_ARRAY(eg_burst_ring, u64, EG_MAX_BURST);  // when each of the last burst_count connects happened
BPF_PERCPU_ARRAY(eg_counters, u64, EG_NCOUNTERS);

static __always_inline void eg_bump(u32 idx)
{
    u64 *c = eg_counters.lookup(&idx);
    if (c)
        (*c)++;
}

static __always_inline u32 eg_port_action(struct eg_dest *d, u32 port)
{
    u32 act = d->base;
#pragma unroll
    for (int i = 0; i < EG_MAX_SEGS; i++) {
        if (i >= d->nseg)
            break;
        if (port >= d->seg[i].lo && port <= d->seg[i].hi) {
            act = d->seg[i].action;
            break;
        }
    }
    return act;
}

// Record one counted connect; 1 if it is more than burst_count within the window (a sliding
// window: the ring holds the times of the last burst_count counted connects).
static __always_inline int eg_burst_exceeded(struct eg_config *cfg)
{
    u32 zero = 0;
    struct eg_burst *st = eg_burst_state.lookup(&zero);
    if (!st)
        return 1;
    if (st->tripped)
        return 1;
    u32 n = cfg->burst_count;
    if (n > EG_MAX_BURST)
        return 1;
    u64 now = bpf_ktime_get_ns();
    u64 idx = __sync_fetch_and_add(&st->next, 1);
    u32 slot = idx % n;
    u64 *at = eg_burst_ring.lookup(&slot);
    if (!at)
        return 1;
    u64 then = *at;
    *at = now;
    eg_bump(EG_C_COUNTED);
    if (then && now - then < cfg->burst_window_ns) {
        st->tripped = 1;
        return 1;
    }
    return 0;
}

// The socket's protocol class, from its type and IPPROTO_* (bpf_sock_addr.type, .protocol).
static __always_inline u32 eg_class(struct bpf_sock_addr *ctx)
{
    u32 type = ctx->type, proto = ctx->protocol;
    if (proto == 132)                                       // IPPROTO_SCTP
        return EG_P_SCTP;
    if (type == 3)                                          // SOCK_RAW
        return EG_P_RAW;
    if (type == 1 && (proto == 6 || proto == 262))          // SOCK_STREAM: TCP, MPTCP
        return EG_P_TCP;
    if (type == 2 && (proto == 17 || proto == 136))         // SOCK_DGRAM: UDP, UDP-Lite
        return EG_P_UDP;
    if (type == 2 && (proto == 1 || proto == 58))           // SOCK_DGRAM: ping (ICMP, ICMPv6)
        return EG_P_ICMP;
    return EG_P_OTHER;
}

static __always_inline int eg_decide(struct bpf_sock_addr *ctx, struct eg_dest *d, struct eg_pin *pin)
{
    u32 zero = 0;
    eg_bump(EG_C_SEEN);
    struct eg_config *cfg = eg_config.lookup(&zero);
    if (!cfg || !cfg->enforce)
        return 1;
    // Python always installs a /0 entry: a miss means the maps are not filled in; fail closed.
    u32 act = d ? (eg_port_action(d, pin->port) >> (EG_CLASS_BITS * eg_class(ctx))) & 0xf : EG_DENY;
    if (act & EG_DENY) {
        if (!eg_pins.lookup(pin)) {
            eg_bump(EG_C_DENIED);
            return 0;
        }
        eg_bump(EG_C_PINNED);
    }
    // A connect the policy denies fails, so it is not counted (the engine does not count it).
    if ((act & EG_COUNT) && cfg->burst_count && eg_burst_exceeded(cfg) && (act & EG_TRIP)) {
        eg_bump(EG_C_BURST);
        return 0;
    }
    return 1;
}

static __always_inline int eg_judge4(struct bpf_sock_addr *ctx)
{
    struct eg_key4 key = {.prefixlen = 32, .addr = ctx->user_ip4};
    struct eg_pin pin = {.family = 4, .port = bpf_ntohs((u16)ctx->user_port)};
    pin.addr[0] = key.addr;
    return eg_decide(ctx, eg_v4.lookup(&key), &pin);
}

static __always_inline int eg_judge6(struct bpf_sock_addr *ctx)
{
    struct eg_pin pin = {.family = 6, .port = bpf_ntohs((u16)ctx->user_port)};
    pin.addr[0] = ctx->user_ip6[0];
    pin.addr[1] = ctx->user_ip6[1];
    pin.addr[2] = ctx->user_ip6[2];
    pin.addr[3] = ctx->user_ip6[3];
    if (pin.addr[0] == 0 && pin.addr[1] == 0 && pin.addr[2] == bpf_htonl(0xffff)) {
        // ::ffff:a.b.c.d goes out as IPv4 to a.b.c.d: judge that address.
        struct eg_key4 key = {.prefixlen = 32, .addr = pin.addr[3]};
        pin.family = 4;
        pin.addr[0] = pin.addr[3];
        pin.addr[2] = 0;
        pin.addr[3] = 0;
        return eg_decide(ctx, eg_m4.lookup(&key), &pin);
    }
    struct eg_key6 key = {.prefixlen = 128};
    key.addr[0] = pin.addr[0];
    key.addr[1] = pin.addr[1];
    key.addr[2] = pin.addr[2];
    key.addr[3] = pin.addr[3];
    return eg_decide(ctx, eg_v6.lookup(&key), &pin);
}

int egress_connect4(struct bpf_sock_addr *ctx) { return eg_judge4(ctx); }
int egress_sendmsg4(struct bpf_sock_addr *ctx) { return eg_judge4(ctx); }
int egress_connect6(struct bpf_sock_addr *ctx) { return eg_judge6(ctx); }
int egress_sendmsg6(struct bpf_sock_addr *ctx) { return eg_judge6(ctx); }
