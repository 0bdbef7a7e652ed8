/*
 * The in-sandbox agent: PID 1 of every sandbox, run as /.sandstorm/bin/sandstorm-agent-<hash>.
 *
 * Started by the runtime as the sandbox's only process, as an unprivileged user, cwd /workspace.
 * It speaks the framed protocol of protocol/agent.md: frames from the gateway on fd 0, frames to
 * the gateway on fd 1 (fd 2 is for diagnostics only). It runs every exec in its own process group
 * with fresh pipes, forwards their output as it comes, reaps every child (orphans included, as
 * PID 1), and keeps the python zygote (zygote.py, next to bin/) for python execs.
 *
 * It is C, compiled by the gateway once per hash of these sources (sandstorm/agent/build.py) and
 * linked statically, because it starts with every sandbox: it must need nothing of the image (no
 * interpreter, no C library) and cost next to nothing before the user's own program.
 *
 * One thread, one poll loop. Writes to the gateway block: a gateway that stops reading stops the
 * agent, which stops reading the pipes, which stops the children (back-pressure). Everything it
 * holds is bounded: one frame in (MAX_GATEWAY_FRAME), the stdin of an exec (MAX_STDIN_PENDING),
 * the final drain of a pipe (MAX_FINAL_DRAIN), the signals a held zygote exec keeps
 * (MAX_HELD_SIGNALS).
 *
 * The files, by concern: main.c (the poll loop, reaping, shutdown), frames.c (framing, dispatch),
 * json.c (JSON in and out), request.c (an EXEC's request), spawn.c (starting a process),
 * execs.c (an exec's life: pipes, output, EXIT), files.c (WRITE_FILE), fs.c (FS requests and
 * those answered at once), transfer.c (reads, walks and writes), watch.c (inotify watches),
 * oom.c (the kernel's OOM count), zygote.c (the python zygote), util.c (memory, buffers, UTF-8,
 * the clock).
 */
#ifndef SANDSTORM_AGENT_H
#define SANDSTORM_AGENT_H

#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PROTOCOL_VERSION 1
#define HEADER_SIZE 9 /* !BII: kind, channel, length */

/* Frame kinds (protocol/agent.md). */
#define HELLO 1
#define EXEC 2
#define STARTED 3
#define STDOUT 4
#define STDERR 5
#define STDIN 6
#define STDIN_CLOSE 7
#define SIGNAL 8
#define EXIT 9
#define PING 10
#define PONG 11
#define ERROR 12
#define WRITE_FILE 13
#define FILE_WRITTEN 14
#define QUIESCE 15
#define FS 16
#define FS_REPLY 17
#define FS_DATA 18
#define FS_END 19
#define FS_CREDIT 20
#define FS_EVENT 21

#define MAX_GATEWAY_FRAME (1024 * 1024) /* largest payload accepted from the gateway */
#define MAX_PING_PAYLOAD 64
#define READ_CHUNK (64 * 1024) /* child output is forwarded in chunks of at most this */
#define INPUT_CHUNK (256 * 1024) /* one read from fd 0 */
#define MAX_STDIN_PENDING (16 * 1024 * 1024) /* per exec; REST stdin is at most 8 MiB */
/* After the leader is reaped its pipes are drained without waiting for EOF (a background
 * grandchild may hold them open forever); this bounds the drain when one keeps writing. */
#define MAX_FINAL_DRAIN (4 * 1024 * 1024)
#define MAX_START_ERROR 4096
#define MAX_HELD_SIGNALS 64
#define MAX_JSON_DEPTH 64
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#define EXIT_NOT_FOUND 127
#define EXIT_CANNOT_EXECUTE 126

/* util.c: allocation that never fails (PID 1 without memory exits), buffers, UTF-8, the clock */

/* A growable byte buffer; `off` is where unconsumed data starts. */
struct buf {
    char *data;
    size_t len, cap, off;
};

