/*
 * Starting processes: clone(CLONE_VM | CLONE_VFORK) on a stack of its own, as glibc's
 * posix_spawn does (no copy of the agent's address space: in gVisor a fork is the dearest part
 * of an exec). The agent is suspended until the child has exec'd or exited, and the child shares
 * its memory: a failure is written into spawn_args, so when clone returns the agent knows whether
 * the program started, with no pipe to read (system calls are dear in gVisor, and the child's are
 * on the exec's path).
 */
#include "agent.h"

/* Where execvpe would look for argv[0]: itself if it holds a '/', else each PATH entry of the
 * exec's environment (DEFAULT_PATH if it has none). NULL-terminated; free with free_list. */
char **candidates(const char *file, char *const *env) {
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

void free_list(char **list) {
    if (!list)
        return;
    for (char **p = list; *p; p++)
        free(*p);
    free(list);
}

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
pid_t spawn(struct spawn_args *a) {
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

/* An exec's pipes as r, w pairs, close-on-exec: stdin, stdout, stderr, and for a zygote exec
 * (count 4) its error pipe; -1 for those not made. */
int exec_pipes(int fds[8], int count) {
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

