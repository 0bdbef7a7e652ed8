/*
 * The python zygote (see "Python zygote" in protocol/agent.md): a pre-started interpreter
 * (guest/zygote.py, next to bin/) whose standbys become python execs. The agent starts it when
 * idle, hands a python exec it can serve straight to its standby, falls back to a normal exec
 * when a standby was stopped before it started, and replaces a zygote that dies or misbehaves.
 */
#include "agent.h"

#define ZYGOTE_PYTHON "/usr/bin/python3"
#define ZYGOTE_IDLE_S 0.2 /* started once the agent has idled this long: never on the cold path */
#define ZYGOTE_LATEST_S 1.0 /* ... or this long after it was wanted, for a sandbox never idle */
#define ZYGOTE_START_S 2.0 /* a zygote exec not started by then is checked: stopped or not */
#define ZYGOTE_MAX_FAILURES 5 /* early deaths in a row before the agent stops restarting it */
#define ZYGOTE_MAX_SOURCE (1024 * 1024)
#define FD_COUNT 4 /* an exec's pipes passed to a standby: stdin_r, stdout_w, stderr_w, err_w */
/* What the gateway gives every exec (BASE_ENV in sandstorm/actors/planning.py): the zygote's
 * environment. A python exec is served by the zygote only if every variable python reads at
 * start-up has the same value. */
static const char *const ZYGOTE_ENV[] = {
    "PATH=" DEFAULT_PATH, "HOME=/workspace", "LANG=C.UTF-8", "PYTHONUNBUFFERED=1", NULL,
};

static bool zygote_enabled = true;
static pid_t zygote_pid, zygote_standby;
static int zygote_sock = -1;
static int standby_sock = -1; /* to the standby: it takes an exec's pipes from the agent */
static int zygote_failures;
static double zygote_due, zygote_latest;
static char *zygote_source;
static char zygote_path[PATH_MAX];

static bool zygote_wanted(void) {
    return zygote_enabled && zygote_sock < 0 && zygote_failures < ZYGOTE_MAX_FAILURES;
}

/* Activity postpones the zygote's start (it would compete for the CPU), up to a limit. */
void zygote_busy(void) {
    if (zygote_sock < 0) {
        double later = monotonic() + ZYGOTE_IDLE_S;
        if (later > zygote_latest)
            later = zygote_latest;
        if (later > zygote_due)
            zygote_due = later;
    }
}

/* The standby is no longer the zygote's to replace (it took an exec, or it is gone): the zygote
 * forks the next one ("U"), by the same rules as after a request (protocol/agent.md). */
static void standby_released(void) {
    if (standby_sock >= 0) {
        close(standby_sock);
        standby_sock = -1;
    }
    zygote_standby = 0;
    if (zygote_sock >= 0 && send(zygote_sock, "U", 1, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) {
        /* full or gone: the quiet timer still refills it, and a gone zygote is seen at once */
    }
}

/* The zygote died, closed its socket, broke the protocol or was found stopped (`failed`), or a
 * checkpoint is coming (not failed): kill it and its standby, and start a new one later. Execs
 * the standbys already took are execs: not touched. */
static void zygote_gone(bool failed) {
    if (zygote_sock >= 0) {
        close(zygote_sock);
        zygote_sock = -1;
    }
    if (standby_sock >= 0) {
        close(standby_sock);
        standby_sock = -1;
    }
    /* Each leads its own group; both are our children, not reaped yet. */
    if (zygote_pid)
        kill(-zygote_pid, SIGKILL);
    if (zygote_standby)
        kill(-zygote_standby, SIGKILL);
    if (zygote_pid && failed)
        zygote_failures++; /* reset by every exec it serves */
    zygote_pid = zygote_standby = 0;
    zygote_due = monotonic() + ZYGOTE_IDLE_S * (double)(1 << zygote_failures);
    zygote_latest = zygote_due + ZYGOTE_LATEST_S;
}

static bool read_zygote_source(void) {
    int fd = open(zygote_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return false;
    struct buf b = {0};
    char data[16384];
    for (;;) {
        ssize_t n = read(fd, data, sizeof data);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            close(fd);
            buf_free(&b);
            return false;
        }
        if (n == 0)
            break;
        if (b.len + (size_t)n > ZYGOTE_MAX_SOURCE) {
            close(fd);
            buf_free(&b);
            return false;
        }
        buf_add(&b, data, (size_t)n);
    }
    close(fd);
    buf_add(&b, "", 1);
    if (strlen(b.data) != b.len - 1) {
        buf_free(&b);
        return false;
    }
    zygote_source = b.data;
    return true;
}

static void start_zygote(void) {
    if (!zygote_source && !read_zygote_source()) {
        zygote_enabled = false;
        return;
    }
    int pair[2], null_pipe[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) < 0)
        goto failed;
    if (pipe2(null_pipe, O_CLOEXEC) < 0) {
        close(pair[0]);
        close(pair[1]);
        goto failed;
    }
    /* Its stdout and stderr lead nowhere (it never writes there); its failure to start shows
     * as its death. */
    char *argv[] = {ZYGOTE_PYTHON, "-c", zygote_source, NULL};
    char *cands[] = {ZYGOTE_PYTHON, NULL};
    struct spawn_args a = {
        .candidates = cands,
        .argv = argv,
        .env = (char **)ZYGOTE_ENV,
        .cwd = "/",
        .fds = {pair[1], null_pipe[1], null_pipe[1]},
    };
    pid_t pid = spawn(&a);
    close(pair[1]);
    close(null_pipe[0]);
    close(null_pipe[1]);
    if (pid < 0) {
        close(pair[0]);
        goto failed;
    }
    set_nonblocking(pair[0]);
    zygote_pid = pid;
    zygote_sock = pair[0];
    return;
failed:
    zygote_failures++;
    zygote_due = monotonic() + ZYGOTE_IDLE_S * (double)(1 << zygote_failures);
}

