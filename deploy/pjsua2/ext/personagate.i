// personagate's additions to the pjsua2 Python module (appended to pjsua2.i by deploy/pjsua2/build.sh): the SIP
// guard (sip_guard.hpp).
%{
#include "sip_guard.hpp"
%}

struct SipGuardConfig {
    unsigned maxMessageBytes;
    SipGuardConfig();
};

std::string sipGuardStart(const SipGuardConfig &cfg);
std::vector<std::string> sipGuardCounts();
void sipGuardStop();

// The agent calls' media port (agent_port.hpp): called from Python with the interpreter lock held throughout
// (each call is microseconds, and those that read or make Python objects need the lock).
%{
#include "agent_port.hpp"
%}

%nothread;
enum AgentPortEvent { AGENT_PORT_INBOUND = 1, AGENT_PORT_ANNOUNCED = 2, AGENT_PORT_RECORDED = 4 };
int agentPortEventFd();
std::vector<int> agentPortEvents();
void agentPortSetRingback(PyObject *pcm);

struct AgentPacerStats {
    unsigned depth, underruns, shed, played, flushed;
};

%feature("nodirector") AgentPort;
class AgentPort : public pj::AudioMediaPort {
  public:
    AgentPort();
    void create(const std::string &name);
    int getId() const;
    void reset(unsigned inboundFrames = 25, unsigned cushionPackets = 1, unsigned framePackets = 4,
               unsigned windowPackets = 25);
    void setWakeFrames(unsigned frames);
    PyObject *takeInbound();
    unsigned inboundWaiting();
    unsigned long getReceived();
    unsigned long getInboundDropped();
    bool putPacket(PyObject *pcm, bool isFiller);
    unsigned flush();
    AgentPacerStats pacerStats();
    void setRingback(bool on);
    void announce(PyObject *pcm);
    void setRecording(bool on);
    PyObject *takeRecorded();
    unsigned long getRecordedDropped();
    PyObject *nextFrame();
    void receiveFrame(PyObject *pcm);
};
%thread;
