/*
 * statx-shim: make Debian 12's coreutils work under Debian 12's own gVisor (runsc 0.0~20221219).
 *
 * Why it exists: that gVisor rejects statx(2) with EINVAL when flags contain
 * AT_NO_AUTOMOUNT (0x800). Bookworm's coreutils always pass it (ls, stat, ...), so inside a
 * sandbox `ls -la /` fails with "cannot access '/': Invalid argument". newfstatat, which
 * Python, Node and bash use, accepts the flag and needs no help. The runsc that
 * scripts/install.sh installs (0.0~20240729 or newer) accepts the flag too; there the shim
 * changes nothing, so one image serves under either.
 *
 * What it does: the image builder compiles this file into /usr/lib/sandstorm/statx-shim.so and
 * names it in the image's /etc/ld.so.preload, so this statx() interposes glibc's wrapper in
 * every dynamically linked program. It calls the raw syscall with AT_NO_AUTOMOUNT cleared and
 * everything else unchanged. Dropping the flag changes nothing there: gVisor has no automount
 * points, so "do not trigger an automount" is already what always happens. syscall(2) gives
 * the usual wrapper semantics: -1 with errno set on failure.
 *
 * Built on the host (Debian 12, glibc 2.36, x86_64: the same ABI as the image) with
 *   gcc -O2 -shared -fPIC -o statx-shim.so statx_shim.c
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

int statx(int dirfd, const char *restrict path, int flags, unsigned int mask,
          struct statx *restrict buf)
{
    return (int)syscall(SYS_statx, dirfd, path, flags & ~AT_NO_AUTOMOUNT, mask, buf);
}
