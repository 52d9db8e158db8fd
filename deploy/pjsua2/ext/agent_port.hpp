/* personagate's AgentPort: an agent call's tap on the conference bridge, in C++, so that the bridge's clock thread
 * never enters Python (gateway/sip/media.py, PortMedia, is its Python side; docs/sip.md, "Capacity").
 *
 * With a Python media port every call cost 100 Python callbacks a second on the clock thread, each taking the
 * interpreter lock from the asyncio thread and back: with dozens of calls the lock's hand-offs, not the work,
 * bounded a gateway process. Here the clock thread only copies 20 ms frames in and out under a small mutex:
 *
 * - inbound: caller frames (16 kHz mono s16le, 640 bytes) into a bounded ring (the oldest dropped, counted);
 *   once `wakeFrames` frames wait, the port's id is posted to the ready list and an eventfd is written, which the
 *   asyncio loop watches (one wake-up a tick for all ports, not one per call);
 * - outbound: the consent announcement (once, its end posted as an event), else the ringback while no agent audio
 *   is queued, else the pacer: gateway/audio/pacing.py's OutboundPacer, the same rules (shallow, sheds the oldest,
 *   standing lag shed, filler repeated on underrun, flush) and counters;
 * - recording: with recording on, each tick's pair (the caller frame received since the last tick, or silence;
 *   the frame sent) is queued for the asyncio side to hand to the call's recorder (an event every 4 ticks).
 *
 * Ports are created, reset and destroyed on the pjsua thread (gateway/sip/ua.py lends them from a pool and
 * destroys them only after the bridge's clock has stopped); the methods for the asyncio side may be called from
 * any thread.
 */
#ifndef PERSONAGATE_AGENT_PORT_HPP
#define PERSONAGATE_AGENT_PORT_HPP

#include <Python.h>
#include <pjsua2.hpp>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <deque>
#include <mutex>
#include <string>
#include <vector>

/* What an agent port posts to the ready list, with its id (agentPortEvents). */
enum AgentPortEvent { AGENT_PORT_INBOUND = 1, AGENT_PORT_ANNOUNCED = 2, AGENT_PORT_RECORDED = 4 };

namespace personagate_agent {

/* A read-only view of a Python bytes-like object (bytes, bytearray, a C-contiguous numpy array). The caller holds
 * the interpreter lock: these methods are wrapped without releasing it (personagate.i, %nothread). */
struct Bytes {
    Py_buffer view;
    bool ok;
    explicit Bytes(PyObject *obj) : ok(PyObject_GetBuffer(obj, &view, PyBUF_C_CONTIGUOUS) == 0) {}
    ~Bytes() {
        if (ok) PyBuffer_Release(&view);
    }
    const unsigned char *data() const { return (const unsigned char *)view.buf; }
    size_t size() const { return ok ? (size_t)view.len : 0; }
};

static const unsigned CLOCK_RATE = 16000;
static const unsigned PACKET_SAMPLES = 320; /* 20 ms */
static const unsigned PACKET_BYTES = PACKET_SAMPLES * 2;

struct Registry {
    std::mutex lock;
    std::vector<int> ready; /* (id << 3) | events, in the order posted */
    int fd = -1;
    bool signalled = false;
    std::vector<int16_t> ringback; /* the ringback cycle, whole packets */
    int next_id = 1;
};

static Registry &registry() {
    static Registry r;
    return r;
}

static void post(int id, int events) {
    Registry &r = registry();
    std::lock_guard<std::mutex> guard(r.lock);
    r.ready.push_back((id << 3) | events);
    if (!r.signalled && r.fd >= 0) {
        uint64_t one = 1;
        ssize_t written = write(r.fd, &one, sizeof(one));
        (void)written; /* a full counter still wakes the reader */
        r.signalled = true;
    }
}

} /* namespace personagate_agent */

/* The eventfd the asyncio loop watches for ports' events (made on first use). */
inline int agentPortEventFd() {
    using namespace personagate_agent;
    Registry &r = registry();
    std::lock_guard<std::mutex> guard(r.lock);
    if (r.fd < 0) r.fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    return r.fd;
}

/* Events posted since the last call, each (port id << 3) | AgentPortEvent bits; clears the eventfd. */
inline std::vector<int> agentPortEvents() {
    using namespace personagate_agent;
    Registry &r = registry();
    std::vector<int> out;
    std::lock_guard<std::mutex> guard(r.lock);
    out.swap(r.ready);
    if (r.fd >= 0) {
        uint64_t value;
        ssize_t got = read(r.fd, &value, sizeof(value));
        (void)got;
    }
    r.signalled = false;
    return out;
}

