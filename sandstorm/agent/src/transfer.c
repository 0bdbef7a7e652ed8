/* FS requests that move data: read (a file to the gateway), list (a walk, to the gateway) and
 * write (from the gateway, into a new file renamed over the old one once complete).
 *
 * Towards the gateway a transfer sends only what the gateway has granted (FS_CREDIT), one frame
 * per transfer per turn of the loop, so a download never holds back exec output and a slow
 * consumer holds at most its window in the gateway. From the gateway a write takes each FS_DATA
 * as it comes; the stream's own bound (the shim, the pipe) is its back-pressure. A transfer the
 * gateway has left alone for TRANSFER_IDLE_S (it restarted mid-way, say) is dropped, and a write
 * so dropped leaves no file behind. */
#include "agent.h"

enum xfer_kind { XFER_READ, XFER_WALK, XFER_WRITE };

struct walk_level {
    DIR *dir;
    size_t path_len; /* the directory's path is path[0 .. path_len) */
};

struct xfer {
    enum xfer_kind kind;
    uint32_t channel;
    int fd;
    long long credit; /* bytes the gateway still accepts */
    double active;    /* last time the gateway sent anything for it */
    /* read */
    off_t pos;
    long long left;
    /* walk */
    struct walk_level levels[MAX_WALK_DEPTH + 1];
    int depth, max_depth;
    long long entries, max_entries;
    char path[PATH_MAX];
    /* write */
    char temp[PATH_MAX], target[PATH_MAX];
    mode_t mode;
    bool has_mtime;
    struct timespec mtime;
    struct xfer *next;
};

static struct xfer *xfers;
static bool walk_next_exists(struct xfer *x);
static char chunk[FS_CHUNK];

static struct xfer *xfer_new(enum xfer_kind kind, uint32_t channel) {
    struct xfer *x = xmalloc(sizeof *x);
    memset(x, 0, sizeof *x);
    x->kind = kind;
    x->channel = channel;
    x->fd = -1;
    x->active = monotonic();
    x->next = xfers;
    xfers = x;
    return x;
}

static struct xfer *xfer_find(uint32_t channel) {
    for (struct xfer *x = xfers; x; x = x->next)
        if (x->channel == channel)
            return x;
    return NULL;
}

/* Forgets a transfer; a write's temporary file is removed unless it was renamed. */
static void xfer_drop(struct xfer *x) {
    for (struct xfer **p = &xfers; *p; p = &(*p)->next)
        if (*p == x) {
            *p = x->next;
            break;
        }
    if (x->fd >= 0)
        close(x->fd);
    if (x->kind == XFER_WRITE && x->temp[0])
        unlink(x->temp);
    for (int i = 0; i <= x->depth && x->kind == XFER_WALK; i++)
        if (x->levels[i].dir)
            closedir(x->levels[i].dir);
    free(x);
}

static void send_end(struct xfer *x, int err, bool truncated) {
    if (err) {
        fs_fail(x->channel, FS_END, err, x->path);
    } else {
        char end[48];
        int n = snprintf(end, sizeof end, "{\"ok\":true,\"truncated\":%s}",
                         truncated ? "true" : "false");
        send_frame(FS_END, x->channel, end, (size_t)n);
    }
    xfer_drop(x);
}

/* ------------------------------------------------------------------ read */

