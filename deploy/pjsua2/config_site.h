/* pjproject's compile-time settings for a personagate gateway (copied to pjlib/include/pj/config_site.h by
 * deploy/pjsua2/build.sh). The pjsua2-python wheel is built with pjproject's defaults: 4 calls per process, a
 * select() ioqueue of 64 sockets (on which a socket-slot shortage aborts the process) and 4000-byte SIP buffers.
 * A gateway faces carriers and the internet with hundreds of calls per process; see docs/sip.md.
 */
#ifndef __PJ_CONFIG_SITE_H__
#define __PJ_CONFIG_SITE_H__

/* A library precondition that fails on hostile input must not abort a process carrying hundreds of calls:
 * assertions are compiled out, and PJ_ENABLE_EXTRA_CHECK keeps every PJ_ASSERT_RETURN as an error return
 * (Asterisk builds its bundled pjproject the same way). */
#ifndef NDEBUG
#define NDEBUG 1
#endif
#define PJ_ENABLE_EXTRA_CHECK 1

#define PJMEDIA_HAS_VIDEO 0
#define PJSUA_HAS_VIDEO 0
#define PJMEDIA_HAS_SOUND 0
#define PJMEDIA_HAS_SRTP 1
/* The conference bridge's rate conversions (a call's 8 kHz codec <-> the 16 kHz bridge) by a polyphase FIR
 * (patches/0007): libresample's large filter took three quarters of the bridge's clock thread with dozens of
 * calls. Same design as gateway/audio's resampler: 100 dB stopband, passband flat to 85 % of 4 kHz. */
#define PJMEDIA_RESAMPLE_IMP PJMEDIA_RESAMPLE_POLYPHASE

#define PJSUA_MAX_CALLS 512
/* Calls are audio only: no real-time text stream (2.16 offers T.140 by default; patches/0003), so no text sockets
 * per call, and a media update does not stop a text stream, which blocks the pjsua thread for ~300 ms. */
#define PJSUA_DEFAULT_TXT_CNT 0
/* epoll (configure --enable-epoll): free of select()'s 1024-descriptor ceiling. Each call has an RTP and an
 * RTCP socket, each TCP/TLS connection one more. */
#define PJ_IOQUEUE_MAX_HANDLES 8192
#define PJ_IOQUEUE_HAS_SAFE_UNREG 1
/* Each call's stream port and its media port sit on the conference bridge, with room for bridged human legs. */
#define PJSUA_MAX_CONF_PORTS (3 * PJSUA_MAX_CALLS + 32)
#define PJSIP_MAX_TSX_COUNT ((64 * 1024) - 1)
#define PJSIP_MAX_DIALOG_COUNT ((64 * 1024) - 1)

/* SIP message buffers: a datagram or a TCP message up to 64 KB is read whole, so that an oversized request is
 * answered 513 by the gateway's own limit (sip_max_message_bytes) instead of being cut at 4000 bytes and parsed
 * as something it is not; a response to a large request (many Via headers) still fits. */
#define PJSIP_MAX_PKT_LEN 65535
#define PJSIP_UDP_SO_RCVBUF_SIZE (1024 * 1024)
#define PJSIP_UDP_SO_SNDBUF_SIZE (1024 * 1024)

/* A burst of TCP or TLS connections (a trunk's reconnecting pool, a scanner) waits in the kernel's queue instead of
 * each sixth SYN being dropped and resent a second later. */
#define PJSIP_TCP_TRANSPORT_BACKLOG 128
#define PJSIP_TLS_TRANSPORT_BACKLOG 128

/* Keep-alives on TCP/TLS are the peer's business (carriers send their own CRLF pings). */
#define PJSIP_TCP_KEEP_ALIVE_INTERVAL 0
#define PJSIP_TLS_KEEP_ALIVE_INTERVAL 0

#endif
