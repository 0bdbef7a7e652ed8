/* Sandstorm guest init: PID 1 of a microVM (see sandstorm/images/vm.py).
 *
 * Runs from the initramfs. It loads the kernel modules the Debian kernel keeps out of its image
 * (listed in /modules/order, dependencies first; /modules/order.shares too when there are
 * shares to mount), mounts the ext4 root read-only under a
 * memory-backed overlay, moves into it, then starts the agent as its only child: uid/gid 1000,
 * no capabilities, no_new_privs, stdin/stdout on the virtio-serial port that QEMU wires to its
 * own stdio. It reaps every orphan and powers the VM off when the agent exits, so the VM's life
 * is the agent's life, exactly as in gVisor where the agent is PID 1.
 *
 * With sandstorm.channel=vsock on the kernel command line (Firecracker, which has no
 * virtio-serial) there is no port to open: the launch line is then the vsock bridge
 * (vm_vsock_bridge.c), which makes its own channel, and gets stdin/stdout on /dev/null.
 *
 * Module parameters on the command line (<module>.<param>=<value>) are handed to finit_module
 * for that module, as modprobe does: the kernel itself applies them only to built-in code, and
 * Firecracker describes its virtio-mmio devices as virtio_mmio.device=... words.
 *
 * The agent's argv and environment come from /launch (in the per-agent initramfs part the
 * runtime appends): argv lines, an empty line, then environment lines. Host directories shared
 * over virtio-9p are listed in /mounts (in a per-sandbox part after that, when there are any):
 * one "<tag> <ro|rw> <destination>" line each. Static, no libc beyond
 * the syscalls it wraps: it must start in milliseconds even under TCG.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <net/if.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/reboot.h>
#include <sys/resource.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define SANDBOX_ID 1000
#define PORT_NAME "org.sandstorm.agent"

static int kmsg = -1;
static char cmdline[4096];

static void say(const char *fmt, ...) {
    char buf[512];
    int n = snprintf(buf, sizeof buf, "sandstorm-init: ");
    va_list ap;
    va_start(ap, fmt);
    n += vsnprintf(buf + n, sizeof buf - n, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof buf - 2) n = sizeof buf - 2;
    buf[n++] = '\n';
    if (write(kmsg >= 0 ? kmsg : 2, buf, n) < 0) { /* nowhere left to complain */ }
}

static void halt_vm(void) {
    sync();
    /* QEMU runs with -no-reboot and the kernel with reboot=t: a reboot ends the VM process. */
    reboot(RB_AUTOBOOT);
    for (;;) pause();
}

