/* Disk faults for one `weir serve` process, switched on and off while it runs.
 *
 * Loaded with LD_PRELOAD; WEIR_DISKFAULT names a control file of two native int32s that the
 * harness rewrites in place (the shim maps it shared, so a change is seen at the next call):
 *
 *   [0] full:           when not 0, every write to a regular file fails with ENOSPC (a full
 *                       disk), and so does fallocate; sockets, pipes and the standard streams
 *                       (the node's log) are left alone.
 *   [1] fsync delay ms: when above 0, every fsync, fdatasync and sync_file_range first waits
 *                       that long (a slow or saturated device).
 *
 * Without WEIR_DISKFAULT the shim passes every call through untouched.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

static volatile int32_t *control;

__attribute__((constructor)) static void map_control(void) {
    const char *path = getenv("WEIR_DISKFAULT");
    if (path == NULL) return;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    void *m = mmap(NULL, 2 * sizeof(int32_t), PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (m != MAP_FAILED) control = m;
}

/* Whether a write to fd must fail because the disk is full. */
static int full(int fd) {
    if (control == NULL || control[0] == 0 || fd <= 2) return 0;
    struct stat st;
    return fstat(fd, &st) == 0 && S_ISREG(st.st_mode);
}

static void slow_sync(void) {
    if (control == NULL || control[1] <= 0) return;
    int32_t ms = control[1];
    struct timespec t = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&t, &t) != 0 && errno == EINTR) {
    }
}

#define REAL(name) \
    static __typeof__(name) *real; \
    if (real == NULL) real = (__typeof__(name) *)dlsym(RTLD_NEXT, #name)

#define NO_SPACE(fd) \
    if (full(fd)) { \
        errno = ENOSPC; \
        return -1; \
    }

ssize_t write(int fd, const void *buf, size_t n) {
    REAL(write);
    NO_SPACE(fd);
    return real(fd, buf, n);
}

ssize_t writev(int fd, const struct iovec *iov, int count) {
    REAL(writev);
    NO_SPACE(fd);
    return real(fd, iov, count);
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t at) {
    REAL(pwrite);
    NO_SPACE(fd);
    return real(fd, buf, n, at);
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off64_t at) {
    REAL(pwrite64);
    NO_SPACE(fd);
    return real(fd, buf, n, at);
}

ssize_t pwritev(int fd, const struct iovec *iov, int count, off_t at) {
    REAL(pwritev);
    NO_SPACE(fd);
    return real(fd, iov, count, at);
}

ssize_t pwritev64(int fd, const struct iovec *iov, int count, off64_t at) {
    REAL(pwritev64);
    NO_SPACE(fd);
    return real(fd, iov, count, at);
}

int fallocate(int fd, int mode, off_t at, off_t len) {
    REAL(fallocate);
    NO_SPACE(fd);
    return real(fd, mode, at, len);
}

int fallocate64(int fd, int mode, off64_t at, off64_t len) {
    REAL(fallocate64);
    NO_SPACE(fd);
    return real(fd, mode, at, len);
}

int fsync(int fd) {
    REAL(fsync);
    slow_sync();
    return real(fd);
}

int fdatasync(int fd) {
    REAL(fdatasync);
    slow_sync();
    return real(fd);
}

int sync_file_range(int fd, off64_t at, off64_t n, unsigned int flags) {
    REAL(sync_file_range);
    slow_sync();
    return real(fd, at, n, flags);
}
