/* An exec's life, from its EXEC to its EXIT: the table of running execs and used channels, its
 * stdin, its output, its start report (STARTED or ERROR) and its end. */
#include "agent.h"

struct exec *execs;
static uint32_t *used_channels; /* sorted */
static size_t used_count, used_cap;
static pid_t *finished_pgids; /* background execs' groups: they may still hold processes */
static size_t finished_count, finished_cap;
struct swept {
    pid_t pgid;
    double until; /* then the group is left for the shutdown's kill (remember_group) */
};
static struct swept *swept; /* finished execs' groups that are being emptied */
static size_t swept_count, swept_cap;

struct exec *exec_new(uint32_t channel) {
    struct exec *ex = xmalloc(sizeof *ex);
    memset(ex, 0, sizeof *ex);
    ex->channel = channel;
    ex->stdin_fd = ex->stdout_fd = ex->stderr_fd = ex->start_fd = -1;
    ex->oom_kills = oom_kill_count(); /* before the process exists */
    return ex;
}

void exec_link(struct exec *ex) {
    ex->next = execs;
    ex->prev = NULL;
    if (execs)
        execs->prev = ex;
    execs = ex;
}

static void exec_unlink(struct exec *ex) {
    if (ex->prev)
        ex->prev->next = ex->next;
    else if (execs == ex)
        execs = ex->next;
    if (ex->next)
        ex->next->prev = ex->prev;
    ex->next = ex->prev = NULL;
}

static void exec_free(struct exec *ex) {
    buf_free(&ex->pending);
    buf_free(&ex->start_error);
    request_free(ex->request);
    free(ex);
}

struct exec *exec_by_channel(uint32_t channel) {
    for (struct exec *ex = execs; ex; ex = ex->next)
        if (ex->channel == channel)
            return ex;
    return NULL;
}

struct exec *exec_by_pid(pid_t pid) {
    for (struct exec *ex = execs; ex; ex = ex->next)
        if (ex->pid == pid)
            return ex;
    return NULL;
}

static bool channel_used(uint32_t channel) {
    size_t lo = 0, hi = used_count;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (used_channels[mid] == channel)
            return true;
        if (used_channels[mid] < channel)
            lo = mid + 1;
        else
            hi = mid;
    }
    return false;
}

static void channel_use(uint32_t channel) {
    if (used_count == used_cap) {
        used_cap = used_cap ? used_cap * 2 : 64;
        used_channels = xrealloc(used_channels, used_cap * sizeof *used_channels);
    }
    size_t at = used_count; /* the gateway counts up: almost always the end */
    while (at > 0 && used_channels[at - 1] > channel)
        at--;
    memmove(used_channels + at + 1, used_channels + at, (used_count - at) * sizeof *used_channels);
    used_channels[at] = channel;
    used_count++;
}

static void remember_group(pid_t pgid) {
    if (finished_count == finished_cap) {
        /* Forget the groups that are gone before growing: bounded by the groups alive. */
        size_t kept = 0;
        for (size_t i = 0; i < finished_count; i++)
            if (kill(-finished_pgids[i], 0) == 0 || errno == EPERM)
                finished_pgids[kept++] = finished_pgids[i];
        finished_count = kept;
        if (finished_count * 2 >= finished_cap) {
            finished_cap = finished_cap ? finished_cap * 2 : 64;
            finished_pgids = xrealloc(finished_pgids, finished_cap * sizeof *finished_pgids);
        }
    }
    finished_pgids[finished_count++] = pgid;
}

/* An exec is over and asked for nothing to outlive it: SIGKILL to its group now and, if the
 * group still has members, again on every pass of the loop (sweep) until it is empty. One
 * signal is not enough: a process forking as it lands can leave a child the signal missed (a
 * fork bomb does little else), and killed processes stay in the group until reaped. A group
 * that outlasts SWEEP_S (a process stuck in the kernel) is left to the shutdown's kill.
 * Processes that left the group (setsid, setpgid) are not the exec's any more and live on.
 * A swept group's id cannot be taken by a new group while it has members; between its last
 * reaping and the next pass the pid space would have to wrap around. */
static void sweep_group(pid_t pgid) {
    if (kill(-pgid, SIGKILL) < 0 && errno == ESRCH)
        return; /* nothing was left behind: the usual case */
    if (swept_count == swept_cap) {
        swept_cap = swept_cap ? swept_cap * 2 : 16;
        swept = xrealloc(swept, swept_cap * sizeof *swept);
    }
    swept[swept_count++] = (struct swept){pgid, monotonic() + SWEEP_S};
}

bool sweeping(void) {
    return swept_count > 0;
}