/* The ringback every port plays while asked to (s16le at 16 kHz, a whole number of 20 ms packets). */
inline void agentPortSetRingback(PyObject *pcm_obj) {
    using namespace personagate_agent;
    Bytes pcm(pcm_obj);
    if (!pcm.ok) return;
    Registry &r = registry();
    std::lock_guard<std::mutex> guard(r.lock);
    r.ringback.assign((const int16_t *)pcm.data(), (const int16_t *)pcm.data() + pcm.size() / 2);
    r.ringback.resize(r.ringback.size() / PACKET_SAMPLES * PACKET_SAMPLES);
}

struct AgentPacerStats {
    unsigned depth, underruns, shed, played, flushed;
};

class AgentPort : public pj::AudioMediaPort {
  public:
    AgentPort() : id(personagate_agent::registry().next_id++) { reset(); }

    /* pjsua thread: register with the bridge (16 kHz mono, 20 ms). */
    void create(const std::string &name) {
        pj::MediaFormatAudio fmt;
        fmt.type = PJMEDIA_TYPE_AUDIO;
        fmt.clockRate = personagate_agent::CLOCK_RATE;
        fmt.channelCount = 1;
        fmt.bitsPerSample = 16;
        fmt.frameTimeUsec = 20000;
        createPort(name, fmt);
    }

    int getId() const { return id; }

    /* Back to a new call's state (pjsua thread, while the port is idle): buffers emptied, counters zeroed, every
     * setting back to its default. */
    void reset(unsigned inboundFrames = 25, unsigned cushionPackets = 1, unsigned framePackets = 4,
               unsigned windowPackets = 25) {
        std::lock_guard<std::mutex> guard(lock);
        inbound.clear();
        inbound_capacity = std::max(1u, inboundFrames);
        wake_frames = 4;
        wake_posted = false;
        received = dropped = 0;
        heard.assign(personagate_agent::PACKET_SAMPLES, 0);
        heard_fresh = false;
        cushion = cushionPackets;
        capacity = framePackets + cushionPackets;
        window = std::max(1u, windowPackets);
        ring.assign((size_t)capacity * personagate_agent::PACKET_SAMPLES, 0);
        filler.assign(capacity, false);
        last.assign(personagate_agent::PACKET_SAMPLES, 0);
        last_filler = started = false;
        head = count = 0;
        window_min = capacity;
        window_ticks = 0;
        underruns = shed = played = flushed = 0;
        ringing = false;
        ring_at = 0;
        announcement.clear();
        announce_at = 0;
        recording = false;
        recorded.clear();
        recorded_dropped = 0;
        record_posted = 0;
    }

    /* ------------------------------------------------------------------ the asyncio side (any thread) */

    /* Post an inbound event once `frames` caller frames wait (again after each takeInbound). */
    void setWakeFrames(unsigned frames) {
        std::lock_guard<std::mutex> guard(lock);
        wake_frames = std::max(1u, frames);
        if (inbound.size() >= wake_frames && !wake_posted) {
            wake_posted = true;
            personagate_agent::post(id, AGENT_PORT_INBOUND);
        }
    }

    /* The caller frames waiting, oldest first, as one s16le bytes object. */
    PyObject *takeInbound() {
        std::vector<int16_t> pcm;
        {
            std::lock_guard<std::mutex> guard(lock);
            pcm.reserve(inbound.size() * personagate_agent::PACKET_SAMPLES);
            for (auto &frame : inbound) pcm.insert(pcm.end(), frame.begin(), frame.end());
            inbound.clear();
            wake_posted = false;
        }
        return PyBytes_FromStringAndSize((const char *)pcm.data(), (Py_ssize_t)(pcm.size() * 2));
    }

    unsigned inboundWaiting() {
        std::lock_guard<std::mutex> guard(lock);
        return (unsigned)inbound.size();
    }

    unsigned long getReceived() {
        std::lock_guard<std::mutex> guard(lock);
        return received;
    }

    unsigned long getInboundDropped() {
        std::lock_guard<std::mutex> guard(lock);
        return dropped;
    }

