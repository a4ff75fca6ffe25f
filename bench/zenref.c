/*
 * zenref: the reference server of this project's benchmark, in C.
 *
 * What it is for: the fastest honest implementation of the Zen protocol
 * (docs/protocol.md) that this machine can run, so that bench/run.py can
 * state our Python server's cost as a ratio to it.  It answers byte for
 * byte like `python -m app`: the same aphorism table, the same unknown and
 * too-long errors, whitespace skipped before a question, any split, any
 * pipelining, answers to every complete question before closing at end of
 * stream, and a lingering close after "request too long".
 *
 * What it leaves out, on purpose: the request and idle timeouts, the PROXY
 * header, logs and metrics.  None of them is exercised by the benchmark's
 * loads, and each would only add work the measurement is not about.
 *
 * Design: one epoll loop per thread (-t N), each thread with its own
 * SO_REUSEPORT listener, so the kernel spreads connections and no state is
 * shared between threads.  Level-triggered: one read() per readiness event
 * keeps each connection's turn short and fair.  A connection costs one small
 * struct while idle; buffers for a split question or for unsent answers are
 * allocated only while they hold bytes.
 *
 * Usage: zenref [-a 127.0.0.1] [-p 1060] [-t threads] [-q max_question] [-b backlog]
 * Prints "zenref listening on ADDR:PORT ..." on stdout once every listener
 * is bound (port 0 picks a free port, shown there).  SIGTERM ends it.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* ---- the protocol's bytes (app/core/zen.py) ---------------------------- */

struct aphorism {
    const char *question;
    const char *answer;
    size_t qlen, alen;
};

#define APH(q, a) {q, a, sizeof q - 1, sizeof a - 1}
static const struct aphorism TABLE[] = {
    APH("Beautiful is better than?", "Ugly."),
    APH("Explicit is better than?", "Implicit."),
    APH("Simple is better than?", "Complex."),
    APH("Complex is better than?", "Complicated."),
    APH("Flat is better than?", "Nested."),
    APH("Sparse is better than?", "Dense."),
    APH("Now is better than?", "Never."),
};
#define TABLE_SIZE (sizeof TABLE / sizeof TABLE[0])
static const char UNKNOWN[] = "Error: unknown aphorism.";
static const char TOO_LONG[] = "Error: request too long.";

/* ---- bounds -------------------------------------------------------------- */

/* One read() takes at most this much: a whole pipelined burst of a load
 * generator in one system call, and a bound on the answers one read makes. */
#define READ_CHUNK 65536
/* Answers are gathered here before one write(): a pipelined read is
 * answered with one system call, like the Python worker's joined answers. */
#define STAGE_SIZE 65536
/* Reading pauses while a connection has more unsent answer bytes than this
 * (PROTOCOL.md rule 7): a peer that never reads cannot grow our memory. */
#define UNSENT_LIMIT 65536
/* The lingering close after "too long" ends after this much quiet from the
 * peer, or this long in all, whichever comes first (the Python worker's
 * LINGER_QUIET and LINGER_MAX). */
#define LINGER_QUIET_MS 1000
#define LINGER_MAX_MS 5000
#define ACCEPT_BATCH 64
#define EVENTS_PER_WAIT 256

/* ---- state --------------------------------------------------------------- */

enum phase {
    OPEN,      /* reading and answering */
    PEER_DONE, /* the peer half-closed: send what is left, then close */
    LINGER,    /* "too long" queued: discard input, half-close, wait for EOF */
};

struct peer {
    int fd;
    enum phase phase;
    uint32_t events;      /* what epoll watches now */
    size_t held;          /* bytes of an unfinished question in `partial` */
    char *partial;        /* max_question bytes, only while held > 0 */
    char *unsent;         /* answers write() did not take yet */
    size_t unsent_len, unsent_off;
    int shut;             /* LINGER: our side already half-closed */
    uint64_t linger_start, last_input;
    struct peer *prev, *next; /* the thread's list of lingering peers */
};

struct loop {
    int epfd;
    int listen_fd;
    char stage[STAGE_SIZE];
    size_t staged;
    char in[READ_CHUNK];
    struct peer *lingering;
    pthread_t thread;
};

static size_t max_question = 1024; /* PROTOCOL.md rule 4, counting the '?' */
static int listener_tag;           /* epoll data of a listener: its address */

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* ---- answers -------------------------------------------------------------- */

