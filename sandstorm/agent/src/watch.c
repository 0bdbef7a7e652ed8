/* Watches: inotify on a path (and, recursively, on every directory under it, those made later
 * included), reported as FS_EVENT frames of create / write / remove / rename events.
 *
 * Each watch has its own inotify descriptor, so watches never share a watch descriptor and
 * one can end without touching another. Events are coalesced — a write to the same path is
 * reported once per frame — and sent at most every WATCH_FLUSH_MS, in frames of at most
 * MAX_WATCH_EVENTS; past that, or when the kernel's queue overflowed, one "overflow" event on
 * the watched path says that events were lost. A watch covers at most MAX_WATCH_DIRS
 * directories (the rest are not watched, and an "overflow" event says so).
 *
 * The agent's own transient names are not reported: an upload's new file (.sandstorm-upload-N)
 * shows as one "write" of its path when it is renamed into place, and an archive's staging
 * directory (.sandstorm-extract-…) is not watched, so what the archive brings shows as the
 * "create"s of its merge. */
#include "agent.h"

#include <sys/inotify.h>

#define DIR_EVENTS                                                                              \
    (IN_CREATE | IN_DELETE | IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO |        \
     IN_DELETE_SELF | IN_MOVE_SELF)

struct wdir {
    int wd;
    char *path;
};

struct pending {
    char op[10];
    char *path, *to;
};

struct watch {
    uint32_t channel;
    int fd;
    bool recursive, overflow;
    char *root;
    struct wdir *dirs;
    size_t ndirs;
    struct pending events[MAX_WATCH_EVENTS];
    int nevents;
    double due; /* when the pending events are sent; 0 with none */
    uint32_t move_cookie; /* an IN_MOVED_FROM waiting for its IN_MOVED_TO */
    char *move_from;
    bool move_from_upload; /* the move is an upload's new file taking its place */
    struct watch *next;
};

static struct watch *watches;

/* A name the agent gives a file or directory of its own for the length of a request. */
static bool transient(const char *name) {
    return strncmp(name, ".sandstorm-upload-", 18) == 0 ||
           strncmp(name, ".sandstorm-extract-", 19) == 0;
}
static int nwatches;

static struct watch *watch_find(uint32_t channel) {
    for (struct watch *w = watches; w; w = w->next)
        if (w->channel == channel)
            return w;
    return NULL;
}

static void add_event(struct watch *w, const char *op, const char *path, const char *to) {
    for (int i = 0; i < w->nevents; i++) /* the same change twice in one frame is one */
        if (strcmp(w->events[i].op, op) == 0 && strcmp(w->events[i].path, path) == 0 &&
            !to && !w->events[i].to)
            return;
    if (w->nevents == MAX_WATCH_EVENTS - 1) {
        w->overflow = true;
    } else {
        struct pending *p = &w->events[w->nevents++];
        snprintf(p->op, sizeof p->op, "%s", op);
        p->path = xstrndup(path, strlen(path));
        p->to = to ? xstrndup(to, strlen(to)) : NULL;
    }
    if (!w->due)
        w->due = monotonic() + WATCH_FLUSH_MS / 1000.0;
}

static void add_dir(struct watch *w, const char *path, int depth) {
    if (w->ndirs >= MAX_WATCH_DIRS) {
        w->overflow = true;
        if (!w->due)
            w->due = monotonic() + WATCH_FLUSH_MS / 1000.0;
        return;
    }
    int wd = inotify_add_watch(w->fd, path, DIR_EVENTS | IN_ONLYDIR | IN_DONT_FOLLOW);
    if (wd < 0)
        return;
    for (size_t i = 0; i < w->ndirs; i++)
        if (w->dirs[i].wd == wd) /* the same directory by another name: keep the first */
            return;
    w->dirs = xrealloc(w->dirs, (w->ndirs + 1) * sizeof *w->dirs);
    w->dirs[w->ndirs++] = (struct wdir){wd, xstrndup(path, strlen(path))};
    if (!w->recursive || depth >= MAX_TREE_DEPTH)
        return;
    DIR *dir = opendir(path);
    if (!dir)
        return;
    struct dirent *d;
    char sub[PATH_MAX];
    while ((d = readdir(dir))) {
        if (d->d_type != DT_DIR || strcmp(d->d_name, ".") == 0 || strcmp(d->d_name, "..") == 0 ||
            transient(d->d_name))
            continue;
        if (snprintf(sub, sizeof sub, "%s/%s", strcmp(path, "/") ? path : "", d->d_name) <
            (int)sizeof sub)
            add_dir(w, sub, depth + 1);
    }
    closedir(dir);
}

