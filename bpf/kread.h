/* Kernel struct reads at the running kernel's offsets: OFF(struct, member) names the
 * -DEG_OFF_<struct>__<member> macro that ebpf_guard/sensor/btf.py reads from the kernel's BTF
 * (never from headers). Shared by sensor.c (its BTF walks) and lsm.c. */
#ifndef EG_KREAD_H
#define EG_KREAD_H

#define OFF(s, m) EG_OFF_##s##__##m

static __always_inline void *kptr(void *base, u32 off)
{
    void *p = 0;
    bpf_probe_read_kernel(&p, sizeof(p), (char *)base + off);
    return p;
}

static __always_inline u32 ku32(void *base, u32 off)
{
    u32 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (char *)base + off);
    return v;
}

static __always_inline u16 ku16(void *base, u32 off)
{
    u16 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (char *)base + off);
    return v;
}

#endif
