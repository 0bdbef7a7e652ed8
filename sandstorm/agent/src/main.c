/* PID 1's loop: HELLO, one poll over the gateway, the children's pipes and the zygote, reaping
 * every child, and the shutdown when the gateway goes. */
#include "agent.h"

/* Signals the agent blocks for good: code in the sandbox runs as the agent's user and could
 * otherwise end PID 1 (and with it the sandbox) by a plain `kill 1`; SIGPIPE and SIGXFSZ make a
 * write fail (EPIPE, EFBIG) instead. Blocked rather than ignored: a child's empty signal mask is
 * then all it takes to give it every default (one system call, not one per signal). */
static const int BLOCKED_SIGNALS[] = {
    SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM,
    SIGTSTP, SIGTTIN, SIGTTOU, SIGVTALRM, SIGPROF, SIGPIPE, SIGXFSZ,
};

static int wake_r = -1, wake_w = -1;

static void reap(void) {
    for (;;) {
        int status;
        struct rusage usage;
        pid_t pid = wait4(-1, &status, WNOHANG, &usage);
        if (pid < 0 && errno == EINTR)
            continue;
        if (pid <= 0)
            return;
        if (zygote_reaped(pid))
            continue;
        struct exec *ex = exec_by_pid(pid);
        if (ex)
            finish(ex, status, &usage);
        /* any other pid is an orphan we inherited as PID 1: reaped, nothing else to do */
    }
}

static void on_sigchld(int sig) {
    (void)sig;
    int saved = errno;
    char byte = 0;
    if (write(wake_w, &byte, 1) < 0) {
        /* full: a wake-up is already pending */
    }
    errno = saved;
}

static void drain_wakeups(void) {
    char data[256];
    while (read(wake_r, data, sizeof data) > 0) {
    }
}

/* How long a child's exit can go unseen while execs run. A SIGCHLD can be lost: gVisor drops a
 * signal once the user's pending signals reach RLIMIT_SIGPENDING, and the agent shares its user
 * with the sandbox's code, which can queue that many. So the loop also reaps on this timer. */
#define REAP_INTERVAL_MS 250

/* Milliseconds until the loop must run without an event: the next sweep, the reaping timer, the
 * zygote (its start, a held exec's check), a watch's flush or a transfer's idle check; 0 while a
 * transfer has data and credit to send; -1 for none. */
static int poll_timeout(void) {
    int ms = -1;
    if (sweeping())
        ms = SWEEP_INTERVAL_MS;
    else if (execs)
        ms = REAP_INTERVAL_MS;
    if (transfers_ready())
        return 0;
    double dues[] = {zygote_next_due(), watch_next_due(), transfers_next_due()};
    for (size_t i = 0; i < sizeof dues / sizeof *dues; i++) {
        if (dues[i] < 0)
            continue;
        double left = (dues[i] - monotonic()) * 1000.0;
        int due_ms = left <= 0 ? 0 : (int)left + 1;
        if (ms < 0 || due_ms < ms)
            ms = due_ms;
    }
    return ms;
}

enum slot_kind {
    SLOT_GATEWAY, SLOT_WAKE, SLOT_ZYGOTE, SLOT_STDOUT, SLOT_STDERR, SLOT_START, SLOT_STDIN,
    SLOT_WATCH,
};

struct slot {
    enum slot_kind kind;
    uint32_t channel;
    int fd;
};

static struct pollfd *pfds;
static struct slot *slots;
static size_t slots_cap;

static size_t add_slot(size_t n, enum slot_kind kind, uint32_t channel, int fd, short events) {
    if (n == slots_cap) {
        slots_cap = slots_cap ? slots_cap * 2 : 64;
        pfds = xrealloc(pfds, slots_cap * sizeof *pfds);
        slots = xrealloc(slots, slots_cap * sizeof *slots);
    }
    pfds[n] = (struct pollfd){.fd = fd, .events = events};
    slots[n] = (struct slot){kind, channel, fd};
    return n + 1;
}

