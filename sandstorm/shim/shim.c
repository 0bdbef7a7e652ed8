/*
 * The per-sandbox shim: it holds one runtime process's stdio so the sandbox outlives the gateway
 * (the idea of containerd-shim and of podman's conmon, which is C for the same reason: it starts
 * with every sandbox, so its start-up is on the cold path).
 *
 *     sandstorm-shim-<hash> DIR JOURNAL_MAX FD -- RUNTIME_ARGV...
 *
 * Started by the gateway (sandstorm/shim/process.py, which compiles this file once per source
 * hash: sandstorm/shim/build.py) in a session of its own, with its listening Unix socket already
 * bound as FD. It spawns the runtime with the environment and limits it inherited, appends every
 * byte of the runtime's stdout to a journal of segment files under DIR, and serves one gateway
 * connection at a time: the journal from the offset the gateway asks for (replay and live are
 * one path), the gateway's agent frames to the runtime's stdin verbatim. The wire format and the
 * rules are protocol/shim.md; the numbers below are sandstorm/shim/wire.py's, which a test
 * compares.
 *
 * Everything is bounded: at most one incoming frame, at most STDIN_MAX bytes queued for the
 * runtime, at most JOURNAL_MAX unacknowledged journal bytes (then stdout is no longer read:
 * back-pressure into the sandbox). It never blocks on the gateway: one poll loop, every
 * descriptor but the journal files non-blocking.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define HEADER_SIZE 9 /* !BII: kind, channel, length */
#define OFFSET_SIZE 8 /* !Q */
#define ATTACHED_SIZE 37 /* !IIQQQBi */
#define RESERVED 0xE0 /* frame kinds at or above it belong to the shim */
#define ATTACH 0xE0
#define ACK 0xE1
#define STOP 0xE2
#define KILL 0xE3
#define ATTACHED_KIND 0xF0
#define MAX_FRAME (1024 * 1024)
#define STDIN_MAX (16 * 1024 * 1024)
#define READ_SIZE 65536
/* The runtime's pipes hold this much (F_SETPIPE_SZ; the kernel's 64 KiB where it refuses): a
 * runtime writing large frames (a download's 256 KiB) then blocks, and wakes the shim, far less
 * often, which is most of what bulk data costs on its way through. No larger: a pipe's pages
 * count against the memory cgroup of its writer, the sandbox for stdout. */
#define PIPE_SIZE (256 * 1024)
#define SEND_SIZE (1024 * 1024)
#define EXIT_DRAIN_S 5.0
#define LINGER_S 10.0
#define ATTACH_WAIT_S 10.0

extern char **environ;

/* A byte buffer with a consumed head, bounded by its users. */
struct buffer {
    unsigned char *data;
    size_t head, len, cap;
};

static size_t buffered(const struct buffer *b) { return b->len - b->head; }

static void consume(struct buffer *b, size_t n) {
    b->head += n;
    if (b->head == b->len) b->head = b->len = 0;
}

static void append(struct buffer *b, const void *data, size_t n) {
    if (b->head > 0 && b->len + n > b->cap) {
        memmove(b->data, b->data + b->head, b->len - b->head);
        b->len -= b->head;
        b->head = 0;
    }
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n) cap *= 2;
        unsigned char *grown = realloc(b->data, cap);
        if (grown == NULL) {
            fprintf(stderr, "sandstorm-shim: out of memory\n");
            exit(70);
        }
        b->data = grown;
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, n);
    b->len += n;
}

static void clear(struct buffer *b) { b->head = b->len = 0; }

struct segment {
    uint64_t start, end;
    int fd;
};

static struct {
    const char *dir;
    uint64_t journal_max, segment_size;
    struct segment *segments;
    size_t nsegments, segments_cap;
    uint64_t written, acked, sent;
    /* Read from the runtime but not journaled yet: the disk refused it (full, I/O error). */
    unsigned char unwritten[READ_SIZE];
    size_t unwritten_head, unwritten_len;
    int disk_error;
    int listener, conn;
    struct buffer conn_in, conn_out, stdin_out;
    int attached;
    double conn_since, progress;
    int stop_pending;
    int stdin_w, stdout_r;
    pid_t pid;
    int pidfd;
    int exited; /* reaped: status is valid */
    int status;
    int exit_recorded;
    double drain_until;
} S;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void put32(unsigned char *p, uint32_t v) {
    for (int i = 3; i >= 0; i--, v >>= 8) p[i] = (unsigned char)v;
}