static const char *dir_path(struct watch *w, int wd) {
    for (size_t i = 0; i < w->ndirs; i++)
        if (w->dirs[i].wd == wd)
            return w->dirs[i].path;
    return NULL;
}

/* A directory moved within the watch keeps its watch descriptors: their paths follow it. */
static void rename_dirs(struct watch *w, const char *from, const char *to) {
    size_t n = strlen(from);
    for (size_t i = 0; i < w->ndirs; i++) {
        char *p = w->dirs[i].path;
        if (strncmp(p, from, n) != 0 || (p[n] != 0 && p[n] != '/'))
            continue;
        char moved[PATH_MAX];
        if (snprintf(moved, sizeof moved, "%s%s", to, p + n) >= (int)sizeof moved)
            continue;
        free(p);
        w->dirs[i].path = xstrndup(moved, strlen(moved));
    }
}

static void settle_move(struct watch *w) {
    if (w->move_from && !w->move_from_upload) /* moved out of the watch: gone, as it can tell */
        add_event(w, "remove", w->move_from, NULL);
    w->move_from_upload = false;
    free(w->move_from);
    w->move_from = NULL;
    w->move_cookie = 0;
}

static void on_event(struct watch *w, const struct inotify_event *e) {
    if (e->mask & IN_Q_OVERFLOW) {
        w->overflow = true;
        if (!w->due)
            w->due = monotonic() + WATCH_FLUSH_MS / 1000.0;
        return;
    }
    const char *dir = dir_path(w, e->wd);
    if (!dir)
        return;
    char path[PATH_MAX];
    if (e->len && e->name[0]) {
        if (snprintf(path, sizeof path, "%s/%s", strcmp(dir, "/") ? dir : "", e->name) >=
            (int)sizeof path)
            return;
    } else {
        snprintf(path, sizeof path, "%s", dir);
    }
    if (w->move_from && !((e->mask & IN_MOVED_TO) && e->cookie == w->move_cookie))
        settle_move(w);
    if (e->len && transient(e->name)) {
        if (e->mask & IN_MOVED_FROM) {
            w->move_from = xstrndup(path, strlen(path));
            w->move_cookie = e->cookie;
            w->move_from_upload = true;
        }
        return; /* made, written, removed: the agent's own, for the length of a request */
    }
    if ((e->mask & IN_MOVED_TO) && w->move_from_upload && e->cookie == w->move_cookie) {
        add_event(w, "write", path, NULL); /* an upload renamed into place */
        free(w->move_from);
        w->move_from = NULL;
        w->move_from_upload = false;
        w->move_cookie = 0;
        return;
    }
    if (e->mask & IN_CREATE) {
        add_event(w, "create", path, NULL);
        if ((e->mask & IN_ISDIR) && w->recursive)
            add_dir(w, path, 0);
    } else if (e->mask & (IN_MODIFY | IN_CLOSE_WRITE)) {
        if (!(e->mask & IN_ISDIR))
            add_event(w, "write", path, NULL);
    } else if (e->mask & IN_DELETE) {
        add_event(w, "remove", path, NULL);
    } else if (e->mask & IN_DELETE_SELF) {
        if (strcmp(path, w->root) == 0)
            add_event(w, "remove", path, NULL);
    } else if (e->mask & IN_MOVED_FROM) {
        w->move_from = xstrndup(path, strlen(path));
        w->move_cookie = e->cookie;
    } else if (e->mask & IN_MOVED_TO) {
        if (w->move_from && e->cookie == w->move_cookie) {
            add_event(w, "rename", w->move_from, path);
            if (e->mask & IN_ISDIR)
                rename_dirs(w, w->move_from, path);
            free(w->move_from);
            w->move_from = NULL;
            w->move_cookie = 0;
        } else {
            add_event(w, "create", path, NULL);
            if ((e->mask & IN_ISDIR) && w->recursive)
                add_dir(w, path, 0);
        }
    }
}

