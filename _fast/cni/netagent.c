/* netagent: the CNI plugin executable, a thin client of agentd.
 *
 * A runtime runs it once per call with CNI_* variables and the plugin's configuration on
 * stdin. It answers VERSION itself; anything else goes, unread, to agentd as one JSON-RPC
 * line on its Unix socket (the configuration's "socket", default /run/netagent/agent.sock):
 *
 *   {"jsonrpc":"2.0","id":1,"method":"cni.exec","params":{"env":{...},"stdin":"BASE64"}}
 *
 * and agentd answers {"jsonrpc":"2.0","id":1,"result":{"exit":N,"out":JSON}}: it prints
 * JSON (nothing when null) and exits with N. All CNI logic lives in agentd
 * (agent/frontends/cni/). When agentd cannot be reached it prints the spec's error 50 for
 * STATUS and 11 (try again later) for anything else.
 *
 * agent/frontends/cni/plugin.py is its pure-Python twin: the same bytes out for the same
 * inputs (tests/e2e/test_cni_plugin.py runs both). Built at install by scripts/install.sh
 * (cc -O2 -o _fast/cni/netagent _fast/cni/netagent.c); agentctl cni install copies it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define DEFAULT_SOCKET "/run/netagent/agent.sock"
#define LATEST "1.1.0"
static const char *VERSIONS[] = {"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"};
static const char *ENV_NAMES[] = {"CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"};
static const char RESULT[] = "{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"exit\":";
static const char ERROR[] = "{\"id\":1,\"error\":"; /* jsonrpc, a default, is omitted */

struct buf {
    char *data;
    size_t len, cap;
};

static void put(struct buf *b, const char *s, size_t n) {
    if (b->len + n + 1 > b->cap) {
        b->cap = (b->len + n + 1) * 2;
        b->data = realloc(b->data, b->cap);
        if (!b->data) {
            perror("netagent");
            exit(2);
        }
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = 0;
}

static void puts_(struct buf *b, const char *s) { put(b, s, strlen(s)); }

/* s as a JSON string: what Python's json.dumps(s, ensure_ascii=False) writes */
static void put_json_string(struct buf *b, const char *s) {
    char esc[8];
    put(b, "\"", 1);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        const char *e = NULL;
        switch (c) {
        case '"': e = "\\\""; break;
        case '\\': e = "\\\\"; break;
        case '\n': e = "\\n"; break;
        case '\r': e = "\\r"; break;
        case '\t': e = "\\t"; break;
        case '\b': e = "\\b"; break;
        case '\f': e = "\\f"; break;
        }
        if (e) {
            puts_(b, e);
        } else if (c < 0x20) {
            snprintf(esc, sizeof esc, "\\u%04x", c);
            puts_(b, esc);
        } else {
            put(b, (const char *)&c, 1);
        }
    }
    put(b, "\"", 1);
}