static void put64(unsigned char *p, uint64_t v) {
    for (int i = 7; i >= 0; i--, v >>= 8) p[i] = (unsigned char)v;
}

static uint32_t get32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t get64(const unsigned char *p) {
    return (uint64_t)get32(p) << 32 | get32(p + 4);
}

/* DIR/name (and a suffix) into out; -1 (ENAMETOOLONG) when it does not fit. */
static int path_in_dir(char *out, size_t size, const char *name, const char *suffix) {
    int n = snprintf(out, size, "%s/%s%s", S.dir, name, suffix);
    if (n < 0 || (size_t)n >= size) {
        errno = ENAMETOOLONG;
        return -1;
    }
    return 0;
}

/* Write DIR/name whole, through a temporary file renamed into place (atomic for a reader). */
static int write_atomically(const char *name, const char *text) {
    char path[4096], tmp[4096];
    if (path_in_dir(path, sizeof path, name, "") < 0 || path_in_dir(tmp, sizeof tmp, name, ".tmp") < 0)
        return -1;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return -1;
    size_t len = strlen(text);
    ssize_t n = write(fd, text, len);
    int saved = errno;
    if (close(fd) < 0 && n == (ssize_t)len) {
        n = -1;
        saved = errno;
    }
    if (n != (ssize_t)len) {
        unlink(tmp);
        errno = n < 0 ? saved : ENOSPC;
        return -1;
    }
    return rename(tmp, path);
}

/* ------------------------------------------------------------------ journal */

static uint64_t first_offset(void) {
    return S.nsegments ? S.segments[0].start : S.written;
}

static int new_segment(void) {
    char name[64], path[4096];
    snprintf(name, sizeof name, "journal.%020" PRIu64, S.written);
    if (path_in_dir(path, sizeof path, name, "") < 0) return -1;
    int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) return -1;
    if (S.nsegments == S.segments_cap) {
        size_t cap = S.segments_cap ? S.segments_cap * 2 : 8;
        struct segment *grown = realloc(S.segments, cap * sizeof *grown);
        if (grown == NULL) {
            close(fd);
            unlink(path);
            errno = ENOMEM;
            return -1;
        }
        S.segments = grown;
        S.segments_cap = cap;
    }
    S.segments[S.nsegments++] = (struct segment){S.written, S.written, fd};
    return 0;
}

/* Append what was read to the journal. A disk that refuses it (ENOSPC, EIO) must not kill the
 * sandbox: the bytes are kept, stdout is not read meanwhile (the sandbox waits, as on a full
 * pipe), and the write is retried from the loop. */
static void write_journal(void) {
    while (S.unwritten_len > 0) {
        struct segment *seg = S.nsegments ? &S.segments[S.nsegments - 1] : NULL;
        ssize_t n = -1;
        if (seg == NULL || seg->end - seg->start >= S.segment_size) {
            if (new_segment() == 0) seg = &S.segments[S.nsegments - 1];
            else seg = NULL;
        }
        if (seg != NULL) n = write(seg->fd, S.unwritten + S.unwritten_head, S.unwritten_len);
        if (n < 0) {
            if (!S.disk_error)
                fprintf(stderr, "sandstorm-shim: journal write failed, will retry: %s\n",
                        strerror(errno));
            S.disk_error = 1;
            return;
        }
        seg->end += (uint64_t)n;
        S.written += (uint64_t)n;
        S.unwritten_head += (size_t)n;
        S.unwritten_len -= (size_t)n;
    }
    S.unwritten_head = 0;
    if (S.disk_error) {
        fprintf(stderr, "sandstorm-shim: journal writable again\n");
        S.disk_error = 0;
    }
}

