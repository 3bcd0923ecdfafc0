/* A stand-in for CRMod/CRTomo that does nothing but what the worker checks:
 * it writes the expected output and exits at once, so everything the bench
 * measures around it is the queue's own overhead.  Built by bench/run.
 *
 * Called as ".../crmod" it writes ../mod/volt.dat, as ".../crtomo" it writes
 * ../inv/inv.ctr ending in ***finished*** (the worker runs solvers in exe/).
 * CRQ_BENCH_COPY=SRC:DST copies a file (relative to exe/) to make a large
 * result.  CRQ_BENCH_LOG=FILE appends "start end token cwd" (CLOCK_REALTIME
 * seconds), token being the content of exe/bench_id if present.
 * A file exe/bench_sleep holding a number of seconds (or CRQ_BENCH_SLEEP=SECONDS)
 * makes it sleep that long first: a solver of known runtime (the fleet rows'
 * campaign).
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    if (!f) return 1;
    fputs(text, f);
    return fclose(f) != 0;
}

static int copy_file(const char *spec) {
    char src[4096], *dst;
    static char buf[1 << 20];
    strncpy(src, spec, sizeof src - 1);
    src[sizeof src - 1] = 0;
    dst = strchr(src, ':');
    if (!dst) return 1;
    *dst++ = 0;
    int in = open(src, O_RDONLY), out = open(dst, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (in < 0 || out < 0) return 1;
    ssize_t n;
    while ((n = read(in, buf, sizeof buf)) > 0)
        if (write(out, buf, (size_t)n) != n) return 1;
    close(in);
    return close(out) != 0 || n < 0;
}

int main(int argc, char **argv) {
    double start = now();
    double sleep_s = 0;
    FILE *sf = fopen("bench_sleep", "r");
    if (sf) {
        if (fscanf(sf, "%lf", &sleep_s) != 1) sleep_s = 0;
        fclose(sf);
    } else if (getenv("CRQ_BENCH_SLEEP")) {
        sleep_s = atof(getenv("CRQ_BENCH_SLEEP"));
    }
    if (sleep_s > 0) {
        struct timespec t = {(time_t)sleep_s, (long)((sleep_s - (double)(time_t)sleep_s) * 1e9)};
        while (nanosleep(&t, &t) != 0) {}
    }
    const char *name = strrchr(argv[0], '/');
    name = name ? name + 1 : argv[0];
    int rc = strstr(name, "crtomo") ? write_text("../inv/inv.ctr", "bench\n***finished***\n")
                                     : write_text("../mod/volt.dat", "1\n10002 40003 1.0E+00 0.0E+00\n");
    const char *copy = getenv("CRQ_BENCH_COPY");
    if (copy && *copy) rc |= copy_file(copy);
    double end = now();
    const char *log = getenv("CRQ_BENCH_LOG");
    if (log && *log) {
        char token[256] = "-", cwd[4096] = "?", line[8192];
        FILE *t = fopen("bench_id", "r");
        if (t) {
            if (!fgets(token, sizeof token, t)) strcpy(token, "-");
            token[strcspn(token, "\n")] = 0;
            fclose(t);
        }
        if (!getcwd(cwd, sizeof cwd)) strcpy(cwd, "?");
        int n = snprintf(line, sizeof line, "%.6f %.6f %s %s\n", start, end, token, cwd);
        int fd = open(log, O_WRONLY | O_APPEND | O_CREAT, 0644);
        if (fd >= 0) {
            if (write(fd, line, (size_t)n) != n) rc = 1;
            close(fd);
        }
    }
    (void)argc;
    return rc;
}