static void put_base64(struct buf *b, const unsigned char *s, size_t n) {
    static const char A[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    char out[4];
    for (size_t i = 0; i < n; i += 3) {
        unsigned v = s[i] << 16 | (i + 1 < n ? s[i + 1] << 8 : 0) | (i + 2 < n ? s[i + 2] : 0);
        out[0] = A[v >> 18 & 63];
        out[1] = A[v >> 12 & 63];
        out[2] = i + 1 < n ? A[v >> 6 & 63] : '=';
        out[3] = i + 2 < n ? A[v & 63] : '=';
        put(b, out, 4);
    }
}

/* --- a minimal JSON scanner: enough to find two top-level strings of the configuration --- */

static const char *ws(const char *p) {
    while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') p++;
    return p;
}

/* end of the string token at p (p at its opening quote), or NULL */
static const char *string_end(const char *p) {
    for (p++; *p; p++) {
        if (*p == '\\') {
            if (!*++p) return NULL;
        } else if (*p == '"') {
            return p + 1;
        }
    }
    return NULL;
}

/* end of the value at p, or NULL */
static const char *value_end(const char *p) {
    if (*p == '"') return string_end(p);
    if (*p == '{' || *p == '[') {
        int depth = 0;
        for (; *p; p++) {
            if (*p == '"') {
                if (!(p = string_end(p))) return NULL;
                p--;
            } else if (*p == '{' || *p == '[') {
                depth++;
            } else if (*p == '}' || *p == ']') {
                if (--depth == 0) return p + 1;
            }
        }
        return NULL;
    }
    while (*p && !strchr(",}] \t\r\n", *p)) p++;
    return p;
}

/* the string token [start, end) decoded, if it has only simple escapes; else NULL */
static char *unescape(const char *start, const char *end) {
    char *out = malloc(end - start), *o = out;
    for (const char *p = start + 1; p < end - 1; p++) {
        if (*p == '\\') {
            p++;
            if (*p == 'n') *o++ = '\n';
            else if (*p == 't') *o++ = '\t';
            else if (*p == '"' || *p == '\\' || *p == '/') *o++ = *p;
            else { free(out); return NULL; }
        } else {
            *o++ = *p;
        }
    }
    *o = 0;
    return out;
}

/* the top-level string `key` of the JSON object in text, or NULL */
static char *top_string(const char *text, const char *key) {
    const char *p = ws(text);
    if (*p != '{') return NULL;
    p = ws(p + 1);
    while (*p == '"') {
        const char *k = p, *kend = string_end(p);
        if (!kend) return NULL;
        p = ws(kend);
        if (*p != ':') return NULL;
        p = ws(p + 1);
        const char *v = p, *vend = value_end(p);
        if (!vend) return NULL;
        if (*v == '"' && (size_t)(kend - k - 2) == strlen(key) && !strncmp(k + 1, key, kend - k - 2))
            return unescape(v, vend);
        p = ws(vend);
        if (*p != ',') return NULL;
        p = ws(p + 1);
    }
    return NULL;
}

/* --- output ------------------------------------------------------------------------------ */

static int fail(const char *version, int code, const char *msg, const char *details_json) {
    struct buf b = {0};
    puts_(&b, "{\"cniVersion\":");
    put_json_string(&b, version);
    char num[32];
    snprintf(num, sizeof num, ",\"code\":%d,\"msg\":", code);
    puts_(&b, num);
    put_json_string(&b, msg);
    if (details_json) {
        puts_(&b, ",\"details\":");
        puts_(&b, details_json);
    }
    puts_(&b, "}\n");
    fwrite(b.data, 1, b.len, stdout);
    return 1;
}

static int answer(const char *version, struct buf *reply) {
    char empty[1] = "";
    char *line = reply->data ? reply->data : empty;
    char *nl = memchr(line, '\n', reply->len);
    size_t n = nl ? (size_t)(nl - line) : reply->len;
    line[n] = 0;
    size_t r = sizeof RESULT - 1;
    if (n > r && !strncmp(line, RESULT, r)) {
        char *end;
        long status = strtol(line + r, &end, 10);
        const char *out = ",\"out\":";
        if (end != line + r && !strncmp(end, out, strlen(out)) && n >= 2 &&
            !strcmp(line + n - 2, "}}")) {
            char *value = end + strlen(out);
            line[n - 2] = 0;
            if (strcmp(value, "null")) printf("%s\n", value);
            return (int)status;
        }
    }
    if (!strncmp(line, ERROR, sizeof ERROR - 1)) {
        char *details = NULL;
        const char *m = strstr(line, "\"message\":");
        if (m) {
            const char *s = m + strlen("\"message\":"), *e = *s == '"' ? string_end(s) : NULL;
            if (e) details = strndup(s, e - s);
        }
        if (strstr(line, "\"kind\":\"busy\""))
            return fail(version, 11, "agentd is busy, try again later", details);
        return fail(version, 999, "agentd refused the request", details);
    }
    return fail(version, 11, "agentd closed the connection without an answer", NULL);
}

int main(void) {
    struct buf in = {0}, req = {0}, reply = {0};
    char chunk[65536];
    ssize_t n;
    while ((n = read(0, chunk, sizeof chunk)) > 0) put(&in, chunk, n);
    const char *text = in.data ? in.data : "";
    const char *command = getenv("CNI_COMMAND");
    char *version = top_string(text, "cniVersion");
    if (!version) version = LATEST;
    if (command && !strcmp(command, "VERSION")) {
        const char *v = LATEST;
        for (size_t i = 0; i < sizeof VERSIONS / sizeof *VERSIONS; i++)
            if (!strcmp(version, VERSIONS[i])) v = VERSIONS[i];
        printf("{\"cniVersion\":\"%s\",\"supportedVersions\":[\"0.3.0\",\"0.3.1\",\"0.4.0\","
               "\"1.0.0\",\"1.1.0\"]}\n", v);
        return 0;
    }
    char *path = top_string(text, "socket");
    if (!path || !*path) path = DEFAULT_SOCKET;

    puts_(&req, "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"cni.exec\",\"params\":{\"env\":{");
    int first = 1;
    for (size_t i = 0; i < sizeof ENV_NAMES / sizeof *ENV_NAMES; i++) {
        const char *value = getenv(ENV_NAMES[i]);
        if (!value) continue;
        if (!first) puts_(&req, ",");
        first = 0;
        put_json_string(&req, ENV_NAMES[i]);
        puts_(&req, ":");
        put_json_string(&req, value);
    }
    puts_(&req, "},\"stdin\":\"");
    put_base64(&req, (const unsigned char *)in.data, in.len);
    puts_(&req, "\"}}\n");

    int unreachable = command && !strcmp(command, "STATUS") ? 50 : 11;
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path) {
        struct buf msg = {0};
        puts_(&msg, "agentd is not reachable at ");
        puts_(&msg, path);
        return fail(version, unreachable, msg.data, "\"socket path too long\"");
    }
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        struct buf msg = {0}, details = {0};
        puts_(&msg, "agentd is not reachable at ");
        puts_(&msg, path);
        put_json_string(&details, strerror(errno));
        return fail(version, unreachable, msg.data, details.data);
    }
    for (size_t off = 0; off < req.len;) {
        ssize_t w = send(fd, req.data + off, req.len - off, MSG_NOSIGNAL); /* no SIGPIPE */
        if (w < 0) {
            if (errno == EINTR) continue;
            break;
        }
        off += w;
    }
    while ((n = read(fd, chunk, sizeof chunk)) != 0) {
        if (n < 0) {
            if (errno == EINTR) continue;
            break;
        }
        put(&reply, chunk, n);
        if (memchr(chunk, '\n', n)) break;
    }
    close(fd);
    return answer(version, &reply);
}