static void read_stdout(void) {
    ssize_t n = read(S.stdout_r, S.unwritten, READ_SIZE);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
    if (n <= 0) {
        close(S.stdout_r);
        S.stdout_r = -1;
        return;
    }
    S.unwritten_head = 0;
    S.unwritten_len = (size_t)n;
    write_journal();
}

static void acknowledge(uint64_t offset) {
    /* Nobody can hold more than it was sent: a larger offset is capped, never trusted. */
    uint64_t cap = S.attached ? S.sent : S.written;
    uint64_t capped = offset < cap ? offset : cap;
    if (capped > S.acked) S.acked = capped;
    /* Whole segments only, and never the one being written. */
    size_t dropped = 0;
    while (S.nsegments - dropped > 1 && S.segments[dropped].end <= S.acked) {
        char name[64], path[4096];
        snprintf(name, sizeof name, "journal.%020" PRIu64, S.segments[dropped].start);
        close(S.segments[dropped].fd);
        if (path_in_dir(path, sizeof path, name, "") == 0) unlink(path);
        dropped++;
    }
    if (dropped) {
        S.nsegments -= dropped;
        memmove(S.segments, S.segments + dropped, S.nsegments * sizeof *S.segments);
    }
}

static int stdout_wanted(void) {
    if (S.stdout_r < 0 || S.unwritten_len > 0) return 0;
    uint64_t unacked = S.written - S.acked;
    /* The runtime is gone: what is left in the pipe is bounded by its capacity. */
    if (S.exited) return unacked < S.journal_max + 4 * READ_SIZE;
    return unacked < S.journal_max;
}

/* ------------------------------------------------------------------ the gateway connection */

static void drop_conn(void) {
    if (S.conn >= 0) close(S.conn);
    S.conn = -1;
    clear(&S.conn_in);
    clear(&S.conn_out);
    S.attached = 0;
}

static void accept_conn(void) {
    int fd = accept4(S.listener, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) return;
    /* A new connection replaces the old one: a restarted gateway reattaches. */
    drop_conn();
    S.conn = fd;
    S.conn_since = now();
    S.progress = S.conn_since;
}

static int conn_wants_write(void) {
    return buffered(&S.conn_out) > 0 || (S.attached && S.sent < S.written);
}

static void flush_conn(void) {
    if (S.conn < 0) return;
    while (buffered(&S.conn_out) > 0) {
        ssize_t n = send(S.conn, S.conn_out.data + S.conn_out.head, buffered(&S.conn_out),
                         MSG_NOSIGNAL);
        if (n < 0) {
            if (errno != EAGAIN && errno != EINTR) drop_conn();
            return;
        }
        consume(&S.conn_out, (size_t)n);
    }
    while (S.attached && S.sent < S.written) {
        struct segment *seg = NULL;
        for (size_t i = 0; i < S.nsegments; i++)
            if (S.segments[i].start <= S.sent && S.sent < S.segments[i].end) {
                seg = &S.segments[i];
                break;
            }
        if (seg == NULL) return;
        uint64_t count = seg->end - S.sent;
        if (count > SEND_SIZE) count = SEND_SIZE;
        off_t from = (off_t)(S.sent - seg->start);
        ssize_t n = sendfile(S.conn, seg->fd, &from, (size_t)count);
        if (n < 0) {
            if (errno != EAGAIN && errno != EINTR) drop_conn();
            return;
        }
        if (n == 0) return;
        S.sent += (uint64_t)n;
        S.progress = now();
    }
}

static void attach(uint64_t offset) {
    uint64_t first = first_offset();
    int exited = S.exit_recorded;
    unsigned char reply[HEADER_SIZE + ATTACHED_SIZE], *p = reply + HEADER_SIZE;
    reply[0] = ATTACHED_KIND;
    put32(reply + 1, 0);
    put32(reply + 5, ATTACHED_SIZE);
    put32(p, (uint32_t)getpid());
    put32(p + 4, (uint32_t)S.pid);
    put64(p + 8, first);
    put64(p + 16, offset);
    put64(p + 24, S.written);
    p[32] = (unsigned char)exited;
    put32(p + 33, (uint32_t)(exited ? S.status : 0));
    append(&S.conn_out, reply, sizeof reply);
    if (offset < first || offset > S.written) {
        /* Gone already, or never written: the gateway reads the reason from the reply. */
        flush_conn();
        drop_conn();
        return;
    }
    S.attached = 1;
    S.sent = offset;
    /* Asking from an offset says everything before it is durable on the gateway's side. */
    acknowledge(offset);
}

