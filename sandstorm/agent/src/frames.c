/* Frames: those to the gateway are written whole with blocking writes on fd 1 (the back-pressure
 * towards the children); those from it are read from fd 0 and dispatched in order. */
#include "agent.h"

bool gateway_gone;

static struct buf inbuf;
static size_t skip_bytes; /* of an oversized frame still to discard */

void send_frame(int kind, uint32_t channel, const void *payload, size_t len) {
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

void send_json(int kind, uint32_t channel, struct buf *json) {
    send_frame(kind, channel, json->data + json->off, buf_size(json));
    buf_free(json);
}

void send_error(uint32_t channel, const char *fmt, ...) {
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

void send_error_bytes(uint32_t channel, const char *message, size_t n) {
    struct buf b = {0};
    buf_str(&b, "{\"message\":");
    json_string(&b, message, n);
    buf_str(&b, "}");
    send_json(ERROR, channel, &b);
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
    case FS:
        on_fs(channel, payload, n);
        break;
    case FS_DATA:
        on_fs_data(channel, payload, n);
        break;
    case FS_END:
        on_fs_end(channel, payload, n);
        break;
    case FS_CREDIT:
        on_fs_credit(channel, payload, n);
        break;
    default:
        send_error(0, "unknown frame kind %d", kind);
    }
}

static uint32_t be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* Reads what fd 0 has and dispatches complete frames; false on EOF. */
bool read_gateway(void) {
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