double monotonic(void);
void *xmalloc(size_t size);
void *xrealloc(void *old, size_t size);
char *xstrndup(const char *s, size_t n);
void set_nonblocking(int fd);
void buf_reserve(struct buf *b, size_t extra);
void buf_add(struct buf *b, const void *data, size_t n);
void buf_str(struct buf *b, const char *s);
void buf_printf(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
size_t buf_size(const struct buf *b);
void buf_free(struct buf *b);
long utf8_decode(const unsigned char *s, size_t n, size_t *used);
void put_utf8(struct buf *b, long cp);

/* json.c: the JSON the gateway sends, parsed into a small tree; strings written as JSON */

enum jtype { J_NULL, J_FALSE, J_TRUE, J_INT, J_FLOAT, J_STR, J_ARR, J_OBJ };

struct jval {
    enum jtype type;
    long long integer;
    bool huge; /* an integer beyond long long: out of every range the agent accepts */
    char *str; /* J_STR: decoded UTF-8, NUL-terminated (may also hold NULs: see len) */
    size_t len;
    bool unencodable; /* a lone surrogate: not representable as bytes (Python's fsencode) */
    char *key; /* as a member of an object */
    size_t key_len;
    bool key_unencodable;
    struct jval *child, *next;
};

struct jval *json_parse(const char *data, size_t n, char *error, size_t error_size);
struct jval *jget(const struct jval *object, const char *name);
void jfree(struct jval *v);
void json_string(struct buf *b, const char *s, size_t n);

/* frames.c: frames to the gateway (blocking writes on fd 1) and from it (fd 0) */

extern bool gateway_gone; /* fd 1 is closed: nobody is listening any more */

void send_frame(int kind, uint32_t channel, const void *payload, size_t len);
void send_json(int kind, uint32_t channel, struct buf *json);
void send_error(uint32_t channel, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void send_error_bytes(uint32_t channel, const char *message, size_t n);
bool read_gateway(void);

/* request.c: an EXEC's request */

struct request {
    char **argv; /* NULL-terminated */
    int argc;
    char **env; /* "NAME=value", NULL-terminated, in the request's order, names unique */
    int envc;
    char *cwd;
    bool background; /* what the exec leaves behind runs on after it (see finish) */
};

struct request *parse_exec(const char *payload, size_t n, bool *last, char *error,
                           size_t error_size);
void request_free(struct request *r);
const char *env_get(char *const *env, const char *name);

/* spawn.c: starting a process */

enum { STAGE_NONE = 0, STAGE_CHDIR = 1, STAGE_EXEC = 2 };

struct spawn_args {
    char **candidates;
    char **argv;
    char **env;
    const char *cwd;
    int fds[3]; /* become 0, 1, 2 */
    /* Written by the child before it exits: the step that failed and its errno. */
    volatile int failed_stage;
    volatile int failed_errno;
};

pid_t spawn(struct spawn_args *a);
char **candidates(const char *file, char *const *env);
void free_list(char **list);
int exec_pipes(int fds[8], int count);

/* execs.c: an exec's life, from its EXEC to its EXIT */

struct exec {
    uint32_t channel;
    pid_t pid;
    double started;
    int stdin_fd, stdout_fd, stderr_fd;
    int start_fd; /* a zygote exec's error pipe, until it has started or failed */
    struct buf start_error;
    struct buf pending; /* stdin not yet written */
    bool close_requested;
    size_t request_left; /* bytes of `pending` that are still its request (zygote exec) */
    bool zygote;
    struct request *request; /* kept to report errors, and for a zygote fallback */
    double deadline; /* a held zygote exec: when to check whether its standby is stopped */
    int signals[MAX_HELD_SIGNALS]; /* sent while held: sent again if it falls back */
    int nsignals;
    long long oom_kills; /* the kernel's OOM-kill count before it started, or -1 */
    struct exec *next, *prev;
};

extern struct exec *execs; /* running execs (every channel with an EXIT still to send) */

struct exec *exec_new(uint32_t channel);
void exec_link(struct exec *ex);
struct exec *exec_by_channel(uint32_t channel);
struct exec *exec_by_pid(pid_t pid);
void track(struct exec *ex, pid_t pid, const int fds[8]);
bool held(const struct exec *ex);
bool stdin_writable(const struct exec *ex);
void flush_stdin(struct exec *ex);
void close_output(struct exec *ex, int kind);
void forward_output(struct exec *ex, int kind);
void check_start(struct exec *ex);
void finish(struct exec *ex, int status, const struct rusage *usage);
void start_exec(uint32_t channel, struct request *r, struct exec *ex);
void kill_exec_groups(void);
/* A finished exec's group gets its SIGKILL every SWEEP_INTERVAL_MS for up to SWEEP_S. */
#define SWEEP_INTERVAL_MS 10
#define SWEEP_S 2.0
bool sweeping(void);
void sweep(void);
void on_exec(uint32_t channel, const char *payload, size_t n);
void on_stdin(uint32_t channel, const char *payload, size_t n);
void on_stdin_close(uint32_t channel);
void on_signal(uint32_t channel, const char *payload, size_t n);

/* files.c: WRITE_FILE */

void on_write_file(uint32_t channel, const char *payload, size_t n);

/* fs.c, transfer.c, watch.c: FS requests (protocol/agent.md, "Files") */

#define FS_CHUNK (256 * 1024) /* most bytes in one FS_DATA to the gateway (its frame limit) */
#define MAX_CREDIT (64 * 1024 * 1024) /* most credit a transfer holds */
#define MAX_WALK_DEPTH 64
#define MAX_TREE_DEPTH 512 /* directories deep that a removal, a merge or a watch descends */
#define MAX_ENTRIES_PER_FRAME 4096
/* The longest entry in JSON: a path and a link target of PATH_MAX, every byte escaped. */
#define MAX_ENTRY_JSON (2 * PATH_MAX * 6 + 256)
#define TRANSFER_IDLE_S 300.0
#define MAX_WATCHES 16
#define MAX_WATCH_DIRS 4096
#define MAX_WATCH_EVENTS 256 /* per FS_EVENT frame, the overflow event included */
#define WATCH_FLUSH_MS 50

void on_fs(uint32_t channel, const char *payload, size_t n);
void fs_fail(uint32_t channel, int kind, int err, const char *path);
void fs_fail_named(uint32_t channel, int kind, const char *name, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
bool entry_json(struct buf *b, const char *path);
void entry_json_stat(struct buf *b, const char *path, const struct stat *st);
void fs_reply_entry(uint32_t channel, const char *path);
const char *field_path(const struct jval *root, const char *name);
bool field_bool(const struct jval *root, const char *name);
bool field_int(const struct jval *root, const char *name, long long low, long long high,
               long long fallback, long long *out);
int make_dirs(char *path, mode_t mode);
int remove_tree(const char *path);
void start_read(uint32_t channel, const struct jval *root);
void start_walk(uint32_t channel, const struct jval *root);
void start_write(uint32_t channel, const struct jval *root);
void on_fs_data(uint32_t channel, const char *payload, size_t n);
void on_fs_end(uint32_t channel, const char *payload, size_t n);
void on_fs_credit(uint32_t channel, const char *payload, size_t n);
bool transfers_ready(void);
void pump_transfers(void);
double transfers_next_due(void);
void start_watch(uint32_t channel, const struct jval *root);
void stop_watch(uint32_t channel);
int watch_fds(int *fds, uint32_t *channels, int max);
void watch_read(uint32_t channel);
double watch_next_due(void);
void watch_tick(void);

/* oom.c: the kernel's count of OOM kills */

long long oom_kill_count(void);
bool oom_killed(int sig, long long before);

/* zygote.c: the python zygote (see "Python zygote" in protocol/agent.md) */

void zygote_init(const char *self);
void zygote_disable(void);
void zygote_busy(void);
bool zygote_take(uint32_t channel, struct request *r);
void zygote_exec_finished(bool served);
bool zygote_reaped(pid_t pid);
int zygote_fd(void);
void zygote_message(void);
void zygote_tick(void);
double zygote_next_due(void);
void quiesce(void);
void zygote_kill(void);

#endif
