/* personagate's SIP guard: a pjsip module in front of pjsua that answers malformed and unsupported requests as
 * RFC 3261 wants (400 naming the problem, 405, 416, 481, 489, 501, 505, 513) and counts every final response the
 * endpoint sends, pjsua's own included. Compiled into the pjsua2 Python module (ext/personagate.i); used by
 * gateway/sip/ua.py. See docs/sip.md, "The SIP guard".
 *
 * Everything here runs on the pjsua thread (the endpoint has no worker threads), except sipGuardCounts(), which a
 * metrics scrape calls from another thread: the counters are behind a mutex.
 */
#ifndef PERSONAGATE_SIP_GUARD_HPP
#define PERSONAGATE_SIP_GUARD_HPP

#include <pjsua-lib/pjsua.h>
#include <pjsip.h>
#include <pjsip_simple.h>
#include <pjsip_ua.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

struct SipGuardConfig {
    unsigned maxMessageBytes; /* a request larger than this is answered 513 (0: pjsip's buffer is the limit) */
    SipGuardConfig() : maxMessageBytes(16384) {}
};

namespace personagate_guard {

static const char *const ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, INFO, REFER, NOTIFY, PRACK";
/* Methods a response is counted under; any other is "other", so that hostile input cannot grow the labels. */
static const char *const KNOWN_METHODS[] = {"INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "PRACK",
                                            "SUBSCRIBE", "NOTIFY", "PUBLISH", "INFO", "REFER", "MESSAGE", "UPDATE"};

struct State {
    bool started = false;
    unsigned max_bytes = 16384;
    pjsip_module mod;
    std::mutex lock;
    std::map<std::pair<std::string, int>, unsigned long> responses; /* (method, status) -> final responses sent */
    std::map<std::string, unsigned long> dropped;                   /* why -> requests that could not be answered */
};

static State &state() {
    static State s;
    return s;
}

static std::string method_label(const pj_str_t &name) {
    for (const char *known : KNOWN_METHODS) {
        if ((pj_ssize_t)std::strlen(known) == name.slen && pj_ansi_strnicmp(known, name.ptr, name.slen) == 0)
            return known;
    }
    return "other";
}

static void count_response(const std::string &method, int status) {
    std::lock_guard<std::mutex> guard(state().lock);
    state().responses[std::make_pair(method, status)]++;
}

static void count_dropped(const char *why) {
    std::lock_guard<std::mutex> guard(state().lock);
    state().dropped[why]++;
}

/* ------------------------------------------------------------------ requests that parsed */

static bool has_to_tag(pjsip_rx_data *rdata) {
    return rdata->msg_info.to && rdata->msg_info.to->tag.slen > 0;
}

static void respond(pjsip_rx_data *rdata, int status, const char *reason, bool allow = false) {
    pj_str_t text = pj_str(const_cast<char *>(reason));
    pjsip_hdr headers;
    pj_list_init(&headers);
    pj_str_t allow_name = pj_str(const_cast<char *>("Allow"));
    pj_str_t allow_value = pj_str(const_cast<char *>(ALLOW));
    pjsip_generic_string_hdr allow_hdr;
    if (allow) {
        pjsip_generic_string_hdr_init2(&allow_hdr, &allow_name, &allow_value);
        pj_list_push_back(&headers, &allow_hdr);
    }
    pjsip_endpt_respond_stateless(pjsua_get_pjsip_endpt(), rdata, status, &text, &headers, NULL);
}

static bool is_method(pjsip_rx_data *rdata, const char *name) {
    const pj_str_t &m = rdata->msg_info.msg->line.req.method.name;
    return (pj_ssize_t)std::strlen(name) == m.slen && pj_ansi_strnicmp(name, m.ptr, m.slen) == 0;
}

static bool event_is_refer(pjsip_rx_data *rdata) {
    pj_str_t name = pj_str(const_cast<char *>("Event"));
    pj_str_t compact = pj_str(const_cast<char *>("o"));
    pjsip_generic_string_hdr *event = (pjsip_generic_string_hdr *)pjsip_msg_find_hdr_by_names(
        rdata->msg_info.msg, &name, &compact, NULL);
    return event && event->hvalue.slen >= 5 && pj_ansi_strnicmp(event->hvalue.ptr, "refer", 5) == 0;
}

/* The size of the body as received (after the blank line), for Content-Length's check over datagrams. */
static long received_body_bytes(pjsip_rx_data *rdata) {
    const char *buf = rdata->msg_info.msg_buf;
    int len = rdata->msg_info.len;
    for (int i = 0; i + 1 < len; ++i) {
        if (buf[i] == '\n' && buf[i + 1] == '\n') return len - (i + 2);
        if (i + 3 < len && buf[i] == '\r' && buf[i + 1] == '\n' && buf[i + 2] == '\r' && buf[i + 3] == '\n')
            return len - (i + 4);
    }
    return 0;
}

/* The name of a header that may appear once and appears more than once, or NULL. */
static const char *duplicated_header(pjsip_msg *msg) {
    static const struct {
        pjsip_hdr_e type;
        const char *name;
    } single[] = {{PJSIP_H_CALL_ID, "Call-ID"},       {PJSIP_H_FROM, "From"},
                  {PJSIP_H_TO, "To"},                 {PJSIP_H_CSEQ, "CSeq"},
                  {PJSIP_H_MAX_FORWARDS, "Max-Forwards"}, {PJSIP_H_CONTENT_LENGTH, "Content-Length"},
                  {PJSIP_H_CONTENT_TYPE, "Content-Type"}};
    for (auto &h : single) {
        pjsip_hdr *first = (pjsip_hdr *)pjsip_msg_find_hdr(msg, h.type, NULL);
        if (first && pjsip_msg_find_hdr(msg, h.type, first->next)) return h.name;
    }
    return NULL;
}

/* RFC 3261 8.2.2.3: a Require naming an extension the endpoint does not support is answered 420 Bad Extension,
 * with Unsupported listing them. True if so answered. */
static bool unsupported_required(pjsip_rx_data *rdata) {
    if (!rdata->msg_info.require) return false;
    const pjsip_generic_array_hdr *supported =
        (const pjsip_generic_array_hdr *)pjsip_endpt_get_capability(pjsua_get_pjsip_endpt(), PJSIP_H_SUPPORTED, NULL);
    pjsip_hdr headers;
    pj_list_init(&headers);
    pj_str_t name = pj_str(const_cast<char *>("Unsupported"));
    pjsip_generic_array_hdr *unsupported = pjsip_generic_array_hdr_create(rdata->tp_info.pool, &name);
    for (pjsip_require_hdr *require = rdata->msg_info.require; require;
         require = (pjsip_require_hdr *)pjsip_msg_find_hdr(rdata->msg_info.msg, PJSIP_H_REQUIRE, require->next)) {
        for (unsigned i = 0; i < require->count; ++i) {
            bool known = false;
            for (unsigned j = 0; supported && j < supported->count; ++j)
                known = known || pj_stricmp(&require->values[i], &supported->values[j]) == 0;
            if (!known && unsupported->count < PJ_ARRAY_SIZE(unsupported->values))
                unsupported->values[unsupported->count++] = require->values[i];
        }
    }
    if (unsupported->count == 0) return false;
    pj_list_push_back(&headers, unsupported);
    pj_str_t text = pj_str(const_cast<char *>("Bad Extension"));
    pjsip_endpt_respond_stateless(pjsua_get_pjsip_endpt(), rdata, 420, &text, &headers, NULL);
    return true;
}

static pj_bool_t on_rx_request(pjsip_rx_data *rdata) {
    pjsip_msg *msg = rdata->msg_info.msg;
    pjsip_method_e id = msg->line.req.method.id;
    if (id == PJSIP_ACK_METHOD) return PJ_FALSE; /* never answered */
    State &s = state();

    if (s.max_bytes && (unsigned)rdata->msg_info.len > s.max_bytes) {
        respond(rdata, 513, "Message Too Large");
        return PJ_TRUE;
    }
    pjsip_uri *uri = msg->line.req.uri;
    if (!PJSIP_URI_SCHEME_IS_SIP(uri) && !PJSIP_URI_SCHEME_IS_SIPS(uri) && !PJSIP_URI_SCHEME_IS_TEL(uri)) {
        respond(rdata, 416, "Unsupported URI Scheme");
        return PJ_TRUE;
    }
    if (pjsip_method_cmp(&rdata->msg_info.cseq->method, &msg->line.req.method) != 0) {
        respond(rdata, 400, "CSeq Method Does Not Match The Request");
        return PJ_TRUE;
    }
    if (const char *twice = duplicated_header(msg)) {
        /* RFC 4475 3.3.8/3.3.9: pjsip would take the first Call-ID with the last From, To and CSeq; over TCP two
         * Content-Lengths make the message's end ambiguous, so the stream cannot be trusted after it */
        respond(rdata, 400, (std::string("Duplicate ") + twice + " Header").c_str());
        if (std::strcmp(twice, "Content-Length") == 0 && !(rdata->tp_info.transport->flag & PJSIP_TRANSPORT_DATAGRAM))
            pjsip_transport_shutdown(rdata->tp_info.transport);
        return PJ_TRUE;
    }
    if (id != PJSIP_INVITE_METHOD && id != PJSIP_CANCEL_METHOD && unsupported_required(rdata)) {
        return PJ_TRUE; /* answered 420 (pjsip's INVITE session answers INVITEs itself) */
    }
    if ((rdata->tp_info.transport->flag & PJSIP_TRANSPORT_DATAGRAM) && rdata->msg_info.clen) {
        /* RFC 3261 18.3: over UDP, a body shorter than Content-Length is an error; bytes beyond it are discarded
         * (pjsip takes the rest of the datagram as the body whatever Content-Length says). */
        long declared = (long)rdata->msg_info.clen->len;
        if (declared < 0) { /* pjsip's parser keeps Content-Length in an int: past 2^31 it wraps negative */
            respond(rdata, 400, "Bad Content-Length Header");
            return PJ_TRUE;
        }
        if (declared > received_body_bytes(rdata)) {
            respond(rdata, 400, "Content-Length Larger Than The Body");
            return PJ_TRUE;
        }
        pjsip_msg_body *body = msg->body;
        if (body && body->print_body == &pjsip_print_text_body && (long)body->len > declared)
            body->len = (unsigned)declared;
    }

    bool known = id != PJSIP_OTHER_METHOD;
    const char *others[] = {"UPDATE", "INFO", "REFER", "NOTIFY", "PRACK", "SUBSCRIBE", "PUBLISH", "MESSAGE"};
    for (const char *name : others) known = known || is_method(rdata, name);
    if (!known) {
        respond(rdata, 501, "Not Implemented", true);
        return PJ_TRUE;
    }
    if (is_method(rdata, "MESSAGE") || id == PJSIP_REGISTER_METHOD) {
        respond(rdata, 405, "Method Not Allowed", true);
        return PJ_TRUE;
    }
    if (is_method(rdata, "PUBLISH") || (is_method(rdata, "SUBSCRIBE") && !(has_to_tag(rdata) && event_is_refer(rdata)))) {
        respond(rdata, 489, "Bad Event");
        return PJ_TRUE;
    }
    if (has_to_tag(rdata)) {
        if (id == PJSIP_OPTIONS_METHOD) { /* pjsua answers an in-dialog OPTIONS 500 */
            pjsip_dialog *dlg = pjsip_ua_find_dialog(&rdata->msg_info.cid->id, &rdata->msg_info.to->tag,
                                                     &rdata->msg_info.from->tag, PJ_FALSE);
            if (dlg)
                respond(rdata, 200, "OK", true);
            else
                respond(rdata, 481, "Call/Transaction Does Not Exist");
            return PJ_TRUE;
        }
        return PJ_FALSE; /* the dialog's own (pjsip answers 481 where there is none) */
    }
    if (id == PJSIP_INVITE_METHOD) {
        /* Replaces is not supported (trim_capabilities): an INVITE that requires it is answered 420 by pjsip; one
         * that only carries it is a new call, as RFC 3891 has a UA without the extension take it. */
        pj_str_t replaces = pj_str(const_cast<char *>("Replaces"));
        pjsip_hdr *hdr;
        while ((hdr = (pjsip_hdr *)pjsip_msg_find_hdr_by_name(msg, &replaces, NULL)) != NULL) pj_list_erase(hdr);
        return PJ_FALSE;
    }
    if (id == PJSIP_CANCEL_METHOD || id == PJSIP_OPTIONS_METHOD)
        return PJ_FALSE;
    if (is_method(rdata, "REFER")) {
        respond(rdata, 405, "Method Not Allowed", true); /* a transfer is only taken inside a call */
        return PJ_TRUE;
    }
    respond(rdata, 481, "Call/Transaction Does Not Exist"); /* BYE, INFO, UPDATE, PRACK, NOTIFY with no dialog */
    return PJ_TRUE;
}

static pj_bool_t on_tx_response(pjsip_tx_data *tdata) {
    pjsip_msg *msg = tdata->msg;
    if (!msg || msg->line.status.code < 200) return PJ_FALSE;
    if (tdata->mod_data[state().mod.id]) return PJ_FALSE; /* a retransmission: counted once */
    tdata->mod_data[state().mod.id] = (void *)1;
    pjsip_cseq_hdr *cseq = (pjsip_cseq_hdr *)pjsip_msg_find_hdr(msg, PJSIP_H_CSEQ, NULL);
    count_response(cseq ? method_label(cseq->method.name) : "other", msg->line.status.code);
    return PJ_FALSE;
}

/* ------------------------------------------------------------------ requests that did not parse */

struct RawLine {
    std::string name; /* lower-case, compact forms expanded */
    std::string text; /* the whole header as received, continuation lines joined */
};

static std::string lower(std::string text) {
    for (char &c : text) c = (char)std::tolower((unsigned char)c);
    return text;
}

static std::string trim(const std::string &text) {
    size_t a = text.find_first_not_of(" \t");
    size_t b = text.find_last_not_of(" \t");
    return a == std::string::npos ? std::string() : text.substr(a, b - a + 1);
}

static std::string expand(const std::string &name) {
    static const std::map<std::string, std::string> compact = {
        {"v", "via"}, {"f", "from"}, {"t", "to"}, {"i", "call-id"}, {"l", "content-length"}, {"m", "contact"},
        {"c", "content-type"}};
    auto it = compact.find(name);
    return it == compact.end() ? name : it->second;
}

/* Split a raw message into its start line and headers; false if there is no start line. */
static bool split(const char *data, size_t len, std::string &start, std::vector<RawLine> &headers) {
    std::string all(data, len);
    size_t pos = 0;
    bool first = true;
    while (pos < all.size()) {
        size_t end = all.find('\n', pos);
        if (end == std::string::npos) end = all.size();
        std::string line = all.substr(pos, end - pos);
        if (!line.empty() && line.back() == '\r') line.pop_back();
        pos = end + 1;
        if (first) {
            start = line;
            first = false;
            continue;
        }
        if (line.empty()) break; /* the body follows */
        if ((line[0] == ' ' || line[0] == '\t') && !headers.empty()) {
            headers.back().text += " " + trim(line);
            continue;
        }
        size_t colon = line.find(':');
        if (colon == std::string::npos) continue;
        headers.push_back({expand(lower(trim(line.substr(0, colon)))), line});
    }
    return !first && !start.empty();
}

static const RawLine *find(const std::vector<RawLine> &headers, const char *name) {
    for (const RawLine &h : headers)
        if (h.name == name) return &h;
    return NULL;
}

static bool digits_in_range(const std::string &text, unsigned long long max) {
    if (text.empty() || text.size() > 10) return false;
    for (char c : text)
        if (!std::isdigit((unsigned char)c)) return false;
    return std::stoull(text) <= max;
}

/* What is wrong with a request that pjsip could not parse: (status, reason). */
static std::pair<int, std::string> diagnose(const std::string &start, const std::vector<RawLine> &headers,
                                            pjsip_rx_data *rdata, pj_status_t why) {
    if (why == PJSIP_ERXOVERFLOW) return {513, "Message Too Large"};
    size_t sp1 = start.find(' '), sp2 = start.rfind(' ');
    std::string version = sp2 == std::string::npos ? "" : start.substr(sp2 + 1);
    if (lower(version).rfind("sip/", 0) == 0 && version != "SIP/2.0") return {505, "Version Not Supported"};
    std::string uri = sp1 != std::string::npos && sp2 > sp1 ? start.substr(sp1 + 1, sp2 - sp1 - 1) : "";
    if (!uri.empty() && (uri[0] == '<' || uri.find_first_of(" \t") != std::string::npos))
        return {400, "Bad Request-URI"}; /* RFC 4475 3.1.2.7, 3.1.2.8: <> or whitespace around or inside it */
    size_t colon = uri.find(':');
    std::string scheme = colon == std::string::npos ? "" : lower(uri.substr(0, colon));
    if (!scheme.empty() && scheme != "sip" && scheme != "sips" && scheme != "tel")
        return {416, "Unsupported URI Scheme"};
    const char *required[][2] = {{"call-id", "Call-ID"}, {"from", "From"}, {"to", "To"}, {"cseq", "CSeq"}};
    for (auto &r : required)
        if (!find(headers, r[0])) return {400, std::string("Missing ") + r[1] + " Header"};
    const RawLine *cseq = find(headers, "cseq");
    std::string value = trim(cseq->text.substr(cseq->text.find(':') + 1));
    if (!digits_in_range(value.substr(0, value.find_first_of(" \t")), 0x7FFFFFFFULL))
        return {400, "Bad CSeq Header"};
    const RawLine *clen = find(headers, "content-length");
    if (clen && !digits_in_range(trim(clen->text.substr(clen->text.find(':') + 1)), 0x7FFFFFFFULL))
        return {400, "Bad Content-Length Header"};
    if (rdata && !pj_list_empty(&rdata->msg_info.parse_err)) {
        pjsip_parser_err_report *err = rdata->msg_info.parse_err.next;
        if (err->hname.slen > 0 && err->hname.slen < 64)
            return {400, "Bad " + std::string(err->hname.ptr, err->hname.slen) + " Header"};
    }
    if (uri.empty() || version.empty()) return {400, "Bad Request Line"};
    return {400, "Malformed Request"};
}

static void on_dropped(pjsip_tp_dropped_data *dd) {
    if (dd->status == PJ_EIGNORED || !dd->rdata || dd->len == 0) return; /* keep-alive CRLFs */
    std::string start;
    std::vector<RawLine> headers;
    if (!split((const char *)dd->data, dd->len, start, headers) || start.rfind("SIP/", 0) == 0) {
        count_dropped(start.rfind("SIP/", 0) == 0 ? "bad_response" : "unreadable");
        return; /* a response is never answered */
    }
    if (lower(start).rfind("ack ", 0) == 0) {
        count_dropped("bad_ack");
        return;
    }
    std::vector<const RawLine *> vias;
    for (const RawLine &h : headers)
        if (h.name == "via") vias.push_back(&h);
    if (vias.empty()) {
        count_dropped("no_via"); /* nowhere a response could go */
        return;
    }
    std::pair<int, std::string> answer = diagnose(start, headers, dd->rdata, dd->status);
    std::string out = "SIP/2.0 " + std::to_string(answer.first) + " " + answer.second + "\r\n";
    for (const RawLine *via : vias) out += via->text + "\r\n";
    for (const char *name : {"from", "to", "call-id", "cseq"}) {
        const RawLine *h = find(headers, name);
        if (!h) continue;
        out += h->text;
        if (std::strcmp(name, "to") == 0 && lower(h->text).find(";tag=") == std::string::npos) {
            char tag[24];
            pj_ansi_snprintf(tag, sizeof(tag), ";tag=pg%08x", (unsigned)pj_rand());
            out += tag;
        }
        out += "\r\n";
    }
    if (answer.first == 405 || answer.first == 501) out += std::string("Allow: ") + ALLOW + "\r\n";
    out += "Content-Length: 0\r\n\r\n";

    pjsip_transport *tp = dd->rdata->tp_info.transport;
    pjsip_tpselector sel;
    pj_bzero(&sel, sizeof(sel));
    sel.type = PJSIP_TPSELECTOR_TRANSPORT;
    sel.u.transport = tp;
    pj_status_t status = pjsip_tpmgr_send_raw(pjsip_endpt_get_tpmgr(pjsua_get_pjsip_endpt()),
                                              (pjsip_transport_type_e)tp->key.type, &sel, NULL, out.data(),
                                              out.size(), &dd->rdata->pkt_info.src_addr,
                                              dd->rdata->pkt_info.src_addr_len, NULL, NULL);
    std::string method = start.substr(0, start.find(' '));
    pj_str_t name = {const_cast<char *>(method.data()), (pj_ssize_t)method.size()};
    if (status == PJ_SUCCESS || status == PJ_EPENDING)
        count_response(method_label(name), answer.first);
    else
        count_dropped("send_failed");
    if (answer.first == 513 && !(tp->flag & PJSIP_TRANSPORT_DATAGRAM))
        pjsip_transport_shutdown(tp); /* a stream that overflowed our buffer cannot be resynchronised */
}

/* Take out of the endpoint's advertised capabilities (Allow, Accept, Supported, Allow-Events: copied into the
 * headers pjsua sends) what a call gateway does not do: pjsua registers presence, instant messaging, their event
 * packages, SIPREC, trickle ICE and Replaces (which would let a third party who knows a dialog take its call). */
static void remove_values(pjsip_generic_array_hdr *hdr, const char *const *values, size_t count) {
    if (!hdr) return;
    unsigned kept = 0;
    for (unsigned i = 0; i < hdr->count; ++i) {
        bool drop = false;
        for (size_t j = 0; j < count; ++j) {
            pj_str_t value = pj_str(const_cast<char *>(values[j]));
            drop = drop || pj_stricmp(&hdr->values[i], &value) == 0;
        }
        if (!drop) hdr->values[kept++] = hdr->values[i];
    }
    hdr->count = kept;
}

static pjsip_generic_array_hdr *capability(pjsip_endpoint *endpt, int type) {
    return (pjsip_generic_array_hdr *)pjsip_endpt_get_capability(endpt, type, NULL);
}

static void trim_capabilities(pjsip_endpoint *endpt) {
    static const char *const methods[] = {"SUBSCRIBE", "MESSAGE", "PUBLISH"};
    static const char *const bodies[] = {"application/pidf+xml", "application/xpidf+xml", "text/plain",
                                         "application/im-iscomposing+xml", "application/simple-message-summary",
                                         "application/dialog-info+xml"};
    static const char *const extensions[] = {"replaces", "siprec", "trickle-ice"};
    static const char *const events[] = {"presence", "presence.winfo", "dialog", "message-summary"};
    remove_values(capability(endpt, PJSIP_H_ALLOW), methods, PJ_ARRAY_SIZE(methods));
    remove_values(capability(endpt, PJSIP_H_ACCEPT), bodies, PJ_ARRAY_SIZE(bodies));
    remove_values(capability(endpt, PJSIP_H_SUPPORTED), extensions, PJ_ARRAY_SIZE(extensions));
    remove_values((pjsip_generic_array_hdr *)pjsip_evsub_get_allow_events_hdr(NULL), events, PJ_ARRAY_SIZE(events));
}

} /* namespace personagate_guard */

