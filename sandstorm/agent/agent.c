/*
 * The in-sandbox agent: PID 1 of every sandbox.
 *
 *     /.sandstorm/bin/sandstorm-agent-<hash>
 *
 * Started by the runtime as the sandbox's only process, as an unprivileged user, cwd /workspace.
 * It speaks the framed protocol of protocol/agent.md: frames from the gateway on fd 0, frames to
 * the gateway on fd 1 (fd 2 is for diagnostics only). It runs every exec in its own process group
 * with fresh pipes, forwards their output as it comes, reaps every child (orphans included, as
 * PID 1), and keeps the python zygote (zygote.py, next to bin/) for python execs.
 *
 * It is C, compiled once per source hash by the gateway (sandstorm/agent/build.py) and linked
 * statically, because it starts with every sandbox: a python agent was a second interpreter
 * start (30-40 ms of CPU inside gVisor) in every sandbox on top of the user's own, and needed
 * python3 in the image. This binary starts in about a millisecond and needs nothing of the image.
 *
 * One thread, one poll loop. Writes to the gateway block: a gateway that stops reading stops the
 * agent, which stops reading the pipes, which stops the children (back-pressure). Everything it
 * holds is bounded: one frame in (1 MiB), 16 MiB of stdin per exec, 4 MiB of final drain per
 * pipe, 64 signals per exec kept for a zygote fallback.
 */
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

/* The python zygote (see "Python zygote" in protocol/agent.md). */
#define ZYGOTE_PYTHON "/usr/bin/python3"
#define ZYGOTE_IDLE_S 0.2 /* started once the agent has idled this long: never on the cold path */
#define ZYGOTE_LATEST_S 1.0 /* ... or this long after it was wanted, for a sandbox never idle */
#define ZYGOTE_START_S 2.0 /* a zygote exec not started by then is checked: stopped or not */
#define ZYGOTE_MAX_FAILURES 5 /* early deaths in a row before the agent stops restarting it */
#define ZYGOTE_MAX_SOURCE (1024 * 1024)
#define FD_COUNT 4 /* an exec's pipes passed to a standby: stdin_r, stdout_w, stderr_w, err_w */
/* What the gateway gives every exec (router BASE_ENV): the zygote's environment. A python exec
 * is served by the zygote only if every variable python reads at start-up has the same value. */
static const char *const ZYGOTE_ENV[] = {
    "PATH=" DEFAULT_PATH, "HOME=/workspace", "LANG=C.UTF-8", "PYTHONUNBUFFERED=1", NULL,
};

/* Signals the agent blocks for good: code in the sandbox runs as the agent's user and could
 * otherwise end PID 1 (and with it the sandbox) by a plain `kill 1`; SIGPIPE and SIGXFSZ make a
 * write fail (EPIPE, EFBIG) instead. Blocked rather than ignored: a child's empty signal mask is
 * then all it takes to give it every default (one system call, not one per signal). */
static const int BLOCKED_SIGNALS[] = {
    SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM,
    SIGTSTP, SIGTTIN, SIGTTOU, SIGVTALRM, SIGPROF, SIGPIPE, SIGXFSZ,
};

/* ------------------------------------------------------------------------------------------ */
/* Small helpers                                                                              */
/* ------------------------------------------------------------------------------------------ */

static double monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void out_of_memory(void) {
    /* PID 1 without memory: nothing sensible is left to do; the gateway sees EOF. */
    static const char msg[] = "sandstorm-agent: out of memory\n";
    ssize_t ignored = write(2, msg, sizeof msg - 1);
    (void)ignored;
    _exit(70);
}

static void *xmalloc(size_t size) {
    void *p = malloc(size ? size : 1);
    if (!p)
        out_of_memory();
    return p;
}

static void *xrealloc(void *old, size_t size) {
    void *p = realloc(old, size ? size : 1);
    if (!p)
        out_of_memory();
    return p;
}

static char *xstrndup(const char *s, size_t n) {
    char *p = xmalloc(n + 1);
    memcpy(p, s, n);
    p[n] = 0;
    return p;
}

