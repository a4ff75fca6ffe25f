/*
 * zenload: the benchmark's load generator for the Zen protocol, in C.
 *
 * What it is for: loading a server hard enough that the server, not the
 * client, is the bottleneck, while checking every byte it gets back.  A
 * Python load generator would need more CPU than the server it measures.
 *
 * Loads (-m):
 *   pingpong  -c connections, one question in flight on each
 *   pipeline  -c connections, -D questions in flight on each (topped up as
 *             answers arrive, so the server reads bursts of questions)
 *   churn     -c connections at a time, each: connect, ask the book's three
 *             questions one after another, close, start again
 *   hold      open -c connections, ask one question on each; once all are
 *             answered print a "ready" line, keep them idle for -d seconds
 *             (the server's memory per idle connection is measured then),
 *             then ask once more on each to prove they are still served
 *
 * Every answer is compared byte for byte with the one the protocol demands
 * (docs/protocol.md).  Wrong bytes, bytes nobody asked for, an early end of
 * stream, socket errors, failed connects and answers slower than -T seconds
 * are counted by kind; the connection is then closed and opened again
 * (except in hold mode).
 *
 * Output: stdout carries JSON lines only: {"event": "ready", ...} (hold)
 * and a last {"event": "summary", ...} with requests/s, latency percentiles
 * and the error counts; a readable summary goes to stderr.  Exit status 0
 * when there was no error (and something was answered), 1 otherwise, 2 for
 * bad options.
 *
 * Bounds: the load stops by itself at warm-up + duration (hold: the ready
 * limit, then the hold time and one answer timeout); an alarm ends the
 * process 15 s after that whatever happens.  It connects only to the IPv4
 * address it is given (default 127.0.0.1).
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

/* ---- what is asked and what must come back ------------------------------- */

struct exchange {
    const char *question, *answer;
    size_t qlen, alen;
};

#define EXCHANGE(q, a) {q, a, sizeof q - 1, sizeof a - 1}
/* The book's three first (churn asks exactly these, in order), then one the
 * server does not know, so the unknown-aphorism path is loaded too. */
static const struct exchange ASKED[] = {
    EXCHANGE("Beautiful is better than?", "Ugly."),
    EXCHANGE("Explicit is better than?", "Implicit."),
    EXCHANGE("Simple is better than?", "Complex."),
    EXCHANGE("Implicit is better than?", "Error: unknown aphorism."),
};
#define BOOK_QUESTIONS 3
#define ALL_QUESTIONS 4

/* ---- options and the shared clock -------------------------------------- */

enum mode { PINGPONG, PIPELINE, CHURN, HOLD };
static const char *const MODE_NAMES[] = {"pingpong", "pipeline", "churn", "hold"};

enum fault { F_MISMATCH, F_EOF, F_IO, F_CONNECT, F_TIMEOUT, FAULT_KINDS };
static const char *const FAULT_NAMES[] = {"mismatch", "eof", "io", "connect", "timeout"};

static struct {
    const char *addr;
    int port;
    enum mode mode;
    int conns, depth, threads, known_only, verbose;
    double duration, warmup, timeout;
} opt = {"127.0.0.1", 1060, PINGPONG, 50, 16, 1, 0, 0, 5.0, -1.0, 5.0};

static struct sockaddr_in target;
static volatile sig_atomic_t interrupted;
static uint64_t t_measure;   /* answers count from here ... */
static uint64_t t_end;       /* ... to here (hold: moved when all are ready); atomic */
static int ready_total;      /* hold: connections answered once; atomic */
static int faults_told;      /* -v: error messages printed so far; atomic */

/* A failed connection is opened again after this pause, so a refusing
 * server costs a bounded number of connects per second. */
#define RETRY_NS 10000000ULL
/* Answer timeouts are checked this often. */
#define SWEEP_NS 100000000ULL
/* Hold mode opens at most this many connections at a time per thread: a
 * burst of 10,000 SYNs would overflow the server's accept queue. */
#define HOLD_OPENING 256
#define READ_CHUNK 65536
#define EVENTS_PER_WAIT 256

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static uint64_t seconds_ns(double s)
{
    return (uint64_t)(s * 1e9);
}