static void lookup(const char *q, size_t len, const char **answer, size_t *alen)
{
    for (size_t i = 0; i < TABLE_SIZE; i++) {
        if (TABLE[i].qlen == len && memcmp(TABLE[i].question, q, len) == 0) {
            *answer = TABLE[i].answer;
            *alen = TABLE[i].alen;
            return;
        }
    }
    *answer = UNKNOWN;
    *alen = sizeof UNKNOWN - 1;
}

static void watch(struct loop *lp, struct peer *p)
{
    uint32_t want = 0;
    size_t pending = p->unsent_len - p->unsent_off;
    if (p->phase == LINGER || (p->phase == OPEN && pending <= UNSENT_LIMIT))
        want |= EPOLLIN;
    if (pending)
        want |= EPOLLOUT;
    if (want != p->events) {
        struct epoll_event ev = {.events = want, .data.ptr = p};
        epoll_ctl(lp->epfd, EPOLL_CTL_MOD, p->fd, &ev);
        p->events = want;
    }
}

/* Keep bytes write() refused; they go out on EPOLLOUT.  0, or -1: no memory. */
static int keep_unsent(struct peer *p, const char *data, size_t n)
{
    size_t live = p->unsent_len - p->unsent_off;
    char *grown = malloc(live + n);
    if (!grown)
        return -1;
    memcpy(grown, p->unsent + p->unsent_off, live);
    memcpy(grown + live, data, n);
    free(p->unsent);
    p->unsent = grown;
    p->unsent_len = live + n;
    p->unsent_off = 0;
    return 0;
}

/* Write what fits now; 0 when the rest is kept or all went, -1 on a dead socket. */
static int send_or_keep(struct peer *p, const char *data, size_t n)
{
    size_t done = 0;
    if (p->unsent_len == p->unsent_off) { /* nothing queued before it: try now */
        while (done < n) {
            ssize_t w = send(p->fd, data + done, n - done, MSG_NOSIGNAL);
            if (w > 0)
                done += (size_t)w;
            else if (w < 0 && errno == EINTR)
                continue;
            else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                break;
            else
                return -1;
        }
    }
    return done == n ? 0 : keep_unsent(p, data + done, n - done);
}

/* Send what the thread staged for this peer. */
static int flush_stage(struct loop *lp, struct peer *p)
{
    int rc = lp->staged ? send_or_keep(p, lp->stage, lp->staged) : 0;
    lp->staged = 0;
    return rc;
}

static int stage(struct loop *lp, struct peer *p, const char *bytes, size_t n)
{
    if (lp->staged + n > STAGE_SIZE && flush_stage(lp, p) < 0)
        return -1;
    memcpy(lp->stage + lp->staged, bytes, n);
    lp->staged += n;
    return 0;
}

static int answer(struct loop *lp, struct peer *p, const char *q, size_t len)
{
    const char *a;
    size_t alen;
    lookup(q, len, &a, &alen);
    return stage(lp, p, a, alen);
}

/* ---- framing (app/core/protocol.py's rules) ------------------------------ */

static int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

/*
 * Answer every complete question in data[0..n); keep an unfinished one.
 * Returns 1 when a question grew past max_question (the caller answers
 * "too long"), 0 otherwise, -1 when the connection must be dropped.
 */
static int frame(struct loop *lp, struct peer *p, const char *data, size_t n)
{
    size_t i = 0;
    while (i < n) {
        if (p->held == 0) {
            while (i < n && is_space(data[i]))
                i++; /* whitespace before a question is skipped, never inside */
            if (i == n)
                break;
        }
        /* The question may take max_question bytes in all, its '?' included. */
        size_t room = max_question - p->held;
        size_t span = n - i < room ? n - i : room;
        const char *mark = memchr(data + i, '?', span);
        if (!mark) {
            if (span == room)
                return 1;
            if (!p->partial && !(p->partial = malloc(max_question)))
                return -1;
            memcpy(p->partial + p->held, data + i, span);
            p->held += span;
            break;
        }
        size_t take = (size_t)(mark - (data + i)) + 1;
        int rc;
        if (p->held) { /* the end of a question split across reads */
            memcpy(p->partial + p->held, data + i, take);
            rc = answer(lp, p, p->partial, p->held + take);
            p->held = 0;
            free(p->partial);
            p->partial = NULL;
        } else {
            rc = answer(lp, p, data + i, take);
        }
        if (rc < 0)
            return -1;
        i += take;
    }
    return 0;
}