static void flush(struct watch *w) {
    settle_move(w);
    if (!w->nevents && !w->overflow)
        return;
    struct buf b = {0};
    buf_str(&b, "{\"events\":[");
    for (int i = 0; i < w->nevents; i++) {
        struct pending *p = &w->events[i];
        buf_printf(&b, "%s{\"op\":\"%s\",\"path\":", i ? "," : "", p->op);
        json_string(&b, p->path, strlen(p->path));
        if (p->to) {
            buf_str(&b, ",\"to\":");
            json_string(&b, p->to, strlen(p->to));
        }
        buf_str(&b, "}");
        free(p->path);
        free(p->to);
    }
    if (w->overflow) {
        buf_printf(&b, "%s{\"op\":\"overflow\",\"path\":", w->nevents ? "," : "");
        json_string(&b, w->root, strlen(w->root));
        buf_str(&b, "}");
    }
    buf_str(&b, "]}");
    w->nevents = 0;
    w->overflow = false;
    w->due = 0;
    send_json(FS_EVENT, w->channel, &b);
}

void start_watch(uint32_t channel, const struct jval *root) {
    const char *path = field_path(root, "path");
    if (!path) {
        fs_fail_named(channel, FS_REPLY, "EINVAL", "watch needs an absolute path");
        return;
    }
    if (nwatches >= MAX_WATCHES) {
        fs_fail_named(channel, FS_REPLY, "EMFILE", "at most %d watches per sandbox",
                      MAX_WATCHES);
        return;
    }
    struct stat st;
    if (stat(path, &st) < 0) {
        fs_fail(channel, FS_REPLY, errno, path);
        return;
    }
    if (!S_ISDIR(st.st_mode)) {
        fs_fail(channel, FS_REPLY, ENOTDIR, path);
        return;
    }
    int fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (fd < 0) {
        fs_fail(channel, FS_REPLY, errno, path);
        return;
    }
    struct watch *w = xmalloc(sizeof *w);
    memset(w, 0, sizeof *w);
    w->channel = channel;
    w->fd = fd;
    w->recursive = field_bool(root, "recursive");
    w->root = xstrndup(path, strlen(path));
    add_dir(w, path, 0);
    if (!w->ndirs) {
        fs_fail(channel, FS_REPLY, errno ? errno : EACCES, path);
        close(fd);
        free(w->root);
        free(w);
        return;
    }
    w->next = watches;
    watches = w;
    nwatches++;
    fs_reply_entry(channel, path);
}

void stop_watch(uint32_t channel) {
    for (struct watch **p = &watches; *p; p = &(*p)->next) {
        struct watch *w = *p;
        if (w->channel != channel)
            continue;
        *p = w->next;
        close(w->fd);
        for (size_t i = 0; i < w->ndirs; i++)
            free(w->dirs[i].path);
        for (int i = 0; i < w->nevents; i++) {
            free(w->events[i].path);
            free(w->events[i].to);
        }
        free(w->dirs);
        free(w->move_from);
        free(w->root);
        free(w);
        nwatches--;
        return;
    }
}

/* The loop's part: the watches' descriptors to poll, their events, their flushes. */
int watch_fds(int *fds, uint32_t *channels, int max) {
    int n = 0;
    for (struct watch *w = watches; w && n < max; w = w->next) {
        fds[n] = w->fd;
        channels[n++] = w->channel;
    }
    return n;
}

void watch_read(uint32_t channel) {
    struct watch *w = watch_find(channel);
    if (!w)
        return;
    char events[16384] __attribute__((aligned(__alignof__(struct inotify_event))));
    for (;;) {
        ssize_t n = read(w->fd, events, sizeof events);
        if (n <= 0)
            break;
        for (char *p = events; p < events + n;) {
            const struct inotify_event *e = (const struct inotify_event *)p;
            on_event(w, e);
            p += sizeof *e + e->len;
        }
    }
}

double watch_next_due(void) {
    double due = -1;
    for (struct watch *w = watches; w; w = w->next)
        if (w->due && (due < 0 || w->due < due))
            due = w->due;
    return due;
}

void watch_tick(void) {
    double now = monotonic();
    for (struct watch *w = watches; w; w = w->next)
        if (w->due && w->due <= now)
            flush(w);
}