static void run(void) {
    reap(); /* children inherited before the handler was installed */
    while (!gateway_gone) {
        size_t n = 0;
        n = add_slot(n, SLOT_GATEWAY, 0, 0, POLLIN);
        n = add_slot(n, SLOT_WAKE, 0, wake_r, POLLIN);
        if (zygote_fd() >= 0)
            n = add_slot(n, SLOT_ZYGOTE, 0, zygote_fd(), POLLIN);
        int watch_fd[MAX_WATCHES];
        uint32_t watch_channel[MAX_WATCHES];
        int nwatch = watch_fds(watch_fd, watch_channel, MAX_WATCHES);
        for (int i = 0; i < nwatch; i++)
            n = add_slot(n, SLOT_WATCH, watch_channel[i], watch_fd[i], POLLIN);
        for (struct exec *ex = execs; ex; ex = ex->next) {
            if (ex->stdout_fd >= 0)
                n = add_slot(n, SLOT_STDOUT, ex->channel, ex->stdout_fd, POLLIN);
            if (ex->stderr_fd >= 0)
                n = add_slot(n, SLOT_STDERR, ex->channel, ex->stderr_fd, POLLIN);
            if (ex->start_fd >= 0)
                n = add_slot(n, SLOT_START, ex->channel, ex->start_fd, POLLIN);
            if (stdin_writable(ex))
                n = add_slot(n, SLOT_STDIN, ex->channel, ex->stdin_fd, POLLOUT);
        }
        int ready = poll(pfds, n, poll_timeout());
        if (ready < 0 && errno != EINTR)
            break;
        zygote_tick();
        watch_tick();
        pump_transfers();
        if (sweeping())
            sweep();
        if (ready == 0 && (execs || sweeping()))
            reap(); /* the timer: a SIGCHLD may have been lost */
        if (ready <= 0)
            continue;
        for (size_t i = 0; i < n && !gateway_gone; i++) {
            if (!pfds[i].revents)
                continue;
            struct slot *s = &slots[i];
            if (s->kind == SLOT_GATEWAY) {
                if (!read_gateway())
                    return;
                continue;
            }
            if (s->kind == SLOT_WAKE) {
                drain_wakeups();
                reap();
                continue;
            }
            if (s->kind == SLOT_ZYGOTE) {
                if (zygote_fd() == s->fd)
                    zygote_message();
                continue;
            }
            if (s->kind == SLOT_WATCH) {
                watch_read(s->channel); /* a watch stopped earlier in this batch: ignored */
                continue;
            }
            /* Something earlier in this batch may have finished the exec or closed the fd. */
            struct exec *ex = exec_by_channel(s->channel);
            if (!ex)
                continue;
            if (s->kind == SLOT_STDIN) {
                if (ex->stdin_fd == s->fd)
                    flush_stdin(ex);
            } else if (s->kind == SLOT_START) {
                if (ex->start_fd == s->fd)
                    check_start(ex);
            } else {
                int kind = s->kind == SLOT_STDOUT ? STDOUT : STDERR;
                if ((kind == STDOUT ? ex->stdout_fd : ex->stderr_fd) != s->fd)
                    continue;
                /* Output means the child has exec'd, so its start pipe is at EOF: settle
                 * STARTED first, keeping STARTED before any output. */
                if (ex->start_fd >= 0)
                    check_start(ex);
                forward_output(ex, kind);
            }
        }
    }
}

/* Gateway gone: kill every exec's process group, reap briefly, return. */
static void shutdown_all(void) {
    kill_exec_groups();
    zygote_kill();
    double deadline = monotonic() + 0.5;
    for (;;) {
        bool leaders = false;
        for (struct exec *ex = execs; ex; ex = ex->next)
            leaders |= ex->pid != 0;
        if (!leaders || monotonic() >= deadline)
            break;
        pid_t pid = wait4(-1, NULL, WNOHANG, NULL);
        if (pid < 0 && errno == ECHILD)
            break;
        if (pid <= 0) {
            struct timespec ts = {0, 5 * 1000 * 1000};
            nanosleep(&ts, NULL);
            continue;
        }
        for (struct exec *ex = execs; ex; ex = ex->next)
            if (ex->pid == pid)
                ex->pid = 0;
    }
    while (wait4(-1, NULL, WNOHANG, NULL) > 0) {
    } /* whatever else already exited */
}

/* Marks the descriptors inherited from the parent (above 2) close-on-exec: children get 0-2. */
static void close_inherited_on_exec(void) {
    DIR *dir = opendir("/proc/self/fd");
    if (!dir)
        return;
    int own = dirfd(dir);
    struct dirent *entry;
    while ((entry = readdir(dir))) {
        char *end;
        long fd = strtol(entry->d_name, &end, 10);
        if (*end || end == entry->d_name || fd <= 2 || fd == own)
            continue;
        int flags = fcntl((int)fd, F_GETFD);
        if (flags >= 0)
            fcntl((int)fd, F_SETFD, flags | FD_CLOEXEC);
    }
    closedir(dir);
}

int main(int argc, char **argv) {
    (void)argc;
    /* Readiness first: the gateway waits for HELLO, so send it before anything else. */
    char hello[96];
    int len = snprintf(hello, sizeof hello, "{\"protocol\":%d,\"pid\":%d,\"agent\":\"c\"}",
                       PROTOCOL_VERSION, (int)getpid());
    sigset_t blocked;
    sigemptyset(&blocked);
    for (size_t i = 0; i < sizeof BLOCKED_SIGNALS / sizeof *BLOCKED_SIGNALS; i++)
        sigaddset(&blocked, BLOCKED_SIGNALS[i]);
    sigprocmask(SIG_BLOCK, &blocked, NULL); /* before HELLO: a closed fd 1 is EPIPE, not death */
    send_frame(HELLO, 0, hello, (size_t)len);
    /* Those it blocks may have come ignored from its parent (nohup, a shell's trap): children
     * must get them at their default, and an ignored signal survives execve. Once per sandbox,
     * after HELLO; blocked, they still never reach the agent itself. */
    struct sigaction dfl = {.sa_handler = SIG_DFL};
    for (size_t i = 0; i < sizeof BLOCKED_SIGNALS / sizeof *BLOCKED_SIGNALS; i++)
        sigaction(BLOCKED_SIGNALS[i], &dfl, NULL);
    if (gateway_gone)
        return 1;
    close_inherited_on_exec();
    /* A pipe must never land on 0-2, where a child's dup2 would clobber it. */
    for (int fd = 0; fd <= 2; fd++)
        if (fcntl(fd, F_GETFD) < 0 && open("/dev/null", O_RDWR) < 0)
            return 1;
    int wake[2];
    if (pipe2(wake, O_CLOEXEC | O_NONBLOCK) < 0)
        return 1;
    wake_r = wake[0], wake_w = wake[1];
    struct sigaction child = {.sa_handler = on_sigchld, .sa_flags = SA_RESTART};
    sigemptyset(&child.sa_mask);
    sigaction(SIGCHLD, &child, NULL);
    if (getpid() != 1)
        /* Outside a sandbox (tests): orphans, zygote execs among them, must still be ours. */
        prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    zygote_init(argv[0] ? argv[0] : "");
    run();
    shutdown_all();
    return 0;
}
