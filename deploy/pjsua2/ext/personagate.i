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
