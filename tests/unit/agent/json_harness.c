/*
 * The agent's JSON parser (sandstorm/agent/src/json.c) on its own, for test_json.py.
 *
 * stdin: records, each a 4-byte big-endian length and that many bytes of payload. stdout: one
 * line per record, "ok <tree>" or "error <message>". The tree is written in a form Python can
 * build from its own json module's result:
 *     n t f           null, true, false
 *     i<digits>       an integer in long long;  I  an integer beyond it
 *     d               a float (its value is never used by the agent)
 *     s<hex>          a string as the bytes it decodes to, then ! if it is unencodable
 *     [a,b]  {k:v,k:v}   arrays, objects (every member, repeated names included, in order)
 */
#include "agent.h"

static void dump_string(const char *s, size_t n, bool unencodable) {
    putchar('s');
    for (size_t i = 0; i < n; i++)
        printf("%02x", (unsigned char)s[i]);
    if (unencodable)
        putchar('!');
}

static void dump(const struct jval *v) {
    switch (v->type) {
    case J_NULL: putchar('n'); return;
    case J_TRUE: putchar('t'); return;
    case J_FALSE: putchar('f'); return;
    case J_FLOAT: putchar('d'); return;
    case J_INT:
        if (v->huge)
            putchar('I');
        else
            printf("i%lld", v->integer);
        return;
    case J_STR: dump_string(v->str, v->len, v->unencodable); return;
    case J_ARR:
    case J_OBJ:
        putchar(v->type == J_ARR ? '[' : '{');
        for (const struct jval *m = v->child; m; m = m->next) {
            if (m != v->child)
                putchar(',');
            if (v->type == J_OBJ) {
                dump_string(m->key, m->key_len, m->key_unencodable);
                putchar(':');
            }
            dump(m);
        }
        putchar(v->type == J_ARR ? ']' : '}');
        return;
    }
}

static bool read_exact(void *data, size_t n) {
    return fread(data, 1, n, stdin) == n;
}

int main(void) {
    unsigned char length[4];
    while (read_exact(length, 4)) {
        size_t n = ((size_t)length[0] << 24) | ((size_t)length[1] << 16) |
                   ((size_t)length[2] << 8) | length[3];
        char *data = xmalloc(n);
        if (!read_exact(data, n))
            return 2;
        char error[128];
        struct jval *v = json_parse(data, n, error, sizeof error);
        if (v) {
            fputs("ok ", stdout);
            dump(v);
            putchar('\n');
            jfree(v);
        } else {
            printf("error %s\n", error);
        }
        free(data);
    }
    return ferror(stdin) ? 2 : 0;
}