/* Another SIGKILL to each group being emptied; forgets those that are gone. */
void sweep(void) {
    size_t kept = 0;
    for (size_t i = 0; i < swept_count; i++) {
        if (kill(-swept[i].pgid, SIGKILL) < 0 && errno == ESRCH)
            continue;
        if (monotonic() >= swept[i].until)
            remember_group(swept[i].pgid);
        else
            swept[kept++] = swept[i];
    }
    swept_count = kept;
}

/* SIGKILL to the group of every exec, running or finished (background processes included). */
void kill_exec_groups(void) {
    for (size_t i = 0; i < finished_count; i++)
        kill(-finished_pgids[i], SIGKILL);
    for (size_t i = 0; i < swept_count; i++)
        kill(-swept[i].pgid, SIGKILL);
    for (struct exec *ex = execs; ex; ex = ex->next)
        kill(-ex->pid, SIGKILL);
}

static void close_stdin(struct exec *ex) {
    if (ex->stdin_fd < 0)
        return;
    close(ex->stdin_fd);
    ex->stdin_fd = -1;
    buf_free(&ex->pending);
}

/* A zygote exec its standby has not started yet (its start pipe still open): its user input
 * waits behind its request, kept for a normal exec should it fall back. */
bool held(const struct exec *ex) {
    return ex->zygote && ex->start_fd >= 0;
}

/* Whether pending input can be written now: a held exec takes only its request. */
bool stdin_writable(const struct exec *ex) {
    return ex->stdin_fd >= 0 && buf_size(&ex->pending) && (!held(ex) || ex->request_left);
}

/* Writes as much pending input as the pipe takes (the main loop polls for the rest). */
void flush_stdin(struct exec *ex) {
    while (stdin_writable(ex)) {
        size_t size = buf_size(&ex->pending);
        if (held(ex) && size > ex->request_left)
            size = ex->request_left;
        ssize_t n = write(ex->stdin_fd, ex->pending.data + ex->pending.off, size);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return;
            /* EPIPE: the child closed its stdin (or exited); the input is undeliverable. */
            close_stdin(ex);
            return;
        }
        ex->pending.off += (size_t)n;
        if (held(ex))
            ex->request_left -= (size_t)n;
    }
    if (ex->stdin_fd < 0 || buf_size(&ex->pending))
        return;
    ex->pending.off = ex->pending.len = 0;
    if (ex->close_requested)
        close_stdin(ex);
}

void close_output(struct exec *ex, int kind) {
    int *fd = kind == STDOUT ? &ex->stdout_fd : &ex->stderr_fd;
    if (*fd >= 0) {
        close(*fd);
        *fd = -1;
    }
}

static char chunk[READ_CHUNK];

void forward_output(struct exec *ex, int kind) {
    int fd = kind == STDOUT ? ex->stdout_fd : ex->stderr_fd;
    ssize_t n;
    do {
        n = read(fd, chunk, sizeof chunk);
    } while (n < 0 && errno == EINTR);
    if (n < 0 && errno == EAGAIN)
        return;
    if (n > 0)
        send_frame(kind, ex->channel, chunk, (size_t)n);
    else
        close_output(ex, kind);
}

/* Forwards what is buffered in a pipe now, without waiting for EOF. */
static void drain_output(struct exec *ex, int kind) {
    int fd = kind == STDOUT ? ex->stdout_fd : ex->stderr_fd;
    size_t budget = MAX_FINAL_DRAIN;
    while (budget > 0 && fd >= 0 && !gateway_gone) {
        ssize_t n = read(fd, chunk, budget < sizeof chunk ? budget : sizeof chunk);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        budget -= (size_t)n;
        send_frame(kind, ex->channel, chunk, (size_t)n);
    }
}

static void send_started(struct exec *ex) {
    struct buf b = {0};
    buf_printf(&b, "{\"pid\":%d,\"zygote\":%s}", (int)ex->pid, ex->zygote ? "true" : "false");
    send_json(STARTED, ex->channel, &b);
}

/* A process this agent started could not run the program: ERROR instead of STARTED (the child
 * exits 126 or 127 and is reaped like any other). */
static void report_start_failure(struct exec *ex, int stage, int error) {
    close_stdin(ex);
    const char *argv0 = ex->request->argv[0];
    if (stage == STAGE_CHDIR)
        send_error(ex->channel, "cannot change directory to %s: %s", ex->request->cwd,
                   strerror(error));
    else if (error == ENOENT || error == ENOTDIR)
        send_error(ex->channel, "%s: command not found", argv0);
    else
        send_error(ex->channel, "%s: %s", argv0, strerror(error));
}

