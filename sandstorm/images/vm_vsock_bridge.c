/* Sandstorm vsock bridge: the agent channel of a Firecracker guest (see
 * sandstorm/runtimes/firecracker/runtime.py).
 *
 *     vsock-bridge PORT COMMAND [ARG...]
 *
 * Firecracker has no virtio-serial; its host<->guest channel is vsock, where the host connects
 * to the device's Unix socket and sends "CONNECT PORT\n" (docs/vsock.md). A snapshot cannot keep
 * a vsock connection: Firecracker sends VIRTIO_VSOCK_EVENT_TRANSPORT_RESET when it takes one, so
 * after a restore the guest's connection is reset and the host must connect again. The agent
 * speaks over its stdin/stdout and must not notice, so this bridge sits between them: it runs
 * COMMAND (the agent) on one end of a socketpair, listens on vsock PORT for its whole life, and
 * relays between the socketpair and the newest host connection. While no host is connected,
 * agent output waits in a bounded buffer and then in the socketpair (the agent blocks, nothing
 * is dropped). Bytes already handed to a connection that a snapshot resets are lost; the
 * gateway takes snapshots of a quiet agent.
 *
 * It is started by the guest init (vm_init.c) as its one child, already as uid 1000 with no
 * capabilities, so the port must be above 1023. It exits with the agent's status, which ends the
 * VM. Static, no allocation: it starts in microseconds.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define BUF 65536

struct buffer {
    char data[BUF];
    size_t len;
};

static void fail(const char *what) {
    fprintf(stderr, "vsock-bridge: %s: %s\n", what, strerror(errno));
    exit(111);
}

/* Read what fits into b from fd: >0 read, 0 end of file, -1 error (EAGAIN counts as 1). */
static ssize_t fill(int fd, struct buffer *b) {
    ssize_t n = read(fd, b->data + b->len, BUF - b->len);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return 1;
    if (n > 0) b->len += n;
    return n;
}

/* Write what b holds to fd: 0 on progress, -1 on error. */
static int drain(int fd, struct buffer *b) {
    ssize_t n = send(fd, b->data, b->len, MSG_NOSIGNAL);
    if (n < 0) return (errno == EAGAIN || errno == EINTR) ? 0 : -1;
    memmove(b->data, b->data + n, b->len - n);
    b->len -= n;
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: vsock-bridge PORT COMMAND [ARG...]\n");
        return 2;
    }
    int listener = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (listener < 0) fail("socket(AF_VSOCK)");
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK,
                               .svm_port = (unsigned)strtoul(argv[1], NULL, 10),
                               .svm_cid = VMADDR_CID_ANY};
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) != 0) fail("bind");
    if (listen(listener, 4) != 0) fail("listen");

    int pair[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0) fail("socketpair");
    pid_t agent = fork();
    if (agent < 0) fail("fork");
    if (agent == 0) {
        if (dup2(pair[1], 0) < 0 || dup2(pair[1], 1) < 0) fail("dup2");
        execvp(argv[2], argv + 2);
        fail(argv[2]);
    }
    close(pair[1]);
    /* Never block on the agent's side: it may be writing output while we write its input. */
    if (fcntl(pair[0], F_SETFL, O_NONBLOCK) != 0) fail("fcntl");
    signal(SIGPIPE, SIG_IGN);

    static struct buffer to_host, to_agent;
    int conn = -1, agent_open = 1, status = 0;
    for (;;) {
        struct pollfd fds[3] = {
            {listener, POLLIN, 0},
            {pair[0], (short)((agent_open && to_host.len < BUF ? POLLIN : 0) |
                              (to_agent.len ? POLLOUT : 0)), 0},
            {conn, (short)((to_agent.len < BUF ? POLLIN : 0) | (to_host.len ? POLLOUT : 0)), 0},
        };
        if (poll(fds, conn >= 0 ? 3 : 2, agent_open ? -1 : 100) < 0 && errno != EINTR)
            fail("poll");
        if (fds[0].revents & POLLIN) {
            /* The newest host connection wins: the host only connects again once the last
             * one is gone (a restore, or a gateway that dropped it). */
            int fresh = accept4(listener, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
            if (fresh >= 0) {
                if (conn >= 0) close(conn);
                conn = fresh;
                to_agent.len = 0; /* a partial frame of the old connection means nothing now */
                continue;
            }
        }
        if (fds[1].revents & (POLLIN | POLLHUP) && agent_open) {
            if (fill(pair[0], &to_host) <= 0) agent_open = 0;
        }
        if (fds[1].revents & POLLOUT && drain(pair[0], &to_agent) != 0) agent_open = 0;
        if (conn >= 0 && fds[2].revents) {
            int broken = (fds[2].revents & POLLERR) != 0;
            if (!broken && fds[2].revents & (POLLIN | POLLHUP)) broken = fill(conn, &to_agent) <= 0;
            if (!broken && fds[2].revents & POLLOUT) broken = drain(conn, &to_host) != 0;
            if (broken) {
                close(conn);
                conn = -1;
            }
        }
        if (!agent_open) {
            /* The agent is gone: hand the host what it wrote last, then leave with its status. */
            if (conn >= 0 && to_host.len) continue;
            if (waitpid(agent, &status, conn >= 0 ? 0 : WNOHANG) == agent || conn < 0) break;
        }
    }
    if (conn >= 0) shutdown(conn, SHUT_WR);
    if (waitpid(agent, &status, 0) < 0 && errno != ECHILD) fail("waitpid");
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}
