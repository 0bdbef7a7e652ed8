/* WRITE_FILE: a file written as the agent's user, parents made as needed, its mode set. */
#include "agent.h"

static int b64value(unsigned char c) {
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+')
        return 62;
    if (c == '/')
        return 63;
    return -1;
}

/* Standard padded base64 into out (at least n / 4 * 3 bytes); -1 if not valid. */
static ssize_t b64decode(const char *in, size_t n, unsigned char *out) {
    if (n % 4)
        return -1;
    size_t o = 0;
    for (size_t i = 0; i < n; i += 4) {
        int v[4], pad = 0;
        for (int k = 0; k < 4; k++) {
            unsigned char c = (unsigned char)in[i + k];
            if (c == '=' && i + 4 == n && k >= 2) {
                v[k] = 0;
                pad++;
                continue;
            }
            if (pad || (v[k] = b64value(c)) < 0)
                return -1;
        }
        unsigned long group = ((unsigned long)v[0] << 18) | ((unsigned long)v[1] << 12) |
                              ((unsigned long)v[2] << 6) | (unsigned long)v[3];
        out[o++] = (unsigned char)(group >> 16);
        if (pad < 2)
            out[o++] = (unsigned char)(group >> 8);
        if (pad < 1)
            out[o++] = (unsigned char)group;
    }
    return (ssize_t)o;
}

/* Writes the file a WRITE_FILE asks for; NULL on success, else the reason (in `error`). */
static const char *write_file(const char *payload, size_t n, char *error, size_t size) {
    char json_error[128];
    struct jval *root = json_parse(payload, n, json_error, sizeof json_error);
    const char *result = NULL;
    unsigned char *data = NULL;
    if (!root) {
        snprintf(error, size, "%s", json_error);
        return error;
    }
    struct jval *path, *data_b64, *mode, *append;
    long long mode_value = 0644;
    if (root->type != J_OBJ) {
        result = "WRITE_FILE payload must be a JSON object";
        goto done;
    }
    path = jget(root, "path");
    data_b64 = jget(root, "data_b64");
    mode = jget(root, "mode");
    append = jget(root, "append");
    if (append && append->type != J_TRUE && append->type != J_FALSE) {
        result = "append must be a boolean";
        goto done;
    }
    if (!path || path->type != J_STR || path->str[0] != '/' || strlen(path->str) != path->len ||
        path->unencodable) {
        result = "path must be an absolute path";
        goto done;
    }
    if (!data_b64 || data_b64->type != J_STR) {
        result = "data_b64 must be a string";
        goto done;
    }
    if (mode) {
        if (mode->type != J_INT || mode->huge || mode->integer < 0 || mode->integer > 07777) {
            result = "mode must be an integer in 0..0o7777";
            goto done;
        }
        mode_value = mode->integer;
    }
    data = xmalloc(data_b64->len / 4 * 3 + 3);
    ssize_t length = b64decode(data_b64->str, data_b64->len, data);
    if (length < 0) {
        result = "data_b64 is not valid base64";
        goto done;
    }
    /* Parents as makedirs(dirname(path), exist_ok=True). */
    char *slash = strrchr(path->str, '/');
    if (slash != path->str) {
        *slash = 0;
        int rc = make_dirs(path->str, 0755);
        if (rc < 0) {
            snprintf(error, size, "%s: %s", strerror(-rc), path->str);
            *slash = '/';
            result = error;
            goto done;
        }
        *slash = '/';
    }
    /* Large files arrive as a first frame then appended chunks (one frame is at most 1 MiB). */
    int flags = O_WRONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC;
    flags |= append && append->type == J_TRUE ? O_APPEND : O_TRUNC;
    int fd = open(path->str, flags, (mode_t)mode_value);
    if (fd < 0) {
        snprintf(error, size, "%s: %s", strerror(errno), path->str);
        result = error;
        goto done;
    }
    /* O_CREAT's mode is masked by the umask and ignored if the file exists. */
    if (fchmod(fd, (mode_t)mode_value) < 0) {
        snprintf(error, size, "%s: %s", strerror(errno), path->str);
        result = error;
        close(fd);
        goto done;
    }
    for (ssize_t off = 0; off < length;) {
        ssize_t w = write(fd, data + off, (size_t)(length - off));
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0) {
            snprintf(error, size, "%s", strerror(errno));
            result = error;
            break;
        }
        off += w;
    }
    if (close(fd) < 0 && !result) {
        snprintf(error, size, "%s", strerror(errno));
        result = error;
    }
done:
    free(data);
    jfree(root);
    return result;
}

void on_write_file(uint32_t channel, const char *payload, size_t n) {
    char error[PATH_MAX + 128];
    const char *failure = write_file(payload, n, error, sizeof error);
    struct buf b = {0};
    if (failure) {
        buf_str(&b, "{\"ok\":false,\"error\":");
        json_string(&b, failure, strlen(failure));
        buf_str(&b, "}");
    } else {
        buf_str(&b, "{\"ok\":true,\"error\":null}");
    }
    send_json(FILE_WRITTEN, channel, &b);
}
