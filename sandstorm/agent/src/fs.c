/* FS requests (protocol/agent.md, "Files"): parsing, answers, entries, and the requests answered
 * at once — stat, mkdir, move, remove, symlink, link, merge. Reads, walks and writes, which move
 * data, are in transfer.c; watches in watch.c.
 *
 * Every request runs as the agent, that is as the sandbox's user, on the sandbox's own paths:
 * the kernel (gVisor's, or the VM's) resolves them, symlinks included, with that user's
 * permissions. Nothing here follows a symlink the caller did not name: a removal or a merge
 * walks with O_NOFOLLOW and removes links, never what they point to. */
#include "agent.h"

#include <sys/syscall.h>
#include <sys/time.h>

/* ------------------------------------------------------------------ answers */

static void errno_name(struct buf *b, int err) {
    const char *name = strerrorname_np(err);
    buf_str(b, "\"errno\":\"");
    buf_str(b, name ? name : "EIO");
    buf_str(b, "\"");
}

void fs_fail_named(uint32_t channel, int kind, const char *name, const char *fmt, ...) {
    char message[PATH_MAX + 256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    struct buf b = {0};
    buf_str(&b, "{\"ok\":false,\"errno\":\"");
    buf_str(&b, name);
    buf_str(&b, "\",\"message\":");
    json_string(&b, message, strlen(message));
    buf_str(&b, "}");
    send_json(kind, channel, &b);
}

void fs_fail(uint32_t channel, int kind, int err, const char *path) {
    struct buf b = {0};
    buf_str(&b, "{\"ok\":false,");
    errno_name(&b, err);
    char message[PATH_MAX + 256];
    snprintf(message, sizeof message, "%s: %s", strerror(err), path);
    buf_str(&b, ",\"message\":");
    json_string(&b, message, strlen(message));
    buf_str(&b, "}");
    send_json(kind, channel, &b);
}

/* {"name","path","type","size","mode","mtime"[,"target"]} for path as lstat sees it; false
 * with errno set when it cannot be seen. */
bool entry_json(struct buf *b, const char *path) {
    struct stat st;
    if (lstat(path, &st) < 0)
        return false;
    entry_json_stat(b, path, &st);
    return true;
}

void entry_json_stat(struct buf *b, const char *path, const struct stat *st) {
    const char *slash = strrchr(path, '/');
    const char *name = slash && slash[1] ? slash + 1 : path;
    const char *type = S_ISREG(st->st_mode)   ? "file"
                       : S_ISDIR(st->st_mode) ? "dir"
                       : S_ISLNK(st->st_mode) ? "symlink"
                                              : "other";
    buf_str(b, "{\"name\":");
    json_string(b, name, strlen(name));
    buf_str(b, ",\"path\":");
    json_string(b, path, strlen(path));
    buf_printf(b, ",\"type\":\"%s\",\"size\":%lld,\"mode\":%u,\"mtime\":%lld.%09ld", type,
               S_ISDIR(st->st_mode) ? 0LL : (long long)st->st_size,
               (unsigned)(st->st_mode & 07777), (long long)st->st_mtim.tv_sec,
               st->st_mtim.tv_nsec);
    if (S_ISLNK(st->st_mode)) {
        char target[PATH_MAX];
        ssize_t n = readlink(path, target, sizeof target - 1);
        if (n >= 0) {
            buf_str(b, ",\"target\":");
            json_string(b, target, (size_t)n);
        }
    }
    buf_str(b, "}");
}

/* {"ok":true,"entry":…} for path, or the reason it cannot be seen. */
void fs_reply_entry(uint32_t channel, const char *path) {
    struct buf b = {0};
    buf_str(&b, "{\"ok\":true,\"entry\":");
    if (!entry_json(&b, path)) {
        int err = errno;
        buf_free(&b);
        fs_fail(channel, FS_REPLY, err, path);
        return;
    }
    buf_str(&b, "}");
    send_json(FS_REPLY, channel, &b);
}

static void fs_reply_ok(uint32_t channel) {
    static const char ok[] = "{\"ok\":true}";
    send_frame(FS_REPLY, channel, ok, sizeof ok - 1);
}

/* ------------------------------------------------------------------ request fields */

/* An absolute path field (no NUL, shorter than PATH_MAX), or NULL. */
const char *field_path(const struct jval *root, const char *name) {
    struct jval *v = jget(root, name);
    if (!v || v->type != J_STR || v->len == 0 || v->len >= PATH_MAX || v->str[0] != '/' ||
        strlen(v->str) != v->len || v->unencodable)
        return NULL;
    return v->str;
}

bool field_bool(const struct jval *root, const char *name) {
    struct jval *v = jget(root, name);
    return v && v->type == J_TRUE;
}

/* An integer field in [low, high], `fallback` when absent or null; false when it is neither. */
bool field_int(const struct jval *root, const char *name, long long low, long long high,
               long long fallback, long long *out) {
    struct jval *v = jget(root, name);
    *out = fallback;
    if (!v || v->type == J_NULL)
        return true;
    if (v->type != J_INT || v->huge || v->integer < low || v->integer > high)
        return false;
    *out = v->integer;
    return true;
}

/* ------------------------------------------------------------------ directories */

/* mkdir -p: every missing component of path made with `mode` (subject to the umask); 0, or
 * -errno (-ENOTDIR when path or a parent is not a directory). */
int make_dirs(char *path, mode_t mode) {
    struct stat st;
    if (stat(path, &st) == 0)
        return S_ISDIR(st.st_mode) ? 0 : -ENOTDIR;
    for (char *p = path + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = 0;
        int rc = mkdir(path, mode);
        int saved = errno;
        *p = '/';
        if (rc < 0 && saved != EEXIST)
            return -saved;
    }
    if (mkdir(path, mode) < 0 && errno != EEXIST)
        return -errno;
    if (stat(path, &st) < 0)
        return -errno;
    return S_ISDIR(st.st_mode) ? 0 : -ENOTDIR;
}

/* Removes `name` in dirfd and, if it is a directory (never followed), everything in it; 0 or
 * -errno of the first failure. */
static int remove_at(int dirfd, const char *name, int depth) {
    if (unlinkat(dirfd, name, 0) == 0)
        return 0;
    if (errno != EISDIR && errno != EPERM)
        return -errno;
    if (depth > MAX_TREE_DEPTH)
        return -ELOOP;
    int fd = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOTDIR ? -EPERM : -errno;
    DIR *dir = fdopendir(fd);
    if (!dir) {
        int err = errno;
        close(fd);
        return -err;
    }
    int rc = 0;
    struct dirent *d;
    while (rc == 0 && (errno = 0, d = readdir(dir))) {
        if (strcmp(d->d_name, ".") == 0 || strcmp(d->d_name, "..") == 0)
            continue;
        rc = remove_at(fd, d->d_name, depth + 1);
    }
    if (rc == 0 && errno)
        rc = -errno;
    closedir(dir);
    if (rc == 0 && unlinkat(dirfd, name, AT_REMOVEDIR) < 0)
        rc = -errno;
    return rc;
}

int remove_tree(const char *path) { return remove_at(AT_FDCWD, path, 0); }

/* Moves everything in directory `from` into directory `to`: a directory onto a directory
 * merges, anything else replaces what is there. Then `from` is removed. 0 or -errno. */
static int merge_into(const char *from, const char *to, int depth) {
    if (depth > MAX_TREE_DEPTH)
        return -ELOOP;
    DIR *dir = opendir(from);
    if (!dir)
        return -errno;
    int rc = 0;
    struct dirent *d;
    char src[PATH_MAX], dst[PATH_MAX];
    while (rc == 0 && (errno = 0, d = readdir(dir))) {
        if (strcmp(d->d_name, ".") == 0 || strcmp(d->d_name, "..") == 0)
            continue;
        if (snprintf(src, sizeof src, "%s/%s", from, d->d_name) >= (int)sizeof src ||
            snprintf(dst, sizeof dst, "%s/%s", to, d->d_name) >= (int)sizeof dst) {
            rc = -ENAMETOOLONG;
            break;
        }
        struct stat s, t;
        if (lstat(src, &s) < 0) {
            rc = -errno;
            break;
        }
        bool target_exists = lstat(dst, &t) == 0;
        if (target_exists && S_ISDIR(s.st_mode) && S_ISDIR(t.st_mode)) {
            rc = merge_into(src, dst, depth + 1);
            continue;
        }
        if (target_exists && (S_ISDIR(t.st_mode) != S_ISDIR(s.st_mode)))
            rc = remove_tree(dst); /* rename cannot put a file over a directory or the reverse */
        if (rc == 0 && rename(src, dst) < 0)
            rc = -errno;
    }
    if (rc == 0 && errno)
        rc = -errno;
    closedir(dir);
    if (rc == 0 && rmdir(from) < 0)
        rc = -errno;
    return rc;
}

/* ------------------------------------------------------------------ the requests */

static void do_mkdir(uint32_t channel, const struct jval *root) {
    const char *path = field_path(root, "path");
    long long mode;
    if (!path || !field_int(root, "mode", 0, 07777, 0755, &mode)) {
        fs_fail_named(channel, FS_REPLY, "EINVAL", "mkdir needs an absolute path and a mode");
        return;
    }
    char copy[PATH_MAX];
    snprintf(copy, sizeof copy, "%s", path);
    int rc = field_bool(root, "parents") ? make_dirs(copy, (mode_t)mode)
                                         : (mkdir(path, (mode_t)mode) < 0 ? -errno : 0);
    if (rc < 0)
        fs_fail(channel, FS_REPLY, -rc, path);
    else
        fs_reply_entry(channel, path);
}

static void do_move(uint32_t channel, const struct jval *root) {
    const char *from = field_path(root, "from"), *to = field_path(root, "to");
    if (!from || !to) {
        fs_fail_named(channel, FS_REPLY, "EINVAL", "move needs absolute from and to paths");
        return;
    }
    struct stat st;
    if (lstat(from, &st) < 0) {
        fs_fail(channel, FS_REPLY, errno, from);
        return;
    }
    int rc;
    if (field_bool(root, "overwrite")) {
        rc = rename(from, to);
    } else {
        rc = (int)syscall(SYS_renameat2, AT_FDCWD, from, AT_FDCWD, to, RENAME_NOREPLACE);
        if (rc < 0 && (errno == EINVAL || errno == ENOSYS)) {
            /* A filesystem without RENAME_NOREPLACE: the check and the rename are two steps,
             * which only code in the same sandbox could race. */
            if (lstat(to, &st) == 0) {
                errno = EEXIST;
                rc = -1;
            } else {
                rc = rename(from, to);
            }
        }
    }
    if (rc < 0)
        fs_fail(channel, FS_REPLY, errno, errno == EEXIST ? to : from);
    else
        fs_reply_entry(channel, to);
}

static void do_remove(uint32_t channel, const struct jval *root) {
    const char *path = field_path(root, "path");
    if (!path) {
        fs_fail_named(channel, FS_REPLY, "EINVAL", "remove needs an absolute path");
        return;
    }
    if (strcmp(path, "/") == 0) {
        fs_fail(channel, FS_REPLY, EBUSY, path);
        return;
    }
    struct stat st;
    int rc = 0;
    if (lstat(path, &st) < 0)
        rc = -errno;
    else if (!S_ISDIR(st.st_mode))
        rc = unlink(path) < 0 ? -errno : 0;
    else if (field_bool(root, "recursive"))
        rc = remove_tree(path);
    else
        rc = rmdir(path) < 0 ? -errno : 0;
    if (rc < 0)
        fs_fail(channel, FS_REPLY, -rc, path);
    else
        fs_reply_ok(channel);
}

static void do_links(uint32_t channel, const struct jval *root, bool symbolic) {
    const char *path = field_path(root, "path");
    struct jval *target = jget(root, symbolic ? "target" : "existing");
    if (!path || !target || target->type != J_STR || target->len == 0 ||
        target->len >= PATH_MAX || strlen(target->str) != target->len ||
        (!symbolic && target->str[0] != '/')) {
        fs_fail_named(channel, FS_REPLY, "EINVAL", "a link needs a path and its target");
        return;
    }
    int rc = symbolic ? symlink(target->str, path) : link(target->str, path);
    if (rc < 0)
        fs_fail(channel, FS_REPLY, errno, path);
    else
        fs_reply_entry(channel, path);
}

static void do_merge(uint32_t channel, const struct jval *root) {
    const char *from = field_path(root, "from"), *to = field_path(root, "to");
    if (!from || !to) {
        fs_fail_named(channel, FS_REPLY, "EINVAL", "merge needs absolute from and to paths");
        return;
    }
    int rc = merge_into(from, to, 0);
    if (rc < 0)
        fs_fail(channel, FS_REPLY, -rc, from);
    else
        fs_reply_ok(channel);
}

void on_fs(uint32_t channel, const char *payload, size_t n) {
    char json_error[128];
    struct jval *root = json_parse(payload, n, json_error, sizeof json_error);
    if (!root || root->type != J_OBJ) {
        fs_fail_named(channel, FS_REPLY, "EINVAL", "FS payload must be a JSON object%s%s",
                      root ? "" : ": ", root ? "" : json_error);
        jfree(root);
        return;
    }
    struct jval *op = jget(root, "op");
    const char *name = op && op->type == J_STR ? op->str : "";
    const char *path = field_path(root, "path");
    if (strcmp(name, "stat") == 0) {
        if (path)
            fs_reply_entry(channel, path);
        else
            fs_fail_named(channel, FS_REPLY, "EINVAL", "stat needs an absolute path");
    } else if (strcmp(name, "mkdir") == 0) {
        do_mkdir(channel, root);
    } else if (strcmp(name, "move") == 0) {
        do_move(channel, root);
    } else if (strcmp(name, "remove") == 0) {
        do_remove(channel, root);
    } else if (strcmp(name, "symlink") == 0 || strcmp(name, "link") == 0) {
        do_links(channel, root, name[0] == 's');
    } else if (strcmp(name, "merge") == 0) {
        do_merge(channel, root);
    } else if (strcmp(name, "read") == 0) {
        start_read(channel, root);
    } else if (strcmp(name, "list") == 0) {
        start_walk(channel, root);
    } else if (strcmp(name, "write") == 0) {
        start_write(channel, root);
    } else if (strcmp(name, "watch") == 0) {
        start_watch(channel, root);
    } else {
        fs_fail_named(channel, FS_REPLY, "EINVAL", "unknown FS op \"%.64s\"", name);
    }
    jfree(root);
}
