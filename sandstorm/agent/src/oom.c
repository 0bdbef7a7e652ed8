/* The kernel's count of OOM kills, read around each exec: a SIGKILL while it moved is reported
 * as an OOM kill (EXIT's oom_killed). */
#include "agent.h"

long long oom_kill_count(void) {
    /* The kernel's count of OOM kills (oom_kill in /proc/vmstat), -1 where there is none
     * (gVisor). In a VM it is the guest kernel's own; in a container the host's. */
    static char data[65536];
    static bool absent; /* no file or no counter: the kernel does not grow one later */
    if (absent)
        return -1;
    int fd = open("/proc/vmstat", O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        absent = errno == ENOENT;
        return -1;
    }
    size_t len = 0;
    for (;;) {
        ssize_t n = read(fd, data + len, sizeof data - 1 - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        len += (size_t)n;
        if (len == sizeof data - 1)
            break;
    }
    close(fd);
    data[len] = 0;
    char *at = strstr(data, "\noom_kill ");
    if (!at) {
        absent = len > 0;
        return -1;
    }
    char *end;
    errno = 0;
    long long value = strtoll(at + 10, &end, 10);
    if (errno || end == at + 10 || (*end != '\n' && *end != 0))
        return -1;
    return value;
}

/* Whether an exec that died of `sig` was (most likely) ended by the OOM killer: it kills with
 * SIGKILL, so a SIGKILL while the kernel counted an OOM kill since `before` was that one. */
bool oom_killed(int sig, long long before) {
    if (sig != SIGKILL || before < 0)
        return false;
    long long now = oom_kill_count();
    return now >= 0 && now > before;
}