/* ---- latency histogram ------------------------------------------------------ */

/* Exact below 128 ns, then 64 buckets per power of two (about 1.6 % wide)
 * up to the largest 64-bit value: percentiles without keeping samples. */
#define SUB_BITS 6
#define SUB (1u << SUB_BITS)
#define EXACT (2u * SUB)
#define BUCKETS (EXACT + (64u - SUB_BITS - 1u) * SUB)

struct histogram {
    uint64_t count[BUCKETS];
    uint64_t total, max;
};

static unsigned bucket_of(uint64_t ns)
{
    if (ns < EXACT)
        return (unsigned)ns;
    unsigned octave = 63u - (unsigned)__builtin_clzll(ns);
    unsigned shift = octave - SUB_BITS;
    return EXACT + (octave - SUB_BITS - 1u) * SUB + (unsigned)((ns >> shift) - SUB);
}

static double bucket_middle_us(unsigned b)
{
    if (b < EXACT)
        return b / 1000.0;
    unsigned k = b - EXACT;
    unsigned shift = k / SUB + 1u;
    uint64_t low = (uint64_t)(k % SUB + SUB) << shift;
    return (double)(low + ((1ULL << shift) >> 1)) / 1000.0;
}

static void record(struct histogram *h, uint64_t ns)
{
    h->count[bucket_of(ns)]++;
    h->total++;
    if (ns > h->max)
        h->max = ns;
}

static double percentile_us(const struct histogram *h, double fraction)
{
    if (h->total == 0)
        return 0.0;
    uint64_t rank = (uint64_t)(fraction * (double)h->total);
    if ((double)rank < fraction * (double)h->total || rank == 0)
        rank++; /* nearest rank: the smallest value with at least this fraction at or below it */
    uint64_t seen = 0;
    for (unsigned b = 0; b < BUCKETS; b++) {
        seen += h->count[b];
        if (seen >= rank) { /* a bucket's middle may lie above the largest value seen */
            double mid = bucket_middle_us(b), max = (double)h->max / 1000.0;
            return mid < max ? mid : max;
        }
    }
    return (double)h->max / 1000.0;
}

/* ---- connections ----------------------------------------------------------------- */

enum state {
    CLOSED,     /* no socket (waiting to be opened, or done) */
    CONNECTING, /* connect() in progress */
    ASKING,     /* questions go out, answers are checked */
    HELD,       /* hold: answered once, now idle */
    CHECKED,    /* hold: answered again after the idle time */
};

struct client {
    int fd;
    enum state state;
    uint32_t events;
    unsigned cursor;          /* which question is next (cycles) */
    unsigned head, inflight;  /* ring of questions awaiting answers */
    size_t matched;           /* bytes of the head answer already verified */
    unsigned asked;           /* churn: questions asked on this connection */
    uint8_t *ring_q;          /* per slot: index into ASKED */
    uint64_t *ring_t;         /* per slot: when it was sent */
    char *out;                /* question bytes write() did not take yet */
    size_t out_len, out_off;
    uint64_t opened_at, reopen_at;
    int waiting;              /* on the lane's reopen list */
};

struct lane {
    int epfd, n;
    unsigned depth;
    struct client *clients;
    struct client **reopen; /* closed clients to open again, each once */
    struct client **due;    /* scratch: those whose time has come */
    int nreopen;
    int hold_next, hold_opening, checking, check_left;
    uint64_t completed, cycles, alive, faults[FAULT_KINDS], last_sweep;
    struct histogram latency;
    char in[READ_CHUNK];
    pthread_t thread;
};

static void tell(const char *what, const char *detail, size_t len)
{
    if (!opt.verbose || __atomic_fetch_add(&faults_told, 1, __ATOMIC_RELAXED) >= 20)
        return;
    fprintf(stderr, "zenload: %s%s%.*s\n", what, len ? ": " : "", (int)(len > 80 ? 80 : len), detail);
}

