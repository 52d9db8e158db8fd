/* pjproject's compile-time limits for a personagate gateway (copied to pjlib/include/pj/config_site.h).
 *
 * The pjsua2-python wheel is built with pjproject's defaults: 4 calls per process (PJSUA_MAX_CALLS) and a
 * select() ioqueue of 64 sockets (PJ_IOQUEUE_MAX_HANDLES), on which a socket-slot shortage aborts the
 * process. A gateway process carries hundreds of calls, each with an RTP and an RTCP socket, so this build
 * raises both, with epoll (configure --enable-epoll) to be free of select()'s 1024-descriptor ceiling.
 */
#ifndef __PJ_CONFIG_SITE_H__
#define __PJ_CONFIG_SITE_H__

#define PJMEDIA_HAS_VIDEO 0
#define PJSUA_HAS_VIDEO 0
#define PJMEDIA_HAS_SOUND 0

#define PJSUA_MAX_CALLS 512
#define PJ_IOQUEUE_MAX_HANDLES 4096
/* Each call's stream port and our media port sit on the conference bridge. */
#define PJSUA_MAX_CONF_PORTS (2 * PJSUA_MAX_CALLS + 32)

#endif