/* A zygote exec's error pipe (close-on-exec in the exec's process): on EOF reports STARTED,
 * or the failure the process wrote there (ERROR). */
void check_start(struct exec *ex) {
    if (ex->start_fd < 0)
        return;
    char data[512];
    for (;;) {
        ssize_t n = read(ex->start_fd, data, sizeof data);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return; /* not decided yet */
        if (n <= 0)
            break;
        size_t room = MAX_START_ERROR - ex->start_error.len;
        buf_add(&ex->start_error, data, (size_t)n < room ? (size_t)n : room);
    }
    close(ex->start_fd);
    ex->start_fd = -1;
    if (ex->start_error.len) {
        /* No STARTED: the process exits 126/127 and is reaped like any other. */
        close_stdin(ex);
        send_error_bytes(ex->channel, ex->start_error.data, ex->start_error.len);
    } else {
        send_started(ex);
        flush_stdin(ex); /* the input that waited behind the request */
    }
}

static void send_exit_without_child(uint32_t channel) {
    struct buf b = {0};
    buf_printf(&b, "{\"exit_code\":%d,\"signal\":null,\"cpu_time_ms\":0.0,\"max_rss_bytes\":0,"
                   "\"duration_ms\":0.0}", EXIT_CANNOT_EXECUTE);
    send_json(EXIT, channel, &b);
}

void finish(struct exec *ex, int status, const struct rusage *usage) {
    double duration_ms = (monotonic() - ex->started) * 1000.0;
    /* The process is gone, so a zygote exec's error pipe is closed: settle STARTED / ERROR
     * before EXIT (the agent's own children reported theirs when clone returned). */
    check_start(ex);
    if (ex->stdout_fd >= 0)
        drain_output(ex, STDOUT);
    if (ex->stderr_fd >= 0)
        drain_output(ex, STDERR);
    struct buf b = {0};
    bool oom = false;
    if (WIFSIGNALED(status)) {
        int sig = WTERMSIG(status);
        oom = oom_killed(sig, ex->oom_kills);
        buf_printf(&b, "{\"exit_code\":null,\"signal\":%d", sig);
    } else {
        buf_printf(&b, "{\"exit_code\":%d,\"signal\":null", WEXITSTATUS(status));
    }
    double cpu_ms = (double)(usage->ru_utime.tv_sec + usage->ru_stime.tv_sec) * 1000.0 +
                    (double)(usage->ru_utime.tv_usec + usage->ru_stime.tv_usec) / 1000.0;
    long long rss = usage->ru_maxrss > 0 ? (long long)usage->ru_maxrss * 1024 : 0;
    buf_printf(&b, ",\"cpu_time_ms\":%.3f,\"max_rss_bytes\":%lld,\"duration_ms\":%.3f,"
                   "\"oom_killed\":%s}",
               cpu_ms, rss, duration_ms < 0 ? 0.0 : duration_ms, oom ? "true" : "false");
    send_json(EXIT, ex->channel, &b);
    exec_unlink(ex);
    zygote_exec_finished(ex->zygote);
    close_stdin(ex);
    close_output(ex, STDOUT);
    close_output(ex, STDERR);
    if (ex->start_fd >= 0)
        close(ex->start_fd);
    if (ex->request && ex->request->background)
        remember_group(ex->pid);
    else
        sweep_group(ex->pid);
    exec_free(ex);
}

/* Keeps the agent's ends of an exec's pipes (non-blocking) and closes the child's. */
void track(struct exec *ex, pid_t pid, const int fds[8]) {
    for (int i = 0; i < 8; i++) {
        if (fds[i] < 0)
            continue;
        if (i == 0 || i == 3 || i == 5 || i == 7) /* the child's: stdin_r, stdout_w, ... */
            close(fds[i]);
        else /* a new pipe has no other status flag: no F_GETFL needed */
            fcntl(fds[i], F_SETFL, O_NONBLOCK);
    }
    ex->pid = pid;
    ex->stdin_fd = fds[1];
    ex->stdout_fd = fds[2];
    ex->stderr_fd = fds[4];
    ex->start_fd = fds[6];
}

static void deliver_signals(struct exec *ex) {
    for (int i = 0; i < ex->nsignals; i++)
        kill(-ex->pid, ex->signals[i]);
    ex->nsignals = 0;
}