static void set_events(struct lane *ln, struct client *c, uint32_t events)
{
    if (c->events == events)
        return;
    struct epoll_event ev = {.events = events, .data.ptr = c};
    epoll_ctl(ln->epfd, EPOLL_CTL_MOD, c->fd, &ev);
    c->events = events;
}

static void shut(struct client *c)
{
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    c->state = CLOSED;
    c->head = c->inflight = c->asked = 0;
    c->matched = c->out_len = c->out_off = 0;
}

static void open_later(struct lane *ln, struct client *c, uint64_t at)
{
    c->reopen_at = at;
    if (!c->waiting) {
        c->waiting = 1;
        ln->reopen[ln->nreopen++] = c;
    }
}

static void fail(struct lane *ln, struct client *c, enum fault kind, const char *detail, size_t len)
{
    ln->faults[kind]++;
    tell(FAULT_NAMES[kind], detail, len);
    if (opt.mode == HOLD) {
        if (c->state == CONNECTING || (c->state == ASKING && !ln->checking))
            ln->hold_opening--;
        if (ln->checking && c->state == ASKING)
            ln->check_left--;
    }
    shut(c);
    if (opt.mode != HOLD)
        open_later(ln, c, now_ns() + RETRY_NS);
}

static void flush(struct lane *ln, struct client *c)
{
    while (c->out_off < c->out_len) {
        ssize_t w = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (w > 0) {
            c->out_off += (size_t)w;
        } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            set_events(ln, c, EPOLLIN | EPOLLOUT);
            return;
        } else if (!(w < 0 && errno == EINTR)) {
            fail(ln, c, F_IO, strerror(errno), strlen(strerror(errno)));
            return;
        }
    }
    c->out_len = c->out_off = 0;
    set_events(ln, c, EPOLLIN);
}

static unsigned next_question(struct client *c)
{
    if (opt.mode == CHURN)
        return c->asked;
    return c->cursor++ % (opt.known_only ? BOOK_QUESTIONS : ALL_QUESTIONS);
}

/* Queue `count` questions (one write for all of them) and note when they left. */
static void ask(struct lane *ln, struct client *c, unsigned count, uint64_t now)
{
    if (c->out_off > 0) { /* keep the unsent tail at the front: the buffer holds depth questions */
        memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
        c->out_len -= c->out_off;
        c->out_off = 0;
    }
    for (unsigned k = 0; k < count; k++) {
        unsigned q = next_question(c);
        unsigned slot = (c->head + c->inflight) % ln->depth;
        memcpy(c->out + c->out_len, ASKED[q].question, ASKED[q].qlen);
        c->out_len += ASKED[q].qlen;
        c->ring_q[slot] = (uint8_t)q;
        c->ring_t[slot] = now;
        c->inflight++;
        c->asked++;
    }
    flush(ln, c);
}

static void start(struct lane *ln, struct client *c, uint64_t now)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        ln->faults[F_CONNECT]++;
        tell("socket", strerror(errno), strlen(strerror(errno)));
        if (opt.mode != HOLD)
            open_later(ln, c, now + RETRY_NS);
        return;
    }
    int one = 1; /* a question must leave at once, not wait for the previous answer's ACK */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd;
    c->state = CONNECTING;
    c->opened_at = now;
    c->events = EPOLLOUT; /* connect's completion, even an immediate one, shows as writable */
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    if (opt.mode == HOLD)
        ln->hold_opening++;
    if (epoll_ctl(ln->epfd, EPOLL_CTL_ADD, fd, &ev) < 0 ||
        (connect(fd, (struct sockaddr *)&target, sizeof target) < 0 && errno != EINPROGRESS))
        fail(ln, c, F_CONNECT, strerror(errno), strlen(strerror(errno)));
}

static void connected(struct lane *ln, struct client *c, uint64_t now)
{
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err != 0) {
        fail(ln, c, F_CONNECT, strerror(err), strlen(strerror(err)));
        return;
    }
    c->state = ASKING;
    ask(ln, c, opt.mode == PIPELINE ? ln->depth : 1, now);
}

/* ---- answers ---------------------------------------------------------------------- */

