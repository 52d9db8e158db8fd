#!/usr/bin/env bash
# Builds pjsua2's Python module from pjproject's source with personagate's settings and patches, caches the
# result outside the clone, and installs it into a Python environment in place of any pjsua2 wheel.
#
#   deploy/pjsua2/build.sh --python .venv/bin/python   # build (or reuse the cached build) and install
#   deploy/pjsua2/build.sh --python PY --no-install    # build only; prints the cached folder
#
# Source, in this order (docs/sip.md, "pjsua2 from source"):
#   $PJPROJECT_ARCHIVE, else pjproject-$PJPROJECT_VERSION.tar.gz in this folder (an image build's context) or in
#   ../shared/vendor beside the clone: a release archive, checked against its SHA-256 below; otherwise a clone of
#   the upstream tag, checked against its commit.
# Cache: ${PERSONAGATE_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/personagate}/pjsua2/<key>, the key a hash of the
# source, this script, config_site.h, the patches and guard/, the Python ABI, the compiler and OpenSSL: a second
# clone or CI run on the same machine reuses the build (about 3 minutes on 2 cores otherwise).
# Build needs: a C/C++ toolchain, make, swig, the Python headers, OpenSSL's headers (Debian: build-essential swig
# python3-dev libssl-dev). Where one is missing and this runs as root with apt-get, they are installed.
set -euo pipefail

PJPROJECT_VERSION="${PJPROJECT_VERSION:-2.16}"
declare -A ARCHIVE_SHA256=(
    [2.16]=da6d93e1fc2b0d73e6991824fad9345eb3b15e9a53b04065896fb8ffff1a42c0
)
declare -A TAG_COMMIT=(
    [2.16]=6cab30cec44af36ba7c8a45ff7af2f74a8ed288c
)
UPSTREAM=https://github.com/pjsip/pjproject.git

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
python=python3
install=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --python) python="$2"; shift 2 ;;
        --no-install) install=0; shift ;;
        *) echo "usage: build.sh [--python PYTHON] [--no-install]" >&2; exit 2 ;;
    esac