/* QUIESCE, before a checkpoint: the zygote and its standby are two python processes that would
 * more than double the snapshot (and its time). The gateway follows with a PING, so its PONG says
 * they are killed. The zygote starts again once idle, as always. */
void quiesce(void) {
    if (zygote_sock >= 0 || zygote_pid)
        zygote_gone(false);
}

/* Whether a process is stopped (SIGSTOP and the like, by code in the sandbox). */
static bool process_stopped(pid_t pid) {
    char path[64], data[512];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return false;
    ssize_t n = read(fd, data, sizeof data - 1);
    close(fd);
    if (n <= 0)
        return false;
    data[n] = 0;
    const char *end = strrchr(data, ')'); /* the name, in parentheses, can hold anything */
    return end && end[1] == ' ' && (end[2] == 'T' || end[2] == 't');
}

/* A zygote exec whose standby was stopped before it started (none of the user's code ran): kill
 * it and run the exec as a normal one, with the input and signals it was sent. */
static void zygote_fallback(struct exec *ex) {
    kill(-ex->pid, SIGKILL); /* reaped later as a pid no exec has */
    ex->pending.off += ex->request_left; /* the request's unwritten rest: not input */
    ex->request_left = 0;
    ex->zygote = false; /* not held any more */
    close_output(ex, STDOUT);
    close_output(ex, STDERR);
    if (ex->start_fd >= 0) {
        close(ex->start_fd);
        ex->start_fd = -1;
    }
    if (ex->stdin_fd >= 0) {
        close(ex->stdin_fd);
        ex->stdin_fd = -1;
    }
    start_exec(ex->channel, ex->request, ex);
}

/* What a zygote exec reads from its stdin before anything else: length, then cwd, argc, argv
 * and env NUL-separated (none of them can hold a NUL). */
static void zygote_request(struct exec *ex) {
    struct request *r = ex->request;
    struct buf body = {0};
    buf_str(&body, r->cwd);
    buf_add(&body, "", 1);
    buf_printf(&body, "%d", r->argc);
    for (int i = 0; i < r->argc; i++) {
        buf_add(&body, "", 1);
        buf_str(&body, r->argv[i]);
    }
    for (int i = 0; i < r->envc; i++) {
        buf_add(&body, "", 1);
        buf_str(&body, r->env[i]);
    }
    size_t size = buf_size(&body);
    unsigned char length[4] = {(unsigned char)(size >> 24), (unsigned char)(size >> 16),
                               (unsigned char)(size >> 8), (unsigned char)size};
    buf_free(&ex->pending);
    buf_add(&ex->pending, length, 4);
    buf_add(&ex->pending, body.data, size);
    buf_free(&body);
    ex->request_left = 4 + size;
}

/* "S<pid>" with the agent's end of a socket to that standby (SCM_RIGHTS): the zygote's only
 * message. Anything else, or a second standby while the agent has one, is a broken zygote. */