/* ---- connection lifetime --------------------------------------------------- */

static void unlink_linger(struct loop *lp, struct peer *p)
{
    if (p->prev)
        p->prev->next = p->next;
    else if (lp->lingering == p)
        lp->lingering = p->next;
    if (p->next)
        p->next->prev = p->prev;
    p->prev = p->next = NULL;
}

static void drop(struct loop *lp, struct peer *p)
{
    if (p->phase == LINGER)
        unlink_linger(lp, p);
    close(p->fd); /* also removes it from the epoll set */
    free(p->partial);
    free(p->unsent);
    free(p);
}

static void start_linger(struct loop *lp, struct peer *p)
{
    p->phase = LINGER;
    p->held = 0;
    free(p->partial);
    p->partial = NULL;
    p->linger_start = p->last_input = now_ms();
    p->next = lp->lingering;
    if (p->next)
        p->next->prev = p;
    lp->lingering = p;
}

/* After the output drained: close a finished peer, half-close a lingering one. */
static int settle(struct peer *p)
{
    if (p->unsent_len != p->unsent_off)
        return 0;
    free(p->unsent);
    p->unsent = NULL;
    p->unsent_len = p->unsent_off = 0;
    if (p->phase == PEER_DONE)
        return -1;
    if (p->phase == LINGER && !p->shut) {
        shutdown(p->fd, SHUT_WR); /* the answer and our FIN go out before any reset */
        p->shut = 1;
    }
    return 0;
}

static int on_writable(struct peer *p)
{
    while (p->unsent_off < p->unsent_len) {
        ssize_t w = send(p->fd, p->unsent + p->unsent_off, p->unsent_len - p->unsent_off, MSG_NOSIGNAL);
        if (w > 0)
            p->unsent_off += (size_t)w;
        else if (w < 0 && errno == EINTR)
            continue;
        else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return 0;
        else
            return -1;
    }
    return 0;
}

static int on_readable(struct loop *lp, struct peer *p)
{
    ssize_t n = recv(p->fd, lp->in, READ_CHUNK, 0);
    if (n < 0)
        return (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) ? 0 : -1;
    if (p->phase == LINGER) { /* discard the input; the peer's EOF ends the linger */
        p->last_input = now_ms();
        if (n == 0) {
            unlink_linger(lp, p);
            p->phase = PEER_DONE; /* closed by settle() once "too long" is out */
        }
        return 0;
    }
    if (n == 0) {
        p->phase = PEER_DONE; /* an unfinished question gets no answer */
        return 0;
    }
    int rc = frame(lp, p, lp->in, (size_t)n);
    if (rc < 0) {
        lp->staged = 0; /* the stage is the thread's: leave it empty for the next peer */
        return -1;
    }
    if (rc == 1) {
        rc = stage(lp, p, TOO_LONG, sizeof TOO_LONG - 1);
        start_linger(lp, p);
    }
    if (flush_stage(lp, p) < 0)
        return -1;
    return rc;
}

static void on_event(struct loop *lp, struct peer *p, uint32_t events)
{
    int rc = 0;
    if (events & (EPOLLOUT | EPOLLERR | EPOLLHUP))
        rc = on_writable(p);
    if (rc == 0 && (events & (EPOLLIN | EPOLLERR | EPOLLHUP)) && (p->events & EPOLLIN))
        rc = on_readable(lp, p);
    if (rc == 0)
        rc = settle(p);
    if (rc < 0) {
        drop(lp, p);
        return;
    }
    watch(lp, p);
}

static void on_listener(struct loop *lp)
{
    for (int i = 0; i < ACCEPT_BATCH; i++) {
        int fd = accept4(lp->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                perror("zenref: accept4"); /* EMFILE: the listener stays ready, we retry next turn */
            return;
        }
        int one = 1; /* answers are tiny and must leave at once, as the Python listener sets */
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct peer *p = calloc(1, sizeof *p);
        if (!p) {
            close(fd);
            continue;
        }
        p->fd = fd;
        p->events = EPOLLIN;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = p};
        if (epoll_ctl(lp->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
            close(fd);
            free(p);
        }
    }
}