/* What a load does after a connection's answers arrived: ask more, cycle, or hold. */
static void answered(struct lane *ln, struct client *c, unsigned count, uint64_t now, int in_window)
{
    if (opt.mode == PINGPONG || opt.mode == PIPELINE) {
        if (now < __atomic_load_n(&t_end, __ATOMIC_RELAXED))
            ask(ln, c, count, now);
    } else if (opt.mode == CHURN) {
        if (c->inflight > 0)
            return;
        if (c->asked < BOOK_QUESTIONS) {
            ask(ln, c, 1, now);
            return;
        }
        ln->cycles += (uint64_t)in_window;
        shut(c);
        open_later(ln, c, now);
    } else if (c->inflight == 0 && c->state == ASKING) {
        ln->hold_opening -= !ln->checking;
        if (ln->checking) {
            c->state = CHECKED;
            ln->alive++;
            ln->check_left--;
            return;
        }
        c->state = HELD;
        if (__atomic_add_fetch(&ready_total, 1, __ATOMIC_SEQ_CST) == opt.conns) {
            __atomic_store_n(&t_end, now + seconds_ns(opt.duration), __ATOMIC_SEQ_CST);
            printf("{\"event\":\"ready\",\"connections\":%d}\n", opt.conns);
            fflush(stdout);
        }
    }
}

/* Compare received bytes with the answers due, oldest first; 0, or -1 after a failure. */
static int verify(struct lane *ln, struct client *c, const char *data, size_t n, uint64_t now, unsigned *done)
{
    int in_window = now >= t_measure && now < __atomic_load_n(&t_end, __ATOMIC_RELAXED);
    size_t i = 0;
    while (i < n) {
        if (c->inflight == 0) {
            fail(ln, c, F_MISMATCH, data + i, n - i); /* bytes nobody asked for */
            return -1;
        }
        const struct exchange *x = &ASKED[c->ring_q[c->head]];
        size_t k = x->alen - c->matched;
        if (k > n - i)
            k = n - i;
        if (memcmp(data + i, x->answer + c->matched, k) != 0) {
            fail(ln, c, F_MISMATCH, data + i, n - i);
            return -1;
        }
        c->matched += k;
        i += k;
        if (c->matched < x->alen)
            break;
        if (in_window) {
            ln->completed++;
            record(&ln->latency, now - c->ring_t[c->head]);
        }
        c->matched = 0;
        c->head = (c->head + 1) % ln->depth;
        c->inflight--;
        (*done)++;
    }
    return in_window;
}

static void readable(struct lane *ln, struct client *c)
{
    ssize_t n = recv(c->fd, ln->in, READ_CHUNK, 0);
    if (n == 0) {
        fail(ln, c, F_EOF, "the server closed the connection", 32);
        return;
    }
    if (n < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            fail(ln, c, F_IO, strerror(errno), strlen(strerror(errno)));
        return;
    }
    uint64_t now = now_ns();
    unsigned done = 0;
    int in_window = verify(ln, c, ln->in, (size_t)n, now, &done);
    if (in_window >= 0 && done > 0)
        answered(ln, c, done, now, in_window);
}

static void on_event(struct lane *ln, struct client *c, uint32_t events)
{
    if (c->state == CLOSED)
        return; /* closed earlier in this batch of events */
    if (c->state == CONNECTING) {
        connected(ln, c, now_ns());
        return;
    }
    if ((events & EPOLLOUT) && c->out_off < c->out_len)
        flush(ln, c);
    if (c->state != CLOSED && (events & (EPOLLIN | EPOLLHUP | EPOLLERR)))
        readable(ln, c);
}

/* ---- one thread's loop -------------------------------------------------------------- */

static void sweep(struct lane *ln, uint64_t now)
{
    uint64_t limit = seconds_ns(opt.timeout);
    ln->last_sweep = now;
    for (int i = 0; i < ln->n; i++) {
        struct client *c = &ln->clients[i];
        if (c->state == CONNECTING && now - c->opened_at > limit)
            fail(ln, c, F_CONNECT, "connect timed out", 17);
        else if (c->inflight > 0 && now - c->ring_t[c->head] > limit)
            fail(ln, c, F_TIMEOUT, "no answer in time", 17);
    }
}