/* A normal exec; `ex` is an exec the zygote did not take (already linked), or NULL. */
void start_exec(uint32_t channel, struct request *r, struct exec *ex) {
    bool fresh = ex == NULL;
    if (fresh) {
        ex = exec_new(channel);
        ex->request = r;
        ex->started = monotonic();
    }
    int fds[8];
    int failed = exec_pipes(fds, 3);
    char **cands = NULL;
    pid_t pid = 0;
    struct spawn_args a = {0};
    if (!failed) {
        cands = candidates(r->argv[0], r->env);
        a.candidates = cands;
        a.argv = r->argv;
        a.env = r->env;
        a.cwd = r->cwd;
        a.fds[0] = fds[0], a.fds[1] = fds[3], a.fds[2] = fds[5];
        pid = spawn(&a);
        free_list(cands);
        if (pid < 0) {
            failed = (int)pid;
            for (int k = 0; k < 8; k++)
                if (fds[k] >= 0)
                    close(fds[k]);
        }
    }
    if (failed) {
        if (failed == -EAGAIN) /* clone's: the sandbox is at its process limit */
            send_error(channel, "cannot start process: the sandbox has as many processes as "
                                "its pids limit allows");
        else
            send_error(channel, "cannot start process: %s", strerror(-failed));
        send_exit_without_child(channel);
        if (!fresh)
            exec_unlink(ex);
        exec_free(ex);
        return;
    }
    track(ex, pid, fds);
    /* The child has exec'd (or exited): STARTED or the failure now, before any output. */
    if (a.failed_stage != STAGE_NONE)
        report_start_failure(ex, a.failed_stage, a.failed_errno);
    else
        send_started(ex);
    if (fresh) {
        exec_link(ex);
        return;
    }
    /* A fallback from a stopped standby: the input it held back and the signals it was sent go
     * to this process; its duration counts from the request. */
    deliver_signals(ex);
    flush_stdin(ex);
    if (ex->close_requested && ex->stdin_fd >= 0 && !buf_size(&ex->pending))
        close_stdin(ex);
}

void on_exec(uint32_t channel, const char *payload, size_t n) {
    if (channel == 0) {
        send_error(0, "EXEC on channel 0 is not allowed");
        return;
    }
    if (channel_used(channel)) {
        if (exec_by_channel(channel))
            send_error(channel, "channel %" PRIu32 " is already in use", channel);
        else
            send_error(0, "channel %" PRIu32 " was already used", channel);
        return;
    }
    channel_use(channel);
    char error[512];
    bool last = false;
    struct request *r = parse_exec(payload, n, &last, error, sizeof error);
    if (!r) {
        send_error(channel, "invalid EXEC request: %s", error);
        send_exit_without_child(channel);
        return;
    }
    if (last)
        zygote_disable(); /* the gateway ends the sandbox after this exec */
    zygote_busy();
    if (!zygote_take(channel, r))
        start_exec(channel, r, NULL);
}

void on_stdin(uint32_t channel, const char *payload, size_t n) {
    struct exec *ex = exec_by_channel(channel);
    if (!ex || ex->stdin_fd < 0 || ex->close_requested || n == 0)
        return; /* unknown, finished or closed: ignored (the gateway validates) */
    size_t pending = buf_size(&ex->pending);
    size_t room = MAX_STDIN_PENDING > pending ? MAX_STDIN_PENDING - pending : 0;
    if (n > room) {
        n = room;
        send_error(channel, "stdin buffer full");
    }
    if (n == 0)
        return;
    buf_add(&ex->pending, payload, n);
    if (!pending)
        flush_stdin(ex);
}

void on_stdin_close(uint32_t channel) {
    struct exec *ex = exec_by_channel(channel);
    if (!ex || ex->stdin_fd < 0)
        return;
    ex->close_requested = true;
    if (!buf_size(&ex->pending))
        close_stdin(ex);
}

void on_signal(uint32_t channel, const char *payload, size_t n) {
    char error[128];
    struct jval *root = json_parse(payload, n, error, sizeof error);
    if (!root) {
        send_error(0, "malformed SIGNAL payload: %s", error);
        return;
    }
    struct jval *sig = root->type == J_OBJ ? jget(root, "signal") : NULL;
    bool valid = sig && sig->type == J_INT && !sig->huge && sig->integer > 0 && sig->integer < 65;
    int signum = valid ? (int)sig->integer : 0;
    jfree(root);
    if (!valid) {
        send_error(0, "SIGNAL needs {\"signal\": 1..64}, got %.*s", (int)(n > 200 ? 200 : n),
                   payload);
        return;
    }
    struct exec *ex = exec_by_channel(channel);
    if (!ex)
        return; /* unknown or finished exec: ignored */
    if (kill(-ex->pid, signum) < 0 && errno != ESRCH)
        send_error(channel, "cannot send signal %d: %s", signum, strerror(errno));
    if (held(ex) && ex->nsignals < MAX_HELD_SIGNALS)
        ex->signals[ex->nsignals++] = signum; /* for the normal exec, should it fall back */
}