static void set_nonblocking(int fd) {
    int flags = fcntl(fd, F_GETFL);
    if (flags >= 0)
        fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

/* A growable byte buffer; `off` is where unconsumed data starts. */
struct buf {
    char *data;
    size_t len, cap, off;
};

static void buf_reserve(struct buf *b, size_t extra) {
    if (b->off && b->off == b->len) {
        b->off = b->len = 0;
    }
    if (b->len + extra <= b->cap)
        return;
    if (b->off) {
        memmove(b->data, b->data + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
        if (b->len + extra <= b->cap)
            return;
    }
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra)
        cap *= 2;
    b->data = xrealloc(b->data, cap);
    b->cap = cap;
}

static void buf_add(struct buf *b, const void *data, size_t n) {
    buf_reserve(b, n);
    memcpy(b->data + b->len, data, n);
    b->len += n;
}

static void buf_str(struct buf *b, const char *s) { buf_add(b, s, strlen(s)); }

static void buf_printf(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void buf_printf(struct buf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    buf_reserve(b, (size_t)n + 1);
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

static size_t buf_size(const struct buf *b) { return b->len - b->off; }

static void buf_free(struct buf *b) {
    free(b->data);
    memset(b, 0, sizeof *b);
}

/* Decodes one UTF-8 sequence at s (n bytes left): the code point, or -1 if not well formed
 * (overlong, surrogate, beyond U+10FFFF, truncated). *used is its length (1 for invalid). */
static long utf8_decode(const unsigned char *s, size_t n, size_t *used) {
    *used = 1;
    unsigned char c = s[0];
    if (c < 0x80)
        return c;
    size_t len;
    long cp, min;
    if (c >= 0xC2 && c <= 0xDF) {
        len = 2, cp = c & 0x1F, min = 0x80;
    } else if (c >= 0xE0 && c <= 0xEF) {
        len = 3, cp = c & 0x0F, min = 0x800;
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4, cp = c & 0x07, min = 0x10000;
    } else {
        return -1;
    }
    if (n < len)
        return -1;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return -1;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return -1;
    *used = len;
    return cp;
}

/* A JSON string, ASCII only (as Python's json does): bytes that are not UTF-8 become U+FFFD. */
static void json_string(struct buf *b, const char *s, size_t n) {
    static const char hex[] = "0123456789abcdef";
    buf_reserve(b, n + 2);
    buf_add(b, "\"", 1);
    size_t i = 0;
    while (i < n) {
        size_t used;
        long cp = utf8_decode((const unsigned char *)s + i, n - i, &used);
        i += used;
        if (cp < 0)
            cp = 0xFFFD;
        char esc[13];
        if (cp == '"') {
            buf_add(b, "\\\"", 2);
        } else if (cp == '\\') {
            buf_add(b, "\\\\", 2);
        } else if (cp == '\n') {
            buf_add(b, "\\n", 2);
        } else if (cp == '\r') {
            buf_add(b, "\\r", 2);
        } else if (cp == '\t') {
            buf_add(b, "\\t", 2);
        } else if (cp >= 0x20 && cp < 0x7F) {
            char c = (char)cp;
            buf_add(b, &c, 1);
        } else if (cp < 0x10000) {
            esc[0] = '\\', esc[1] = 'u';
            for (int k = 0; k < 4; k++)
                esc[2 + k] = hex[(cp >> (12 - 4 * k)) & 0xF];
            buf_add(b, esc, 6);
        } else {
            long v = cp - 0x10000, hi = 0xD800 + (v >> 10), lo = 0xDC00 + (v & 0x3FF);
            esc[0] = '\\', esc[1] = 'u', esc[6] = '\\', esc[7] = 'u';
            for (int k = 0; k < 4; k++) {
                esc[2 + k] = hex[(hi >> (12 - 4 * k)) & 0xF];
                esc[8 + k] = hex[(lo >> (12 - 4 * k)) & 0xF];
            }
            buf_add(b, esc, 12);
        }
    }
    buf_add(b, "\"", 1);
}

/* ------------------------------------------------------------------------------------------ */
/* JSON in: a strict parser (RFC 8259, as Python's json with strict=True) into a small tree     */
/* ------------------------------------------------------------------------------------------ */

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

struct jparser {
    const char *p, *end, *start;
    char error[96];
    int depth;
};

static void jfree(struct jval *v) {
    while (v) {
        struct jval *next = v->next;
        jfree(v->child);
        free(v->str);
        free(v->key);
        free(v);
        v = next;
    }
}

static bool jfail(struct jparser *ps, const char *what) {
    if (!ps->error[0])
        snprintf(ps->error, sizeof ps->error, "%s at char %td", what, ps->p - ps->start);
    return false;
}

static void jskip(struct jparser *ps) {
    while (ps->p < ps->end &&
           (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r'))
        ps->p++;
}

static int hexval(char c) {
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

static bool jhex4(struct jparser *ps, long *out) {
    if (ps->end - ps->p < 4)
        return jfail(ps, "Invalid \\uXXXX escape");
    long v = 0;
    for (int i = 0; i < 4; i++) {
        int h = hexval(ps->p[i]);
        if (h < 0)
            return jfail(ps, "Invalid \\uXXXX escape");
        v = v * 16 + h;
    }
    ps->p += 4;
    *out = v;
    return true;
}

static void put_utf8(struct buf *b, long cp) {
    unsigned char out[4];
    size_t n;
    if (cp < 0x80) {
        out[0] = (unsigned char)cp, n = 1;
    } else if (cp < 0x800) {
        out[0] = (unsigned char)(0xC0 | (cp >> 6)), out[1] = (unsigned char)(0x80 | (cp & 0x3F));
        n = 2;
    } else if (cp < 0x10000) {
        out[0] = (unsigned char)(0xE0 | (cp >> 12));
        out[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (unsigned char)(0x80 | (cp & 0x3F));
        n = 3;
    } else {
        out[0] = (unsigned char)(0xF0 | (cp >> 18));
        out[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
        out[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        out[3] = (unsigned char)(0x80 | (cp & 0x3F));
        n = 4;
    }
    buf_add(b, out, n);
}

/* A string at ps->p (the opening quote). Lone surrogates from \u escapes are kept as Python's
 * os.fsencode would: U+DC80..U+DCFF as the byte they escape, any other one marks the string
 * unencodable. */
static bool jstring(struct jparser *ps, char **out, size_t *out_len, bool *unencodable) {
    struct buf b = {0};
    *unencodable = false;
    ps->p++;
    for (;;) {
        if (ps->p >= ps->end) {
            buf_free(&b);
            return jfail(ps, "Unterminated string");
        }
        unsigned char c = (unsigned char)*ps->p;
        if (c == '"') {
            ps->p++;
            break;
        }
        if (c < 0x20) {
            buf_free(&b);
            return jfail(ps, "Invalid control character");
        }
        if (c != '\\') {
            const char *run = ps->p;
            while (ps->p < ps->end && *ps->p != '"' && *ps->p != '\\' &&
                   (unsigned char)*ps->p >= 0x20)
                ps->p++;
            buf_add(&b, run, (size_t)(ps->p - run));
            continue;
        }
        ps->p++;
        if (ps->p >= ps->end) {
            buf_free(&b);
            return jfail(ps, "Unterminated string");
        }
        char e = *ps->p++;
        char simple = 0;
        switch (e) {
        case '"': simple = '"'; break;
        case '\\': simple = '\\'; break;
        case '/': simple = '/'; break;
        case 'b': simple = '\b'; break;
        case 'f': simple = '\f'; break;
        case 'n': simple = '\n'; break;
        case 'r': simple = '\r'; break;
        case 't': simple = '\t'; break;
        case 'u': {
            long cp;
            if (!jhex4(ps, &cp)) {
                buf_free(&b);
                return false;
            }
            if (cp >= 0xD800 && cp <= 0xDBFF && ps->end - ps->p >= 6 && ps->p[0] == '\\' &&
                ps->p[1] == 'u') {
                const char *save = ps->p;
                long lo;
                ps->p += 2;
                if (jhex4(ps, &lo) && lo >= 0xDC00 && lo <= 0xDFFF) {
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                } else {
                    ps->error[0] = 0;
                    ps->p = save;
                }
            }
            if (cp >= 0xDC80 && cp <= 0xDCFF) {
                unsigned char raw = (unsigned char)(cp - 0xDC00);
                buf_add(&b, &raw, 1);
            } else if (cp >= 0xD800 && cp <= 0xDFFF) {
                *unencodable = true; /* refused before use; U+FFFD keeps its place in messages */
                put_utf8(&b, 0xFFFD);
            } else {
                put_utf8(&b, cp);
            }
            continue;
        }
        default:
            buf_free(&b);
            ps->p--;
            return jfail(ps, "Invalid \\escape");
        }
        buf_add(&b, &simple, 1);
    }
    buf_add(&b, "", 1);
    *out_len = b.len - 1;
    *out = b.data;
    return true;
}

static struct jval *jvalue(struct jparser *ps);

static struct jval *jnew(enum jtype type) {
    struct jval *v = xmalloc(sizeof *v);
    memset(v, 0, sizeof *v);
    v->type = type;
    return v;
}

static bool jliteral(struct jparser *ps, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(ps->end - ps->p) >= n && memcmp(ps->p, word, n) == 0) {
        ps->p += n;
        return true;
    }
    return false;
}

static struct jval *jnumber(struct jparser *ps) {
    const char *s = ps->p;
    if (ps->p < ps->end && *ps->p == '-')
        ps->p++;
    if (ps->p >= ps->end || *ps->p < '0' || *ps->p > '9') {
        ps->p = s;
        jfail(ps, "Expecting value");
        return NULL;
    }
    if (*ps->p == '0') {
        ps->p++;
    } else {
        while (ps->p < ps->end && *ps->p >= '0' && *ps->p <= '9')
            ps->p++;
    }
    bool is_float = false;
    if (ps->p + 1 < ps->end && *ps->p == '.' && ps->p[1] >= '0' && ps->p[1] <= '9') {
        is_float = true;
        ps->p++;
        while (ps->p < ps->end && *ps->p >= '0' && *ps->p <= '9')
            ps->p++;
    }
    if (ps->p < ps->end && (*ps->p == 'e' || *ps->p == 'E')) {
        const char *q = ps->p + 1;
        if (q < ps->end && (*q == '+' || *q == '-'))
            q++;
        if (q < ps->end && *q >= '0' && *q <= '9') {
            is_float = true;
            while (q < ps->end && *q >= '0' && *q <= '9')
                q++;
            ps->p = q;
        }
    }
    struct jval *v = jnew(is_float ? J_FLOAT : J_INT);
    if (!is_float) {
        bool negative = *s == '-';
        unsigned long long acc = 0;
        for (const char *d = s + negative; d < ps->p; d++) {
            if (acc > (ULLONG_MAX - 9) / 10) {
                v->huge = true;
                break;
            }
            acc = acc * 10 + (unsigned long long)(*d - '0');
        }
        if (acc > (unsigned long long)LLONG_MAX)
            v->huge = true;
        v->integer = v->huge ? 0 : (negative ? -(long long)acc : (long long)acc);
    }
    return v;
}

static struct jval *jcontainer(struct jparser *ps, bool object) {
    if (++ps->depth > MAX_JSON_DEPTH) {
        jfail(ps, "Too deeply nested");
        return NULL;
    }
    struct jval *v = jnew(object ? J_OBJ : J_ARR);
    struct jval **tail = &v->child;
    char close = object ? '}' : ']';
    ps->p++;
    jskip(ps);
    if (ps->p < ps->end && *ps->p == close) {
        ps->p++;
        ps->depth--;
        return v;
    }
    for (;;) {
        char *key = NULL;
        size_t key_len = 0;
        bool key_bad = false;
        if (object) {
            jskip(ps);
            if (ps->p >= ps->end || *ps->p != '"') {
                jfail(ps, "Expecting property name enclosed in double quotes");
                goto fail;
            }
            if (!jstring(ps, &key, &key_len, &key_bad))
                goto fail;
            jskip(ps);
            if (ps->p >= ps->end || *ps->p != ':') {
                free(key);
                jfail(ps, "Expecting ':' delimiter");
                goto fail;
            }
            ps->p++;
        }
        struct jval *item = jvalue(ps);
        if (!item) {
            free(key);
            goto fail;
        }
        item->key = key;
        item->key_len = key_len;
        item->key_unencodable = key_bad;
        *tail = item;
        tail = &item->next;
        jskip(ps);
        if (ps->p < ps->end && *ps->p == ',') {
            ps->p++;
            continue;
        }
        if (ps->p < ps->end && *ps->p == close) {
            ps->p++;
            break;
        }
        jfail(ps, "Expecting ',' delimiter");
        goto fail;
    }
    ps->depth--;
    return v;
fail:
    jfree(v);
    return NULL;
}

static struct jval *jvalue(struct jparser *ps) {
    jskip(ps);
    if (ps->p >= ps->end) {
        jfail(ps, "Expecting value");
        return NULL;
    }
    switch (*ps->p) {
    case '{':
        return jcontainer(ps, true);
    case '[':
        return jcontainer(ps, false);
    case '"': {
        struct jval *v = jnew(J_STR);
        if (!jstring(ps, &v->str, &v->len, &v->unencodable)) {
            free(v);
            return NULL;
        }
        return v;
    }
    case 'n':
        if (jliteral(ps, "null"))
            return jnew(J_NULL);
        break;
    case 't':
        if (jliteral(ps, "true"))
            return jnew(J_TRUE);
        break;
    case 'f':
        if (jliteral(ps, "false"))
            return jnew(J_FALSE);
        break;
    default:
        return jnumber(ps);
    }
    jfail(ps, "Expecting value");
    return NULL;
}

/* The whole payload as one JSON document, or NULL with a message in `error`. */
static struct jval *json_parse(const char *data, size_t n, char *error, size_t error_size) {
    struct jparser ps = {.p = data, .end = data + n, .start = data};
    for (size_t i = 0; i < n;) {
        size_t used;
        if (utf8_decode((const unsigned char *)data + i, n - i, &used) < 0) {
            snprintf(error, error_size, "payload is not UTF-8 (byte %zu)", i);
            return NULL;
        }
        i += used;
    }
    struct jval *v = jvalue(&ps);
    if (v) {
        jskip(&ps);
        if (ps.p != ps.end) {
            jfail(&ps, "Extra data");
            jfree(v);
            v = NULL;
        }
    }
    if (!v)
        snprintf(error, error_size, "%s", ps.error);
    return v;
}

/* A member of an object; the last one wins for a repeated name (as in Python). */
static struct jval *jget(const struct jval *object, const char *name) {
    struct jval *found = NULL;
    size_t n = strlen(name);
    for (struct jval *m = object->child; m; m = m->next)
        if (m->key_len == n && memcmp(m->key, name, n) == 0)
            found = m;
    return found;
}

/* ------------------------------------------------------------------------------------------ */
/* Frames to the gateway: blocking writes on fd 1 (the back-pressure towards the children)      */
/* ------------------------------------------------------------------------------------------ */

static bool gateway_gone; /* fd 1 is closed: nobody is listening any more */

static void send_frame(int kind, uint32_t channel, const void *payload, size_t len) {
    if (gateway_gone)
        return;
    unsigned char header[HEADER_SIZE] = {
        (unsigned char)kind,
        (unsigned char)(channel >> 24), (unsigned char)(channel >> 16),
        (unsigned char)(channel >> 8), (unsigned char)channel,
        (unsigned char)(len >> 24), (unsigned char)(len >> 16),
        (unsigned char)(len >> 8), (unsigned char)len,
    };
    struct iovec iov[2] = {{header, HEADER_SIZE}, {(void *)payload, len}};
    int count = len ? 2 : 1;
    struct iovec *v = iov;
    while (count > 0) {
        ssize_t n = writev(1, v, count);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN) {
                /* fd 1 made non-blocking (it can share a file description with fd 0). */
                struct pollfd p = {.fd = 1, .events = POLLOUT};
                poll(&p, 1, -1);
                continue;
            }
            gateway_gone = true;
            return;
        }
        size_t done = (size_t)n;
        while (count > 0 && done >= v->iov_len) {
            done -= v->iov_len;
            v++;
            count--;
        }
        if (count > 0) {
            v->iov_base = (char *)v->iov_base + done;
            v->iov_len -= done;
        }
    }
}

static void send_json(int kind, uint32_t channel, struct buf *json) {
    send_frame(kind, channel, json->data + json->off, buf_size(json));
    buf_free(json);
}

static void send_error(uint32_t channel, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void send_error(uint32_t channel, const char *fmt, ...) {
    char message[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    struct buf b = {0};
    buf_str(&b, "{\"message\":");
    json_string(&b, message, strlen(message));
    buf_str(&b, "}");
    send_json(ERROR, channel, &b);
}

static void send_error_bytes(uint32_t channel, const char *message, size_t n) {
    struct buf b = {0};
    buf_str(&b, "{\"message\":");
    json_string(&b, message, n);
    buf_str(&b, "}");
    send_json(ERROR, channel, &b);
}

/* ------------------------------------------------------------------------------------------ */
/* Exec requests                                                                              */
/* ------------------------------------------------------------------------------------------ */

struct request {
    char **argv; /* NULL-terminated */
    int argc;
    char **env; /* "NAME=value", NULL-terminated, in the request's order, names unique */
    int envc;
    char *cwd;
};

static void request_free(struct request *r) {
    if (!r)
        return;
    for (int i = 0; i < r->argc; i++)
        free(r->argv[i]);
    for (int i = 0; i < r->envc; i++)
        free(r->env[i]);
    free(r->argv);
    free(r->env);
    free(r->cwd);
    free(r);
}

/* The value of NAME in an environment, or NULL. */
static const char *env_get(char *const *env, const char *name) {
    size_t n = strlen(name);
    for (; *env; env++)
        if (strncmp(*env, name, n) == 0 && (*env)[n] == '=')
            return *env + n + 1;
    return NULL;
}

/* Validates an EXEC payload as parse_exec did; NULL with a message in `error`. */
static struct request *parse_exec(const char *payload, size_t n, bool *last, char *error,
                                  size_t error_size) {
    char json_error[128];
    struct jval *root = json_parse(payload, n, json_error, sizeof json_error);
    struct request *r = NULL;
    const char *problem = NULL;
    if (!root) {
        snprintf(error, error_size, "%s", json_error);
        return NULL;
    }
    if (root->type != J_OBJ) {
        problem = "EXEC payload must be a JSON object";
        goto done;
    }
    struct jval *argv = jget(root, "argv");
    if (!argv || argv->type != J_ARR) {
        problem = "argv must be a list of strings";
        goto done;
    }
    int argc = 0;
    for (struct jval *a = argv->child; a; a = a->next) {
        if (a->type != J_STR) {
            problem = "argv must be a list of strings";
            goto done;
        }
        if (strlen(a->str) != a->len) {
            problem = "argv contains a NUL character";
            goto done;
        }
        argc++;
    }
    if (argc == 0 || argv->child->len == 0) {
        problem = "argv must be non-empty";
        goto done;
    }
    struct jval *env = jget(root, "env");
    if (!env || env->type != J_OBJ) {
        problem = "env must be an object of strings";
        goto done;
    }
    int envc = 0;
    for (struct jval *e = env->child; e; e = e->next) {
        if (e->type != J_STR) {
            problem = "env values must be strings";
            goto done;
        }
        if (e->key_len == 0 || memchr(e->key, '=', e->key_len) || strlen(e->key) != e->key_len ||
            strlen(e->str) != e->len) {
            snprintf(error, error_size, "invalid environment variable name ");
            size_t used = strlen(error);
            struct buf quoted = {0};
            json_string(&quoted, e->key, e->key_len);
            snprintf(error + used, error_size - used, "%.*s", (int)buf_size(&quoted),
                     quoted.data);
            buf_free(&quoted);
            jfree(root);
            return NULL;
        }
        envc++;
    }
    struct jval *cwd = jget(root, "cwd");
    if (!cwd || cwd->type != J_STR || cwd->len == 0 || strlen(cwd->str) != cwd->len) {
        problem = "cwd must be a non-empty string";
        goto done;
    }
    struct jval *last_value = jget(root, "last");
    *last = false;
    if (last_value) {
        if (last_value->type != J_TRUE && last_value->type != J_FALSE) {
            problem = "last must be a boolean";
            goto done;
        }
        *last = last_value->type == J_TRUE;
    }
    bool unencodable = cwd->unencodable;
    for (struct jval *a = argv->child; a; a = a->next)
        unencodable |= a->unencodable;
    for (struct jval *e = env->child; e; e = e->next)
        unencodable |= e->unencodable || e->key_unencodable;
    if (unencodable) {
        problem = "argv, env and cwd must be encodable";
        goto done;
    }
    r = xmalloc(sizeof *r);
    memset(r, 0, sizeof *r);
    r->argv = xmalloc(sizeof(char *) * (size_t)(argc + 1));
    for (struct jval *a = argv->child; a; a = a->next)
        r->argv[r->argc++] = xstrndup(a->str, a->len);
    r->argv[r->argc] = NULL;
    r->env = xmalloc(sizeof(char *) * (size_t)(envc + 1));
    for (struct jval *e = env->child; e; e = e->next) {
        /* A repeated name keeps its first place and its last value (a Python dict). */
        int at = -1;
        for (int i = 0; i < r->envc; i++)
            if (strncmp(r->env[i], e->key, e->key_len) == 0 && r->env[i][e->key_len] == '=')
                at = i;
        char *item = xmalloc(e->key_len + e->len + 2);
        memcpy(item, e->key, e->key_len);
        item[e->key_len] = '=';
        memcpy(item + e->key_len + 1, e->str, e->len + 1);
        if (at >= 0) {
            free(r->env[at]);
            r->env[at] = item;
        } else {
            r->env[r->envc++] = item;
        }
    }
    r->env[r->envc] = NULL;
    r->cwd = xstrndup(cwd->str, cwd->len);
done:
    if (problem)
        snprintf(error, error_size, "%s", problem);
    jfree(root);
    return r;
}

/* Where execvpe would look for argv[0]: itself if it holds a '/', else each PATH entry of the
 * exec's environment (DEFAULT_PATH if it has none). NULL-terminated; free with free_list. */
static char **candidates(const char *file, char *const *env) {
    char **out;
    if (strchr(file, '/')) {
        out = xmalloc(2 * sizeof *out);
        out[0] = xstrndup(file, strlen(file));
        out[1] = NULL;
        return out;
    }
    const char *path = env_get(env, "PATH");
    if (!path)
        path = DEFAULT_PATH;
    size_t count = 1;
    for (const char *p = path; *p; p++)
        count += *p == ':';
    out = xmalloc((count + 1) * sizeof *out);
    size_t i = 0;
    const char *start = path;
    for (;;) {
        const char *end = strchr(start, ':');
        size_t len = end ? (size_t)(end - start) : strlen(start);
        const char *dir = len ? start : ".";
        size_t dir_len = len ? len : 1;
        while (dir_len > 1 && dir[dir_len - 1] == '/')
            dir_len--;
        if (dir_len == 1 && dir[0] == '/')
            dir_len = 0; /* "/" + "/" + file would be "//file": as Python's rstrip, "/file" */
        size_t file_len = strlen(file);
        char *c = xmalloc(dir_len + file_len + 2);
        memcpy(c, dir, dir_len);
        c[dir_len] = '/';
        memcpy(c + dir_len + 1, file, file_len + 1);
        out[i++] = c;
        if (!end)
            break;
        start = end + 1;
    }
    out[i] = NULL;
    return out;
}

static void free_list(char **list) {
    if (!list)
        return;
    for (char **p = list; *p; p++)
        free(*p);
    free(list);
}

/* ------------------------------------------------------------------------------------------ */
/* Starting processes: clone(CLONE_VM | CLONE_VFORK) on a stack of its own, as glibc's        */
/* posix_spawn does (no copy of the agent's address space: in gVisor a fork is the dearest    */
/* part of an exec). The agent is suspended until the child has exec'd or exited, and the     */
/* child shares its memory: a failure is written into spawn_args, so when clone returns the   */
/* agent knows whether the program started, with no pipe to read (every system call costs     */
/* ~26 us on gVisor's ptrace platform, and the child's are on the exec's path).               */
/* ------------------------------------------------------------------------------------------ */

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

static int spawn_child(void *arg) {
    struct spawn_args *a = arg;
    setpgid(0, 0);
    /* The agent's only handler (SIGCHLD's) is reset by execve, and it ignores no signal (it
     * blocks them, and resets those it blocks at start): an empty mask leaves every signal at
     * its default. */
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    for (int i = 0; i < 3; i++) {
        if (dup2(a->fds[i], i) < 0) {
            a->failed_errno = errno;
            a->failed_stage = STAGE_EXEC;
            _exit(EXIT_CANNOT_EXECUTE);
        }
    }
    if (chdir(a->cwd) < 0) {
        a->failed_errno = errno;
        a->failed_stage = STAGE_CHDIR;
        _exit(EXIT_CANNOT_EXECUTE);
    }
    int saved = 0, last = ENOENT;
    for (char **c = a->candidates; *c; c++) {
        execve(*c, a->argv, a->env);
        last = errno;
        if (last == EACCES && !saved)
            saved = last;
    }
    int failure = saved ? saved : last;
    a->failed_errno = failure;
    a->failed_stage = STAGE_EXEC;
    _exit(failure == ENOENT || failure == ENOTDIR ? EXIT_NOT_FOUND : EXIT_CANNOT_EXECUTE);
}

static char *spawn_stack;
#define SPAWN_STACK_SIZE (256 * 1024)

/* Starts a process; its pid, or -errno when no process could be created. A pid with
 * a->failed_stage set is a child that could not run the program and has exited (126 or 127). */
static pid_t spawn(struct spawn_args *a) {
    if (!spawn_stack) {
        void *stack = mmap(NULL, SPAWN_STACK_SIZE, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
        if (stack == MAP_FAILED)
            return -errno;
        spawn_stack = stack;
    }
    a->failed_stage = STAGE_NONE;
    a->failed_errno = 0;
    pid_t pid = clone(spawn_child, spawn_stack + SPAWN_STACK_SIZE,
                      CLONE_VM | CLONE_VFORK | SIGCHLD, a);
    if (pid < 0)
        return -errno;
    if (a->failed_stage == STAGE_NONE)
        setpgid(pid, pid); /* also here, as the child did: never a window without the group */
    return pid;
}

/* ------------------------------------------------------------------------------------------ */
/* The agent's state                                                                          */
/* ------------------------------------------------------------------------------------------ */

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

static struct exec *execs; /* running execs (every channel with an EXIT still to send) */
static uint32_t *used_channels; /* sorted */
static size_t used_count, used_cap;
static pid_t *finished_pgids; /* groups that may still hold background processes */
static size_t finished_count, finished_cap;
static struct buf inbuf;
static size_t skip_bytes; /* of an oversized frame still to discard */
static int wake_r = -1, wake_w = -1;

static bool zygote_enabled = true;
static pid_t zygote_pid, zygote_standby;
static int zygote_sock = -1;
static int standby_sock = -1; /* to the standby: it takes an exec's pipes from the agent */
static int zygote_failures;
static double zygote_due, zygote_latest;
static char *zygote_source;
static char zygote_path[PATH_MAX];

static long long oom_kill_count(void) {
    /* The kernel's count of OOM kills (oom_kill in /proc/vmstat), -1 where there is none
     * (gVisor). In a VM it is the guest kernel's own; in a container the host's. */
    static char data[65536];
    static bool absent; /* no file or no counter: the kernel does not grow one later */
    if (absent)
        return -1;
    int fd = open("/proc/vmstat", O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        absent = errno == ENOENT;
        return -1;
    }
    size_t len = 0;
    for (;;) {
        ssize_t n = read(fd, data + len, sizeof data - 1 - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        len += (size_t)n;
        if (len == sizeof data - 1)
            break;
    }
    close(fd);
    data[len] = 0;
    char *at = strstr(data, "\noom_kill ");
    if (!at) {
        absent = len > 0;
        return -1;
    }
    char *end;
    errno = 0;
    long long value = strtoll(at + 10, &end, 10);
    if (errno || end == at + 10 || (*end != '\n' && *end != 0))
        return -1;
    return value;
}

static struct exec *exec_new(uint32_t channel) {
    struct exec *ex = xmalloc(sizeof *ex);
    memset(ex, 0, sizeof *ex);
    ex->channel = channel;
    ex->stdin_fd = ex->stdout_fd = ex->stderr_fd = ex->start_fd = -1;
    ex->oom_kills = oom_kill_count(); /* before the process exists */
    return ex;
}

static void exec_link(struct exec *ex) {
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

static struct exec *exec_by_channel(uint32_t channel) {
    for (struct exec *ex = execs; ex; ex = ex->next)
        if (ex->channel == channel)
            return ex;
    return NULL;
}

static struct exec *exec_by_pid(pid_t pid) {
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

/* ------------------------------------------------------------------------------------------ */
/* Stdin, output, start reports                                                               */
/* ------------------------------------------------------------------------------------------ */

static void close_stdin(struct exec *ex) {
    if (ex->stdin_fd < 0)
        return;
    close(ex->stdin_fd);
    ex->stdin_fd = -1;
    buf_free(&ex->pending);
}

/* A zygote exec its standby has not started yet (its start pipe still open): its user input
 * waits behind its request, kept for a normal exec should it fall back. */
static bool held(const struct exec *ex) {
    return ex->zygote && ex->start_fd >= 0;
}

/* Whether pending input can be written now: a held exec takes only its request. */
static bool stdin_writable(const struct exec *ex) {
    return ex->stdin_fd >= 0 && buf_size(&ex->pending) && (!held(ex) || ex->request_left);
}

/* Writes as much pending input as the pipe takes (the main loop polls for the rest). */
static void flush_stdin(struct exec *ex) {
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

static void close_output(struct exec *ex, int kind) {
    int *fd = kind == STDOUT ? &ex->stdout_fd : &ex->stderr_fd;
    if (*fd >= 0) {
        close(*fd);
        *fd = -1;
    }
}

static char chunk[READ_CHUNK];

static void forward_output(struct exec *ex, int kind) {
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
static void check_start(struct exec *ex) {
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

/* ------------------------------------------------------------------------------------------ */
/* Exit                                                                                       */
/* ------------------------------------------------------------------------------------------ */

static void send_exit_without_child(uint32_t channel) {
    struct buf b = {0};
    buf_printf(&b, "{\"exit_code\":%d,\"signal\":null,\"cpu_time_ms\":0.0,\"max_rss_bytes\":0,"
                   "\"duration_ms\":0.0}", EXIT_CANNOT_EXECUTE);
    send_json(EXIT, channel, &b);
}

static void zygote_busy(void);

static void finish(struct exec *ex, int status, const struct rusage *usage) {
    double duration_ms = (monotonic() - ex->started) * 1000.0;
    /* The process is gone, so a zygote exec's error pipe is closed: settle STARTED / ERROR
     * before EXIT (the agent's own children reported theirs when clone returned). */
    check_start(ex);
    if (ex->stdout_fd >= 0)
        drain_output(ex, STDOUT);
    if (ex->stderr_fd >= 0)
        drain_output(ex, STDERR);
    struct buf b = {0};
    bool oom_killed = false;
    if (WIFSIGNALED(status)) {
        int sig = WTERMSIG(status);
        /* The OOM killer ends a process with SIGKILL: if the kernel counted an OOM kill while
         * this exec ran, the SIGKILL was (most likely) that one. */
        if (sig == SIGKILL && ex->oom_kills >= 0) {
            long long now = oom_kill_count();
            oom_killed = now >= 0 && now > ex->oom_kills;
        }
        buf_printf(&b, "{\"exit_code\":null,\"signal\":%d", sig);
    } else {
        buf_printf(&b, "{\"exit_code\":%d,\"signal\":null", WEXITSTATUS(status));
    }
    double cpu_ms = (double)(usage->ru_utime.tv_sec + usage->ru_stime.tv_sec) * 1000.0 +
                    (double)(usage->ru_utime.tv_usec + usage->ru_stime.tv_usec) / 1000.0;
    long long rss = usage->ru_maxrss > 0 ? (long long)usage->ru_maxrss * 1024 : 0;
    buf_printf(&b, ",\"cpu_time_ms\":%.3f,\"max_rss_bytes\":%lld,\"duration_ms\":%.3f,"
                   "\"oom_killed\":%s}",
               cpu_ms, rss, duration_ms < 0 ? 0.0 : duration_ms, oom_killed ? "true" : "false");
    send_json(EXIT, ex->channel, &b);
    exec_unlink(ex);
    zygote_busy();
    /* An exec the zygote served is over, so its next standby competes with it no more: "R"
     * has it forked now, ready for an exec that follows, rather than after 50 ms of quiet. */
    if (ex->zygote && zygote_sock >= 0 &&
        send(zygote_sock, "R", 1, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) {
        /* full or gone: the quiet timer still refills it, and a gone zygote is seen at once */
    }
    close_stdin(ex);
    close_output(ex, STDOUT);
    close_output(ex, STDERR);
    if (ex->start_fd >= 0)
        close(ex->start_fd);
    remember_group(ex->pid);
    exec_free(ex);
}

/* ------------------------------------------------------------------------------------------ */
/* Normal execs                                                                               */
/* ------------------------------------------------------------------------------------------ */

/* An exec's pipes as r, w pairs, close-on-exec: stdin, stdout, stderr, and for a zygote exec
 * (count 4) its error pipe; -1 for those not made. */
static int exec_pipes(int fds[8], int count) {
    for (int i = 0; i < 8; i++)
        fds[i] = -1;
    for (int i = 0; i < count; i++) {
        if (pipe2(fds + 2 * i, O_CLOEXEC) < 0) {
            int saved = errno;
            for (int k = 0; k < 8; k++)
                if (fds[k] >= 0)
                    close(fds[k]);
            return -saved;
        }
    }
    return 0;
}

/* Keeps the agent's ends of an exec's pipes (non-blocking) and closes the child's. */
static void track(struct exec *ex, pid_t pid, const int fds[8]) {
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
static void start_exec(uint32_t channel, struct request *r, struct exec *ex) {
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

/* ------------------------------------------------------------------------------------------ */
/* The python zygote                                                                          */
/* ------------------------------------------------------------------------------------------ */

static bool zygote_wanted(void) {
    return zygote_enabled && zygote_sock < 0 && zygote_failures < ZYGOTE_MAX_FAILURES;
}

/* Activity postpones the zygote's start (it would compete for the CPU), up to a limit. */
static void zygote_busy(void) {
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
static void quiesce(void) {
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
static void zygote_message(void) {
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

/* ------------------------------------------------------------------------------------------ */
/* Frames from the gateway                                                                    */
/* ------------------------------------------------------------------------------------------ */

static void on_exec(uint32_t channel, const char *payload, size_t n) {
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
        zygote_enabled = false; /* the gateway ends the sandbox after this exec */
    zygote_busy();
    if (zygote_sock >= 0 && zygote_can_serve(r)) {
        if (standby_sock >= 0 && spawn_on_standby(channel, r))
            return;
        /* No standby: execs came together, or the zygote cannot fork one (stopped by code in
         * the sandbox: then it is replaced, as a dead one is). */
        if (zygote_pid && process_stopped(zygote_pid))
            zygote_gone(true);
    }
    start_exec(channel, r, NULL);
}

static void on_stdin(uint32_t channel, const char *payload, size_t n) {
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

static void on_stdin_close(uint32_t channel) {
    struct exec *ex = exec_by_channel(channel);
    if (!ex || ex->stdin_fd < 0)
        return;
    ex->close_requested = true;
    if (!buf_size(&ex->pending))
        close_stdin(ex);
}

static void on_signal(uint32_t channel, const char *payload, size_t n) {
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

static int mkdirs(char *path) {
    /* mkdir -p of path's parent components, then path itself (0755, subject to the umask). */
    struct stat st;
    if (stat(path, &st) == 0)
        return S_ISDIR(st.st_mode) ? 0 : -EEXIST;
    for (char *p = path + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = 0;
        int rc = mkdir(path, 0755);
        int saved = errno;
        *p = '/';
        if (rc < 0 && saved != EEXIST)
            return -saved;
    }
    if (mkdir(path, 0755) < 0 && errno != EEXIST)
        return -errno;
    if (stat(path, &st) < 0)
        return -errno;
    return S_ISDIR(st.st_mode) ? 0 : -EEXIST;
}

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
        int rc = mkdirs(path->str);
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

static void on_write_file(uint32_t channel, const char *payload, size_t n) {
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

static void dispatch(int kind, uint32_t channel, const char *payload, size_t n) {
    switch (kind) {
    case STDIN:
        on_stdin(channel, payload, n);
        break;
    case EXEC:
        on_exec(channel, payload, n);
        break;
    case STDIN_CLOSE:
        on_stdin_close(channel);
        break;
    case SIGNAL:
        on_signal(channel, payload, n);
        break;
    case PING:
        if (n > MAX_PING_PAYLOAD)
            send_error(0, "PING payload is %zu bytes, limit is %d", n, MAX_PING_PAYLOAD);
        else
            send_frame(PONG, channel, payload, n);
        break;
    case WRITE_FILE:
        on_write_file(channel, payload, n);
        break;
    case QUIESCE:
        quiesce();
        break;
    default:
        send_error(0, "unknown frame kind %d", kind);
    }
}

static uint32_t be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* Reads what fd 0 has and dispatches complete frames; false on EOF. */
static bool read_gateway(void) {
    buf_reserve(&inbuf, INPUT_CHUNK);
    ssize_t n = read(0, inbuf.data + inbuf.len, INPUT_CHUNK);
    if (n < 0)
        return errno == EAGAIN || errno == EINTR;
    if (n == 0)
        return false;
    size_t got = (size_t)n;
    if (skip_bytes) {
        size_t dropped = skip_bytes < got ? skip_bytes : got;
        skip_bytes -= dropped;
        memmove(inbuf.data + inbuf.len, inbuf.data + inbuf.len + dropped, got - dropped);
        got -= dropped;
    }
    inbuf.len += got;
    while (buf_size(&inbuf) >= HEADER_SIZE) {
        const unsigned char *h = (const unsigned char *)inbuf.data + inbuf.off;
        int kind = h[0];
        uint32_t channel = be32(h + 1), length = be32(h + 5);
        if (length > MAX_GATEWAY_FRAME) {
            send_error(0, "frame of kind %d is %" PRIu32 " bytes, limit is %d", kind, length,
                       MAX_GATEWAY_FRAME);
            inbuf.off += HEADER_SIZE;
            size_t available = buf_size(&inbuf) < length ? buf_size(&inbuf) : length;
            inbuf.off += available;
            skip_bytes = length - available;
            continue;
        }
        if (buf_size(&inbuf) < HEADER_SIZE + (size_t)length)
            break;
        const char *payload = inbuf.data + inbuf.off + HEADER_SIZE;
        inbuf.off += HEADER_SIZE + length;
        /* Handlers copy what they keep: the buffer is compacted before the next read. */
        dispatch(kind, channel, payload, length);
    }
    if (inbuf.off == inbuf.len)
        inbuf.off = inbuf.len = 0;
    return true;
}

/* ------------------------------------------------------------------------------------------ */
/* Reaping, the loop, shutdown                                                                */
/* ------------------------------------------------------------------------------------------ */

static void reap(void) {
    for (;;) {
        int status;
        struct rusage usage;
        pid_t pid = wait4(-1, &status, WNOHANG, &usage);
        if (pid < 0 && errno == EINTR)
            continue;
        if (pid <= 0)
            return;
        if (pid == zygote_pid) {
            zygote_gone(true);
            continue;
        }
        if (pid == zygote_standby) {
            standby_released(); /* reaped: its pid may be reused, never to be killed */
            continue;
        }
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

/* Milliseconds until the zygote needs attention (its start, a held exec's check), or -1. */
static int poll_timeout(void) {
    double due = -1;
    if (zygote_wanted() && !execs)
        due = zygote_due;
    for (struct exec *ex = execs; ex; ex = ex->next)
        if (held(ex) && (due < 0 || ex->deadline < due))
            due = ex->deadline;
    if (due < 0)
        return -1;
    double ms = (due - monotonic()) * 1000.0;
    return ms <= 0 ? 0 : (int)ms + 1;
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

static void zygote_tick(void) {
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

enum slot_kind {
    SLOT_GATEWAY, SLOT_WAKE, SLOT_ZYGOTE, SLOT_STDOUT, SLOT_STDERR, SLOT_START, SLOT_STDIN,
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
        if (zygote_sock >= 0)
            n = add_slot(n, SLOT_ZYGOTE, 0, zygote_sock, POLLIN);
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
                if (zygote_sock == s->fd)
                    zygote_message();
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
    for (size_t i = 0; i < finished_count; i++)
        kill(-finished_pgids[i], SIGKILL);
    for (struct exec *ex = execs; ex; ex = ex->next)
        kill(-ex->pid, SIGKILL);
    if (zygote_pid)
        kill(-zygote_pid, SIGKILL);
    if (zygote_standby)
        kill(-zygote_standby, SIGKILL);
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
    const char *setting = getenv("SANDSTORM_ZYGOTE");
    zygote_enabled = !(setting && strcmp(setting, "0") == 0);
    /* zygote.py lives next to the directory of this binary (bin/). */
    const char *self = argv[0] ? argv[0] : "";
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
    run();
    shutdown_all();
    return 0;
}
