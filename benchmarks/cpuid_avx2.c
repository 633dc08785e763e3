/* An x86 CPU that says it has AVX2 and nothing newer, to the process this is preloaded into.
 *
 * Libraries pick their kernels by what the CPUID instruction reports (ONNX Runtime's MLAS, PyTorch's
 * cpuinfo and oneDNN, numpy). Linux can make CPUID fault in a process (arch_prctl ARCH_SET_CPUID,
 * on CPUs with "cpuid_fault" in /proc/cpuinfo); this library turns that on when it is loaded and
 * answers each faulting CPUID itself: the real answer, less AVX-512 (all of it), VNNI (AVX-512 and
 * AVX), bf16, fp16 and AMX. Those libraries then run their AVX2 kernels, at this CPU's speed: what
 * emulation (qemu) computes but cannot time. The kernel's own view (/proc/cpuinfo) is unchanged.
 *
 *     gcc -O2 -shared -fPIC -o cpuid_avx2.so cpuid_avx2.c
 *     LD_PRELOAD=$PWD/cpuid_avx2.so python ...       (benchmarks/avx2_only.py does both)
 *
 * The setting holds for the process and the threads it starts, and ends at execve, so a child
 * process needs LD_PRELOAD too (inherited through the environment). What runs before this library's
 * constructor keeps what it read: glibc's own string functions (chosen in the dynamic loader). A
 * program that installs a SIGSEGV handler of its own (Python's faulthandler, so pytest) takes the
 * answering away: its next CPUID ends the process. */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

static void real_cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

static void mask(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    if (leaf == 7 && sub == 0) {
        /* EBX: AVX512F 16, DQ 17, IFMA 21, PF 26, ER 27, CD 28, BW 30, VL 31 */
        r[1] &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) |
                  (1u << 30) | (1u << 31));
        /* ECX: VBMI 1, VBMI2 6, VNNI 11, BITALG 12, VPOPCNTDQ 14 */
        r[2] &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
        /* EDX: 4VNNIW 2, 4FMAPS 3, VP2INTERSECT 8, AMX-BF16 22, AVX512-FP16 23, AMX-TILE 24, AMX-INT8 25 */
        r[3] &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25));
    } else if (leaf == 7 && sub == 1) {
        /* EAX: AVX-VNNI 4, AVX512-BF16 5, AMX-FP16 21, AVX-IFMA 23; EDX: AVX-VNNI-INT8 4,
         * AVX-NE-CONVERT 5, AMX-COMPLEX 8, AVX-VNNI-INT16 10, AVX10 19 */
        r[0] &= ~((1u << 4) | (1u << 5) | (1u << 21) | (1u << 23));
        r[3] &= ~((1u << 4) | (1u << 5) | (1u << 8) | (1u << 10) | (1u << 19));
    } else if (leaf == 0xd && sub == 0) {
        /* XCR0 bits the CPU supports: opmask 5, ZMM halves 6-7, AMX tiles 17-18 */
        r[0] &= ~((1u << 5) | (1u << 6) | (1u << 7) | (1u << 17) | (1u << 18));
    }
}

static struct sigaction previous;         /* the handler before this one: every other SIGSEGV */

static void on_fault(int sig, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    greg_t *g = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)g[REG_RIP];
    /* a faulting CPUID is a general protection fault (SI_KERNEL), at a CPUID instruction; anything
     * else (a bad pointer, kill -SEGV) goes to the previous handler, or kills as it would have */
    if (info->si_code != SI_KERNEL || ip[0] != 0x0f || ip[1] != 0xa2) {
        sigaction(sig, &previous, NULL);
        if (info->si_code <= 0)                /* sent, not a fault: send it again */
            raise(sig);
        return;                                /* a fault: runs the instruction again, which faults */
    }
    int saved = errno;
    uint32_t leaf = (uint32_t)g[REG_RAX], sub = (uint32_t)g[REG_RCX], r[4];
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
    real_cpuid(leaf, sub, r);
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
    mask(leaf, sub, r);
    g[REG_RAX] = r[0];
    g[REG_RBX] = r[1];
    g[REG_RCX] = r[2];
    g[REG_RDX] = r[3];
    g[REG_RIP] += 2;
    errno = saved;
}

__attribute__((constructor)) static void start(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO;
    sigfillset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &previous);
    if (syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
        perror("cpuid_avx2: arch_prctl(ARCH_SET_CPUID) (no cpuid_fault on this CPU?)");
        exit(3);
    }
}