static void die(const char *what) {
    say("%s: %s", what, strerror(errno));
    halt_vm();
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* The value of "key=value" on the kernel command line, or NULL. */
static const char *param(const char *key, char *out, size_t size) {
    size_t klen = strlen(key);
    for (const char *p = cmdline; *p;) {
        while (*p == ' ' || *p == '\n') p++;
        const char *end = p;
        while (*end && *end != ' ' && *end != '\n') end++;
        if ((size_t)(end - p) > klen && strncmp(p, key, klen) == 0 && p[klen] == '=') {
            size_t n = end - p - klen - 1;
            if (n >= size) n = size - 1;
            memcpy(out, p + klen + 1, n);
            out[n] = 0;
            return out;
        }
        p = end;
    }
    return NULL;
}

static long param_long(const char *key, long fallback) {
    char buf[32];
    return param(key, buf, sizeof buf) ? strtol(buf, NULL, 10) : fallback;
}

static void read_file(const char *path, char *buf, size_t size) {
    buf[0] = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    ssize_t n = read(fd, buf, size - 1);
    close(fd);
    buf[n > 0 ? n : 0] = 0;
}

/* Module names treat '-' and '_' alike (as the kernel and modprobe do). */
static int same_module(const char *a, size_t alen, const char *b, size_t blen) {
    if (alen != blen) return 0;
    for (size_t i = 0; i < alen; i++) {
        char x = a[i] == '-' ? '_' : a[i], y = b[i] == '-' ? '_' : b[i];
        if (x != y) return 0;
    }
    return 1;
}

/* The "param=value ..." string finit_module takes for module `name` (a file name such as
 * "virtio_mmio.ko" or a bare name): every "<name>.<param>[=<value>]" word of `line`, in order,
 * repeated words included (virtio_mmio.device= names one device each). Words are split on
 * blanks outside double quotes, as the kernel splits its command line; quotes are passed on for
 * the kernel's own parser. A word that would overflow `out` is dropped whole, never cut. */
static void module_params(const char *line, const char *name, char *out, size_t size) {
    size_t nlen = strlen(name), used = 0;
    if (nlen > 3 && strcmp(name + nlen - 3, ".ko") == 0) nlen -= 3;
    out[0] = 0;
    for (const char *p = line; *p;) {
        while (*p == ' ' || *p == '\t' || *p == '\n') p++;
        const char *end = p;
        int quoted = 0;
        while (*end && (quoted || (*end != ' ' && *end != '\t' && *end != '\n'))) {
            if (*end == '"') quoted = !quoted;
            end++;
        }
        const char *dot = memchr(p, '.', end - p), *eq = memchr(p, '=', end - p);
        if (dot && (!eq || dot < eq) && dot + 1 < end && same_module(p, dot - p, name, nlen)) {
            size_t wlen = end - (dot + 1);
            if (used + (used > 0) + wlen < size) {
                if (used > 0) out[used++] = ' ';
                memcpy(out + used, dot + 1, wlen);
                used += wlen;
                out[used] = 0;
            }
        }
        p = end;
    }
}

static void load_modules(const char *listing) {
    static char order[4096], params[sizeof cmdline];
    read_file(listing, order, sizeof order);
    for (char *name = strtok(order, "\n"); name; name = strtok(NULL, "\n")) {
        char path[256];
        snprintf(path, sizeof path, "/modules/%s", name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) die(path);
        module_params(cmdline, name, params, sizeof params);
        if (syscall(SYS_finit_module, fd, params, 0) != 0 && errno != EEXIST) die(path);
        close(fd);
    }
}

/* sandstorm.channel=vsock: the launch line brings its own channel (Firecracker's vsock). */
static int vsock_channel(void) {
    char channel[16];
    return param("sandstorm.channel", channel, sizeof channel) && strcmp(channel, "vsock") == 0;
}

/* /dev/vportNpM of the virtio-serial port named PORT_NAME (no udev here to make the link). */
static int open_port(void) {
    for (int tries = 0; tries < 5000; tries++) {
        DIR *d = opendir("/sys/class/virtio-ports");
        struct dirent *e;
        while (d && (e = readdir(d))) {
            if (e->d_name[0] == '.') continue;
            char path[300], name[128];
            snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
            read_file(path, name, sizeof name);
            name[strcspn(name, "\n")] = 0;
            if (strcmp(name, PORT_NAME) == 0) {
                snprintf(path, sizeof path, "/dev/%s", e->d_name);
                closedir(d);
                int fd = open(path, O_RDWR | O_CLOEXEC);
                if (fd < 0) die(path);
                return fd;
            }
        }
        if (d) closedir(d);
        sleep_ms(1);
    }
    errno = ENODEV;
    die("virtio-serial port " PORT_NAME);
    return -1;
}

static void wait_for(const char *path) {
    for (int tries = 0; tries < 5000 && access(path, F_OK) != 0; tries++) sleep_ms(1);
}

static void mount_or_die(const char *src, const char *dst, const char *type, unsigned long flags,
                         const char *data) {
    mkdir(dst, 0755);
    if (mount(src, dst, type, flags, data) != 0) die(dst);
}

/* mkdir -p, each new level 0755 (and root's: the share mounted on top brings its own owner). */
static void make_dirs(char *path) {
    for (char *slash = strchr(path + 1, '/'); slash; slash = strchr(slash + 1, '/')) {
        *slash = 0;
        mkdir(path, 0755);
        *slash = '/';
    }
    mkdir(path, 0755);
}

/* The runtime's virtio-9p shares at their destinations in the new root: nosuid, nodev, and
 * read-only where asked (QEMU's export refuses writes to it as well). No page cache: the host
 * may change the files under the guest. A share that cannot be mounted stops the boot. */
static void mount_shares(void) {
    static char buf[65536];
    read_file("/mounts", buf, sizeof buf);
    for (char *line = buf; *line;) {
        char *nl = strchr(line, '\n');
        if (nl) *nl = 0;
        char *mode = strchr(line, ' ');
        char *destination = mode ? strchr(mode + 1, ' ') : NULL;
        if (!destination || destination[1] != '/') {
            errno = EINVAL;
            die("/mounts");
        }
        *mode++ = 0;
        *destination++ = 0;
        static char target[4200];
        snprintf(target, sizeof target, "/newroot%s", destination);
        make_dirs(target);
        unsigned long flags = MS_NOSUID | MS_NODEV | (strcmp(mode, "ro") == 0 ? MS_RDONLY : 0);
        if (mount(line, target, "9p", flags, "trans=virtio,version=9p2000.L,cache=none") != 0)
            die(target);
        if (!nl) break;
        line = nl + 1;
    }
}

/* What gVisor gives a sandbox as well: the hostname "sandbox", and a loopback interface that is
 * up (the kernel gives it 127.0.0.1 and ::1 then); there is no other network device. */
static void set_up_host_identity(void) {
    if (sethostname("sandbox", 7) != 0) die("sethostname");
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) die("socket");
    struct ifreq lo;
    memset(&lo, 0, sizeof lo);
    strcpy(lo.ifr_name, "lo");
    if (ioctl(s, SIOCGIFFLAGS, &lo) != 0) die("lo");
    lo.ifr_flags |= IFF_UP;
    if (ioctl(s, SIOCSIFFLAGS, &lo) != 0) die("lo up");
    close(s);
}