static void reopen_due(struct lane *ln, uint64_t now)
{
    int kept = 0, count = ln->nreopen;
    ln->nreopen = 0; /* start() may queue a client again after a failure */
    struct client **due = ln->due;
    int ndue = 0;
    for (int i = 0; i < count; i++) {
        struct client *c = ln->reopen[i];
        if (c->reopen_at <= now) {
            c->waiting = 0;
            due[ndue++] = c;
        } else {
            ln->reopen[kept++] = c;
        }
    }
    ln->nreopen = kept;
    for (int i = 0; i < ndue; i++)
        start(ln, due[i], now);
}

/* Hold: after the idle time, ask once more on every held connection. */
static void begin_check(struct lane *ln, uint64_t now)
{
    ln->checking = 1;
    for (int i = 0; i < ln->n; i++) {
        struct client *c = &ln->clients[i];
        if (c->state != HELD)
            continue;
        c->state = ASKING;
        ln->check_left++;
        ask(ln, c, 1, now);
    }
}

/* 1 while the lane has work to do now. */
static int keep_going(struct lane *ln, uint64_t now, uint64_t *deadline)
{
    uint64_t end = __atomic_load_n(&t_end, __ATOMIC_SEQ_CST);
    if (interrupted)
        return 0;
    if (opt.mode != HOLD || !ln->checking) {
        *deadline = end;
        if (now < end)
            return 1;
        if (opt.mode != HOLD || __atomic_load_n(&ready_total, __ATOMIC_SEQ_CST) < opt.conns)
            return 0;
        begin_check(ln, now);
        *deadline = now + seconds_ns(opt.timeout);
    }
    return ln->check_left > 0 && now < *deadline;
}

static int wait_ms(struct lane *ln, uint64_t now, uint64_t deadline)
{
    uint64_t until = deadline;
    if (ln->last_sweep + SWEEP_NS < until)
        until = ln->last_sweep + SWEEP_NS;
    for (int i = 0; i < ln->nreopen; i++)
        if (ln->reopen[i]->reopen_at < until)
            until = ln->reopen[i]->reopen_at;
    return until <= now ? 0 : (int)((until - now + 999999) / 1000000);
}

static void *run_lane(void *arg)
{
    struct lane *ln = arg;
    struct epoll_event events[EVENTS_PER_WAIT];
    uint64_t now = now_ns(), deadline = 0;
    ln->last_sweep = now;
    if (opt.mode != HOLD)
        for (int i = 0; i < ln->n; i++)
            start(ln, &ln->clients[i], now);
    while (keep_going(ln, now, &deadline)) {
        while (opt.mode == HOLD && !ln->checking && ln->hold_next < ln->n && ln->hold_opening < HOLD_OPENING)
            start(ln, &ln->clients[ln->hold_next++], now);
        int n = epoll_wait(ln->epfd, events, EVENTS_PER_WAIT, wait_ms(ln, now, deadline));
        for (int i = 0; i < n; i++)
            on_event(ln, events[i].data.ptr, events[i].events);
        now = now_ns();
        if (ln->nreopen && now < deadline)
            reopen_due(ln, now);
        if (now - ln->last_sweep >= SWEEP_NS)
            sweep(ln, now);
    }
    for (int i = 0; i < ln->n; i++)
        shut(&ln->clients[i]);
    return NULL;
}

/* ---- start-up and the summary ------------------------------------------------------ */

static void usage(void)
{
    fprintf(stderr,
            "usage: zenload [-a addr] [-p port] [-m pingpong|pipeline|churn|hold] [-c conns] [-D depth]\n"
            "               [-d seconds] [-w seconds] [-T seconds] [-t threads] [-k] [-v]\n"
            "  -a  server IPv4 address (default 127.0.0.1)     -p  port (default 1060)\n"
            "  -m  the load (default pingpong)                 -c  connections (default 50)\n"
            "  -D  pipeline: questions in flight per connection (default 16)\n"
            "  -d  measured seconds; hold: seconds held once all are ready (default 5)\n"
            "  -w  seconds of load before measuring (default 0); hold: limit to get ready (default 60)\n"
            "  -T  seconds an answer may take before it counts as an error (default 5)\n"
            "  -t  threads, the connections split among them (default 1)\n"
            "  -k  ask only the book's three questions (default: also an unknown one)\n"
            "  -v  describe the first errors on stderr\n");
    exit(2);
}