void start_read(uint32_t channel, const struct jval *root) {
    const char *path = field_path(root, "path");
    long long offset, length, suffix, credit;
    if (!path || !field_int(root, "offset", 0, LLONG_MAX, 0, &offset) ||
        !field_int(root, "length", 0, LLONG_MAX, -1, &length) ||
        !field_int(root, "suffix", 0, LLONG_MAX, -1, &suffix) ||
        !field_int(root, "credit", 0, MAX_CREDIT, 0, &credit)) {
        fs_fail_named(channel, FS_REPLY, "EINVAL", "read needs an absolute path and a range");
        return;
    }
    /* O_NONBLOCK: opening a fifo must not wait for a writer (it is then refused below). */
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        fs_fail(channel, FS_REPLY, errno, path);
        if (fd >= 0)
            close(fd);
        return;
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        if (S_ISDIR(st.st_mode))
            fs_fail(channel, FS_REPLY, EISDIR, path);
        else
            fs_fail_named(channel, FS_REPLY, "EFTYPE", "not a regular file: %s", path);
        return;
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    long long size = (long long)st.st_size, start, count;
    if (suffix >= 0) {
        start = size > suffix ? size - suffix : 0;
        count = size - start;
    } else {
        start = offset < size ? offset : size;
        count = size - start;
        if (length >= 0 && length < count)
            count = length;
    }
    struct buf b = {0};
    buf_str(&b, "{\"ok\":true,\"entry\":");
    entry_json_stat(&b, path, &st);
    buf_printf(&b, ",\"offset\":%lld,\"length\":%lld}", start, count);
    send_json(FS_REPLY, channel, &b);
    struct xfer *x = xfer_new(XFER_READ, channel);
    snprintf(x->path, sizeof x->path, "%s", path);
    x->fd = fd;
    x->pos = (off_t)start;
    x->left = count;
    x->credit = credit;
    if (count == 0)
        send_end(x, 0, false);
}

static void pump_read(struct xfer *x) {
    size_t want = sizeof chunk;
    if ((long long)want > x->left)
        want = (size_t)x->left;
    if ((long long)want > x->credit)
        want = (size_t)x->credit;
    ssize_t n = pread(x->fd, chunk, want, x->pos);
    if (n < 0 && errno == EINTR)
        return;
    if (n < 0) {
        send_end(x, errno, false);
        return;
    }
    if (n == 0) { /* the file shrank: the gateway sees fewer bytes than announced */
        send_end(x, 0, false);
        return;
    }
    send_frame(FS_DATA, x->channel, chunk, (size_t)n);
    x->pos += n;
    x->left -= n;
    x->credit -= n;
    if (x->left == 0)
        send_end(x, 0, false);
}

/* ------------------------------------------------------------------ walk */

void start_walk(uint32_t channel, const struct jval *root) {
    const char *path = field_path(root, "path");
    long long depth, max_entries, credit;
    if (!path || !field_int(root, "depth", 0, MAX_WALK_DEPTH, 1, &depth) ||
        !field_int(root, "max_entries", 0, LLONG_MAX, 10000, &max_entries) ||
        !field_int(root, "credit", 0, MAX_CREDIT, 0, &credit)) {
        fs_fail_named(channel, FS_REPLY, "EINVAL", "list needs an absolute path and a depth");
        return;
    }
    DIR *dir = opendir(path);
    if (!dir) {
        fs_fail(channel, FS_REPLY, errno, path);
        return;
    }
    struct buf b = {0};
    buf_str(&b, "{\"ok\":true,\"entry\":");
    if (!entry_json(&b, path)) {
        int err = errno;
        buf_free(&b);
        closedir(dir);
        fs_fail(channel, FS_REPLY, err, path);
        return;
    }
    buf_str(&b, "}");
    send_json(FS_REPLY, channel, &b);
    struct xfer *x = xfer_new(XFER_WALK, channel);
    snprintf(x->path, sizeof x->path, "%s", strcmp(path, "/") == 0 ? "" : path);
    x->levels[0] = (struct walk_level){dir, strlen(x->path)};
    x->max_depth = (int)depth;
    x->max_entries = max_entries;
    x->credit = credit;
    if (depth == 0)
        send_end(x, 0, false);
}

/* The next entry of the walk into `b` (pre-order: a directory, then what it holds); false at
 * the end. Directories that cannot be read are listed, not entered. */
static bool walk_next(struct xfer *x, struct buf *b) {
    while (x->depth >= 0) {
        struct walk_level *level = &x->levels[x->depth];
        errno = 0;
        struct dirent *d = readdir(level->dir);
        if (!d) {
            closedir(level->dir);
            level->dir = NULL;
            x->depth--;
            continue;
        }
        if (strcmp(d->d_name, ".") == 0 || strcmp(d->d_name, "..") == 0)
            continue;
        size_t len = level->path_len;
        if (snprintf(x->path + len, sizeof x->path - len, "/%s", d->d_name) >=
            (int)(sizeof x->path - len))
            continue; /* beyond PATH_MAX: nothing could name it */
        struct stat st;
        if (lstat(x->path, &st) < 0)
            continue; /* gone since readdir */
        entry_json_stat(b, x->path, &st);
        if (S_ISDIR(st.st_mode) && x->depth + 1 < x->max_depth) {
            DIR *sub = opendir(x->path);
            if (sub) {
                x->depth++;
                x->levels[x->depth] = (struct walk_level){sub, strlen(x->path)};
            }
        }
        return true;
    }
    return false;
}