/* End lingering closes that ran out of time; return ms until the next deadline, or -1. */
static int expire_lingering(struct loop *lp)
{
    uint64_t now = now_ms();
    int64_t next = -1;
    struct peer *p = lp->lingering;
    while (p) {
        struct peer *after = p->next;
        uint64_t quiet_end = p->last_input + LINGER_QUIET_MS;
        uint64_t hard_end = p->linger_start + LINGER_MAX_MS;
        uint64_t end = quiet_end < hard_end ? quiet_end : hard_end;
        if (now >= end)
            drop(lp, p);
        else if (next < 0 || (int64_t)(end - now) < next)
            next = (int64_t)(end - now);
        p = after;
    }
    return (int)next;
}

static void *serve(void *arg)
{
    struct loop *lp = arg;
    struct epoll_event events[EVENTS_PER_WAIT];
    for (;;) {
        int timeout = lp->lingering ? expire_lingering(lp) : -1;
        int n = epoll_wait(lp->epfd, events, EVENTS_PER_WAIT, timeout);
        if (n < 0 && errno != EINTR) {
            perror("zenref: epoll_wait");
            exit(1);
        }
        for (int i = 0; i < n; i++) {
            if (events[i].data.ptr == &listener_tag)
                on_listener(lp);
            else
                on_event(lp, events[i].data.ptr, events[i].events);
        }
    }
    return NULL;
}

/* ---- start-up ---------------------------------------------------------------- */

static int bind_listener(const struct sockaddr_in *addr, int backlog)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
        setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) < 0 ||
        bind(fd, (const struct sockaddr *)addr, sizeof *addr) < 0 || listen(fd, backlog) < 0) {
        perror("zenref: listener");
        exit(1);
    }
    return fd;
}

static struct loop *make_loop(int listen_fd)
{
    struct loop *lp = calloc(1, sizeof *lp);
    if (!lp || (lp->epfd = epoll_create1(EPOLL_CLOEXEC)) < 0) {
        perror("zenref: loop");
        exit(1);
    }
    lp->listen_fd = listen_fd;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &listener_tag};
    epoll_ctl(lp->epfd, EPOLL_CTL_ADD, listen_fd, &ev);
    return lp;
}

static void raise_fd_limit(void)
{
    struct rlimit rl; /* the hold measurement keeps 10,000 connections open */
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static void usage(void)
{
    fprintf(stderr, "usage: zenref [-a addr] [-p port] [-t threads] [-q max_question] [-b backlog]\n"
                    "  -a  IPv4 address to listen on (default 127.0.0.1)\n"
                    "  -p  port; 0 picks a free one (default 1060)\n"
                    "  -t  threads, each with its own SO_REUSEPORT listener (default 1)\n"
                    "  -q  longest question in bytes, '?' included (default 1024)\n"
                    "  -b  listen backlog (default 4096)\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *host = "127.0.0.1";
    long port = 1060, threads = 1, backlog = 4096, maxq = 1024;
    int opt;
    while ((opt = getopt(argc, argv, "a:p:t:q:b:")) != -1) {
        switch (opt) {
        case 'a': host = optarg; break;
        case 'p': port = strtol(optarg, NULL, 10); break;
        case 't': threads = strtol(optarg, NULL, 10); break;
        case 'q': maxq = strtol(optarg, NULL, 10); break;
        case 'b': backlog = strtol(optarg, NULL, 10); break;
        default: usage();
        }
    }
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (optind != argc || port < 0 || port > 65535 || threads < 1 || threads > 256 || maxq < 1 ||
        maxq > (1 << 24) || backlog < 1 || inet_pton(AF_INET, host, &addr.sin_addr) != 1)
        usage();
    max_question = (size_t)maxq;
    raise_fd_limit();
    signal(SIGPIPE, SIG_IGN);

    struct loop **loops = calloc((size_t)threads, sizeof *loops);
    if (!loops)
        return 1;
    loops[0] = make_loop(bind_listener(&addr, (int)backlog));
    socklen_t len = sizeof addr; /* port 0: the others bind the port the first one got */
    getsockname(loops[0]->listen_fd, (struct sockaddr *)&addr, &len);
    for (long i = 1; i < threads; i++)
        loops[i] = make_loop(bind_listener(&addr, (int)backlog));
    printf("zenref listening on %s:%u threads=%ld max_question=%ld\n", host, ntohs(addr.sin_port), threads, maxq);
    fflush(stdout);
    for (long i = 1; i < threads; i++)
        if (pthread_create(&loops[i]->thread, NULL, serve, loops[i]) != 0) {
            perror("zenref: pthread_create");
            return 1;
        }
    serve(loops[0]);
    return 0;
}
