/*
 * JSON, in and out. In: a strict parser (RFC 8259, as Python's json with strict=True, NaN and
 * Infinity refused) of the gateway's control payloads into a small tree. Out: a JSON string.
 *
 * The parser is the agent's own rather than a packaged library's (Debian's libjansson-dev links
 * statically, but does not fit): an escaped lone surrogate \udc80..\udcff must decode to the
 * byte it stands for, as Python's os.fsencode does, where jansson refuses the whole payload;
 * nesting is refused past MAX_JSON_DEPTH, a bound jansson fixes at build time; a name may hold
 * NUL (refused later, with the reason, as a variable name); an integer beyond long long is out
 * of range rather than a syntax error; and the messages are Python's json's. Every payload is
 * hostile: tests/unit/agent/test_json.py checks this file against Python's json and fuzzes it.
 */
#include "agent.h"

/* A JSON string, ASCII only (as Python's json does): bytes that are not UTF-8 become U+FFFD. */
void json_string(struct buf *b, const char *s, size_t n) {
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

struct jparser {
    const char *p, *end, *start;
    char error[96];
    int depth;
};

void jfree(struct jval *v) {
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
struct jval *json_parse(const char *data, size_t n, char *error, size_t error_size) {
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
struct jval *jget(const struct jval *object, const char *name) {
    struct jval *found = NULL;
    size_t n = strlen(name);
    for (struct jval *m = object->child; m; m = m->next)
        if (m->key_len == n && memcmp(m->key, name, n) == 0)
            found = m;
    return found;
}
