#!/usr/bin/env bash
# The system programs the test suite starts, installed or asked for before it runs (`make test` runs this, and so
# does .ci/run): redis-server, sipp (Debian's sip-tester), promtool (Debian's prometheus), Debian's chromium (the
# browser tests drive /usr/bin/chromium through Playwright; nothing downloads a browser) and baresip with its
# srtp module (SIP over TLS with SRTP). tests/helpers/programs.py checks the same programs for each test.
#
#   tests/system-deps.sh            # as root with apt-get: installs what is missing; otherwise says what to
#                                   # install and fails
#   PERSONAGATE_TEST_ALLOW_SKIPS=1 tests/system-deps.sh   # warns instead of failing: those tests skip
#
# kubectl (kubectl kustomize renders deploy/k8s in tests/test_k8s*.py) is not a Debian package here: where it is
# missing this only warns and those tests skip, saying so.
set -euo pipefail

say() { echo "system-deps: $*" >&2; }

# Debian packages whose program is missing; one check per package.
missing=()
command -v redis-server >/dev/null 2>&1 || [[ -x /usr/bin/redis-server ]] || missing+=(redis-server)
command -v sipp >/dev/null 2>&1 || missing+=(sip-tester)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
[[ -x /usr/bin/chromium ]] || missing+=(chromium)
{ command -v baresip >/dev/null 2>&1 && [[ -f /usr/lib/baresip/modules/srtp.so ]]; } || missing+=(baresip)

if [[ ${#missing[@]} -gt 0 ]]; then
    install_command="sudo apt-get update && sudo apt-get install -y ${missing[*]}"
    if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        say "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
        # Only promtool is wanted. Containers usually forbid service starts (policy-rc.d), but where apt could
        # start the Prometheus server and its node exporter, stop them: nothing here should listen on 9090/9100.
        for service in prometheus prometheus-node-exporter; do
            if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$service" 2>/dev/null; then
                systemctl stop "$service"
            elif service "$service" status >/dev/null 2>&1; then
                service "$service" stop >/dev/null
            fi
        done
    elif [[ "${PERSONAGATE_TEST_ALLOW_SKIPS:-}" == 1 ]]; then
        say "warning: missing ${missing[*]}: the tests that need them will skip (install: $install_command)"
    else
        say "the tests need programs from these Debian packages: ${missing[*]}"
        say "install them:  $install_command"
        say "or run the tests without them (those tests skip):  PERSONAGATE_TEST_ALLOW_SKIPS=1 make test"
        exit 1
    fi
fi

if ! command -v kubectl >/dev/null 2>&1; then
    say "warning: kubectl is not installed: tests/test_k8s.py will skip rendering and checking deploy/k8s"
fi