static void kill_runtime(void) {
    if (!S.exited) kill(S.pid, SIGKILL); /* not reaped yet, so the pid is still ours */
}

static void frame(unsigned kind, const unsigned char *whole, size_t size) {
    const unsigned char *payload = whole + HEADER_SIZE;
    size_t length = size - HEADER_SIZE;
    if (!S.attached) {
        if (kind == ATTACH && length == OFFSET_SIZE) attach(get64(payload));
        else drop_conn();
    } else if (kind == ACK && length == OFFSET_SIZE) {
        acknowledge(get64(payload));
    } else if (kind == STOP) {
        S.stop_pending = 1;
    } else if (kind == KILL) {
        kill_runtime();
    } else if (kind >= RESERVED) {
        drop_conn();
    } else if (S.stdin_w >= 0 && !S.stop_pending) {
        append(&S.stdin_out, whole, size);
    }
}

static void parse_frames(void) {
    while (S.conn >= 0 && buffered(&S.conn_in) >= HEADER_SIZE) {
        const unsigned char *head = S.conn_in.data + S.conn_in.head;
        unsigned kind = head[0];
        uint32_t length = get32(head + 5);
        if (length > MAX_FRAME) {
            drop_conn();
            return;
        }
        size_t end = HEADER_SIZE + (size_t)length;
        if (buffered(&S.conn_in) < end) return;
        if (kind < RESERVED && S.attached && buffered(&S.stdin_out) >= STDIN_MAX)
            return; /* wait for the runtime to take its stdin; the socket is not read meanwhile */
        consume(&S.conn_in, end);
        /* consume() keeps the bytes in place until the next append: still readable here, and
         * frame() only appends to other buffers (or drops this one, which is then not read). */
        frame(kind, head, end);
    }
}

static void read_conn(short revents) {
    size_t room = HEADER_SIZE + MAX_FRAME - buffered(&S.conn_in);
    if (buffered(&S.conn_in) >= HEADER_SIZE + MAX_FRAME) {
        if (revents & (POLLHUP | POLLERR)) drop_conn();
        return;
    }
    unsigned char chunk[READ_SIZE];
    ssize_t n = recv(S.conn, chunk, room < READ_SIZE ? room : READ_SIZE, 0);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
    if (n <= 0) {
        drop_conn();
        return;
    }
    append(&S.conn_in, chunk, (size_t)n);
}

/* Close the connection after taking what the gateway sent (closing a Unix socket with unread
 * data would turn the end of the stream into ECONNRESET on its side). */
static void close_conn(void) {
    if (S.conn < 0) return;
    unsigned char chunk[READ_SIZE];
    for (int i = 0; i < 64; i++) /* bounded: a gateway that keeps sending is cut off anyway */
        if (recv(S.conn, chunk, sizeof chunk, 0) <= 0) break;
    drop_conn();
}

/* ------------------------------------------------------------------ the runtime */

static void flush_stdin(void) {
    if (S.stdin_w < 0) {
        clear(&S.stdin_out);
        return;
    }
    while (buffered(&S.stdin_out) > 0) {
        ssize_t n = write(S.stdin_w, S.stdin_out.data + S.stdin_out.head, buffered(&S.stdin_out));
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) return;
            clear(&S.stdin_out); /* the runtime closed its stdin: nobody will read it */
            break;
        }
        consume(&S.stdin_out, (size_t)n);
    }
    if (S.stop_pending || S.exited) {
        close(S.stdin_w);
        S.stdin_w = -1;
    }
}

static void reap(void) {
    int wstatus;
    pid_t pid = waitpid(S.pid, &wstatus, WNOHANG);
    if (pid == 0) return;
    if (pid < 0) wstatus = 255 << 8;
    /* The subprocess convention: the exit code, or -N for signal N. */
    S.status = WIFSIGNALED(wstatus) ? -WTERMSIG(wstatus) : WEXITSTATUS(wstatus);
    S.exited = 1;
    close(S.pidfd);
    S.pidfd = -1;
    S.drain_until = now() + EXIT_DRAIN_S;
}