static void pump_walk(struct xfer *x) {
    struct buf b = {0};
    buf_str(&b, "{\"entries\":[");
    int count = 0;
    bool more = true;
    /* Room for one more entry of the longest kind (a path and a target of PATH_MAX, escaped)
     * stays in both the frame and the credit. */
    size_t room = (long long)FS_CHUNK < x->credit ? FS_CHUNK : (size_t)x->credit;
    while (count < MAX_ENTRIES_PER_FRAME && x->entries < x->max_entries &&
           buf_size(&b) + MAX_ENTRY_JSON <= room) {
        size_t mark = b.len;
        if (count)
            buf_add(&b, ",", 1);
        if (!walk_next(x, &b)) {
            b.len = mark;
            more = false;
            break;
        }
        count++;
        x->entries++;
    }
    buf_str(&b, "]}");
    if (count == 0 && more && x->entries < x->max_entries) {
        buf_free(&b); /* no credit for even one entry: wait for FS_CREDIT */
        return;
    }
    x->credit -= (long long)buf_size(&b);
    if (count)
        send_json(FS_DATA, x->channel, &b);
    else
        buf_free(&b);
    if (!more)
        send_end(x, 0, false);
    else if (x->entries >= x->max_entries)
        send_end(x, 0, walk_next_exists(x));
}

/* Whether the walk has anything left (asked once, at the entry limit). */
static bool walk_next_exists(struct xfer *x) {
    struct buf scratch = {0};
    bool found = walk_next(x, &scratch);
    buf_free(&scratch);
    return found;
}

/* ------------------------------------------------------------------ write */