/* Split /launch into argv and envp (both NULL-terminated, pointing into a static buffer). */
static void read_launch(char **argv, char **envp, int max) {
    static char buf[8192];
    read_file("/launch", buf, sizeof buf);
    int n = 0, in_env = 0;
    char **cur = argv;
    for (char *line = buf; *line && n < max - 1;) {
        char *nl = strchr(line, '\n');
        if (nl) *nl = 0;
        if (*line == 0 && !in_env) {
            cur[n] = NULL;
            cur = envp;
            n = 0;
            in_env = 1;
        } else if (*line) {
            cur[n++] = line;
        }
        if (!nl) break;
        line = nl + 1;
    }
    cur[n] = NULL;
    if (!in_env) envp[0] = NULL;
    if (!argv[0]) {
        errno = ENOENT;
        die("/launch has no command");
    }
}

static void start_agent(int port, char **argv, char **envp, long nproc) {
    /* Drop every capability from the bounding set too, while still root. */
    for (int cap = 0; cap <= CAP_LAST_CAP; cap++) prctl(PR_CAPBSET_DROP, cap, 0, 0, 0);
    setsid();
    /* No port (vsock): the bridge opens its own channel; stdin/stdout stay harmless. */
    int io = port >= 0 ? port : open("/dev/null", O_RDWR | O_CLOEXEC);
    if (io < 0) die("/dev/null");
    if (dup2(io, 0) < 0 || dup2(io, 1) < 0) die("dup2");
    /* stderr: the kernel log (rate limited by the kernel), which QEMU writes to console.log. */
    if (dup2(kmsg >= 0 ? kmsg : open("/dev/null", O_WRONLY), 2) < 0) die("dup2");
    struct rlimit nofile = {4096, 4096}, procs = {nproc, nproc};
    if (setrlimit(RLIMIT_NOFILE, &nofile) != 0 || setrlimit(RLIMIT_NPROC, &procs) != 0)
        die("setrlimit");
    if (setgroups(0, NULL) != 0 || setgid(SANDBOX_ID) != 0 || setuid(SANDBOX_ID) != 0)
        die("dropping privileges");
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) die("no_new_privs");
    if (chdir("/workspace") != 0 && chdir("/") != 0) die("chdir");
    execve(argv[0], argv, envp);
    die(argv[0]);
}

int main(void) {
    mount_or_die("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
    kmsg = open("/dev/kmsg", O_WRONLY | O_CLOEXEC);
    mount_or_die("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    mount_or_die("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    read_file("/proc/cmdline", cmdline, sizeof cmdline);
    load_modules("/modules/order");
    /* The file system sharing modules only where there are shares: each costs boot time. */
    if (access("/mounts", F_OK) == 0) load_modules("/modules/order.shares");

    int port = vsock_channel() ? -1 : open_port();
    if (param_long("sandstorm.probe", 0)) {
        /* KVM probe: the VM booted and reached user space; say so (where there is a port to
         * say it on) and stop. */
        if (port >= 0 && write(port, "sandstorm-probe-ok\n", 19) < 0) die("probe");
        halt_vm();
    }

    wait_for("/dev/vda");
    mount_or_die("/dev/vda", "/ro", "ext4", MS_RDONLY | MS_NOSUID | MS_NODEV, "noload");
    char opts[128];
    /* Writes land in guest memory, bounded: a full overlay gives ENOSPC, not a dead guest. */
    snprintf(opts, sizeof opts, "size=%ld,mode=0755", param_long("sandstorm.overlay", 64L << 20));
    mount_or_die("tmpfs", "/rw", "tmpfs", MS_NOSUID | MS_NODEV, opts);
    mkdir("/rw/upper", 0755);
    mkdir("/rw/work", 0755);
    mount_or_die("overlay", "/newroot", "overlay", MS_NOSUID | MS_NODEV,
                 "lowerdir=/ro,upperdir=/rw/upper,workdir=/rw/work");
    /* The agent (from the initramfs) read-only at /.sandstorm, as gVisor bind-mounts it. */
    mount_or_die("/agent", "/newroot/.sandstorm", NULL, MS_BIND, NULL);
    if (mount(NULL, "/newroot/.sandstorm", NULL,
              MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL) != 0)
        die("remount /.sandstorm");
    mount_shares();
    set_up_host_identity();
    if (mount("/dev", "/newroot/dev", NULL, MS_MOVE, NULL) != 0) die("move /dev");
    umount2("/sys", MNT_DETACH);
    umount2("/proc", MNT_DETACH);

    static char *argv[64], *envp[64];
    read_launch(argv, envp, 64);
    long nproc = param_long("sandstorm.nproc", 256);

    if (chdir("/newroot") != 0 || mount(".", "/", NULL, MS_MOVE, NULL) != 0 || chroot(".") != 0 ||
        chdir("/") != 0)
        die("switching root");
    mount_or_die("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    mount_or_die("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=1777");

    pid_t agent = fork();
    if (agent < 0) die("fork");
    if (agent == 0) start_agent(port, argv, envp, nproc);
    if (port >= 0) close(port);
    for (;;) {
        int status;
        pid_t pid = wait(&status);
        if (pid == agent || (pid < 0 && errno == ECHILD)) break;
    }
    halt_vm();
    return 0;
}