void zygote_message(void) {
    char message[33];
    char cbuf[CMSG_SPACE(sizeof(int))];
    struct iovec iov = {message, sizeof message - 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
                         .msg_controllen = sizeof cbuf};
    ssize_t n = recvmsg(zygote_sock, &msg, MSG_CMSG_CLOEXEC);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    int fd = -1;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); n > 0 && cm; cm = CMSG_NXTHDR(&msg, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
            continue;
        size_t count = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < count; i++) {
            int received;
            memcpy(&received, CMSG_DATA(cm) + i * sizeof(int), sizeof received);
            if (fd < 0)
                fd = received;
            else
                close(received);
        }
    }
    message[n > 0 ? n : 0] = 0;
    char *end;
    errno = 0;
    long pid = n > 1 && message[0] == 'S' ? strtol(message + 1, &end, 10) : -1;
    bool valid = pid > 0 && pid <= INT_MAX && !errno && !*end && fd >= 0 && !zygote_standby &&
                 !(msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC));
    if (!valid) {
        if (fd >= 0)
            close(fd);
        zygote_gone(true); /* EOF, or not the protocol */
        return;
    }
    zygote_standby = (pid_t)pid;
    standby_sock = fd;
}

/* A python exec served by the standby: the agent passes it the exec's pipes itself, with the
 * request already in its stdin, so it goes ahead at once. False if the standby cannot take them
 * (it is gone): the caller runs a normal exec. */
static bool spawn_on_standby(uint32_t channel, struct request *r) {
    int fds[8];
    if (exec_pipes(fds, 4))
        return false;
    pid_t pid = zygote_standby;
    int passed[FD_COUNT] = {fds[0], fds[3], fds[5], fds[7]};
    char cbuf[CMSG_SPACE(sizeof passed)];
    memset(cbuf, 0, sizeof cbuf);
    char x = 'x';
    struct iovec iov = {&x, 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
                         .msg_controllen = sizeof cbuf};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof passed);
    memcpy(CMSG_DATA(cm), passed, sizeof passed);
    ssize_t sent;
    do {
        sent = sendmsg(standby_sock, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    } while (sent < 0 && errno == EINTR);
    standby_released();
    if (sent < 0) {
        kill(-pid, SIGKILL); /* it closed its socket: not a standby any more */
        for (int k = 0; k < 8; k++)
            close(fds[k]);
        return false;
    }
    zygote_failures = 0;
    struct exec *ex = exec_new(channel);
    ex->request = r;
    ex->started = monotonic();
    ex->zygote = true;
    ex->deadline = ex->started + ZYGOTE_START_S;
    track(ex, pid, fds);
    exec_link(ex);
    zygote_request(ex);
    flush_stdin(ex);
    return true;
}

/* The variables python reads while starting (locale, user site via HOME, PYTHON*). */
static bool startup_variable(const char *item) {
    return strncmp(item, "HOME=", 5) == 0 || strncmp(item, "LANG=", 5) == 0 ||
           strncmp(item, "PYTHON", 6) == 0 || strncmp(item, "LC_", 3) == 0;
}

/* True for exactly the python command lines the zygote reproduces: `python3 -c CODE [args]` and
 * `python3 FILE [args]` resolving to the zygote's interpreter, with the zygote's start-up
 * environment. Everything else is a normal exec. */
static bool zygote_can_serve(const struct request *r) {
    if (r->argc < 2)
        return false;
    const char *base = strrchr(r->argv[0], '/');
    base = base ? base + 1 : r->argv[0];
    if (strcmp(base, "python3") != 0)
        return false;
    if (strcmp(r->argv[1], "-c") == 0) {
        if (r->argc < 3)
            return false;
    } else if (!r->argv[1][0] || r->argv[1][0] == '-') {
        return false; /* other flags, or "-" (stdin) */
    }
    int theirs = 0, ours = 0;
    for (int i = 0; i < r->envc; i++) {
        if (!startup_variable(r->env[i]))
            continue;
        theirs++;
        bool same = false;
        for (const char *const *z = ZYGOTE_ENV; *z; z++)
            same |= strcmp(*z, r->env[i]) == 0;
        if (!same)
            return false;
    }
    for (const char *const *z = ZYGOTE_ENV; *z; z++)
        ours += startup_variable(*z);
    if (theirs != ours)
        return false;
    /* The interpreter execvpe would run, and the sys.executable python would compute. */
    char **cands = candidates(r->argv[0], r->env);
    bool result = false;
    for (char **c = cands; *c; c++) {
        struct stat st;
        if (stat(*c, &st) == 0 && S_ISREG(st.st_mode) && access(*c, X_OK) == 0) {
            result = strcmp(*c, ZYGOTE_PYTHON) == 0;
            break;
        }
    }
    free_list(cands);
    return result;
}

