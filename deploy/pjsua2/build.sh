#!/usr/bin/env bash
# Builds pjsua2's Python module from pjproject's source with personagate's limits (config_site.h beside this
# script): hundreds of calls per gateway process instead of the pjsua2-python wheel's 4.
#
#   deploy/pjsua2/build.sh PJPROJECT_SOURCE_DIR            # build; prints the folder to put on PYTHONPATH
#   deploy/pjsua2/build.sh PJPROJECT_SOURCE_DIR --install  # and put it in this Python's site-packages,
#                                                          # in place of the pjsua2-python wheel
#
# PJPROJECT_SOURCE_DIR: a checkout of pjproject at tag 2.15.1 (the wheel's version; the gateway is tested on it).
# Needs a C/C++ toolchain, make, swig and the Python headers (Debian: build-essential swig python3-dev).
# About 12 minutes on 2 cores. The gateway runs on either build: pjsua clamps sip_max_calls to its limit.
set -euo pipefail

src="$(cd "${1:?usage: build.sh PJPROJECT_SOURCE_DIR [--install]}" && pwd)"
install="${2:-}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
jobs="$(getconf _NPROCESSORS_ONLN)"

cp "$here/config_site.h" "$src/pjlib/include/pj/config_site.h"
cd "$src"
CFLAGS="-fPIC -O2" CXXFLAGS="-fPIC -O2" ./configure --disable-shared --disable-sound --disable-video \
    --disable-libwebrtc --disable-libyuv --disable-opencore-amr --disable-silk --disable-bcg729 \
    --disable-openh264 --disable-v4l2 --disable-ffmpeg --disable-sdl --enable-epoll
make dep
make -j"$jobs" lib
cd pjsip-apps/src/swig/python
make PYTHON_EXE="$python"
built="$(cd build/lib.* && pwd)"
if [[ "$install" == "--install" ]]; then
    site="$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')"
    "$python" -m pip uninstall --yes --quiet pjsua2-python 2>/dev/null || true
    cp "$built"/pjsua2.py "$built"/_pjsua2*.so "$site"/
    (cd / && "$python" -c 'import pjsua2; print("pjsua2 installed:", pjsua2.__file__)')
else
    echo "built: PYTHONPATH=$built"
fi