    /* Queue one 20 ms packet of agent audio (s16le, 640 bytes); a full pacer drops its oldest packet. False if
     * the packet is not 640 bytes. */
    bool putPacket(PyObject *pcm_obj, bool isFiller) {
        personagate_agent::Bytes pcm(pcm_obj);
        if (pcm.size() != personagate_agent::PACKET_BYTES) return false;
        std::lock_guard<std::mutex> guard(lock);
        if (count == capacity) {
            head = (head + 1) % capacity;
            --count;
            ++shed;
        }
        unsigned slot = (head + count) % capacity;
        std::memcpy(&ring[(size_t)slot * personagate_agent::PACKET_SAMPLES], pcm.data(), pcm.size());
        filler[slot] = isFiller;
        ++count;
        return true;
    }

    /* Drop every queued packet at once (barge-in, hold); returns how many. */
    unsigned flush() {
        std::lock_guard<std::mutex> guard(lock);
        unsigned dropped_now = count;
        count = head = 0;
        flushed += dropped_now;
        started = last_filler = false;
        window_ticks = 0;
        window_min = capacity;
        return dropped_now;
    }

    AgentPacerStats pacerStats() {
        std::lock_guard<std::mutex> guard(lock);
        AgentPacerStats s = {count, underruns, shed, played, flushed};
        return s;
    }

    void setRingback(bool on) {
        std::lock_guard<std::mutex> guard(lock);
        ringing = on;
    }

    /* Play these 20 ms frames (s16le, 16 kHz) once, before anything else; an ANNOUNCED event follows the last. */
    void announce(PyObject *pcm_obj) {
        personagate_agent::Bytes pcm(pcm_obj);
        std::lock_guard<std::mutex> guard(lock);
        announcement.assign((const int16_t *)pcm.data(), (const int16_t *)pcm.data() + pcm.size() / 2);
        announcement.resize((announcement.size() + personagate_agent::PACKET_SAMPLES - 1) /
                            personagate_agent::PACKET_SAMPLES * personagate_agent::PACKET_SAMPLES, 0);
        announce_at = 0;
        if (announcement.empty()) personagate_agent::post(id, AGENT_PORT_ANNOUNCED);
    }

    void setRecording(bool on) {
        std::lock_guard<std::mutex> guard(lock);
        recording = on;
        recorded.clear();
        heard_fresh = false;
    }

    /* The ticks recorded since the last call: for each, the caller's frame then the frame sent (2 x 640 bytes). */
    PyObject *takeRecorded() {
        std::vector<int16_t> pcm;
        {
            std::lock_guard<std::mutex> guard(lock);
            pcm.swap(recorded);
            record_posted = 0;
        }
        return PyBytes_FromStringAndSize((const char *)pcm.data(), (Py_ssize_t)(pcm.size() * 2));
    }

    unsigned long getRecordedDropped() {
        std::lock_guard<std::mutex> guard(lock);
        return recorded_dropped;
    }

    /* What the bridge would play now (the clock thread's onFrameRequested, called directly: tests and diagnostics
     * of the pacer's rules without a bridge). */
    PyObject *nextFrame() {
        pj::MediaFrame frame;
        onFrameRequested(frame);
        return PyBytes_FromStringAndSize((const char *)frame.buf.data(), (Py_ssize_t)frame.buf.size());
    }

    /* Hand the port a caller frame as the bridge would (onFrameReceived, called directly: tests). */
    void receiveFrame(PyObject *pcm_obj) {
        personagate_agent::Bytes pcm(pcm_obj);
        pj::MediaFrame frame;
        frame.type = PJMEDIA_FRAME_TYPE_AUDIO;
        frame.buf.assign(pcm.data(), pcm.data() + pcm.size());
        frame.size = (unsigned)pcm.size();
        onFrameReceived(frame);
    }

    /* ------------------------------------------------------------------ the bridge's clock thread */

    virtual void onFrameReceived(pj::MediaFrame &frame) {
        if (frame.type != PJMEDIA_FRAME_TYPE_AUDIO || frame.buf.size() != personagate_agent::PACKET_BYTES) return;
        bool wake = false;
        {
            std::lock_guard<std::mutex> guard(lock);
            if (inbound.size() >= inbound_capacity) {
                inbound.pop_front();
                ++dropped;
            }
            const int16_t *samples = (const int16_t *)frame.buf.data();
            inbound.emplace_back(samples, samples + personagate_agent::PACKET_SAMPLES);
            ++received;
            if (recording) {
                std::memcpy(heard.data(), samples, personagate_agent::PACKET_BYTES);
                heard_fresh = true;
            }
            if (inbound.size() >= wake_frames && !wake_posted) wake = wake_posted = true;
        }
        if (wake) personagate_agent::post(id, AGENT_PORT_INBOUND);
    }