static void parse(int argc, char **argv)
{
    int o;
    while ((o = getopt(argc, argv, "a:p:m:c:D:d:w:T:t:kv")) != -1) {
        switch (o) {
        case 'a': opt.addr = optarg; break;
        case 'p': opt.port = atoi(optarg); break;
        case 'c': opt.conns = atoi(optarg); break;
        case 'D': opt.depth = atoi(optarg); break;
        case 'd': opt.duration = atof(optarg); break;
        case 'w': opt.warmup = atof(optarg); break;
        case 'T': opt.timeout = atof(optarg); break;
        case 't': opt.threads = atoi(optarg); break;
        case 'k': opt.known_only = 1; break;
        case 'v': opt.verbose = 1; break;
        case 'm':
            for (opt.mode = PINGPONG; opt.mode <= HOLD && strcmp(optarg, MODE_NAMES[opt.mode]); opt.mode++)
                ;
            if (opt.mode > HOLD)
                usage();
            break;
        default: usage();
        }
    }
    if (opt.warmup < 0)
        opt.warmup = opt.mode == HOLD ? 60.0 : 0.0;
    if (opt.mode != PIPELINE)
        opt.depth = 1;
    target.sin_family = AF_INET;
    target.sin_port = htons((uint16_t)opt.port);
    if (optind != argc || opt.port < 1 || opt.port > 65535 || opt.conns < 1 || opt.conns > 1000000 ||
        opt.depth < 1 || opt.depth > 4096 || !(opt.duration > 0 && opt.duration <= 3600) ||
        !(opt.warmup <= 3600) || !(opt.timeout > 0 && opt.timeout <= 60) || opt.threads < 1 ||
        opt.threads > 64 || inet_pton(AF_INET, opt.addr, &target.sin_addr) != 1)
        usage();
    if (opt.threads > opt.conns)
        opt.threads = opt.conns;
}

static struct lane *make_lanes(void)
{
    struct lane *lanes = calloc((size_t)opt.threads, sizeof *lanes);
    int first = 0;
    for (int t = 0; lanes && t < opt.threads; t++) {
        struct lane *ln = &lanes[t];
        ln->n = opt.conns / opt.threads + (t < opt.conns % opt.threads);
        ln->depth = (unsigned)opt.depth;
        ln->epfd = epoll_create1(EPOLL_CLOEXEC);
        ln->clients = calloc((size_t)ln->n, sizeof *ln->clients);
        ln->reopen = calloc((size_t)ln->n, sizeof *ln->reopen);
        ln->due = calloc((size_t)ln->n, sizeof *ln->due);
        if (ln->epfd < 0 || !ln->clients || !ln->reopen || !ln->due)
            return NULL;
        for (int i = 0; i < ln->n; i++) {
            struct client *c = &ln->clients[i];
            c->fd = -1;
            c->cursor = (unsigned)(first + i); /* neighbours start on different questions */
            c->ring_q = calloc(ln->depth, 1);
            c->ring_t = calloc(ln->depth, sizeof *c->ring_t);
            c->out = malloc(ln->depth * 32u);
            if (!c->ring_q || !c->ring_t || !c->out)
                return NULL;
        }
        first += ln->n;
    }
    return lanes;
}