static int record_exit(void) {
    char text[32];
    snprintf(text, sizeof text, "%d\n", S.status);
    if (write_atomically("exit", text) < 0) {
        fprintf(stderr, "sandstorm-shim: cannot record the exit status yet: %s\n",
                strerror(errno));
        return 0;
    }
    S.exit_recorded = 1;
    if (S.stdin_w >= 0) {
        close(S.stdin_w);
        S.stdin_w = -1;
    }
    return 1;
}

/* ------------------------------------------------------------------ the loop */

static int done(double t) {
    if (!S.exited) return 0;
    if (!S.exit_recorded) {
        if ((S.stdout_r >= 0 || S.unwritten_len > 0) && t < S.drain_until) return 0;
        if (S.unwritten_len > 0 || !record_exit()) return 0; /* the disk refuses it for now */
        S.progress = t;
    }
    /* Deliver the rest to a connected gateway; a stalled or silent one is not waited for. */
    if (S.conn < 0 || t - S.progress > LINGER_S) return 1;
    if (!S.attached) return t - S.conn_since > ATTACH_WAIT_S;
    return !conn_wants_write();
}

static void run(void) {
    for (;;) {
        if (S.unwritten_len > 0) write_journal();
        if (done(now())) return;
        struct pollfd fds[5];
        int n = 0;
        fds[n++] = (struct pollfd){S.listener, POLLIN, 0};
        if (stdout_wanted()) fds[n++] = (struct pollfd){S.stdout_r, POLLIN, 0};
        if (S.pidfd >= 0) fds[n++] = (struct pollfd){S.pidfd, POLLIN, 0};
        if (S.stdin_w >= 0 && buffered(&S.stdin_out) > 0)
            fds[n++] = (struct pollfd){S.stdin_w, POLLOUT, 0};
        if (S.conn >= 0) {
            short events = conn_wants_write() ? POLLOUT : 0;
            if (buffered(&S.conn_in) < HEADER_SIZE + MAX_FRAME) events |= POLLIN;
            fds[n++] = (struct pollfd){S.conn, events, 0};
        }
        int timeout = -1;
        if (S.exited || (S.conn >= 0 && !S.attached)) timeout = 200; /* the exit deadlines */
        if (S.unwritten_len > 0) timeout = 500; /* retry the journal write */
        if (poll(fds, (nfds_t)n, timeout) < 0 && errno != EINTR) {
            fprintf(stderr, "sandstorm-shim: poll: %s\n", strerror(errno));
            exit(70);
        }
        for (int i = 0; i < n; i++) {
            if (!fds[i].revents) continue;
            int fd = fds[i].fd;
            if (fd == S.pidfd) reap();
            else if (fd == S.stdout_r) read_stdout();
            else if (fd == S.stdin_w) flush_stdin();
            else if (fd == S.listener) accept_conn();
            else if (S.conn >= 0 && fd == S.conn) read_conn(fds[i].revents);
        }
        if (S.conn >= 0) parse_frames(); /* also frames held back while stdin was full */
        if (buffered(&S.stdin_out) > 0 || S.stop_pending) flush_stdin();
        int silent = now() - S.conn_since > ATTACH_WAIT_S;
        if (S.conn >= 0 && !S.attached && !S.exited && silent) drop_conn();
        flush_conn();
    }
}

static int parse_number(const char *text, long long max, long long *out) {
    char *end;
    errno = 0;
    long long value = strtoll(text, &end, 10);
    if (errno || end == text || *end || value < 0 || value > max) return -1;
    *out = value;
    return 0;
}

static int set_flag(int fd, int get, int set, int flag, int on) {
    int flags = fcntl(fd, get);
    if (flags < 0) return -1;
    return fcntl(fd, set, on ? flags | flag : flags & ~flag);
}

