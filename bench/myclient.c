/*
 * Small MySQL-protocol client for bench/run.sh (libmariadb).
 *
 *   myclient latency HOST PORT USER PASS N WARMUP
 *       one connection, WARMUP then N sequential "SELECT 1" (text protocol,
 *       result fetched and freed); prints
 *       "mean_us=.. p50_us=.. p99_us=.. wall_s=.. n=.. errors=.."
 *
 *   myclient idle HOST PORT USER PASS N PROCS
 *       opens N authenticated connections from PROCS child processes, prints
 *       "READY opened=.. failed=.. secs=.." (plus "FIRST_ERROR ..." if any),
 *       then holds them open until SIGTERM/SIGINT.
 *
 *   myclient bigrows HOST PORT USER PASS ROWS ROUNDS
 *       ROUNDS times: "SELECT REPEAT('x', 1 MiB) FROM mysql.seq_1_to_ROWS" (MariaDB's
 *       sequence engine), streamed with mysql_use_result; prints
 *       "bytes=.. secs=.. mb_per_s=.. errors=.."
 *
 * With MYCLIENT_TLS=1 in the environment every connection asks for TLS
 * (the server certificate is not verified: the benchmark uses auto-certs).
 */
#include <errno.h>
#include <mysql.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static MYSQL *open_conn(const char *host, int port, const char *user,
                        const char *pass, char *err, size_t errlen) {
    MYSQL *m = mysql_init(NULL);
    if (!m) {
        snprintf(err, errlen, "mysql_init: out of memory");
        return NULL;
    }
    unsigned int timeout = 20;
    mysql_options(m, MYSQL_OPT_CONNECT_TIMEOUT, &timeout);
    const char *tls = getenv("MYCLIENT_TLS");
    if (tls && strcmp(tls, "1") == 0) {
        my_bool on = 1, off = 0;
        mysql_options(m, MYSQL_OPT_SSL_ENFORCE, &on);
        mysql_options(m, MYSQL_OPT_SSL_VERIFY_SERVER_CERT, &off);
    }
    if (!mysql_real_connect(m, host, user, pass, NULL, port, NULL, 0)) {
        snprintf(err, errlen, "%u %s", mysql_errno(m), mysql_error(m));
        mysql_close(m);
        return NULL;
    }
    return m;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int latency(const char *host, int port, const char *user,
                   const char *pass, long n, long warmup) {
    char err[512];
    MYSQL *m = open_conn(host, port, user, pass, err, sizeof err);
    if (!m) {
        fprintf(stderr, "connect: %s\n", err);
        return 1;
    }
    double *lat = calloc((size_t)n, sizeof(double));
    long errors = 0;
    double t0 = 0;
    for (long i = -warmup; i < n; i++) {
        double a = now_s();
        if (i == 0) t0 = a;
        if (mysql_real_query(m, "SELECT 1", 8) != 0) {
            if (errors++ < 3) fprintf(stderr, "query: %u %s\n", mysql_errno(m), mysql_error(m));
            if (errors > 100) break;
            continue;
        }
        MYSQL_RES *r = mysql_store_result(m);
        if (!r) {
            if (errors++ < 3) fprintf(stderr, "store: %u %s\n", mysql_errno(m), mysql_error(m));
            continue;
        }
        mysql_free_result(r);
        if (i >= 0) lat[i] = (now_s() - a) * 1e6;
    }
    double wall = now_s() - t0;
    mysql_close(m);
    if (errors) {
        printf("mean_us=nan p50_us=nan p99_us=nan wall_s=%.3f n=%ld errors=%ld\n", wall, n, errors);
        return 1;
    }
    qsort(lat, (size_t)n, sizeof(double), cmp_double);
    printf("mean_us=%.2f p50_us=%.2f p99_us=%.2f wall_s=%.3f n=%ld errors=0\n",
           wall * 1e6 / n, lat[n / 2], lat[(long)(n * 0.99)], wall, n);
    free(lat);
    return 0;
}

static int bigrows(const char *host, int port, const char *user,
                   const char *pass, long rows, long rounds) {
    char err[512], q[128];
    MYSQL *m = open_conn(host, port, user, pass, err, sizeof err);
    if (!m) {
        fprintf(stderr, "connect: %s\n", err);
        return 1;
    }
    snprintf(q, sizeof q, "SELECT b FROM sbtest.big WHERE id <= %ld", rows);
    double bytes = 0, t0 = now_s();
    long errors = 0;
    for (long r = 0; r < rounds; r++) {
        if (mysql_real_query(m, q, strlen(q)) != 0) {
            fprintf(stderr, "query: %u %s\n", mysql_errno(m), mysql_error(m));
            errors++;
            break;
        }
        MYSQL_RES *res = mysql_use_result(m);
        if (!res) {
            fprintf(stderr, "use_result: %u %s\n", mysql_errno(m), mysql_error(m));
            errors++;
            break;
        }
        MYSQL_ROW row;
        long got = 0;
        while ((row = mysql_fetch_row(res))) {
            unsigned long *len = mysql_fetch_lengths(res);
            bytes += len[0];
            got++;
        }
        if (mysql_errno(m) || got != rows) {
            fprintf(stderr, "fetch: %ld of %ld rows: %u %s\n", got, rows, mysql_errno(m), mysql_error(m));
            errors++;
        }
        mysql_free_result(res);
    }
    double secs = now_s() - t0;
    mysql_close(m);
    printf("bytes=%.0f secs=%.3f mb_per_s=%.1f errors=%ld\n", bytes, secs, bytes / secs / 1e6, errors);
    return errors ? 1 : 0;
}

static volatile sig_atomic_t stop_flag = 0;
static void on_stop(int sig) { (void)sig; stop_flag = 1; }

struct report { long opened, failed; char err[240]; };

static int idle(const char *host, int port, const char *user, const char *pass,
                long n, int procs) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (procs < 1) procs = 1;
    int pfd[2];
    if (pipe(pfd) != 0) { perror("pipe"); return 1; }
    pid_t *kids = calloc((size_t)procs, sizeof(pid_t));
    double t0 = now_s();
    for (int p = 0; p < procs; p++) {
        long share = n / procs + (p < n % procs ? 1 : 0);
        pid_t pid = fork();
        if (pid < 0) { perror("fork"); return 1; }
        if (pid == 0) {
            close(pfd[0]);
            signal(SIGTERM, on_stop);
            signal(SIGINT, on_stop);
            MYSQL **conns = calloc((size_t)share + 1, sizeof(MYSQL *));
            struct report rep = {0, 0, ""};
            for (long i = 0; i < share && !stop_flag; i++) {
                char err[240];
                conns[i] = open_conn(host, port, user, pass, err, sizeof err);
                if (conns[i]) rep.opened++;
                else if (rep.failed++ == 0) snprintf(rep.err, sizeof rep.err, "%s", err);
            }
            if (write(pfd[1], &rep, sizeof rep) != sizeof rep) _exit(2);
            close(pfd[1]);
            while (!stop_flag) pause();
            _exit(0); /* the kernel closes the sockets */
        }
        kids[p] = pid;
    }
    close(pfd[1]);
    signal(SIGTERM, on_stop);
    signal(SIGINT, on_stop);
    long opened = 0, failed = 0;
    char first_err[240] = "";
    for (int p = 0; p < procs; p++) {
        struct report rep;
        ssize_t got;
        do { got = read(pfd[0], &rep, sizeof rep); } while (got < 0 && errno == EINTR && !stop_flag);
        if (got != sizeof rep) break;
        opened += rep.opened;
        failed += rep.failed;
        if (rep.failed && !first_err[0]) snprintf(first_err, sizeof first_err, "%s", rep.err);
    }
    printf("READY opened=%ld failed=%ld secs=%.2f\n", opened, failed, now_s() - t0);
    if (first_err[0]) printf("FIRST_ERROR %s\n", first_err);
    fflush(stdout);
    while (!stop_flag) pause();
    for (int p = 0; p < procs; p++) kill(kids[p], SIGTERM);
    for (int p = 0; p < procs; p++) waitpid(kids[p], NULL, 0);
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: %s latency|idle|bigrows HOST PORT USER PASS N WARMUP|PROCS|ROUNDS\n", argv[0]);
        return 2;
    }
    const char *mode = argv[1], *host = argv[2], *user = argv[4], *pass = argv[5];
    int port = atoi(argv[3]);
    long n = atol(argv[6]), extra = atol(argv[7]);
    if (strcmp(mode, "latency") == 0) return latency(host, port, user, pass, n, extra);
    if (strcmp(mode, "idle") == 0) return idle(host, port, user, pass, n, (int)extra);
    if (strcmp(mode, "bigrows") == 0) return bigrows(host, port, user, pass, n, extra);
    fprintf(stderr, "unknown mode %s\n", mode);
    return 2;
}
