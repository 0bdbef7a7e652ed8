/* An EXEC's request: argv, env, cwd and background checked as the gateway's schema states them,
 * copied out of the parsed payload so that nothing of the frame is kept. */
#include "agent.h"

void request_free(struct request *r) {
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
const char *env_get(char *const *env, const char *name) {
    size_t n = strlen(name);
    for (; *env; env++)
        if (strncmp(*env, name, n) == 0 && (*env)[n] == '=')
            return *env + n + 1;
    return NULL;
}

/* Validates an EXEC payload; NULL with a message in `error`. */
struct request *parse_exec(const char *payload, size_t n, bool *last, char *error,
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
    struct jval *background = jget(root, "background");
    if (background && background->type != J_TRUE && background->type != J_FALSE) {
        problem = "background must be a boolean";
        goto done;
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
    r->background = background && background->type == J_TRUE;
done:
    if (problem)
        snprintf(error, error_size, "%s", problem);
    jfree(root);
    return r;
}