int main(int argc, char **argv) {
    long long journal_max, listen_fd;
    if (argc < 6 || strcmp(argv[4], "--") != 0 || parse_number(argv[2], INT64_MAX, &journal_max)
        || parse_number(argv[3], 1 << 20, &listen_fd)) {
        fprintf(stderr, "usage: sandstorm-shim DIR JOURNAL_MAX FD -- RUNTIME_ARGV...\n");
        return 2;
    }
    /* Errors, not deaths: a gateway gone mid-send is EPIPE; a file-size limit is EFBIG, which
     * the journal treats as a full disk. The runtime gets both back at their defaults. */
    signal(SIGPIPE, SIG_IGN);
    signal(SIGXFSZ, SIG_IGN);
    S.dir = argv[1];
    S.journal_max = (uint64_t)journal_max;
    S.segment_size = S.journal_max / 4;
    if (S.segment_size > 4 * 1024 * 1024) S.segment_size = 4 * 1024 * 1024;
    if (S.segment_size < READ_SIZE) S.segment_size = READ_SIZE;
    S.conn = -1;
    /* Inherited from the gateway; the runtime must not inherit it in turn. */
    S.listener = (int)listen_fd;
    if (set_flag(S.listener, F_GETFD, F_SETFD, FD_CLOEXEC, 1) < 0
        || set_flag(S.listener, F_GETFL, F_SETFL, O_NONBLOCK, 1) < 0) {
        fprintf(stderr, "sandstorm-shim: listening socket %d: %s\n", S.listener, strerror(errno));
        return 1;
    }
    int stdin_pipe[2], stdout_pipe[2];
    if (pipe2(stdin_pipe, O_CLOEXEC) < 0 || pipe2(stdout_pipe, O_CLOEXEC) < 0) {
        fprintf(stderr, "sandstorm-shim: pipe: %s\n", strerror(errno));
        return 1;
    }
    /* The runtime gets the pipes as fds 0 and 1 and the shim's own stderr (its log). */
    posix_spawn_file_actions_t actions;
    posix_spawnattr_t attr;
    sigset_t defaults;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, stdin_pipe[0], 0);
    posix_spawn_file_actions_adddup2(&actions, stdout_pipe[1], 1);
    posix_spawnattr_init(&attr);
    sigemptyset(&defaults);
    sigaddset(&defaults, SIGPIPE);
    sigaddset(&defaults, SIGXFSZ);
    posix_spawnattr_setsigdefault(&attr, &defaults);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGDEF);
    char **runtime_argv = argv + 5;
    int err = posix_spawn(&S.pid, runtime_argv[0], &actions, &attr, runtime_argv, environ);
    posix_spawn_file_actions_destroy(&actions);
    posix_spawnattr_destroy(&attr);
    if (err) {
        fprintf(stderr, "sandstorm-shim: cannot start %s: %s\n", runtime_argv[0], strerror(err));
        return 1;
    }
    close(stdin_pipe[0]);
    close(stdout_pipe[1]);
    fcntl(stdin_pipe[1], F_SETPIPE_SZ, PIPE_SIZE);
    fcntl(stdout_pipe[0], F_SETPIPE_SZ, PIPE_SIZE);
    S.stdin_w = stdin_pipe[1];
    S.stdout_r = stdout_pipe[0];
    S.pidfd = (int)syscall(SYS_pidfd_open, S.pid, 0);
    char pids[64];
    snprintf(pids, sizeof pids, "%d %d\n", (int)getpid(), (int)S.pid);
    if (S.pidfd < 0 || set_flag(S.pidfd, F_GETFD, F_SETFD, FD_CLOEXEC, 1) < 0
        || set_flag(S.stdin_w, F_GETFL, F_SETFL, O_NONBLOCK, 1) < 0
        || set_flag(S.stdout_r, F_GETFL, F_SETFL, O_NONBLOCK, 1) < 0
        /* Who holds this sandbox, for a later gateway. */
        || write_atomically("pid", pids) < 0) {
        fprintf(stderr, "sandstorm-shim: cannot start: %s\n", strerror(errno));
        kill(S.pid, SIGKILL); /* nothing may outlive a shim that cannot hold it */
        waitpid(S.pid, NULL, 0);
        return 1;
    }
    run();
    close_conn();
    return 0;
}