/* Install the guard (pjsua thread, after libInit). Returns "" or what failed. */
inline std::string sipGuardStart(const SipGuardConfig &cfg) {
    using namespace personagate_guard;
    State &s = state();
    s.max_bytes = cfg.maxMessageBytes;
    if (s.started) return "";
    pjsip_endpoint *endpt = pjsua_get_pjsip_endpt();
    if (!endpt) return "no pjsip endpoint (call after libInit)";
    pj_bzero(&s.mod, sizeof(s.mod));
    s.mod.name = pj_str(const_cast<char *>("mod-personagate-guard"));
    s.mod.id = -1;
    s.mod.priority = PJSIP_MOD_PRIORITY_TSX_LAYER - 1; /* before transactions: refusals stay stateless */
    s.mod.on_rx_request = &on_rx_request;
    s.mod.on_tx_response = &on_tx_response;
    pj_status_t status = pjsip_endpt_register_module(endpt, &s.mod);
    if (status != PJ_SUCCESS) {
        char buf[PJ_ERR_MSG_SIZE];
        pj_strerror(status, buf, sizeof(buf));
        return std::string("registering the guard module: ") + buf;
    }
    pjsip_tpmgr_set_drop_data_cb(pjsip_endpt_get_tpmgr(endpt), &on_dropped);
    trim_capabilities(endpt);
    s.started = true;
    return "";
}

/* The counters: "response <METHOD> <status> <count>" and "dropped <why> <count>" (any thread). */
inline std::vector<std::string> sipGuardCounts() {
    using namespace personagate_guard;
    std::vector<std::string> out;
    std::lock_guard<std::mutex> guard(state().lock);
    for (auto &entry : state().responses)
        out.push_back("response " + entry.first.first + " " + std::to_string(entry.first.second) + " " +
                      std::to_string(entry.second));
    for (auto &entry : state().dropped)
        out.push_back("dropped " + entry.first + " " + std::to_string(entry.second));
    return out;
}

/* Forget the module (pjsua thread, before libDestroy): the endpoint that held it is going. */
inline void sipGuardStop() {
    using namespace personagate_guard;
    State &s = state();
    if (!s.started) return;
    pjsip_endpoint *endpt = pjsua_get_pjsip_endpt();
    if (endpt) {
        pjsip_tpmgr_set_drop_data_cb(pjsip_endpt_get_tpmgr(endpt), NULL);
        pjsip_endpt_unregister_module(endpt, &s.mod);
    }
    s.started = false;
}

#endif