static void report(struct lane *lanes, double cpu_s)
{
    static struct histogram all;
    uint64_t completed = 0, cycles = 0, alive = 0, faults[FAULT_KINDS] = {0}, errors = 0;
    for (int t = 0; t < opt.threads; t++) {
        completed += lanes[t].completed;
        cycles += lanes[t].cycles;
        alive += lanes[t].alive;
        for (int k = 0; k < FAULT_KINDS; k++)
            faults[k] += lanes[t].faults[k];
        for (unsigned b = 0; b < BUCKETS; b++)
            all.count[b] += lanes[t].latency.count[b];
        all.total += lanes[t].latency.total;
        if (lanes[t].latency.max > all.max)
            all.max = lanes[t].latency.max;
    }
    for (int k = 0; k < FAULT_KINDS; k++)
        errors += faults[k];
    int ready = __atomic_load_n(&ready_total, __ATOMIC_SEQ_CST);
    double p50 = percentile_us(&all, 0.50), p90 = percentile_us(&all, 0.90);
    double p99 = percentile_us(&all, 0.99), p999 = percentile_us(&all, 0.999);
    printf("{\"event\":\"summary\",\"mode\":\"%s\",\"connections\":%d,\"depth\":%d,\"threads\":%d,"
           "\"duration_s\":%.3f,\"completed\":%lu,\"rps\":%.1f,\"cycles\":%lu,\"cps\":%.1f,"
           "\"p50_us\":%.1f,\"p90_us\":%.1f,\"p99_us\":%.1f,\"p999_us\":%.1f,\"max_us\":%.1f,"
           "\"ready\":%d,\"alive\":%lu,\"errors\":%lu,\"error_kinds\":{",
           MODE_NAMES[opt.mode], opt.conns, opt.depth, opt.threads, opt.duration, (unsigned long)completed,
           (double)completed / opt.duration, (unsigned long)cycles, (double)cycles / opt.duration, p50, p90, p99,
           p999, (double)all.max / 1000.0, ready, (unsigned long)alive, (unsigned long)errors);
    for (int k = 0; k < FAULT_KINDS; k++)
        printf("%s\"%s\":%lu", k ? "," : "", FAULT_NAMES[k], (unsigned long)faults[k]);
    printf("},\"client_cpu_s\":%.3f}\n", cpu_s);
    fflush(stdout);
    fprintf(stderr, "zenload %s x%d: %lu answers (%.0f/s), p50 %.1f us, p99 %.1f us, %lu errors\n",
            MODE_NAMES[opt.mode], opt.conns, (unsigned long)completed, (double)completed / opt.duration, p50, p99,
            (unsigned long)errors);
    int ok = errors == 0 && (opt.mode == HOLD ? alive == (uint64_t)opt.conns : completed > 0);
    exit(ok ? 0 : 1);
}

static void on_signal(int sig)
{
    (void)sig;
    interrupted = 1;
}

/* File descriptors for every connection, signals that stop the load, the last-resort alarm. */
static void prepare_process(void)
{
    struct rlimit rl; /* hold keeps -c sockets open at once */
    rlim_t need = (rlim_t)opt.conns + 64;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < need) {
        rl.rlim_cur = need < rl.rlim_max ? need : rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    /* The last bound: whatever goes wrong, the process ends 15 s after its planned end. */
    alarm((unsigned)(opt.warmup + opt.duration + opt.timeout + 15.0));
}

int main(int argc, char **argv)
{
    parse(argc, argv);
    prepare_process();
    struct lane *lanes = make_lanes();
    if (!lanes) {
        perror("zenload: setup");
        return 1;
    }
    uint64_t begin = now_ns();
    t_measure = opt.mode == HOLD ? begin : begin + seconds_ns(opt.warmup);
    /* hold: the limit to get ready; all-ready moves it to the end of the hold */
    t_end = opt.mode == HOLD ? begin + seconds_ns(opt.warmup) : t_measure + seconds_ns(opt.duration);
    for (int t = 1; t < opt.threads; t++)
        if (pthread_create(&lanes[t].thread, NULL, run_lane, &lanes[t]) != 0) {
            perror("zenload: pthread_create");
            return 1;
        }
    run_lane(&lanes[0]);
    for (int t = 1; t < opt.threads; t++)
        pthread_join(lanes[t].thread, NULL);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
                 (double)ru.ru_stime.tv_usec / 1e6;
    if (opt.mode == HOLD && __atomic_load_n(&ready_total, __ATOMIC_SEQ_CST) < opt.conns) {
        printf("{\"event\":\"notready\",\"ready\":%d,\"connections\":%d}\n", ready_total, opt.conns);
        fflush(stdout);
    }
    report(lanes, cpu);
    return 0;
}