    virtual void onFrameRequested(pj::MediaFrame &frame) {
        using namespace personagate_agent;
        frame.type = PJMEDIA_FRAME_TYPE_AUDIO;
        frame.buf.resize(PACKET_BYTES);
        frame.size = PACKET_BYTES;
        int16_t *out = (int16_t *)frame.buf.data();
        int events = 0;
        {
            std::lock_guard<std::mutex> guard(lock);
            if (announce_at < announcement.size()) {
                std::memcpy(out, &announcement[announce_at], PACKET_BYTES);
                announce_at += PACKET_SAMPLES;
                if (announce_at >= announcement.size()) {
                    announcement.clear();
                    announce_at = 0;
                    events |= AGENT_PORT_ANNOUNCED;
                }
            } else if (ringing && count == 0 && ring_packet(out)) {
                /* ringback */
            } else {
                pacer_get(out);
            }
            if (recording) {
                if (recorded.size() >= MAX_RECORDED_TICKS * 2 * PACKET_SAMPLES) {
                    recorded.erase(recorded.begin(), recorded.begin() + 2 * PACKET_SAMPLES);
                    ++recorded_dropped;
                }
                if (heard_fresh)
                    recorded.insert(recorded.end(), heard.begin(), heard.end());
                else
                    recorded.insert(recorded.end(), PACKET_SAMPLES, 0);
                recorded.insert(recorded.end(), out, out + PACKET_SAMPLES);
                heard_fresh = false;
                if (++record_posted == RECORD_EVENT_TICKS) events |= AGENT_PORT_RECORDED;
            }
        }
        if (events) post(id, events);
    }

  private:
    static const unsigned MAX_RECORDED_TICKS = 250; /* 5 s the asyncio side has not taken: the oldest dropped */
    static const unsigned RECORD_EVENT_TICKS = 4;

    bool ring_packet(int16_t *out) {
        using namespace personagate_agent;
        Registry &r = registry();
        std::lock_guard<std::mutex> guard(r.lock);
        if (r.ringback.empty()) return false;
        size_t packets = r.ringback.size() / PACKET_SAMPLES;
        std::memcpy(out, &r.ringback[(ring_at % packets) * PACKET_SAMPLES], PACKET_BYTES);
        ++ring_at;
        return true;
    }

    /* OutboundPacer.get (lock held). */
    void pacer_get(int16_t *out) {
        using namespace personagate_agent;
        if (count) {
            const int16_t *packet = &ring[(size_t)head * PACKET_SAMPLES];
            std::memcpy(out, packet, PACKET_BYTES);
            std::memcpy(last.data(), packet, PACKET_BYTES);
            last_filler = filler[head];
            head = (head + 1) % capacity;
            --count;
            ++played;
            started = true;
        } else {
            if (started) ++underruns;
            if (last_filler)
                std::memcpy(out, last.data(), PACKET_BYTES);
            else
                std::memset(out, 0, PACKET_BYTES);
        }
        /* standing lag: the depth left after the tick's packet above the cushion for a whole window is shed */
        window_min = std::min(window_min, count);
        if (++window_ticks < window) return;
        if (window_min > cushion) {
            unsigned drop = std::min(window_min - cushion, count);
            head = (head + drop) % capacity;
            count -= drop;
            shed += drop;
        }
        window_ticks = 0;
        window_min = capacity;
    }

    const int id;
    std::mutex lock;
    /* inbound */
    std::deque<std::vector<int16_t>> inbound;
    unsigned inbound_capacity, wake_frames;
    bool wake_posted;
    unsigned long received, dropped;
    std::vector<int16_t> heard;
    bool heard_fresh;
    /* the pacer */
    unsigned cushion, capacity, window;
    std::vector<int16_t> ring;
    std::vector<bool> filler;
    std::vector<int16_t> last;
    bool last_filler, started;
    unsigned head, count, window_min, window_ticks;
    unsigned underruns, shed, played, flushed;
    /* ringback, announcement, recording */
    bool ringing;
    unsigned long ring_at;
    std::vector<int16_t> announcement;
    size_t announce_at;
    bool recording;
    std::vector<int16_t> recorded;
    unsigned long recorded_dropped;
    unsigned record_posted;
};

#endif