done
# An absolute path that keeps a virtual environment's interpreter (no symlinks resolved): the build changes folders.
if [[ "$python" == */* ]]; then python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")"; else python="$(command -v "$python")"; fi
[[ -n "${ARCHIVE_SHA256[$PJPROJECT_VERSION]:-}" ]] || {
    echo "build.sh: pjproject $PJPROJECT_VERSION is not pinned here (known: ${!ARCHIVE_SHA256[*]})" >&2; exit 2; }

say() { echo "pjsua2: $*" >&2; }

ensure_build_deps() {
    local missing=()
    command -v swig >/dev/null || missing+=(swig)
    command -v make >/dev/null || missing+=(make)
    command -v g++ >/dev/null || missing+=(g++)
    [[ -f /usr/include/openssl/ssl.h ]] || missing+=(libssl-dev)
    "$python" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
        || missing+=(python3-dev)
    [[ ${#missing[@]} -eq 0 ]] && return
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        say "installing build dependencies: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        say "missing build dependencies: ${missing[*]} (Debian: apt-get install build-essential swig python3-dev libssl-dev)"
        exit 1
    fi
}

# The source: prints "archive PATH" or "git"; never trusts an unverified archive.
find_source() {
    local candidate="${PJPROJECT_ARCHIVE:-}" name="pjproject-$PJPROJECT_VERSION.tar.gz"
    if [[ -z "$candidate" ]]; then
        candidate="$repo/../shared/vendor/$name"
        [[ -f "$here/$name" ]] && candidate="$here/$name"
    fi
    if [[ -f "$candidate" ]]; then
        local sum
        sum="$(sha256sum "$candidate" | cut -d' ' -f1)"
        if [[ "$sum" != "${ARCHIVE_SHA256[$PJPROJECT_VERSION]}" ]]; then
            say "$candidate: SHA-256 $sum, expected ${ARCHIVE_SHA256[$PJPROJECT_VERSION]}; refusing it"
            exit 1
        fi
        echo "archive $(cd "$(dirname "$candidate")" && pwd)/$(basename "$candidate")"
    else
        echo git
    fi
}

abi="$("$python" -c 'import sys, sysconfig; print(sysconfig.get_config_var("SOABI") or sys.implementation.cache_tag)')"
compiler="$( (g++ --version 2>/dev/null || echo none) | head -n1)"
openssl="$(pkg-config --modversion openssl 2>/dev/null || openssl version 2>/dev/null || echo unknown)"
key="$( { echo "$PJPROJECT_VERSION ${ARCHIVE_SHA256[$PJPROJECT_VERSION]} ${TAG_COMMIT[$PJPROJECT_VERSION]}"
          echo "$abi"; echo "$compiler"; echo "$openssl"
          cat "$here/build.sh" "$here/config_site.h"
          find "$here/patches" "$here/ext" -type f 2>/dev/null | LC_ALL=C sort | xargs -r cat || true; } \
        | sha256sum | cut -c1-16)"
cache_root="${PERSONAGATE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/personagate}/pjsua2"
built="$cache_root/$PJPROJECT_VERSION-$abi-$key"
mkdir -p "$cache_root"

exec 9>"$cache_root/.lock"
flock 9  # one build at a time per cache: a second clone waits and then reuses it

if [[ -f "$built/BUILD_INFO" ]]; then
    say "using the cached build $built"
else
    ensure_build_deps
    work="$(mktemp -d "$cache_root/.build-XXXXXX")"
    trap 'rm -rf "$work"' EXIT
    source="$(find_source)"
    if [[ "$source" == git ]]; then
        say "no source archive (PJPROJECT_ARCHIVE, deploy/pjsua2/, ../shared/vendor): cloning $UPSTREAM tag $PJPROJECT_VERSION"
        git clone --quiet --depth 1 --branch "$PJPROJECT_VERSION" "$UPSTREAM" "$work/pjproject-$PJPROJECT_VERSION"
        commit="$(git -C "$work/pjproject-$PJPROJECT_VERSION" rev-parse HEAD)"
        if [[ "$commit" != "${TAG_COMMIT[$PJPROJECT_VERSION]}" ]]; then
            say "tag $PJPROJECT_VERSION is commit $commit upstream, expected ${TAG_COMMIT[$PJPROJECT_VERSION]}; refusing it"
            exit 1
        fi
    else
        say "building pjproject $PJPROJECT_VERSION from ${source#archive } (about 3 minutes on 2 cores)"
        tar -xzf "${source#archive }" -C "$work"
    fi
    src="$work/pjproject-$PJPROJECT_VERSION"
    for patch in "$here"/patches/*.patch; do
        [[ -e "$patch" ]] || continue
        patch --quiet --forward -p1 -d "$src" < "$patch"
    done
    cp "$here/config_site.h" "$src/pjlib/include/pj/config_site.h"
    # personagate's C++ additions to the Python module (ext/): the SWIG interface beside pjsua2.i, which includes
    # it, and the headers beside the generated wrapper, which compiles them.
    cp "$here"/ext/*.i "$src/pjsip-apps/src/swig/"
    cp "$here"/ext/*.hpp "$src/pjsip-apps/src/swig/python/"
    printf '\n%%include "personagate.i"\n' >> "$src/pjsip-apps/src/swig/pjsua2.i"
    jobs="$(getconf _NPROCESSORS_ONLN)"
    (
        cd "$src"
        CFLAGS="-fPIC -O2" CXXFLAGS="-fPIC -O2" ./configure --disable-shared --disable-sound --disable-video \
            --enable-epoll --disable-libwebrtc --disable-libyuv --disable-opencore-amr --disable-silk \
            --disable-bcg729 --disable-openh264 --disable-v4l2 --disable-ffmpeg --disable-sdl --disable-opus \
            --disable-speex-codec --disable-speex-aec --disable-ilbc-codec --disable-gsm-codec --disable-g7221-codec \
            --disable-l16-codec --disable-upnp --disable-android-mediacodec >"$work/configure.log" 2>&1 \
            || { tail -n 30 "$work/configure.log" >&2; exit 1; }
        grep -q '^#define PJ_HAS_SSL_SOCK 1' pjlib/include/pj/compat/os_auto.h \
            || { say "configure found no OpenSSL: TLS would be missing (install libssl-dev)"; exit 1; }
        make dep >"$work/make.log" 2>&1 && make -j"$jobs" lib >>"$work/make.log" 2>&1 \
            || { tail -n 40 "$work/make.log" >&2; exit 1; }
        cd pjsip-apps/src/swig/python
        make PYTHON_EXE="$python" >>"$work/make.log" 2>&1 || { tail -n 40 "$work/make.log" >&2; exit 1; }
    )
    out="$work/out"
    mkdir -p "$out"
    cp "$src"/pjsip-apps/src/swig/python/pjsua2.py "$src"/pjsip-apps/src/swig/python/build/lib.*/_pjsua2*.so "$out/"
    strip --strip-debug "$out"/_pjsua2*.so  # Python's -g: 36 MB of debug information otherwise
    { echo "pjproject $PJPROJECT_VERSION (${source})"; echo "python ABI $abi"; echo "compiler $compiler"
      echo "openssl $openssl"; echo "key $key"; } > "$out/BUILD_INFO"
    rm -rf "$built"
    mv "$out" "$built"
    say "built and cached: $built"
fi

touch "$built"  # most recently used: older builds beyond the three latest are removed
ls -1dt "$cache_root"/*/ 2>/dev/null | tail -n +4 | xargs -r rm -rf

if [[ $install -eq 1 ]]; then
    site="$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')"
    "$python" -m pip uninstall --yes --quiet pjsua2-python pjsua2 2>/dev/null || true
    rm -rf "$site"/pjsua2.py "$site"/_pjsua2*.so
    cp "$built"/pjsua2.py "$built"/_pjsua2*.so "$site"/
    cp "$built/BUILD_INFO" "$site/pjsua2.BUILD_INFO"
    (cd / && "$python" -c "import pjsua2; print(\"pjsua2: installed\", pjsua2.__file__)")
else
    echo "$built"
fi