void start_write(uint32_t channel, const struct jval *root) {
    const char *path = field_path(root, "path");
    long long mode, mtime_ns;
    if (!path || !field_int(root, "mode", 0, 07777, 0644, &mode) ||
        !field_int(root, "mtime_ns", 0, LLONG_MAX, -1, &mtime_ns)) {
        fs_fail_named(channel, FS_REPLY, "EINVAL", "write needs an absolute path and a mode");
        return;
    }
    struct xfer *x = xfer_new(XFER_WRITE, channel);
    x->mode = (mode_t)mode;
    /* A symlink at the path is followed: the file it names gets the new contents. */
    char resolved[PATH_MAX];
    struct stat st;
    if (lstat(path, &st) == 0 && S_ISLNK(st.st_mode) && realpath(path, resolved))
        snprintf(x->target, sizeof x->target, "%s", resolved);
    else
        snprintf(x->target, sizeof x->target, "%s", path);
    if (stat(x->target, &st) == 0 && S_ISDIR(st.st_mode)) {
        fs_fail(channel, FS_REPLY, EISDIR, path);
        xfer_drop(x);
        return;
    }
    char parent[PATH_MAX];
    snprintf(parent, sizeof parent, "%s", x->target);
    char *slash = strrchr(parent, '/');
    *(slash == parent ? slash + 1 : slash) = 0;
    if (field_bool(root, "parents")) {
        int rc = make_dirs(parent, 0755);
        if (rc < 0) {
            fs_fail(channel, FS_REPLY, -rc, parent);
            xfer_drop(x);
            return;
        }
    }
    if (mtime_ns >= 0) {
        x->has_mtime = true;
        x->mtime.tv_sec = (time_t)(mtime_ns / 1000000000LL);
        x->mtime.tv_nsec = (long)(mtime_ns % 1000000000LL);
    }
    if (snprintf(x->temp, sizeof x->temp, "%s/.sandstorm-upload-%" PRIu32,
                 strcmp(parent, "/") == 0 ? "" : parent, channel) >= (int)sizeof x->temp) {
        x->temp[0] = 0;
        fs_fail(channel, FS_REPLY, ENAMETOOLONG, path);
        xfer_drop(x);
        return;
    }
    x->fd = open(x->temp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (x->fd < 0) {
        int err = errno;
        x->temp[0] = 0;
        fs_fail(channel, FS_REPLY, err == ENOTDIR ? ENOTDIR : err, path);
        xfer_drop(x);
    }
}

/* Bytes for a write; the first failure answers at once and drops the write (and its file):
 * whatever the gateway sent meanwhile is ignored as for any unknown channel. */
void on_fs_data(uint32_t channel, const char *payload, size_t n) {
    struct xfer *x = xfer_find(channel);
    if (!x || x->kind != XFER_WRITE)
        return;
    x->active = monotonic();
    for (size_t off = 0; off < n;) {
        ssize_t w = write(x->fd, payload + off, n - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0) {
            fs_fail(channel, FS_REPLY, errno, x->target);
            xfer_drop(x);
            return;
        }
        off += (size_t)w;
    }
}

static void commit_write(struct xfer *x) {
    int err = 0;
    if (fchmod(x->fd, x->mode) < 0)
        err = errno;
    struct timespec times[2] = {{0, UTIME_OMIT}, x->mtime};
    if (!err && x->has_mtime && futimens(x->fd, times) < 0)
        err = errno;
    if (close(x->fd) < 0 && !err)
        err = errno;
    x->fd = -1;
    if (!err && rename(x->temp, x->target) < 0)
        err = errno;
    if (err) {
        fs_fail(x->channel, FS_REPLY, err, x->target);
    } else {
        x->temp[0] = 0; /* renamed: nothing to remove */
        fs_reply_entry(x->channel, x->target);
    }
    xfer_drop(x);
}

/* FS_END from the gateway: a write is complete (or, with {"abort":true}, abandoned); a read,
 * a walk or a watch is no longer wanted. */
void on_fs_end(uint32_t channel, const char *payload, size_t n) {
    struct xfer *x = xfer_find(channel);
    if (!x) {
        stop_watch(channel);
        return;
    }
    if (x->kind == XFER_WRITE && !(n && memmem(payload, n, "\"abort\"", 7)))
        commit_write(x);
    else
        xfer_drop(x);
}

void on_fs_credit(uint32_t channel, const char *payload, size_t n) {
    struct xfer *x = xfer_find(channel);
    if (!x || x->kind == XFER_WRITE)
        return;
    char json_error[128];
    struct jval *root = json_parse(payload, n, json_error, sizeof json_error);
    long long bytes;
    if (root && root->type == J_OBJ && field_int(root, "bytes", 0, MAX_CREDIT, 0, &bytes)) {
        x->credit += bytes;
        if (x->credit > MAX_CREDIT)
            x->credit = MAX_CREDIT;
        x->active = monotonic();
    } else {
        send_error(0, "FS_CREDIT payload must be {\"bytes\": 0..%d}", MAX_CREDIT);
    }
    jfree(root);
}

/* ------------------------------------------------------------------ the loop's part */

/* Whether a transfer can send now (the loop must then not sleep). */
bool transfers_ready(void) {
    for (struct xfer *x = xfers; x; x = x->next)
        if (x->kind != XFER_WRITE && x->credit > 0)
            return true;
    return false;
}

/* One frame of each transfer that has credit; idle transfers dropped. */
void pump_transfers(void) {
    double now = monotonic();
    struct xfer *x = xfers;
    while (x && !gateway_gone) {
        struct xfer *next = x->next;
        if (x->kind != XFER_WRITE && x->credit > 0) {
            x->active = now;
            if (x->kind == XFER_READ)
                pump_read(x);
            else
                pump_walk(x);
        } else if (now - x->active > TRANSFER_IDLE_S) {
            xfer_drop(x);
        }
        x = next;
    }
}

/* Seconds until the next idle check is due, or -1 when no transfer waits. */
double transfers_next_due(void) {
    double due = -1;
    for (struct xfer *x = xfers; x; x = x->next)
        if (due < 0 || x->active + TRANSFER_IDLE_S < due)
            due = x->active + TRANSFER_IDLE_S;
    return due;
}