/* A zygote exec not started after ZYGOTE_START_S: its standby may be slow (a large program to
 * compile), left alone, or stopped by code in the sandbox before it started, so none of the
 * user's code ran: then it runs as a normal exec, and a stopped zygote is replaced. */
static void check_held(struct exec *ex, double now) {
    bool stopped = process_stopped(ex->pid);
    check_start(ex); /* after: a process already stopped cannot start in between */
    if (!held(ex))
        return;
    if (!stopped) {
        ex->deadline = now + ZYGOTE_START_S;
        return;
    }
    if (zygote_pid && process_stopped(zygote_pid))
        zygote_gone(true);
    zygote_fallback(ex);
}

void zygote_tick(void) {
    double now = monotonic();
    for (struct exec *ex = execs, *next; ex; ex = next) {
        next = ex->next; /* a failed fallback frees ex */
        if (held(ex) && now >= ex->deadline)
            check_held(ex, now);
    }
    if (zygote_wanted() && !execs && now >= zygote_due)
        /* Never while an exec runs: on a loaded host the zygote's start would take CPU from
         * that exec, for execs that may never come. */
        start_zygote();
}

/* The zygote's state at the agent's start: zygote.py is found next to the directory of the
 * agent's own binary (bin/), and SANDSTORM_ZYGOTE=0 in the agent's environment turns it off. */
void zygote_init(const char *self) {
    const char *setting = getenv("SANDSTORM_ZYGOTE");
    zygote_enabled = !(setting && strcmp(setting, "0") == 0);
    const char *slash = strrchr(self, '/');
    size_t dir_len = slash ? (size_t)(slash - self) : 0;
    while (dir_len > 0 && self[dir_len - 1] != '/')
        dir_len--; /* the parent of bin/ */
    if (slash && dir_len > 0 && dir_len + sizeof "zygote.py" < sizeof zygote_path) {
        memcpy(zygote_path, self, dir_len);
        memcpy(zygote_path + dir_len, "zygote.py", sizeof "zygote.py");
    } else {
        zygote_enabled = false;
    }
    double now = monotonic();
    zygote_due = now + ZYGOTE_IDLE_S;
    zygote_latest = now + ZYGOTE_LATEST_S;
}

void zygote_disable(void) { zygote_enabled = false; }

/* Serves a python exec on the standby if the zygote reproduces it and a standby is ready; false
 * leaves it to the caller, as a normal exec. */
bool zygote_take(uint32_t channel, struct request *r) {
    if (zygote_sock < 0 || !zygote_can_serve(r))
        return false;
    if (standby_sock >= 0 && spawn_on_standby(channel, r))
        return true;
    /* No standby: execs came together, or the zygote cannot fork one (stopped by code in the
     * sandbox: then it is replaced, as a dead one is). */
    if (zygote_pid && process_stopped(zygote_pid))
        zygote_gone(true);
    return false;
}

/* An exec is over (reaped). One the zygote served competes with the next standby no more: "R"
 * has the zygote fork it now, ready for an exec that follows, rather than after its quiet time. */
void zygote_exec_finished(bool served) {
    zygote_busy();
    if (served && zygote_sock >= 0 && send(zygote_sock, "R", 1, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) {
        /* full or gone: the quiet timer still refills it, and a gone zygote is seen at once */
    }
}

/* A reaped pid that was the zygote's or its standby's (true), or another. */
bool zygote_reaped(pid_t pid) {
    if (pid == zygote_pid) {
        zygote_gone(true);
        return true;
    }
    if (pid == zygote_standby) {
        standby_released(); /* reaped: its pid may be reused, never to be killed */
        return true;
    }
    return false;
}

/* The socket to the zygote (its messages are read by zygote_message), or -1. */
int zygote_fd(void) { return zygote_sock; }

/* When the zygote next needs attention (its start, a held exec's check), or -1. */
double zygote_next_due(void) {
    double due = -1;
    if (zygote_wanted() && !execs)
        due = zygote_due;
    for (struct exec *ex = execs; ex; ex = ex->next)
        if (held(ex) && (due < 0 || ex->deadline < due))
            due = ex->deadline;
    return due;
}

/* The agent is going: SIGKILL to the zygote's group and its standby's. */
void zygote_kill(void) {
    if (zygote_pid)
        kill(-zygote_pid, SIGKILL);
    if (zygote_standby)
        kill(-zygote_standby, SIGKILL);
}
